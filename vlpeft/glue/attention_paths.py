"""The attention paths of an adapted attention call: the facts that allow each one, and the runners.

For each call of the ``"padapter"`` attention function (:mod:`vlpeft.glue.attention`), :func:`attention_facts` finds
why each path cannot compute it (an :class:`~vlpeft.functional.p_laplacian.backend.AttentionFacts`);
:func:`~vlpeft.functional.p_laplacian.backend.choose_backend` then decides, with the reason:

- ``fused``: the fused Triton kernels compute the attention and the ``release`` self-graph aggregation together
  (:func:`run_fused`; requested by the adapted block with a :class:`FusedReleaseRequest`), so the
  (batch, heads, n, n) attention is never materialised;
- ``blocked``: :func:`~vlpeft.functional.blocked_attention.blocked_eager_attention` in causal row blocks, skipping the
  masked staircase (:func:`run_blocked`);
- ``eager``: the model's own ``eager_attention_forward``.

Both vlpeft paths reproduce only attention modules whose eager function is exactly softmax(q k^T * scaling + mask) v
(:data:`FUSABLE_EAGER_MODULES`). Facts derived from a mask (attended rows, block plans) are cached per mask object
(:func:`mask_fact`): every layer of a forward pass receives the same mask.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlpeft.functional import blocked_attention
from vlpeft.functional.blocked_attention import attention_block_plan, blocked_eager_attention
from vlpeft.functional.p_laplacian import triton_attention, triton_support
from vlpeft.functional.p_laplacian.backend import AttentionFacts, BackendChoice, choose_backend

__all__ = [
    "FUSABLE_EAGER_MODULES",
    "FusedReleaseRequest",
    "attended_query_rows",
    "attention_facts",
    "inline_attention_choice",
    "mask_fact",
    "repeat_heads",
    "run_blocked",
    "run_fused",
]

# Attention modules whose eager function is exactly softmax(q k^T * scaling + mask) v (no soft-capping, sinks or
# extra scaling): the fused kernels and the blocked attention reproduce them. Keyed by the transformers model
# module's last name.
FUSABLE_EAGER_MODULES: frozenset[str] = frozenset({
    "modeling_llama", "modeling_mistral", "modeling_qwen2", "modeling_qwen3", "modeling_gemma", "modeling_phi3",
    "modeling_clip", "modeling_siglip",
})

#: Keyword arguments of an attention call that the blocked attention reproduces (it has no soft-capping, sinks, ...).
_BLOCKED_KWARGS = frozenset({"dropout", "scaling", "position_ids", "cache_position", "output_attentions", "use_cache",
                             "past_key_values", "cache", "sliding_window", "is_causal"})


@dataclass
class FusedReleaseRequest:
    """Ask for the ``release`` self-graph aggregation computed together with the attention by the fused GPU kernels
    (:func:`vlpeft.functional.p_laplacian.triton_attention.fused_attention_p_laplacian`).

    Attributes:
        features: maps the value states (batch, heads, n, head_dim) (repeated to the query heads) to the node
            features F (batch, heads, n, d_f), float32.
        coefficients: () -> (p, mu), the adapter's current coefficients (called only when the kernels run).
        feature_dim: d_f, the width of the node features per head.
        eps, self_loop, p_bounds: the adapter's options (as for ``p_laplacian_aggregate``).
    """

    features: Callable[[torch.Tensor], torch.Tensor]
    coefficients: Callable[[], tuple[torch.Tensor | float, torch.Tensor | float]]
    feature_dim: int
    eps: float | None
    self_loop: str
    p_bounds: tuple[float, float] | None


def repeat_heads(states: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat key/value heads (batch, kv_heads, n, d) to ``num_heads`` like transformers' ``repeat_kv``."""
    kv_heads = states.shape[1]
    if kv_heads == num_heads:
        return states
    if num_heads % kv_heads:
        raise ValueError(f"cannot repeat {kv_heads} key/value heads to {num_heads} query heads")
    return states.repeat_interleave(num_heads // kv_heads, dim=1)


# ------------------------------------------------------------------------------------------ mask facts


#: Facts derived from an attention mask (attended rows, block plans), kept while the mask lives and is unchanged:
#: every layer of a forward pass receives the same mask object, so each fact is computed once per forward.
_MASK_FACTS: dict[int, tuple[weakref.ref, int, dict[tuple, Any]]] = {}
_MASK_FACTS_LIMIT = 8


def mask_fact(mask: torch.Tensor, key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()`` cached per mask object (identity and in-place version) and ``key``."""
    entry = _MASK_FACTS.get(id(mask))
    if entry is None or entry[0]() is not mask or entry[1] != mask._version:
        if len(_MASK_FACTS) >= _MASK_FACTS_LIMIT:
            for stale in [k for k, (ref, _, _) in _MASK_FACTS.items() if ref() is None] or list(_MASK_FACTS):
                del _MASK_FACTS[stale]
        entry = (weakref.ref(mask), mask._version, {})
        _MASK_FACTS[id(mask)] = entry
    facts = entry[2]
    if key not in facts:
        facts[key] = compute()
    return facts[key]


def attended_query_rows(mask: torch.Tensor | None, n_q: int, n_k: int) -> torch.Tensor | None:
    """Which query rows may attend to at least one key, from an attention mask.

    Under an additive mask, a query row whose keys are all masked (e.g. a left-padding position) gets a softmax
    spread over every key, future ones included: an artefact that must not enter a graph built on the attention.

    Args:
        mask: additive float mask or boolean mask (True = attend), broadcastable to (batch, heads, n_q, n_k); the
            key axis may be longer than ``n_k`` (only the first ``n_k`` keys are used); ``None`` means no mask.

    Returns:
        (batch or 1, 1 or heads, n_q, 1) boolean, or ``None`` when ``mask`` is ``None``.
    """
    if mask is None:
        return None
    if mask.dim() != 4:
        raise ValueError(f"expected a 4-D attention mask (batch, heads, n_q, n_k), got shape {tuple(mask.shape)}")
    return mask_fact(mask, ("attended", n_q, n_k), lambda: _attended_rows(mask, n_q, n_k))


def _attended_rows(mask: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    mask = mask[..., -n_q:, :n_k] if mask.shape[-2] >= n_q else mask[..., :n_k]
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask > torch.finfo(mask.dtype).min / 2
    return allowed.any(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------ facts


def attention_facts(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    request: FusedReleaseRequest | None,
    kwargs: dict[str, Any],
) -> tuple[AttentionFacts, list[tuple[slice, int]] | None]:
    """(why each path cannot compute this call, the blocked attention's row-block plan where it applies).

    Args:
        module: the attention module; query (batch, heads, n_q, head_dim); key/value (batch, kv_heads, n_k,
            head_dim); attention_mask: the eager mask or None; request: the adapted block's request for the fused
            kernels (None: none); kwargs: the attention call's other arguments (``dropout`` included).
    """
    fusable = type(module).__module__.rsplit(".", 1)[-1] in FUSABLE_EAGER_MODULES
    blocked, plan = _blocked_fact(module, fusable, query, key, attention_mask, kwargs)
    return AttentionFacts(_fused_fact(module, fusable, query, key, value, attention_mask, request, kwargs), blocked), plan


def _fused_fact(module: nn.Module, fusable: bool, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, request: FusedReleaseRequest | None,
                kwargs: dict[str, Any]) -> str | None:
    if request is None:
        return "not requested (the kernels compute a single active release adapter's self-attention graph only)"
    missing = triton_support.triton_unavailable_reason()
    if missing is not None:
        return missing
    if not fusable:
        return f"attention of {type(module).__module__} is not one the kernels reproduce"
    if float(kwargs.get("dropout", 0.0) or 0.0) > 0.0 and module.training:
        return "attention dropout while training"
    if key.shape[-2] != query.shape[-2]:
        return f"KV-cached queries (n_q={query.shape[-2]}, n_k={key.shape[-2]})"
    if attention_mask is not None and (attention_mask.dtype == torch.bool or attention_mask.dim() != 4):
        return "a boolean or non-4-D attention mask"
    bias = None if attention_mask is None else attention_mask[..., : query.shape[-2]]
    return triton_attention.fused_kernel_blocker(query, key, value, request.feature_dim, bias)


def _blocked_fact(module: nn.Module, fusable: bool, query: torch.Tensor, key: torch.Tensor,
                  attention_mask: torch.Tensor | None,
                  kwargs: dict[str, Any]) -> tuple[str | None, list[tuple[slice, int]] | None]:
    if not fusable:
        return f"attention of {type(module).__module__} may differ from softmax(q k^T * scaling + mask) v", None
    if attention_mask is None or attention_mask.dim() != 4 or not attention_mask.is_floating_point():
        return "no 4-D additive float attention mask", None
    if query.dtype not in (torch.float32, torch.float64) or attention_mask.dtype != query.dtype:
        return f"{str(query.dtype).replace('torch.', '')} queries with a {attention_mask.dtype} mask", None
    extra = set(kwargs) - _BLOCKED_KWARGS
    if attention_mask.requires_grad or extra:
        return f"attention arguments it does not reproduce ({sorted(extra) or 'a mask with a gradient'})", None
    if kwargs.get("sliding_window") is not None:
        return "sliding-window attention", None
    if kwargs.get("scaling", getattr(module, "scaling", None)) is None:
        return "no attention scaling known", None
    n_q, n_k = query.shape[-2], key.shape[-2]
    bias = attention_mask[..., :n_k]
    if bias.shape[-2] != n_q:
        return f"a mask of {bias.shape[-2]} rows for {n_q} queries", None
    plan = mask_fact(attention_mask, ("plan", n_q, n_k, blocked_attention.BLOCK_ROWS),
                     lambda: attention_block_plan(bias, n_q, n_k))
    if len(plan) == 1:
        return "one row block (the mask leaves too few pairs to skip)", None
    return None, plan


def inline_attention_choice(override: str | None = "auto") -> BackendChoice:
    """The attention path of an inline-attention block (its module computes the attention itself)."""
    why = "inline attention (computed inside the module, not through the attention interface)"
    return choose_backend(AttentionFacts(fused=why, blocked=why), override)


# ------------------------------------------------------------------------------------------ runners


def run_fused(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    request: FusedReleaseRequest,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attention output (batch, n_q, heads, head_dim), value states (batch, heads, n, head_dim) repeated to the
    query heads, release aggregate U (batch, heads, n, d_f)) by the fused kernels."""
    value_states = repeat_heads(value, query.shape[1])
    features = request.features(value_states)
    scaling = kwargs.get("scaling", getattr(module, "scaling", None))
    options = {} if request.eps is None else {"eps": request.eps}
    bias = None if attention_mask is None else attention_mask[..., : query.shape[-2]]
    p, mu = request.coefficients()
    out, aggregated = triton_attention.fused_attention_p_laplacian(
        query, key, value, features, p, mu, scale=scaling, attn_bias=bias, self_loop=request.self_loop,
        p_bounds=request.p_bounds, **options,
    )
    return out.transpose(1, 2).contiguous(), value_states, aggregated


def run_blocked(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    plan: list[tuple[slice, int]],
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention output (batch, n_q, heads, head_dim), probs (batch, heads, n_q, n_k)) by
    :func:`~vlpeft.functional.blocked_attention.blocked_eager_attention` on ``plan`` (where :func:`attention_facts`
    found it applies). Dropout is applied by the caller, as for the eager path."""
    scaling = kwargs.get("scaling", getattr(module, "scaling", None))
    heads = query.shape[1]
    bias = attention_mask[..., : key.shape[-2]]
    out, probs = blocked_eager_attention(query, repeat_heads(key, heads), repeat_heads(value, heads), bias,
                                         float(scaling), plan)
    return out.transpose(1, 2).contiguous(), probs
