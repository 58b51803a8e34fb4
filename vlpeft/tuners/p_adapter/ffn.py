"""p-adapter on FFN blocks: :class:`PAdapterFFN` adds a parallel ReLU bottleneck adapter of the FFN input
(p-adapter.md §2.4 G)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vlpeft.functional.precision import autocast_disabled
from vlpeft.glue.attention import hook_module_outputs
from vlpeft.tuners.p_adapter.config import PAdapterConfig
from vlpeft.tuners.p_adapter.layer import (
    AdapterSettings,
    PAdapterLayer,
    _first_param_device,
    _getattr_with_fallback,
    _linear,
)
from vlpeft.tuners.p_adapter.variants import _projection_weights


class PAdapterFFN(nn.Module, PAdapterLayer):
    """An FFN block with parallel ReLU bottleneck adapters of its input (p-adapter.md §2.4 G).

    Two layouts: BERT-style ``output(hidden, input_tensor) = LayerNorm(dropout(dense(hidden)) + input_tensor)``
    (the adapter of ``input_tensor`` is added before the LayerNorm), and MLP blocks ``mlp(x)`` (the adapter of
    ``x`` is added to the block output; the caller adds the residual).
    """

    __getattr__ = _getattr_with_fallback

    def __init__(self, base_layer: nn.Module, module_name: str) -> None:
        super().__init__()
        self._init_padapter_containers(base_layer)
        self.module_name = module_name
        if all(isinstance(getattr(base_layer, n, None), nn.Module) for n in ("dense", "dropout", "LayerNorm")):
            self.style = "bert_output"
            self.hidden_size = int(_projection_weights(base_layer.dense)[0].shape[0])
        else:
            linears = [m for m in base_layer.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
            if not linears:
                raise ValueError(f"{module_name} ({type(base_layer).__name__}) is not an FFN block: it has no Linear.")
            self.style = "mlp"
            self.hidden_size = int(_projection_weights(linears[0])[0].shape[1])

    def update_layer(self, adapter_name: str, config: PAdapterConfig) -> None:
        width = config.bottleneck_size or max(1, self.hidden_size // config.reduction_factor)
        device = _first_param_device(self.base_layer)
        self.padapter_down[adapter_name] = _linear(self.hidden_size, width, config.init_std, False, device)
        self.padapter_up[adapter_name] = _linear(
            width, self.hidden_size, config.init_std, config.init_weights == "zero_up", device
        )
        self.padapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.padapter_settings[adapter_name] = AdapterSettings(
            variant=config.variant,
            graph="ffn",
            p_value=0.0,
            learnable_p=False,
            p_bounds=None,
            mu0=float(config.mu0),
            learnable_mu=False,
            key_pool_size=None,
            self_loop=config.self_loop,
            causal_degrees=False,
            chunk_size=None,
        )
        self.set_adapter(self.active_adapters)

    def _adapter_sum(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
        total = None
        for name in names:
            down, up = self.padapter_down[name], self.padapter_up[name]
            h = self.padapter_dropout[name](x.to(down.weight.dtype))
            branch = up(F.relu(down(h)))
            total = branch if total is None else total + branch
        return total

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self._active_names()
        if self.disable_adapters or not names:
            return self.base_layer(*args, **kwargs)
        if self.style == "bert_output":
            if len(args) >= 2:
                input_tensor = args[1]
            elif "input_tensor" in kwargs:
                input_tensor = kwargs["input_tensor"]
            else:
                raise TypeError(f"{self.module_name}: expected (hidden_states, input_tensor) arguments.")
            with autocast_disabled(input_tensor.device.type):
                branch = self._adapter_sum(names, input_tensor)

            def add(output: torch.Tensor) -> torch.Tensor:
                return output + branch.to(output.dtype)

            with hook_module_outputs(replace={self.base_layer.dropout: add}):
                return self.base_layer(*args, **kwargs)
        x = args[0] if args else kwargs["hidden_states"] if "hidden_states" in kwargs else next(iter(kwargs.values()))
        output = self.base_layer(*args, **kwargs)
        with autocast_disabled(x.device.type):
            branch = self._adapter_sum(names, x)
        return output + branch.to(output.dtype)

    def __repr__(self) -> str:
        return "padapter." + super().__repr__()
