"""p-adapter tuner layers: wrappers around attention blocks and FFN blocks (p-adapter.md §2.3-2.4, §3, §4).

:class:`PAdapterAttention` wraps a whole attention block and adds the p-adapter after the attention output
projection, before the residual add / LayerNorm:

- BERT-style post-LN blocks (BLIP text, Q-Former, BERT/RoBERTa, GIT text): ``block.output`` computes
  dense -> dropout -> LayerNorm(h + input); the adapter edits the dropout's output through a temporary hook.
- Blocks returning the projected attention output (Llama/Gemma/OPT/CLIP/SigLIP/BLIP vision attention): the adapter
  edits the block's first output; the residual is added by the caller.

Graph inputs (post-softmax, pre-dropout attention; projected queries; projected values of all key positions,
cached ones included) come from :mod:`vlpeft.glue.attention`: the ``"padapter"`` attention function for models
that use transformers' AttentionInterface, temporary forward hooks for inline-attention models.

:class:`PAdapterFFN` wraps an FFN block and adds a parallel ReLU bottleneck adapter of the FFN input.

All adapter state lives in ``ModuleDict``s keyed by adapter name; learnable scalars (p's theta, mu's offset m)
are tiny leaf modules with a ``.weight`` (FSDP-friendly, ``ecosystem.md`` §6).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

from vlpeft._transformers_compat import cache_from_kwargs, takes_cache_argument
from vlpeft.functional import (
    mu_from_offset,
    p_from_theta,
    p_laplacian_aggregate,
    pool_keys,
    theta_from_p,
)
from vlpeft.functional._precision import autocast_disabled
from vlpeft.functional.p_laplacian_triton import triton_available
from vlpeft.glue.attention import (
    PADAPTER_ATTENTION,
    FusedReleaseRequest,
    MissingAttentionError,
    attended_query_rows,
    cache_layer_side_state,
    capture_attention,
    hook_module_outputs,
)
from vlpeft.tuners.p_adapter.config import PAdapterConfig


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


# ------------------------------------------------------------------------------------------------ attention blocks

_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "projection", "c_proj", "dense")
_QUERY_NAMES = ("q_proj", "query")
_VALUE_NAMES = ("v_proj", "value")
_FUSED_QKV_NAMES = ("qkv", "c_attn", "qkv_proj")


@functools.cache
def _class_uses_attention_interface(cls: type) -> bool:
    """Whether an attention class dispatches through transformers' AttentionInterface (from its source)."""
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            break
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if "ALL_ATTENTION_FUNCTIONS.get_interface(" in source:
            return True
    return False


@dataclass(frozen=True)
class AttentionBlockSpec:
    """How an attention block is laid out (names relative to the wrapped block).

    Attributes:
        style: ``"bert"`` (post-LN ``output`` submodule, adapter between its dropout and LayerNorm) or
            ``"projected"`` (the block returns the projected attention output first).
        capture: ``"interface"`` or ``"inline"``.
        attention: the module computing attention (``""`` = the block itself).
        out_proj: the attention output projection W_O.
        out_dropout: (bert) the dropout whose output the adapter edits.
        query / value / fused_qkv: (inline) projections whose outputs give Q and V.
        is_cross: cross-attention block (keys/values from another sequence).
        is_causal: block of a decoder that can run with a KV cache (``paper`` then uses causal degrees by default,
            so that cached decoding equals cache-free decoding).
    """

    style: str
    capture: str
    attention: str
    out_proj: str
    out_dropout: str | None
    query: str | None
    value: str | None
    fused_qkv: str | None
    is_cross: bool
    is_causal: bool


def _child_name(module: nn.Module, candidates: tuple[str, ...]) -> str | None:
    for name in candidates:
        if isinstance(getattr(module, name, None), nn.Module):
            return name
    return None


def _runs_with_kv_cache(attention: nn.Module) -> bool:
    """Whether an attention module belongs to a (causal or prefix-LM) decoder that can decode with a KV cache.

    True if it declares ``is_causal`` or a decoder config, or if its forward takes a cache (``cache`` from
    transformers 5.25, ``past_key_values`` before; PaliGemma's Gemma has ``is_causal = False`` because of its
    bidirectional prefix, yet decodes with a cache).
    """
    config = getattr(attention, "config", None)
    if getattr(attention, "is_causal", False) or getattr(config, "is_decoder", False):
        return True
    return takes_cache_argument(attention.forward)


def describe_attention_block(block: nn.Module, module_name: str) -> AttentionBlockSpec:
    """Work out the layout of an attention block from its structure.

    Raises:
        ValueError: the module is not an attention block p-adapter knows how to wrap.
    """
    output = getattr(block, "output", None)
    inner_name = _child_name(block, ("self", "attention"))
    is_cross = "cross" in module_name.rsplit(".", 1)[-1].lower()
    if (
        inner_name is not None
        and isinstance(output, nn.Module)
        and all(isinstance(getattr(output, n, None), nn.Module) for n in ("dense", "dropout", "LayerNorm"))
    ):
        inner = getattr(block, inner_name)
        query = _child_name(inner, _QUERY_NAMES)
        value = _child_name(inner, _VALUE_NAMES)
        if query is None or value is None:
            raise ValueError(f"{module_name}: inner attention {type(inner).__name__} has no query/value projections.")
        capture = "interface" if _class_uses_attention_interface(type(inner)) else "inline"
        return AttentionBlockSpec(
            style="bert",
            capture=capture,
            attention=inner_name,
            out_proj="output.dense",
            out_dropout="output.dropout",
            query=f"{inner_name}.{query}",
            value=f"{inner_name}.{value}",
            fused_qkv=None,
            is_cross=is_cross,
            is_causal=_runs_with_kv_cache(inner),
        )
    out_proj = _child_name(block, _OUTPUT_PROJECTIONS)
    if out_proj is None:
        raise ValueError(
            f"{module_name} ({type(block).__name__}) is not an attention block p-adapter can wrap: expected a "
            f"BERT-style block (self/attention + output.dense/dropout/LayerNorm) or an attention module with an "
            f"output projection named one of {_OUTPUT_PROJECTIONS}."
        )
    capture = "interface" if _class_uses_attention_interface(type(block)) else "inline"
    query = _child_name(block, _QUERY_NAMES)
    value = _child_name(block, _VALUE_NAMES)
    fused = _child_name(block, _FUSED_QKV_NAMES)
    if fused is None and (query is None or value is None):
        raise ValueError(
            f"{module_name} ({type(block).__name__}) is not an attention block p-adapter can wrap: it exposes no "
            f"query/value projections (one of {_QUERY_NAMES} and {_VALUE_NAMES}, or fused {_FUSED_QKV_NAMES})."
        )
    return AttentionBlockSpec(
        style="projected",
        capture=capture,
        attention="",
        out_proj=out_proj,
        out_dropout=None,
        query=query,
        value=value,
        fused_qkv=fused if query is None else None,
        is_cross=is_cross,
        is_causal=_runs_with_kv_cache(block),
    )


def _submodule(block: nn.Module, name: str) -> nn.Module:
    return block if name == "" else block.get_submodule(name)


def _projection_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W (out, in), b (out,) or None) of a Linear-like projection (Conv1D weights are transposed)."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    weight = base.weight
    if type(base).__name__ == "Conv1D":
        weight = weight.t()
    return weight, getattr(base, "bias", None)


def _heads_to_tokens(states: torch.Tensor) -> torch.Tensor:
    """(batch, heads, n, head_dim) -> (batch, n, heads * head_dim)."""
    batch, heads, n, dim = states.shape
    return states.transpose(1, 2).reshape(batch, n, heads * dim)


def _tokens_to_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, n, heads * d) -> (batch, heads, n, d)."""
    batch, n, width = states.shape
    if width % heads:
        raise ValueError(f"feature width {width} is not divisible by the {heads} attention heads")
    return states.reshape(batch, n, heads, width // heads).transpose(1, 2)


def _pool_key_nodes(
    nodes: torch.Tensor, attn: torch.Tensor, k: int, module_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool cross-attention key nodes (batch, n_k, d) and attention columns to ``k`` (release §2.4 A)."""
    n_k = nodes.shape[-2]
    if k > n_k:
        raise ValueError(
            f"PAdapterConfig.key_pool_size={k} but cross-attention of {module_name!r} has only n_k={n_k} key tokens; "
            f"expected key_pool_size <= {n_k} (the release pools ViT-B/16's 197 image tokens to 16 or 24)."
        )
    return pool_keys(nodes, attn, k)


def grouped_value_factors(
    value: torch.Tensor, w_o: torch.Tensor, b_o: torch.Tensor | None, heads: int, kv_heads: int | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``paper`` value nodes V̂ = V W_O^T + b_O of grouped-query attention as coordinates times a basis.

    ``value`` (batch, n_k, heads * head_dim) repeats ``kv_heads`` distinct heads (head h is key/value head
    h // group, group = heads / kv_heads), so V̂ = C B with C = [v, 1] (batch, n_k, r), v the distinct heads'
    values (batch, n_k, kv_heads * head_dim), and B (r, d) = [W_O^T summed over each group's heads ; b_O],
    r = kv_heads * head_dim (+ 1 with an output bias).

    Returns:
        ``(C, B)``, or ``None`` when it would not be narrower (no grouping, or r >= d).
    """
    if kv_heads is None or kv_heads >= heads:
        return None
    batch, n_k, width = value.shape
    d = w_o.shape[0]
    head_dim, group = width // heads, heads // kv_heads
    rank = kv_heads * head_dim + (b_o is not None)
    if rank >= d:
        return None
    coords = value.reshape(batch, n_k, kv_heads, group, head_dim)[:, :, :, 0].reshape(batch, n_k, -1)
    basis = w_o.reshape(d, kv_heads, group, head_dim).sum(dim=2).reshape(d, -1).t()
    if b_o is not None:
        coords = torch.cat([coords, coords.new_ones(batch, n_k, 1)], dim=-1)
        basis = torch.cat([basis, b_o.unsqueeze(0)], dim=0)
    return coords, basis


def _drop_unattended_rows(probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the attention rows of queries whose keys are all masked (their softmax is an artefact).

    When every row attends (causal masks without padding, the common case) ``probs`` is returned as is: the
    product would be a second (batch, heads, n_q, n_k) tensor per layer in the forward and in the backward pass.
    """
    rows = attended_query_rows(mask, probs.shape[-2], probs.shape[-1])
    if rows is None or bool(rows.all()):
        return probs
    return probs * rows.to(probs.dtype)


@dataclass
class _GraphInputs:
    query: torch.Tensor  # (batch, n_q, heads * head_dim)
    value: torch.Tensor  # (batch, n_k, heads * head_dim)
    probs: torch.Tensor | None  # (batch, heads, n_q, n_k); None when the fused kernels computed ``aggregated``
    aggregated: torch.Tensor | None = None  # release U (batch, heads, n, d_f) from the fused kernels
    # rows -> probs[..., rows, :], when the attention function can recompute the attention (see AttentionCapture)
    recompute: Callable[[slice], torch.Tensor] | None = None
    kv_heads: int | None = None  # distinct value heads before grouped-query repetition (None: as many as heads)
    block_plan: list[tuple[slice, int]] | None = None  # probs[..., rows, n_keys:] == 0 (from the blocked attention)


def _masked_rows(recompute: Callable[[slice], torch.Tensor], attended: torch.Tensor
                 ) -> Callable[[slice], torch.Tensor]:
    """``recompute`` with the unattended query rows zeroed as :func:`_drop_unattended_rows` does; ``attended``
    (batch or 1, 1 or heads, n_q, 1) boolean."""

    def rows_of(rows: slice) -> torch.Tensor:
        block = recompute(rows)
        return block * attended[..., rows, :].to(block.dtype)

    return rows_of


class PAdapterAttention(nn.Module, PAdapterLayer):
    """An attention block with p-adapters after its output projection.

    Args:
        base_layer: the attention block (see module docstring for supported layouts).
        module_name: its full name in the model (used for pattern-specific settings and error messages).
    """

    __getattr__ = _getattr_with_fallback

    def __init__(self, base_layer: nn.Module, module_name: str) -> None:
        super().__init__()
        self._init_padapter_containers(base_layer)
        self.module_name = module_name
        self.spec = describe_attention_block(base_layer, module_name)
        weight, _ = _projection_weights(_submodule(base_layer, self.spec.out_proj))
        self.hidden_size = int(weight.shape[0])
        self.attention_width = int(weight.shape[1])
        self.num_heads = self._find_num_heads()

    def _find_num_heads(self) -> int:
        attention = _submodule(self.base_layer, self.spec.attention)
        for owner in (attention, getattr(attention, "config", None)):
            for name in ("num_heads", "num_attention_heads", "n_head", "num_attention_heads_per_partition"):
                value = getattr(owner, name, None)
                if isinstance(value, int) and value > 0:
                    return value
        raise ValueError(f"{self.module_name}: cannot determine the number of attention heads.")

    # -------------------------------------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str, config: PAdapterConfig) -> None:
        """Create the adapter ``adapter_name`` on this block according to ``config``."""
        width = config.bottleneck_size or max(1, self.hidden_size // config.reduction_factor)
        graph = "self" if config.variant == "release" and not self.spec.is_cross else "bipartite"
        if config.variant == "release" and width % self.num_heads:
            raise ValueError(
                f"{self.module_name}: the release variant splits the bottleneck r={width} into "
                f"{self.num_heads} heads; choose bottleneck_size/reduction_factor so that r is divisible by it."
            )
        p_value = _pattern_value(config.p_init_pattern, self.module_name, config.p_init)
        config.check_p_value(p_value, f"initial p of {self.module_name}")
        raw = config.p_parametrization == "raw"
        settings = AdapterSettings(
            variant=config.variant,
            graph=graph,
            p_value=p_value,
            learnable_p=config.learnable_p,
            p_bounds=None if raw else config.p_bounds,
            mu0=float(config.mu0),
            learnable_mu=bool(config.learnable_mu),
            key_pool_size=config.key_pool_size if self.spec.is_cross else None,
            self_loop=config.self_loop,
            causal_degrees=self.spec.is_causal if config.causal_degrees is None else config.causal_degrees,
            chunk_size=config.chunk_size,
            compile_block=bool(config.compile_block),
        )
        device = _first_param_device(self.base_layer)
        zero_up = config.init_weights == "zero_up"
        std = config.init_std
        self.padapter_down[adapter_name] = _linear(self.hidden_size, width, std, False, device)
        if config.variant == "release":
            self.padapter_gate[adapter_name] = _linear(self.hidden_size, width, std, False, device)
        self.padapter_up[adapter_name] = _linear(width, self.hidden_size, std, zero_up, device)
        if config.learnable_p:
            start = p_value if raw else theta_from_p(p_value, *config.p_bounds)
            self.padapter_p[adapter_name] = AdapterScalar(start, device)
        if settings.learnable_mu:
            self.padapter_mu[adapter_name] = AdapterScalar(0.0, device)
        self.padapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.padapter_settings[adapter_name] = settings
        self.set_adapter(self.active_adapters)

    def p_value(self, adapter_name: str) -> torch.Tensor | float:
        """Current p of an adapter (a 0-d tensor when learnable)."""
        settings = self.padapter_settings[adapter_name]
        if not settings.learnable_p:
            return settings.p_value
        raw = self.padapter_p[adapter_name]()
        if settings.p_bounds is None:
            return raw
        # The clamp only removes float rounding past the bounds when sigmoid(theta) saturates.
        return p_from_theta(raw, *settings.p_bounds).clamp(*settings.p_bounds)

    def mu_value(self, adapter_name: str) -> torch.Tensor | float:
        """Current mu of an adapter (a 0-d tensor when learnable)."""
        settings = self.padapter_settings[adapter_name]
        if not settings.learnable_mu:
            return 2.0 * settings.mu0
        return mu_from_offset(self.padapter_mu[adapter_name](), settings.mu0)

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self._active_names()
        if self.disable_adapters or not names:
            return self.base_layer(*args, **kwargs)
        spec = self.spec
        attention = _submodule(self.base_layer, spec.attention)
        if spec.capture == "interface":
            implementation = getattr(getattr(attention, "config", None), "_attn_implementation", None)
            if implementation != PADAPTER_ATTENTION:
                raise MissingAttentionError(
                    f"{self.module_name}: attention implementation is {implementation!r}; p-adapter needs the "
                    f"{PADAPTER_ATTENTION!r} implementation on adapted towers (fused sdpa/flash kernels return no "
                    "attention weights). Do not change the attention implementation of a p-adapter model."
                )
        cache = cache_from_kwargs(kwargs)
        record: dict[str, Any] = {}
        if spec.capture == "inline" and not spec.is_cross:
            record["mask"] = kwargs.get("attention_mask")
        watched: dict[str, nn.Module] = {}
        if spec.capture == "inline":
            if spec.style == "bert":
                watched["attention"] = attention
            for key in ("query", "value", "fused_qkv"):
                name = getattr(spec, key)
                if name is not None:
                    watched[key] = self.base_layer.get_submodule(name)

        with capture_attention(attention) as capture:
            capture.fused = self._fused_request(names)
            capture.recompute_wanted = self._wants_recomputed_attention(names)

            def adapt(output: torch.Tensor) -> torch.Tensor:
                inputs = self._graph_inputs(capture, record, cache, output.shape[1])
                return self._apply_adapters(names, output, inputs, cache)

            if spec.style == "bert":
                dropout = self.base_layer.get_submodule(spec.out_dropout)
                with hook_module_outputs(record, watched, {dropout: adapt}):
                    outputs = self.base_layer(*args, **kwargs)
                if "adapted" not in record:
                    raise MissingAttentionError(
                        f"{self.module_name}: the block's output dropout was not called; cannot place the adapter."
                    )
                return outputs
            with hook_module_outputs(record, watched):
                outputs = self.base_layer(*args, **kwargs)
            if not isinstance(outputs, tuple):
                raise TypeError(f"{self.module_name}: expected the attention block to return a tuple, got {type(outputs)}")
            record["returned_probs"] = outputs[1] if len(outputs) > 1 else None
            adapted = adapt(outputs[0])
            return (adapted, *outputs[1:])

    def _graph_inputs(
        self, capture: Any, record: dict[str, Any], cache: Any, n_q: int
    ) -> _GraphInputs:
        spec = self.spec
        if spec.capture == "interface":
            if capture.calls != 1 or (capture.probs is None and capture.aggregated is None):
                raise MissingAttentionError(
                    f"{self.module_name}: expected exactly one call of the {PADAPTER_ATTENTION!r} attention function "
                    f"during the block's forward, saw {capture.calls}; the adapter received no attention weights."
                )
            record["adapted"] = True
            if capture.aggregated is not None:
                return _GraphInputs(_heads_to_tokens(capture.query), _heads_to_tokens(capture.value), None,
                                    capture.aggregated)
            probs = _drop_unattended_rows(capture.probs, capture.mask)
            recompute = capture.recompute_probs
            if recompute is not None and probs is not capture.probs:
                recompute = _masked_rows(recompute, attended_query_rows(capture.mask, *probs.shape[-2:]))
            return _GraphInputs(_heads_to_tokens(capture.query), _heads_to_tokens(capture.value), probs,
                                recompute=recompute, kv_heads=capture.kv_heads, block_plan=capture.block_plan)
        if spec.style == "bert":
            inner_out = record.get("attention")
            probs = inner_out[1] if isinstance(inner_out, tuple) and len(inner_out) > 1 else None
        else:
            probs = record.get("returned_probs")
            dropout = getattr(_submodule(self.base_layer, spec.attention), "dropout", None)
            if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
                raise ValueError(
                    f"{self.module_name}: this inline attention returns post-dropout weights; p-adapter needs the "
                    f"pre-dropout attention. Set its attention dropout to 0 (it is {dropout.p}) or run in eval mode."
                )
        if probs is None:
            raise MissingAttentionError(f"{self.module_name}: the inline attention returned no attention weights.")
        heads = probs.shape[1]
        if spec.fused_qkv is not None:
            qkv = record["fused_qkv"]
            batch, n, width = qkv.shape
            parts = qkv.reshape(batch, n, 3, width // 3)
            query, value = parts[:, :, 0], parts[:, :, 2]
        else:
            query = record["query"]
            value = record.get("value")
            if cache is not None:
                value = _heads_to_tokens(self._cached_values(cache))
        if value is None or query is None:
            raise MissingAttentionError(f"{self.module_name}: projected queries/values were not captured.")
        if value.shape[1] != probs.shape[-1] or query.shape[1] != probs.shape[-2]:
            raise RuntimeError(
                f"{self.module_name}: captured shapes disagree: queries {tuple(query.shape)}, values "
                f"{tuple(value.shape)}, attention {tuple(probs.shape)} ({heads} heads)."
            )
        record["adapted"] = True
        return _GraphInputs(query, value, _drop_unattended_rows(probs, record.get("mask")))

    def _wants_recomputed_attention(self, names: list[str]) -> bool:
        """Whether a chunked ``release`` self-graph adapter is active: its block can rebuild the attention rows in
        the backward pass instead of keeping the attention (when nothing else keeps it, see
        ``p_laplacian_aggregate(recompute_attention=...)``)."""
        return self.spec.capture == "interface" and any(
            self.padapter_settings[name].variant == "release" and self.padapter_settings[name].graph == "self"
            and self.padapter_settings[name].chunk_size is not None for name in names)

    def _fused_request(self, names: list[str]) -> FusedReleaseRequest | None:
        """Request the fused GPU kernels for a single active ``release`` self-graph adapter on a CUDA model with
        Triton (the attention function then decides whether the call's inputs allow them)."""
        if self.spec.capture != "interface" or len(names) != 1 or not triton_available():
            return None
        name = names[0]
        settings = self.padapter_settings[name]
        if settings.variant != "release" or settings.graph != "self":
            return None
        heads = self.num_heads

        def features(value_states: torch.Tensor) -> torch.Tensor:
            with autocast_disabled(value_states.device.type):
                fold_weight, fold_bias = self._release_fold(name)
                nodes = F.linear(_heads_to_tokens(value_states).float(), fold_weight, fold_bias)
            return _tokens_to_heads(nodes, heads)

        return FusedReleaseRequest(features, self.p_value(name), self.mu_value(name), None, settings.self_loop,
                                   settings.p_bounds)

    def _release_fold(self, name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """§3.1 step 7: the frozen W_O folded into W_down, F = Z (W_O W_down) + (b_O W_down + b_down), in ``dtype``."""
        out_weight, out_bias = _projection_weights(_submodule(self.base_layer, self.spec.out_proj))
        down = self.padapter_down[name]
        weight = down.weight.to(dtype)
        fold_weight = weight @ out_weight.to(dtype)
        fold_bias = down.bias.to(dtype) if out_bias is None else down.bias.to(dtype) + weight @ out_bias.to(dtype)
        return fold_weight, fold_bias

    def _layer_idx(self) -> int:
        attention = _submodule(self.base_layer, self.spec.attention)
        idx = getattr(attention, "layer_idx", None)
        if not isinstance(idx, int):
            raise RuntimeError(f"{self.module_name}: attention module has no integer `layer_idx` to locate its cache.")
        return idx

    def _cache_for(self, cache: Any, cross: bool) -> Any:
        if hasattr(cache, "self_attention_cache"):
            return cache.cross_attention_cache if cross else cache.self_attention_cache
        return cache

    def _cached_values(self, cache: Any) -> torch.Tensor:
        layer = self._cache_for(cache, self.spec.is_cross).layers[self._layer_idx()]
        return layer.values

    def _state_layer(self, cache: Any) -> Any:
        """The self-attention cache layer of this block's layer (persistent across decoding steps)."""
        return self._cache_for(cache, False).layers[self._layer_idx()]

    # -------------------------------------------------------------------------------------------- maths
    def _apply_adapters(
        self, names: list[str], output: torch.Tensor, inputs: _GraphInputs, cache: Any
    ) -> torch.Tensor:
        out_weight, out_bias = _projection_weights(_submodule(self.base_layer, self.spec.out_proj))
        delta = None
        device_type = output.device.type
        dtype = block_dtype(output)
        with autocast_disabled(device_type):
            o = output.to(dtype)
            w_o = out_weight.to(dtype)
            b_o = None if out_bias is None else out_bias.to(dtype)
            query = inputs.query.to(dtype)
            value = inputs.value.to(dtype)
            probs = None if inputs.probs is None else inputs.probs.to(dtype)
            for name in names:
                settings = self.padapter_settings[name]
                if inputs.aggregated is not None:  # the fused kernels computed U (single release adapter)
                    branch = self._release_output(name, o, _heads_to_tokens(inputs.aggregated))
                elif settings.variant == "release":
                    branch = self._release_branch(name, settings, o, query, value, probs, inputs.recompute)
                else:
                    branch = self._paper_branch(name, settings, o, query, value, probs, w_o, b_o, cache,
                                                inputs.kv_heads, inputs.block_plan)
                delta = branch if delta is None else delta + branch
        return output + delta.to(output.dtype)

    def _release_branch(
        self,
        name: str,
        settings: AdapterSettings,
        o: torch.Tensor,
        query: torch.Tensor,
        value: torch.Tensor,
        probs: torch.Tensor,
        recompute: Callable[[slice], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """y - o = W_up(GELU(W_gate o + b_gate) ⊙ U) + b_up with U from the release graph (§2.4, §3.1).

        ``recompute`` (rows -> probs[..., rows, :]) lets a chunked self-graph block rebuild the attention rows in the
        backward pass instead of keeping ``probs`` (the kernel uses it only when ``probs`` needs no gradient).
        """
        fold_weight, fold_bias = self._release_fold(name, o.dtype)
        heads = probs.shape[1]
        n_q = probs.shape[-2]
        if settings.graph == "self":
            nodes = F.linear(value, fold_weight, fold_bias)
            key_features = _tokens_to_heads(nodes, heads)
            query_features = key_features[:, :, key_features.shape[2] - n_q :]
            attn = probs
            options = {"self_loop": settings.self_loop}
            if recompute is not None and settings.chunk_size is not None:
                options["recompute_attention"] = recompute
        else:
            keys, attn = value, probs
            if settings.key_pool_size is not None:
                keys, attn = _pool_key_nodes(value, probs, settings.key_pool_size, self.module_name)
            key_features = _tokens_to_heads(F.linear(keys, fold_weight, fold_bias), heads)
            query_features = _tokens_to_heads(F.linear(query, fold_weight, fold_bias), heads)
            options = {}
        aggregated = p_laplacian_aggregate(
            query_features,
            key_features,
            attn,
            self.p_value(name),
            self.mu_value(name),
            variant="release",
            graph=settings.graph,
            p_bounds=settings.p_bounds,
            chunk_size=settings.chunk_size,
            compiled=settings.compile_block,
            **options,
        )
        return self._release_output(name, o, _heads_to_tokens(aggregated))

    def _release_output(self, name: str, o: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """W_up(GELU(W_gate o + b_gate) ⊙ U) + b_up for U (batch, n, r), in the dtype of ``o``."""
        gate = self.padapter_gate[name]
        hidden = F.gelu(F.linear(o, gate.weight.to(o.dtype), gate.bias.to(o.dtype))) * u.to(o.dtype)
        hidden = self.padapter_dropout[name](hidden)
        up = self.padapter_up[name]
        return F.linear(hidden, up.weight.to(o.dtype), up.bias.to(o.dtype))

    def _paper_past_degrees(
        self, settings: AdapterSettings, n_q: int, n_k: int, cache: Any
    ) -> tuple[torch.Tensor | None, Callable[[torch.Tensor], None] | None]:
        """Running column degrees of earlier queries for cached decoding with causal degrees (§2.5, H10).

        ``n_k`` is the number of key tokens before pooling. The running sums live next to the KV cache and follow
        its beam reordering; updating them is idempotent, so gradient-checkpoint recomputation and several adapters
        sharing one block are safe.

        Returns:
            ``(past degrees or None, store)``: ``store`` records the degrees after these queries (the block's own
            running sums, ``p_laplacian_aggregate(return_column_degrees=True)``); ``(None, None)`` without causal
            degrees or without a cache.
        """
        if not settings.causal_degrees or cache is None:
            return None, None
        state_layer = self._state_layer(cache)
        past_tokens = state_layer.get_seq_length() - n_q if self.spec.is_cross else n_k - n_q
        key = f"padapter:{id(self)}:{settings.key_pool_size}"
        entries = cache_layer_side_state(state_layer).setdefault(key, {})
        if past_tokens == 0:
            past = None
        elif past_tokens in entries:
            past = entries[past_tokens]
        else:
            raise RuntimeError(
                f"{self.module_name}: cached decoding with the paper variant's causal degrees needs the column "
                f"degrees of the {past_tokens} earlier tokens, but the cache carries none (was the cache filled "
                "without this adapter, or cropped?). Decode from the start with this model, or use use_cache=False."
            )

        def store(degrees: torch.Tensor) -> None:
            entries[past_tokens + n_q] = degrees.detach()
            for stale in [k for k in entries if k < past_tokens]:
                del entries[stale]

        return past, store

    def _paper_branch(
        self,
        name: str,
        settings: AdapterSettings,
        o: torch.Tensor,
        query: torch.Tensor,
        value: torch.Tensor,
        probs: torch.Tensor,
        w_o: torch.Tensor,
        b_o: torch.Tensor | None,
        cache: Any,
        kv_heads: int | None = None,
        block_plan: list[tuple[slice, int]] | None = None,
    ) -> torch.Tensor:
        """Ū' - o with Ū from Eqs. 14-16 on V̂ = [Q ; V] W_O + b_O and head-mean attention (§2.3, §2.5).

        Under grouped-query attention (``kv_heads`` < heads) the value nodes are passed as coordinates in the
        span of their distinct heads (:func:`grouped_value_factors`), which makes the block's pairwise products
        narrower; the result is the same. ``block_plan`` (from the blocked attention) spares the block loop a pass
        over the attention for its key extents.
        """
        query_nodes = F.linear(query, w_o, b_o)
        factors = grouped_value_factors(value, w_o, b_o, probs.shape[1], kv_heads)
        value_nodes, kv_basis = (F.linear(value, w_o, b_o), None) if factors is None else factors
        # The graph is the head-mean attention; the kernel averages the heads block by block (attn_head_mean), so
        # no (n_q, n_k) mean tensor is built and kept for backward. Pooling is linear, so it commutes with the mean
        # and with the basis.
        attn = probs
        if settings.key_pool_size is not None:
            value_nodes, attn = _pool_key_nodes(value_nodes, attn, settings.key_pool_size, self.module_name)
        past_degrees, store_degrees = self._paper_past_degrees(settings, probs.shape[-2], probs.shape[-1], cache)
        result = p_laplacian_aggregate(
            query_nodes.unsqueeze(1),
            value_nodes.unsqueeze(1),
            attn,
            self.p_value(name),
            self.mu_value(name),
            variant="paper",
            graph="bipartite",
            p_bounds=settings.p_bounds,
            causal_degrees=settings.causal_degrees,
            past_column_degrees=past_degrees,
            chunk_size=settings.chunk_size,
            attn_head_mean=True,
            kv_basis=kv_basis,
            return_column_degrees=store_degrees is not None,
            attn_block_plan=block_plan if settings.key_pool_size is None and settings.chunk_size is None else None,
        )
        if store_degrees is not None:
            result, degrees = result
            store_degrees(degrees)
        u_bar = result.squeeze(1)
        down, up = self.padapter_down[name], self.padapter_up[name]
        hidden = F.gelu(F.linear(u_bar, down.weight.to(u_bar.dtype), down.bias.to(u_bar.dtype)))
        hidden = self.padapter_dropout[name](hidden)
        u_prime = F.linear(hidden, up.weight.to(u_bar.dtype), up.bias.to(u_bar.dtype)) + u_bar
        return u_prime - o

    def __repr__(self) -> str:
        return "padapter." + super().__repr__()


# ------------------------------------------------------------------------------------------------ FFN blocks


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
