"""p-adapter tuner layer base: :class:`PAdapterLayer` (PEFT's tuner-layer mixin), the per-adapter settings and
learnable scalars, merge errors, and small helpers shared by the attention and FFN wrappers.

The wrappers live in :mod:`~vlpeft.tuners.p_adapter.attention` (:class:`PAdapterAttention`) and
:mod:`~vlpeft.tuners.p_adapter.ffn` (:class:`PAdapterFFN`); they import this module, so it does not re-export them.

All adapter state lives in ``ModuleDict``s keyed by adapter name; learnable scalars (p's theta, mu's offset m)
are tiny leaf modules with a ``.weight`` (FSDP-friendly, ``ecosystem.md`` §6).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

# Re-exported for ``from vlpeft.tuners.p_adapter.layer import describe_attention_block`` (block_spec is a leaf).
from vlpeft.glue.attention_blocks import AttentionBlockSpec, describe_attention_block


def block_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The adapters' compute dtype for a block whose activations are ``tensor``: float32 (also under bf16/fp16
    weights or autocast), float64 for float64 models."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


class PAdapterMergeError(RuntimeError):
    """p-adapter cannot be merged into the base weights."""


MERGE_ERROR_MESSAGE = (
    "p-adapter cannot be merged: its output depends on the attention graph of each input (a p-Laplacian "
    "re-weighting of the attention matrix), which no change of the frozen weights can reproduce. Use "
    "`unload()` to get the base model back, or keep the adapter unmerged for inference."
)


class AdapterScalar(nn.Module):
    """A learnable scalar in a leaf module with a ``.weight`` of shape (1,) (p's theta or mu's offset m).

    ``no_weight_decay`` marks it for :func:`vlpeft.tuners.param_groups.build_param_groups`.
    """

    no_weight_decay = True

    def __init__(self, value: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((1,), float(value), dtype=torch.float32, device=device))

    def forward(self) -> torch.Tensor:
        return self.weight.reshape(())


@dataclass(frozen=True)
class AdapterSettings:
    """Per-module, per-adapter settings derived from :class:`PAdapterConfig` (not saved: rebuilt from the config)."""

    variant: str
    graph: str  # "self" (release self-attention) or "bipartite"
    p_value: float  # the initial or fixed p
    learnable_p: bool
    p_bounds: tuple[float, float] | None  # None: raw parametrisation
    mu0: float
    learnable_mu: bool
    key_pool_size: int | None
    self_loop: str
    causal_degrees: bool
    chunk_size: int | None
    compile_block: bool = False  # release: torch.compile the p-Laplacian block's per-block work
    backend: str = "auto"  # PAdapterConfig.backend: auto | torch | cpu | triton


def _linear(in_features: int, out_features: int, std: float, zero: bool, device: torch.device) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, device=device, dtype=torch.float32)
    with torch.no_grad():
        if zero:
            layer.weight.zero_()
        else:
            layer.weight.normal_(0.0, std)
        layer.bias.zero_()
    return layer


def _pattern_value(patterns: dict[str, float], module_name: str, default: float) -> float:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


def _first_param_device(module: nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def _getattr_with_fallback(module: nn.Module, name: str) -> Any:
    """``nn.Module`` attribute lookup, falling back to the wrapped block.

    Model code may read attributes of the block it built (GIT reads ``layer[0].attention.self.image_patch_tokens``).
    """
    try:
        return nn.Module.__getattr__(module, name)
    except AttributeError:
        if name == "base_layer":
            raise
        return getattr(nn.Module.__getattr__(module, "base_layer"), name)


class PAdapterLayer(BaseTunerLayer):
    """Common base of the p-adapter tuner layers (PEFT's ``tuner_layer_cls``)."""

    adapter_layer_names: tuple[str, ...] = (
        "padapter_down",
        "padapter_gate",
        "padapter_up",
        "padapter_p",
        "padapter_mu",
    )
    other_param_names: tuple[str, ...] = ("padapter_settings", "padapter_dropout")

    def _init_padapter_containers(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.padapter_down = nn.ModuleDict()
        self.padapter_gate = nn.ModuleDict()
        self.padapter_up = nn.ModuleDict()
        self.padapter_p = nn.ModuleDict()
        self.padapter_mu = nn.ModuleDict()
        self.padapter_dropout = nn.ModuleDict()
        self.padapter_settings: dict[str, AdapterSettings] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    def _active_names(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.padapter_settings]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise PAdapterMergeError(MERGE_ERROR_MESSAGE)

    def unmerge(self) -> None:
        raise PAdapterMergeError(MERGE_ERROR_MESSAGE)


__all__ = [
    "MERGE_ERROR_MESSAGE",
    "AdapterScalar",
    "AdapterSettings",
    "AttentionBlockSpec",
    "PAdapterLayer",
    "PAdapterMergeError",
    "block_dtype",
    "describe_attention_block",
]
