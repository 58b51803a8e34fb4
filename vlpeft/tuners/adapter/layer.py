"""Bottleneck adapter layers (routing.md §4).

One adapter maps y (batch, n, d) to z = up(phi(R(down(y), down(x_R)))) (batch, n, d), with down: d -> s and
up: s -> d (both with bias) and R the optional routing function applied before the nonlinearity phi; the
down-projection, including its bias, is shared by text and vision.

- :class:`SequentialAdapter` wraps a projection (``nn.Linear`` / GPT-2 ``Conv1D``) whose output y is a sublayer
  output before residual/LayerNorm; it returns ``y + z`` (``residual=False``: ``z``).
- :class:`ParallelAdapter` wraps an FFN block and adds the adapter of the block's input to its output
  (``"mlp"`` blocks, ``forward(x)``), or, for BERT-style ``output(h, input_tensor)`` blocks, to the residual
  input so that the block computes LayerNorm(dense(h) + input_tensor + z).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from vlpeft.functional import project_visual, route
from vlpeft.glue.visual_features import VisualFeatureContext
from vlpeft.tuners.adapter.config import AdapterConfig

BLOCK_CALL_STYLES = ("mlp", "bert_output")


class BottleneckAdapterLayer(BaseTunerLayer):
    """State of the bottleneck adapters of one wrapped module, keyed by adapter name."""

    adapter_layer_names = ("bottleneck_adapter_down", "bottleneck_adapter_up")
    other_param_names = (
        "adapter_size",
        "nonlinearity",
        "residual",
        "routing",
        "pooling",
        "matmul_reshape_quirk",
        "visual_projection_grad",
        "visual_source",
    )

    def __init__(self, base_layer: nn.Module, width: int) -> None:
        self.base_layer = base_layer
        self.width = width
        self.adapter_size: dict[str, int] = {}
        self.nonlinearity: dict[str, str] = {}
        self.residual: dict[str, bool] = {}
        self.routing: dict[str, str | None] = {}
        self.pooling: dict[str, str] = {}
        self.matmul_reshape_quirk: dict[str, bool] = {}
        self.visual_projection_grad: dict[str, bool] = {}
        self.visual_source: dict[str, str | None] = {}
        self.bottleneck_adapter_down = nn.ModuleDict({})
        self.bottleneck_adapter_up = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.module_name = ""
        self.visual_context: VisualFeatureContext | None = None

    def update_layer(
        self,
        adapter_name: str,
        config: AdapterConfig,
        *,
        visual_source: str | None,
        shared: tuple[nn.Linear, nn.Linear] | None = None,
    ) -> None:
        if shared is None:
            size = config.bottleneck_size(self.width)
            down = nn.Linear(self.width, size)
            up = nn.Linear(size, self.width)
            nn.init.normal_(down.weight, std=config.init_std)
            nn.init.zeros_(down.bias)
            if config.up_init == "zeros":
                nn.init.zeros_(up.weight)
            else:
                nn.init.normal_(up.weight, std=config.init_std)
            nn.init.zeros_(up.bias)
        else:
            down, up = shared
            if down.in_features != self.width:
                raise ValueError(
                    f"cannot share the adapter of width {down.in_features} with {self.module_name!r} of width {self.width}"
                )
        self.adapter_size[adapter_name] = down.out_features
        self.bottleneck_adapter_down[adapter_name] = down
        self.bottleneck_adapter_up[adapter_name] = up
        self.nonlinearity[adapter_name] = config.nonlinearity
        self.residual[adapter_name] = config.residual
        self.routing[adapter_name] = config.routing
        self.pooling[adapter_name] = config.pooling
        self.matmul_reshape_quirk[adapter_name] = config.matmul_reshape_quirk
        self.visual_projection_grad[adapter_name] = config.visual_projection_grad
        self.visual_source[adapter_name] = visual_source
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            f"bottleneck adapters cannot be merged into {self.module_name!r}: the adapter is a non-linear function "
            "of the hidden states. Use unload() to remove it."
        )

    def unmerge(self) -> None:
        if self.merged_adapters:
            raise RuntimeError(f"{self.module_name!r} reports merged bottleneck adapters, which cannot exist")

    def adapter_output(self, y: Tensor, adapter: str) -> Tensor:
        """z for hidden states y (batch, ..., d) -> (batch, ..., d)."""
        down = self.bottleneck_adapter_down[adapter]
        up = self.bottleneck_adapter_up[adapter]
        y = self._cast_input_dtype(y, down.weight.dtype)
        hidden = down(y)
        if self.routing[adapter] is not None:
            hidden = self._route(y, hidden, adapter, down)
        return up(ACT2FN[self.nonlinearity[adapter]](hidden))

    def _route(self, y: Tensor, hidden: Tensor, adapter: str, down: nn.Linear) -> Tensor:
        if y.dim() < 2:
            raise ValueError(f"routed module {self.module_name!r} needs a batch dimension, got {tuple(y.shape)}")
        context = self.visual_context
        source = self.visual_source[adapter]
        if context is None or source is None:
            raise RuntimeError(f"routed module {self.module_name!r} was built without a visual-feature source")
        features, mask = context.visual_input(
            source, self.pooling[adapter], y.shape[0], requester=self.module_name, width=self.width
        )
        visual = project_visual(features.to(down.weight.dtype), down.weight, down.bias,
                                grad=self.visual_projection_grad[adapter])
        if mask is not None:
            visual = visual * mask.unsqueeze(-1).to(visual.dtype)
        shape = hidden.shape
        routed = route(
            hidden.reshape(shape[0], -1, shape[-1]),
            visual,
            self.routing[adapter],
            reshape_quirk=self.matmul_reshape_quirk[adapter],
        )
        return routed.reshape(shape)

    def _active(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [name for name in self.active_adapters if name in self.bottleneck_adapter_down]


def projection_width(module: nn.Module) -> int:
    """Output width of a projection (the hidden size the adapter works in)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1]
    raise TypeError(
        f"sequential bottleneck adapters wrap nn.Linear or Conv1D projections, got {type(module).__name__}; "
        "use style='parallel' to wrap an FFN block"
    )


class SequentialAdapter(nn.Module, BottleneckAdapterLayer):
    """Adapter after a projection: returns y + z(y) (or z(y) without residual), adapters applied in order."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: AdapterConfig,
        *,
        visual_source: str | None,
        visual_context: VisualFeatureContext,
        module_name: str,
        shared: tuple[nn.Linear, nn.Linear] | None = None,
        width: int | None = None,
    ) -> None:
        """``width`` is the output width of ``base_layer`` when it is a whole block rather than a projection."""
        super().__init__()
        BottleneckAdapterLayer.__init__(
            self, base_layer, projection_width(base_layer) if width is None else width
        )
        self.module_name = module_name
        self.visual_context = visual_context
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, visual_source=visual_source, shared=shared)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """x: (batch, ..., in) -> (batch, ..., d). A block returning a tuple (a mixture-of-experts FFN with its
        router logits) has its first element adapted."""
        output = self.base_layer(x, *args, **kwargs)
        result = output[0] if isinstance(output, tuple) else output
        result_dtype = result.dtype
        for adapter in self._active():
            z = self.adapter_output(result, adapter).to(result_dtype)
            result = result + z if self.residual[adapter] else z
        return (result, *output[1:]) if isinstance(output, tuple) else result

    def __repr__(self) -> str:
        return "bottleneck_adapter." + super().__repr__()


class ParallelAdapter(nn.Module, BottleneckAdapterLayer):
    """Adapter beside an FFN block (see the module docstring for the two call styles)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: AdapterConfig,
        *,
        block_style: str,
        width: int,
        visual_source: str | None,
        visual_context: VisualFeatureContext,
        module_name: str,
        shared: tuple[nn.Linear, nn.Linear] | None = None,
    ) -> None:
        if block_style not in BLOCK_CALL_STYLES:
            raise ValueError(f"block_style={block_style!r} is not one of {BLOCK_CALL_STYLES}")
        super().__init__()
        BottleneckAdapterLayer.__init__(self, base_layer, width)
        self.block_style = block_style
        self.module_name = module_name
        self.visual_context = visual_context
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, visual_source=visual_source, shared=shared)

    def _sum_of_adapters(self, x: Tensor, out_dtype: torch.dtype) -> Tensor | None:
        total = None
        for adapter in self._active():
            z = self.adapter_output(x, adapter).to(out_dtype)
            total = z if total is None else total + z
        return total

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.block_style == "mlp":
            x = _argument(args, kwargs, 0, ("hidden_states", "x", "hidden_state"), self.module_name)
            out = self.base_layer(*args, **kwargs)
            z = self._sum_of_adapters(x, out.dtype)
            return out if z is None else out + z
        input_tensor = _argument(args, kwargs, 1, ("input_tensor",), self.module_name)
        z = self._sum_of_adapters(input_tensor, input_tensor.dtype)
        if z is not None:
            if len(args) > 1:
                args = (args[0], input_tensor + z, *args[2:])
            else:
                kwargs = {**kwargs, "input_tensor": input_tensor + z}
        return self.base_layer(*args, **kwargs)

    def __repr__(self) -> str:
        return "bottleneck_adapter." + super().__repr__()


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, names: tuple[str, ...], module: str) -> Tensor:
    if len(args) > index:
        return args[index]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    raise ValueError(f"parallel adapter {module!r} cannot find argument {index} ({names}) of the wrapped block call")
