"""Attention capture: give adapted attention blocks their post-softmax attention and projected queries/values.

p-adapter (and any method that reads the attention graph) needs, for each adapted attention block and each
forward call, the per-head post-softmax, pre-dropout attention ``probs`` (batch, heads, n_q, n_k), the projected
queries (batch, heads, n_q, head_dim) and the projected values of **all** key positions, cached ones included
(batch, heads, n_k, head_dim). Two routes provide them (``ecosystem.md`` §3.4):

- **Interface models** (BLIP-2, LLaVA, PaliGemma, CLIP/SigLIP, GPT-2, BERT/RoBERTa, ...) dispatch attention through
  transformers' ``AttentionInterface``. :data:`PADAPTER_ATTENTION` (``"padapter"``) is registered there, together
  with an ``AttentionMaskInterface`` entry (the eager mask builder; without it transformers would build no mask).
  The function runs the model's own ``eager_attention_forward`` (resolved from the attention module's Python
  module, so GQA ``repeat_kv``, scaling and soft-capping stay model-exact) and, while a :func:`capture_attention`
  context is open for that attention module, records the tensors in it.
- **Inline models** (BLIP text and vision, ViLT, GIT text) compute attention inside the module; the wrapper opens
  :func:`hook_module_outputs` to record what their submodules return (the query/value projections, the inner
  self-attention's ``(context, probs)``).

Methods whose cached decoding needs running state (p-adapter ``paper`` with causal degrees) keep it next to the
KV cache with :func:`cache_layer_side_state`, which follows beam reordering and batch selection of the cache.

Captures are per module and per call: the context is opened by the adapted block around its own base forward, so
gradient-checkpoint recomputation (which re-runs that forward) re-creates it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from vlpeft.functional import blocked_attention
from vlpeft.functional.blocked_attention import attention_block_plan, blocked_eager_attention

PADAPTER_ATTENTION = "padapter"

__all__ = [
    "FUSABLE_EAGER_MODULES",
    "PADAPTER_ATTENTION",
    "AttentionCapture",
    "FusedReleaseRequest",
    "MissingAttentionError",
    "attended_query_rows",
    "cache_layer_side_state",
    "capture_attention",
    "hook_module_outputs",
    "padapter_attention_forward",
    "register_attention_function",
    "repeat_heads",
]


class MissingAttentionError(RuntimeError):
    """An adapted attention block ran without producing attention weights (e.g. under sdpa/flash)."""


@dataclass
class FusedReleaseRequest:
    """Ask :func:`padapter_attention_forward` for the ``release`` self-graph aggregation computed together with the
    attention by the fused GPU kernels (:func:`vlpeft.functional.p_laplacian_triton.attention_p_laplacian`), so the
    (batch, heads, n, n) attention is never materialised.

    Attributes:
        features: maps the value states (batch, heads, n, head_dim) (repeated to the query heads) to the node
            features F (batch, heads, n, d_f), float32.
        p, mu, eps, self_loop, p_bounds: the adapter's coefficients and options (as for ``p_laplacian_aggregate``).
    """

    features: Callable[[torch.Tensor], torch.Tensor]
    p: torch.Tensor | float
    mu: torch.Tensor | float
    eps: float | None
    self_loop: str
    p_bounds: tuple[float, float] | None


@dataclass
class AttentionCapture:
    """Tensors recorded during one forward call of one attention module.

    Attributes:
        query: projected queries (batch, heads, n_q, head_dim), after RoPE where the model applies it.
        value: projected values of all key positions (batch, heads, n_k, head_dim), repeated to the query heads
            under grouped-query attention.
        kv_heads: the number of distinct key/value heads before that repetition (``heads`` without grouping);
            ``value``'s head h repeats key/value head h // (heads / kv_heads), as transformers' ``repeat_kv``.
        block_plan: when the blocked eager attention computed ``probs``, its row blocks ``[(rows, n_keys), ...]``:
            ``probs[..., rows, n_keys:]`` is exactly 0 (``None`` when the model's eager function ran).
        probs: post-softmax, pre-dropout attention (batch, heads, n_q, n_k).
        mask: the attention mask the attention function received ((batch, 1, n_q, n_k) additive or boolean), or
            ``None``.
        calls: how many attention calls were recorded (an adapted block must see exactly one).
        outputs: outputs of submodules recorded by :func:`hook_module_outputs`, by the names given there.
        fused: set by the adapted block before its forward to request the fused kernels (see
            :class:`FusedReleaseRequest`); ``aggregated`` then holds their U (batch, heads, n, d_f) and ``probs``
            stays ``None``. When the inputs do not allow the kernels, the call falls back to eager attention and
            ``aggregated`` stays ``None``.
        recompute_wanted: set by the adapted block before its forward when it can use ``recompute_probs``.
        recompute_probs: for interface models, when ``recompute_wanted`` and ``probs`` needs no gradient, a callable mapping a slice of query rows to ``probs[..., rows, :]``
            (batch, heads, rows, n_k), recomputed by the model's eager attention on those rows (same mask, scaling
            and soft-capping); it keeps the query/key tensors and a compact copy of the mask alive, not the
            (n_q, n_k) attention. Used by chunked p-adapter blocks to rebuild attention rows in the backward pass
            when nothing else keeps the attention (see :func:`recompute_attention_rows`).
    """

    query: torch.Tensor | None = None
    value: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    calls: int = 0
    outputs: dict[str, Any] = field(default_factory=dict)
    fused: FusedReleaseRequest | None = None
    aggregated: torch.Tensor | None = None
    recompute_wanted: bool = False
    recompute_probs: Callable[[slice], torch.Tensor] | None = None
    kv_heads: int | None = None
    block_plan: list[tuple[slice, int]] | None = None

    def record(
        self, query: torch.Tensor, value: torch.Tensor, probs: torch.Tensor | None, mask: torch.Tensor | None = None,
        kv_heads: int | None = None, block_plan: list[tuple[slice, int]] | None = None,
    ) -> None:
        self.query, self.value, self.probs, self.mask = query, value, probs, mask
        self.kv_heads, self.block_plan = kv_heads, block_plan
        self.calls += 1


_local = threading.local()


def _active_captures() -> dict[int, AttentionCapture]:
    captures = getattr(_local, "captures", None)
    if captures is None:
        captures = {}
        _local.captures = captures
    return captures


@contextlib.contextmanager
def capture_attention(attention_module: nn.Module) -> Iterator[AttentionCapture]:
    """Record what :func:`padapter_attention_forward` computes for ``attention_module`` inside this context.

    Nested contexts for the same module are not allowed (one block forward at a time per module and thread).
    """
    captures = _active_captures()
    key = id(attention_module)
    if key in captures:
        raise RuntimeError(
            f"An attention capture is already open for {type(attention_module).__name__} (id {key}); "
            "re-entrant forwards of one attention module are not supported."
        )
    capture = AttentionCapture()
    captures[key] = capture
    try:
        yield capture
    finally:
        del captures[key]


@contextlib.contextmanager
def hook_module_outputs(
    record: dict[str, Any] | None = None,
    modules: dict[str, nn.Module] | None = None,
    replace: dict[nn.Module, Callable[[Any], Any]] | None = None,
) -> Iterator[None]:
    """Temporarily hook submodules: record their outputs and/or replace them.

    Used to wrap inline-attention blocks without re-implementing their forward.

    Args:
        record: dict receiving ``record[name] = output`` for each entry of ``modules`` (the last call wins).
        modules: name -> submodule whose forward output is recorded.
        replace: submodule -> function mapping its output to a replacement output (e.g. to add an adapter branch
            between an output projection's dropout and its LayerNorm).
    """
    handles = []
    try:
        for name, module in (modules or {}).items():
            if record is None:
                raise ValueError("hook_module_outputs: `modules` given without a `record` dict")

            def store(_module: nn.Module, _args: Any, output: Any, _name: str = name) -> None:
                record[_name] = output

            handles.append(module.register_forward_hook(store))
        for module, fn in (replace or {}).items():

            def edit(_module: nn.Module, _args: Any, output: Any, _fn: Callable[[Any], Any] = fn) -> Any:
                return _fn(output)

            handles.append(module.register_forward_hook(edit))
        yield
    finally:
        for handle in handles:
            handle.remove()


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
    return _per_mask(mask, ("attended", n_q, n_k), lambda: _attended_rows(mask, n_q, n_k))


def _attended_rows(mask: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    mask = mask[..., -n_q:, :n_k] if mask.shape[-2] >= n_q else mask[..., :n_k]
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask > torch.finfo(mask.dtype).min / 2
    return allowed.any(dim=-1, keepdim=True)


#: Facts derived from an attention mask (attended rows, block plans), kept while the mask lives and is unchanged:
#: every layer of a forward pass receives the same mask object, so each fact is computed once per forward.
_MASK_FACTS: dict[int, tuple[weakref.ref, int, dict[tuple, Any]]] = {}
_MASK_FACTS_LIMIT = 8


def _per_mask(mask: torch.Tensor, key: tuple, compute: Callable[[], Any]) -> Any:
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


def repeat_heads(states: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat key/value heads (batch, kv_heads, n, d) to ``num_heads`` like transformers' ``repeat_kv``."""
    kv_heads = states.shape[1]
    if kv_heads == num_heads:
        return states
    if num_heads % kv_heads:
        raise ValueError(f"cannot repeat {kv_heads} key/value heads to {num_heads} query heads")
    return states.repeat_interleave(num_heads // kv_heads, dim=1)


def _model_eager_function(module: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    source = sys.modules.get(type(module).__module__)
    function = getattr(source, "eager_attention_forward", None)
    if function is None:
        raise RuntimeError(
            f"{type(module).__name__} (module {type(module).__module__}) has no `eager_attention_forward`; the "
            f"{PADAPTER_ATTENTION!r} attention implementation only supports models that dispatch through "
            "transformers' AttentionInterface with an eager fallback."
        )
    return function


def padapter_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AttentionInterface function: the model's eager attention, recording (query, value, probs) when captured.

    Args:
        module: the attention module calling the interface.
        query: (batch, heads, n_q, head_dim); key/value: (batch, kv_heads, n_k, head_dim), cached positions
            included; attention_mask: the eager (additive float) mask or ``None``.

    Returns:
        ``(attn_output, attn_weights)`` exactly as the model's eager function returns them (attention output
        (batch, n_q, heads, head_dim) and post-dropout weights (batch, heads, n_q, n_k)).
    """
    eager = _model_eager_function(module)
    capture = _active_captures().get(id(module))
    if capture is None:
        return eager(module, query, key, value, attention_mask, **kwargs)
    if capture.fused is not None:
        fused = _fused_release_attention(module, query, key, value, attention_mask, capture, kwargs)
        if fused is not None:
            return fused
    dropout = float(kwargs.pop("dropout", 0.0) or 0.0)
    blocked = _blocked_attention(module, query, key, value, attention_mask, kwargs)
    if blocked is not None:
        attn_output, probs, plan = blocked
    else:
        attn_output, probs = eager(module, query, key, value, attention_mask, dropout=0.0, **kwargs)
        plan = None
    value_states = repeat_heads(value, probs.shape[1])
    if dropout > 0.0 and module.training:
        dropped = nn.functional.dropout(probs, p=dropout, training=True)
        attn_output = torch.matmul(dropped, value_states).transpose(1, 2).contiguous()
        returned = dropped
    else:
        returned = probs
    capture.record(query, value_states, probs, attention_mask, kv_heads=value.shape[1], block_plan=plan)
    if capture.recompute_wanted and not (torch.is_grad_enabled() and probs.requires_grad):
        capture.recompute_probs = recompute_attention_rows(eager, module, query, key, value, attention_mask, kwargs)
    return attn_output, returned


def recompute_attention_rows(
    eager: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> Callable[[slice], torch.Tensor]:
    """A callable ``rows -> probs[..., rows, :]`` re-running the eager attention on a block of query rows.

    Args:
        eager: the model's eager attention function; module, query (batch, heads, n_q, head_dim), key/value
            (batch, kv_heads, n_k, head_dim), attention_mask and kwargs: what it was called with (dropout is forced
            to 0: the probabilities are the pre-dropout ones).

    An additive mask holding only 0 and the dtype's minimum (causal and padding masks) is kept as a boolean
    (1/4 of its size) and rebuilt exactly per block (s + min rounds to min for any finite score s); other masks
    are kept as they are.

    The rows are recomputed under the autocast state of this (forward) call, whatever autocast state the caller
    has (the p-Laplacian backward runs with autocast off): under bf16/fp16 autocast the eager function's matmuls
    then see the dtypes they saw in the forward pass (issue #18 item 10).
    """
    options = {k: v for k, v in kwargs.items() if k != "dropout"}
    autocast_states = [
        (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        for kind in dict.fromkeys((query.device.type, "cpu")) if torch.amp.is_autocast_available(kind)
    ]
    mask = attention_mask
    allowed = None
    if mask is not None and mask.dtype != torch.bool and mask.is_floating_point():
        lowest = torch.finfo(mask.dtype).min
        is_zero = mask == 0
        if bool((is_zero | (mask == lowest)).all()):
            allowed, mask = is_zero, None
        del is_zero

    def rows_of(rows: slice) -> torch.Tensor:
        if allowed is not None:
            block = allowed[..., rows, :] if allowed.shape[-2] != 1 else allowed
            mask_rows = torch.zeros(block.shape, dtype=attention_dtype, device=block.device).masked_fill_(
                ~block, torch.finfo(attention_dtype).min)
        elif mask is not None:
            mask_rows = mask[..., rows, :] if mask.shape[-2] != 1 else mask
        else:
            mask_rows = None
        with contextlib.ExitStack() as stack:
            for kind, enabled, dtype in autocast_states:
                stack.enter_context(torch.autocast(device_type=kind, dtype=dtype, enabled=enabled))
            return eager(module, query[..., rows, :], key, value, mask_rows, dropout=0.0, **options)[1]

    attention_dtype = attention_mask.dtype if attention_mask is not None else query.dtype
    return rows_of


# Attention modules whose eager function is exactly softmax(q k^T * scaling + mask) v (no soft-capping, sinks or
# extra scaling): the fused kernels reproduce them. Keyed by the transformers model module's last name.
FUSABLE_EAGER_MODULES: frozenset[str] = frozenset({
    "modeling_llama", "modeling_mistral", "modeling_qwen2", "modeling_qwen3", "modeling_gemma", "modeling_phi3",
    "modeling_clip", "modeling_siglip",
})


def _fused_release_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    capture: AttentionCapture,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None] | None:
    """Attention output and release aggregation by the fused kernels, or ``None`` when they do not apply here
    (another attention variant, dropout while training, KV-cached queries, a boolean mask, CPU tensors, ...)."""
    from vlpeft.functional.p_laplacian_triton import attention_p_laplacian, fused_kernel_supported

    if type(module).__module__.rsplit(".", 1)[-1] not in FUSABLE_EAGER_MODULES:
        return None
    if float(kwargs.get("dropout", 0.0) or 0.0) > 0.0 and module.training:
        return None
    n = query.shape[-2]
    if key.shape[-2] != n:
        return None
    bias = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool or attention_mask.dim() != 4:
            return None
        bias = attention_mask[..., :n]
    request = capture.fused
    value_states = repeat_heads(value, query.shape[1])
    features = request.features(value_states)
    if not fused_kernel_supported(query, key, value, features, bias):
        return None
    scaling = kwargs.get("scaling", getattr(module, "scaling", None))
    options = {} if request.eps is None else {"eps": request.eps}
    out, aggregated = attention_p_laplacian(
        query, key, value, features, request.p, request.mu, scale=scaling, attn_bias=bias,
        self_loop=request.self_loop, p_bounds=request.p_bounds, backend="triton", **options,
    )
    capture.record(query, value_states, None, attention_mask, kv_heads=value.shape[1])
    capture.aggregated = aggregated
    return out.transpose(1, 2).contiguous(), None


def _blocked_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[slice, int]]] | None:
    """(attention output (batch, n_q, heads, head_dim), probs, block plan) by :func:`blocked_eager_attention`, or
    ``None`` where it
    does not apply: attention modules outside :data:`FUSABLE_EAGER_MODULES` (whose eager function may differ from
    softmax(q k^T * scaling + mask) v), no additive mask, half precision, or a mask that leaves less than 15 % of the
    pairs to skip (non-causal attention). Dropout is applied by the caller, as for the eager path."""
    if type(module).__module__.rsplit(".", 1)[-1] not in FUSABLE_EAGER_MODULES:
        return None
    if attention_mask is None or attention_mask.dim() != 4 or not attention_mask.is_floating_point():
        return None
    if query.dtype not in (torch.float32, torch.float64) or attention_mask.dtype != query.dtype:
        return None
    if attention_mask.requires_grad or set(kwargs) - {"scaling", "position_ids", "cache_position",
                                                      "output_attentions", "use_cache", "past_key_values", "cache",
                                                      "sliding_window", "is_causal"}:
        return None
    if kwargs.get("sliding_window") is not None:
        return None
    scaling = kwargs.get("scaling", getattr(module, "scaling", None))
    if scaling is None:
        return None
    n_q, n_k = query.shape[-2], key.shape[-2]
    bias = attention_mask[..., :n_k]
    if bias.shape[-2] != n_q:
        return None
    plan = _per_mask(attention_mask, ("plan", n_q, n_k, blocked_attention.BLOCK_ROWS),
                     lambda: attention_block_plan(bias, n_q, n_k))
    if len(plan) == 1:
        return None
    heads = query.shape[1]
    out, probs = blocked_eager_attention(query, repeat_heads(key, heads), repeat_heads(value, heads), bias,
                                         float(scaling), plan)
    return out.transpose(1, 2).contiguous(), probs, plan


_SIDE_STATE_ATTR = "_vlpeft_side_state"
_STATEFUL_LAYER_CLASSES: dict[type, type] = {}


def _map_side_state(layer: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for entries in layer.__dict__.get(_SIDE_STATE_ATTR, {}).values():
        for key in list(entries):
            entries[key] = fn(entries[key])


def _stateful_layer_class(base: type) -> type:
    """A subclass of a cache-layer class whose batch reordering also reorders the attached side state."""
    if base in _STATEFUL_LAYER_CLASSES:
        return _STATEFUL_LAYER_CLASSES[base]

    def reorder_cache(self: Any, beam_idx: torch.LongTensor) -> None:
        base.reorder_cache(self, beam_idx)
        _map_side_state(self, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self: Any, repeats: int) -> None:
        base.batch_repeat_interleave(self, repeats)
        _map_side_state(self, lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self: Any, indices: torch.Tensor) -> None:
        base.batch_select_indices(self, indices)
        _map_side_state(self, lambda t: t[indices.to(t.device)])

    def crop(self: Any, tokens_to_remove: int) -> None:
        # Running sums cannot be un-accumulated: drop the state; a later cached step then raises.
        base.crop(self, tokens_to_remove)
        self.__dict__.get(_SIDE_STATE_ATTR, {}).clear()

    def reset(self: Any) -> None:
        base.reset(self)
        self.__dict__.get(_SIDE_STATE_ATTR, {}).clear()

    methods = {
        "reorder_cache": reorder_cache,
        "batch_repeat_interleave": batch_repeat_interleave,
        "batch_select_indices": batch_select_indices,
        "crop": crop,
        "reset": reset,
    }
    stateful = type(f"SideState{base.__name__}", (base,), {k: v for k, v in methods.items() if hasattr(base, k)})
    _STATEFUL_LAYER_CLASSES[base] = stateful
    return stateful


def cache_layer_side_state(layer: Any) -> dict[str, dict[int, torch.Tensor]]:
    """Side state stored on one KV-cache layer object, kept in step with the cache's batch order.

    The layer object's class is swapped (once) for a subclass whose ``reorder_cache`` / ``batch_select_indices`` /
    ``batch_repeat_interleave`` also apply to the side tensors (batch axis 0); ``crop`` and ``reset`` clear them.

    Returns:
        A dict owner key -> {number of tokens processed: tensor (batch, ...)}, owned by the callers.
    """
    if _SIDE_STATE_ATTR not in layer.__dict__:
        layer.__class__ = _stateful_layer_class(type(layer))
        layer.__dict__[_SIDE_STATE_ATTR] = {}
    return layer.__dict__[_SIDE_STATE_ATTR]


def register_attention_function() -> None:
    """Register :data:`PADAPTER_ATTENTION` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(PADAPTER_ATTENTION, padapter_attention_forward)
    AttentionMaskInterface.register(PADAPTER_ATTENTION, eager_mask)


register_attention_function()
