"""Eager attention that skips the masked upper-right staircase of causal masks (CPU cost of p-adapter's H1).

p-adapter needs the post-softmax attention probabilities, so its towers run eager attention instead of a fused
kernel; under a causal mask about half of the eager products and softmax work is spent on entries that come out
exactly 0. :func:`blocked_eager_attention` computes the same ``softmax(q k^T * scale + bias) v`` in blocks of query
rows, each on the leading key columns where its rows have an unmasked key: the skipped keys have bias at the
dtype's minimum, so their softmax weight is exactly 0 and their gradient (p * (...)) is exactly 0 too. The full
(batch, heads, n_q, n_k) probability tensor is still returned (zeros right of each block's keys), as eager
attention returns it.

Shapes: query (batch, heads, n_q, d), key/value (batch, heads, n_k, d) (key/value heads already repeated to the
query heads), bias additive float (batch or 1, 1 or heads, n_q, >= n_k).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: Query rows per block (about; blocks have equal sizes).
BLOCK_ROWS = 128
#: Use the blocked form only when it skips at least this fraction of the (query, key) pairs.
MIN_SAVING = 0.15


def attention_block_plan(bias: Tensor, n_q: int, n_k: int, block_rows: int | None = None) -> list[tuple[slice, int]]:
    """Blocks of query rows with the number of leading key columns holding all their unmasked keys.

    A key is masked where ``bias`` is below half the dtype's minimum. A row whose keys are all masked gets a
    softmax spread over every key (eager semantics), so a block containing one keeps all ``n_k`` keys.

    Args:
        bias: additive mask (batch or 1, 1 or heads, n_q, >= n_k); block_rows: about this many rows per block
            (default :data:`BLOCK_ROWS`).

    Returns:
        ``[(rows, n_keys), ...]``; a single block ``(all rows, n_k)`` when blocking would skip less than
        :data:`MIN_SAVING` of the pairs.
    """
    block_rows = BLOCK_ROWS if block_rows is None else block_rows
    whole = [(slice(0, n_q), n_k)]
    if n_q <= block_rows:
        return whole
    blocks = max(1, round(n_q / block_rows))
    size = -(-n_q // blocks)
    slices = [slice(start, min(start + size, n_q)) for start in range(0, n_q, size)]
    allowed = bias[..., :n_k] > torch.finfo(bias.dtype).min / 2  # (.., n_q, n_k)
    if allowed.shape[-2] == 1:
        return whole
    fully_masked = allowed.any(dim=-1).logical_not_().reshape(-1, n_q).any(dim=0)  # (n_q,): in some sequence
    positions = torch.arange(1, n_k + 1, device=allowed.device)
    marks = [allowed[..., rows, :].reshape(-1, n_k).any(dim=0) for rows in slices]  # keys any row of a block sees
    ends = (torch.stack(marks) * positions).amax(dim=-1).tolist()
    has_masked_row = [bool(fully_masked[rows].any()) for rows in slices]
    ends = [n_k if masked else max(1, int(end)) for end, masked in zip(ends, has_masked_row)]
    pairs = sum((rows.stop - rows.start) * keys for rows, keys in zip(slices, ends))
    if pairs > (1.0 - MIN_SAVING) * n_q * n_k:
        return whole
    return list(zip(slices, ends))


class _BlockedAttention(torch.autograd.Function):
    """(out (b, h, n_q, d_v), probs (b, h, n_q, n_k)) of softmax(q k^T * scale + bias) v over a block plan."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor, bias: Tensor, scale: float,
                plan: list[tuple[slice, int]]) -> tuple[Tensor, Tensor]:
        batch, heads, n_q, _ = query.shape
        n_k = key.shape[-2]
        probs = query.new_empty(batch, heads, n_q, n_k)
        out = query.new_empty(batch, heads, n_q, value.shape[-1])
        for rows, n_keys in plan:
            if n_keys < n_k:
                probs[..., rows, n_keys:] = 0.0  # only the skipped staircase is zeroed
            scores = torch.matmul(query[..., rows, :], key[..., :n_keys, :].transpose(-1, -2)) * scale
            scores = scores + bias[..., rows, :n_keys]
            block = torch.softmax(scores, dim=-1)
            probs[..., rows, :n_keys] = block
            out[..., rows, :] = torch.matmul(block, value[..., :n_keys, :])
            del scores, block
        ctx.save_for_backward(query, key, value, probs)
        ctx.scale = scale
        ctx.plan = plan
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return out, probs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor | None, grad_probs: Tensor | None) -> tuple[Tensor | None, ...]:
        query, key, value, probs = ctx.saved_tensors
        needs = ctx.needs_input_grad
        scale = ctx.scale
        grad_q = torch.zeros_like(query) if needs[0] else None  # rows of blocks without a gradient stay 0
        grad_k = torch.zeros_like(key) if needs[1] else None
        grad_v = torch.zeros_like(value) if needs[2] else None
        for rows, n_keys in ctx.plan:
            block = probs[..., rows, :n_keys]
            grad_block = None
            if grad_out is not None:
                grad_rows = grad_out[..., rows, :]
                grad_block = torch.matmul(grad_rows, value[..., :n_keys, :].transpose(-1, -2))
                if grad_v is not None:
                    grad_v[..., :n_keys, :] += torch.matmul(block.transpose(-1, -2), grad_rows)
            if grad_probs is not None:
                from_probs = grad_probs[..., rows, :n_keys]
                grad_block = from_probs.clone() if grad_block is None else grad_block.add_(from_probs)
            if grad_block is None or (grad_q is None and grad_k is None):
                continue
            # Softmax backward (aten's fused kernel: (g - sum_j g_j y_j) y in one pass); the skipped keys have
            # probability 0, so the row sums over the kept keys are exact.
            grad_scores = torch.ops.aten._softmax_backward_data(grad_block, block, -1, block.dtype).mul_(scale)
            if grad_q is not None:
                grad_q[..., rows, :] = torch.matmul(grad_scores, key[..., :n_keys, :])
            if grad_k is not None:
                grad_k[..., :n_keys, :] += torch.matmul(grad_scores.transpose(-1, -2), query[..., rows, :])
        return grad_q, grad_k, grad_v, None, None, None


def blocked_eager_attention(query: Tensor, key: Tensor, value: Tensor, bias: Tensor, scale: float,
                            plan: list[tuple[slice, int]]) -> tuple[Tensor, Tensor]:
    """softmax(query key^T * scale + bias) value over the row blocks of ``plan`` (see :func:`attention_block_plan`).

    Args:
        query: (batch, heads, n_q, d); key, value: (batch, heads, n_k, d) / (.., d_v), float32 or float64.
        bias: additive mask (batch or 1, 1 or heads, n_q, >= n_k) of the same dtype; needs no gradient.
        scale: the scores' scaling.
        plan: [(rows, n_keys), ...] covering all query rows; keys right of ``n_keys`` must be masked for ``rows``.

    Returns:
        (output (batch, heads, n_q, d_v), probabilities (batch, heads, n_q, n_k)), as eager attention computes them
        (equal up to float rounding of the smaller products).
    """
    if query.dtype not in (torch.float32, torch.float64) or not (query.dtype == key.dtype == value.dtype == bias.dtype):
        raise TypeError(f"blocked_eager_attention needs float32/float64 inputs of one dtype, got query {query.dtype}, "
                        f"key {key.dtype}, value {value.dtype}, bias {bias.dtype}")
    if bias.requires_grad:
        raise ValueError("blocked_eager_attention: the bias must not require a gradient")
    if query.shape[1] != key.shape[1] or key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"query/key/value heads or lengths disagree: {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    return _BlockedAttention.apply(query, key, value, bias, float(scale), plan)
