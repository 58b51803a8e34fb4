"""Column degrees of the ``paper`` graph, and their running sums across KV-cached decoding steps (p-adapter.md §2.5, H10).

The ``paper`` weights normalise by the column degrees D_j of the attention M (batch, heads, n_q, n_k): all queries'
column sums, or with causal degrees D_j^(q) = past_j + sum_{q' <= q} M_q'j, so that query row q depends on rows
<= q only. In cached decoding, ``past`` (batch, heads, n_past) carries the column sums of every earlier query
(right-padded with zeros: under causality earlier queries put no mass on newer keys); :func:`accumulate_column_degrees`
maintains it, and with it cached decoding equals cache-free decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlpeft.functional.precision import autocast_disabled, compute_dtype
from vlpeft.functional.shapes import broadcast_shapes


def accumulate_column_degrees(attn: Tensor, past_column_degrees: Tensor | None = None, *,
                              head_mean: bool = False) -> Tensor:
    """Running column degrees for cached ``paper`` decoding with causal degrees.

    Args:
        attn: attention of the current queries (batch, heads, n_q, n_k).
        past_column_degrees: previous running degrees (batch, heads, n_past), n_past <= n_k, or None.
        head_mean: the graph is the head mean of ``attn`` (as with ``attn_head_mean``): the result and
            ``past_column_degrees`` then have heads = 1.

    Returns:
        (batch, heads, n_k) in float32 (float64 for float64 inputs): past (zero-padded to n_k) plus the
        column sums of ``attn``. Pass it as ``past_column_degrees`` for the next decoding step.
    """
    if attn.dim() != 4:
        raise ValueError(f"attn must be 4-D (batch, heads, n_q, n_k), got shape {tuple(attn.shape)}")
    dtype = compute_dtype(attn.dtype)
    with autocast_disabled(attn.device.type):
        total = attn.to(dtype).sum(dim=-2)
        if head_mean:
            total = total.mean(dim=1, keepdim=True)
        if past_column_degrees is not None:
            check_past_degrees(past_column_degrees, attn.shape[-1], tuple(total.shape[:2]))
            total = total + pad_past(past_column_degrees.to(dtype), attn.shape[-1])
    return total


def check_past_degrees(past: Tensor, n_k: int, lead: tuple[int, ...]) -> None:
    """``past`` must be (batch, heads, n_past) with n_past <= n_k and (batch, heads) broadcasting with ``lead``."""
    if not isinstance(past, Tensor) or past.dim() != 3 or past.shape[-1] > n_k:
        shape = tuple(past.shape) if isinstance(past, Tensor) else type(past).__name__
        raise ValueError(f"past_column_degrees must be (batch, heads, n_past) with n_past <= n_k={n_k}, got {shape}")
    try:
        broadcast_shapes(tuple(past.shape[:2]), lead)
    except RuntimeError as err:
        raise ValueError(f"past_column_degrees batch/heads {tuple(past.shape[:2])} do not broadcast with {lead}") from err


def pad_past(past: Tensor, n_k: int) -> Tensor:
    """(batch, heads, n_past) zero-padded on the right to (batch, heads, n_k)."""
    return torch.nn.functional.pad(past, (0, n_k - past.shape[-1]))


def initial_column_degrees(attn: Tensor, past: Tensor | None, *, causal: bool, head_mean: bool) -> Tensor:
    """The column degrees before the first block of query rows: (.., 1, n_k), or a 0-d zero.

    Causal: the degrees of the earlier queries, ``past`` (batch, heads, n_past) zero-padded to n_k (0-d zero
    without a past); each block adds its own running sums. Otherwise: the full column sums of ``attn``
    (batch, heads, n_q, n_k) over all queries, averaged over the heads (keepdim) with ``head_mean``.
    """
    if causal:
        return attn.new_zeros(()) if past is None else pad_past(past, attn.shape[-1]).unsqueeze(-2)
    base = attn.sum(dim=-2, keepdim=True)
    return base.mean(dim=1, keepdim=True) if head_mean else base
