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
  context is open for that attention module, records the tensors in it. For a captured call, the attention path
  (fused Triton kernels, blocked eager attention in torch, or the model's eager function) is chosen by
  :func:`~vlpeft.functional.p_laplacian.backend.choose_backend` from the facts of
  :func:`~vlpeft.glue.attention_paths.attention_facts`.
- **Inline models** (BLIP text and vision, ViLT, GIT text) compute attention inside the module; the wrapper opens
  :func:`hook_module_outputs` to record what their submodules return (the query/value projections, the inner
  self-attention's ``(context, probs)``).

Methods whose cached decoding needs running state (p-adapter ``paper`` with causal degrees) keep it next to the
KV cache with :func:`~vlpeft.glue.cache_side_state.cache_layer_side_state`, which follows beam reordering and batch
selection of the cache.

Captures are per module and per call: the context is opened by the adapted block around its own base forward, so
gradient-checkpoint recomputation (which re-runs that forward) re-creates it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from vlpeft.functional.p_laplacian.backend import choose_backend
from vlpeft.glue.attention_paths import (
    FUSABLE_EAGER_MODULES,
    FusedReleaseRequest,
    attended_query_rows,
    attention_facts,
    repeat_heads,
    run_blocked,
    run_fused,
)
from vlpeft.glue.cache_side_state import cache_layer_side_state

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
    "recompute_attention_rows",
    "register_attention_function",
    "repeat_heads",
]


class MissingAttentionError(RuntimeError):
    """An adapted attention block ran without producing attention weights (e.g. under sdpa/flash)."""


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
            :class:`~vlpeft.glue.attention_paths.FusedReleaseRequest`); when they run, ``aggregated`` holds their U
            (batch, heads, n, d_f) and ``probs`` stays ``None``. Otherwise (the backend choice declines them: see
            ``backend_override``) the attention runs in torch and ``aggregated`` stays ``None``.
        backend_override: set by the adapted block: its ``PAdapterConfig.backend`` ("auto": ``VLPEFT_BACKEND``
            decides), passed to :func:`~vlpeft.functional.p_laplacian.backend.choose_backend`.
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
    backend_override: str = "auto"
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

    For a captured call, :func:`~vlpeft.functional.p_laplacian.backend.choose_backend` picks the path from the
    facts of :func:`~vlpeft.glue.attention_paths.attention_facts`: the fused Triton kernels (which also compute the
    ``release`` aggregation, left in ``capture.aggregated``), the blocked eager attention, or the model's eager
    function.

    Args:
        module: the attention module calling the interface.
        query: (batch, heads, n_q, head_dim); key/value: (batch, kv_heads, n_k, head_dim), cached positions
            included; attention_mask: the eager (additive float) mask or ``None``.

    Returns:
        ``(attn_output, attn_weights)`` as the model's eager function returns them (attention output
        (batch, n_q, heads, head_dim) and post-dropout weights (batch, heads, n_q, n_k); ``None`` weights when the
        fused kernels ran).
    """
    eager = _model_eager_function(module)
    capture = _active_captures().get(id(module))
    if capture is None:
        return eager(module, query, key, value, attention_mask, **kwargs)
    facts, plan = attention_facts(module, query, key, value, attention_mask, capture.fused, kwargs)
    path = choose_backend(facts, capture.backend_override).attention
    if path == "fused":
        attn_output, value_states, capture.aggregated = run_fused(module, query, key, value, attention_mask,
                                                                   capture.fused, kwargs)
        capture.record(query, value_states, None, attention_mask, kv_heads=value.shape[1])
        return attn_output, None
    dropout = float(kwargs.pop("dropout", 0.0) or 0.0)
    if path == "blocked":
        attn_output, probs = run_blocked(module, query, key, value, attention_mask, plan, kwargs)
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


def register_attention_function() -> None:
    """Register :data:`PADAPTER_ATTENTION` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(PADAPTER_ATTENTION, padapter_attention_forward)
    AttentionMaskInterface.register(PADAPTER_ATTENTION, eager_mask)


register_attention_function()
