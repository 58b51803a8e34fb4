"""Routed LoRA layers: nn.Linear and GPT-2 Conv1D, with optional fused q/k/v slices (routing.md §3).

For a frozen W0 (out, in), per adapter::

    t = A drop(x)            (batch, n, r)      text bottleneck
    v = A drop(x_R)          (batch, m, r)      visual bottleneck (shared A; independent dropout, Q9)
    u = R(t, v)              (batch, n, r)      routing function (u = t when routing is None)
    h = W0 x + b + (alpha / r) B u

Fused q/k/v projections (GPT-2 ``c_attn``) get one bottleneck per adapted slice: A is (k r, in) and B is
(k d, r) holding the k blocks B_j (d, r); slice j of the output receives (alpha / r) B_j R(t_j, v_j). With
``fused_qv_bottleneck`` (quirk Q3) the k r bottleneck is routed as one vector instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from vlpeft.functional import project_visual, route
from vlpeft.glue.visual_features import VisualFeatureContext
from vlpeft.tuners._quantized import is_quantized_weight
from vlpeft.tuners.routed_lora.config import FUSED_SLICES, RoutedLoraConfig


class RoutedLoraLayer(BaseTunerLayer):
    """State of the routed LoRA adapters of one wrapped layer, keyed by adapter name."""

    adapter_layer_names = ("routed_lora_A", "routed_lora_B")
    other_param_names = (
        "r",
        "lora_alpha",
        "scaling",
        "routed_lora_dropout",
        "routing",
        "pooling",
        "fused_slices",
        "fused_qv_bottleneck",
        "matmul_reshape_quirk",
        "visual_projection_grad",
        "visual_source",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.routed_lora_dropout = nn.ModuleDict({})
        self.routed_lora_A = nn.ModuleDict({})
        self.routed_lora_B = nn.ModuleDict({})
        self.routing: dict[str, str | None] = {}
        self.pooling: dict[str, str] = {}
        self.fused_slices: dict[str, list[int] | None] = {}
        self.fused_qv_bottleneck: dict[str, bool] = {}
        self.matmul_reshape_quirk: dict[str, bool] = {}
        self.visual_projection_grad: dict[str, bool] = {}
        self.visual_source: dict[str, str | None] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.module_name = ""
        self.visual_context: VisualFeatureContext | None = None
        if isinstance(base_layer, nn.Linear):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            self.fan_in_fan_out = False
        elif isinstance(base_layer, Conv1D):
            self.in_features, self.out_features = base_layer.weight.shape
            self.fan_in_fan_out = True
        else:
            raise TypeError(
                f"routed LoRA supports nn.Linear and transformers Conv1D layers, got {type(base_layer).__name__}"
            )

    def update_layer(
        self,
        adapter_name: str,
        config: RoutedLoraConfig,
        *,
        fused: bool,
        visual_source: str | None,
    ) -> None:
        r = config.r
        slices: list[int] | None = None
        slice_width = self.out_features
        if fused:
            if self.out_features % 3:
                raise ValueError(
                    f"{self.module_name!r} is listed as a fused q/k/v projection but its output width "
                    f"{self.out_features} is not divisible by 3"
                )
            slices = [FUSED_SLICES.index(name) for name in config.fused_qkv_slices]
            slice_width = self.out_features // 3
        groups = 1 if slices is None else len(slices)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / r
        self.routed_lora_dropout[adapter_name] = (
            nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        # Same construction order and init as PEFT's LoRA (A, then B, then Kaiming on A and zeros on B), so that
        # equal seeds give equal weights.
        self.routed_lora_A[adapter_name] = nn.Linear(self.in_features, groups * r, bias=False)
        self.routed_lora_B[adapter_name] = nn.Linear(r, groups * slice_width, bias=False)
        if config.init_lora_weights:
            nn.init.kaiming_uniform_(self.routed_lora_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.routed_lora_B[adapter_name].weight)
        self.routing[adapter_name] = config.routing
        self.pooling[adapter_name] = config.pooling
        self.fused_slices[adapter_name] = slices
        self.fused_qv_bottleneck[adapter_name] = bool(config.fused_qv_bottleneck and slices is not None)
        self.matmul_reshape_quirk[adapter_name] = config.matmul_reshape_quirk
        self.visual_projection_grad[adapter_name] = config.visual_projection_grad
        self.visual_source[adapter_name] = visual_source
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    # ------------------------------------------------------------------------------------- merging
    def get_delta_weight(self, adapter: str) -> Tensor:
        """(alpha / r) B A laid out like the base weight ((out, in), or (in, out) for Conv1D)."""
        if self.routing[adapter] is not None:
            raise ValueError(_merge_error(adapter, self.routing[adapter]))
        a = self.routed_lora_A[adapter].weight
        b = self.routed_lora_B[adapter].weight
        r, scaling = self.r[adapter], self.scaling[adapter]
        slices = self.fused_slices[adapter]
        if slices is None:
            delta = b @ a * scaling
        else:
            width = self.out_features // 3
            blocks = [torch.zeros(width, self.in_features, dtype=a.dtype, device=a.device) for _ in range(3)]
            for group, position in enumerate(slices):
                blocks[position] = b[group * width : (group + 1) * width] @ a[group * r : (group + 1) * r] * scaling
            delta = torch.cat(blocks, dim=0)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter in self.routed_lora_A and self.routing[adapter] is not None:
                raise ValueError(_merge_error(adapter, self.routing[adapter]))
        base = self.get_base_layer()
        if adapter_names and is_quantized_weight(base.weight):
            raise ValueError(
                f"cannot merge routed LoRA into the quantized weight of {self.module_name!r} "
                f"({type(base.weight).__name__}); keep the adapter unmerged, or merge into a float copy of the base model."
            )
        for adapter in adapter_names:
            if adapter not in self.routed_lora_A:
                continue
            delta = self.get_delta_weight(adapter).to(base.weight.dtype)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs/infs detected in the merged weights of {self.module_name!r}; adapter {adapter!r} is broken")
                base.weight.data = merged
            else:
                base.weight.data += delta
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.routed_lora_A:
                base.weight.data -= self.get_delta_weight(adapter).to(base.weight.dtype)


def _merge_error(adapter: str, routing: str | None) -> str:
    return (
        f"cannot merge routed LoRA adapter {adapter!r} (routing={routing!r}): its update depends on each sample's "
        "visual features, so it has no fixed weight to fold into W0. Only routing=None (plain LoRA) merges; use "
        "unload() to remove the adapter instead."
    )


class Linear(nn.Module, RoutedLoraLayer):
    """Routed LoRA around an ``nn.Linear`` or a GPT-2 ``Conv1D``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: RoutedLoraConfig,
        *,
        fused: bool,
        visual_source: str | None,
        visual_context: VisualFeatureContext,
        module_name: str,
    ) -> None:
        super().__init__()
        RoutedLoraLayer.__init__(self, base_layer)
        self.module_name = module_name
        self.visual_context = visual_context
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, fused=fused, visual_source=visual_source)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """x: (batch, ..., in) -> (batch, ..., out)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.routed_lora_A:
                continue
            result = result + self._update(x, adapter).to(result_dtype)
        return result.to(result_dtype)

    def _update(self, x: Tensor, adapter: str) -> Tensor:
        lora_a = self.routed_lora_A[adapter]
        lora_b = self.routed_lora_B[adapter]
        dropout = self.routed_lora_dropout[adapter]
        x = self._cast_input_dtype(x, lora_a.weight.dtype)
        text = lora_a(dropout(x))
        routing = self.routing[adapter]
        if routing is not None:
            text = self._route(x, text, adapter, lora_a, dropout)
        scaling = self.scaling[adapter]
        slices = self.fused_slices[adapter]
        if slices is None:
            return lora_b(text) * scaling
        return self._scatter_slices(text, lora_b.weight, slices, self.r[adapter]) * scaling

    def _route(self, x: Tensor, text: Tensor, adapter: str, lora_a: nn.Module, dropout: nn.Module) -> Tensor:
        """text (batch, ..., g r) -> routed (batch, ..., g r)."""
        if x.dim() < 2:
            raise ValueError(f"routed module {self.module_name!r} needs a batch dimension, got input of shape {tuple(x.shape)}")
        context = self.visual_context
        source = self.visual_source[adapter]
        if context is None or source is None:
            raise RuntimeError(f"routed module {self.module_name!r} was built without a visual-feature source")
        features, mask = context.visual_input(
            source, self.pooling[adapter], x.shape[0], requester=self.module_name, width=self.in_features
        )
        visual = project_visual(dropout(features.to(lora_a.weight.dtype)), lora_a.weight, lora_a.bias,
                                grad=self.visual_projection_grad[adapter])
        if mask is not None:
            visual = visual * mask.unsqueeze(-1).to(visual.dtype)
        shape = text.shape
        text = text.reshape(shape[0], -1, shape[-1])
        kind, quirk = self.routing[adapter], self.matmul_reshape_quirk[adapter]
        slices = self.fused_slices[adapter]
        if slices is None or self.fused_qv_bottleneck[adapter]:
            routed = route(text, visual, kind, reshape_quirk=quirk)
        else:
            r = self.r[adapter]
            routed = torch.cat(
                [
                    route(text[..., g * r : (g + 1) * r], visual[..., g * r : (g + 1) * r], kind, reshape_quirk=quirk)
                    for g in range(len(slices))
                ],
                dim=-1,
            )
        return routed.reshape(shape)

    def _scatter_slices(self, text: Tensor, weight_b: Tensor, slices: list[int], r: int) -> Tensor:
        """Per-slice up-projection into the fused output: (..., g r) -> (..., 3 d), zeros in unadapted slices."""
        width = self.out_features // 3
        parts: list[Tensor | None] = [None, None, None]
        for group, position in enumerate(slices):
            parts[position] = F.linear(text[..., group * r : (group + 1) * r], weight_b[group * width : (group + 1) * width])
        template = next(p for p in parts if p is not None)
        return torch.cat([p if p is not None else torch.zeros_like(template) for p in parts], dim=-1)

    def __repr__(self) -> str:
        return "routed_lora." + super().__repr__()
