"""The ``release`` weights of one block of query rows (p-adapter.md §3.1), in place (default path) and as pure
functions for ``torch.compile`` (``compiled=True``).

A block: centred query-row features xq_c (.., rows, d), centred key features xk_c (.., keys, d) with squared norms
sq_k (.., 1, keys), its attention rows attn (.., rows, keys); per-row h = (p - 2) / 2 and log c = log(2 mu / p)
broadcastable to (.., rows, 1). S = max((A + eps) D, s_min^2) with D the squared distances (self loops forced to
s_min^2 under the ``release`` policy), W = A exp(h log S - shift): exactly 0 on non-edges (A = 0) and on dropped self
loops, without a log of the attention.

``settings`` (of :class:`~vlpeft.functional.p_laplacian.release.ReleaseAggregate`):
(eps, s_min^2, self graph, drop self loops, query offset).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vlpeft.functional.p_laplacian.gradients import gram_distances, mul_, thin_matmul

ReleaseSettings = tuple[float, float, bool, bool, int]


def self_loops(pairs: Tensor, rows: slice, query_offset: int) -> Tensor:
    """View of the self-loop entries (query i, key node query_offset + i) of a block of rows ``rows``."""
    return pairs.diagonal(offset=query_offset + rows.start, dim1=-2, dim2=-1)


def release_scaled(xq_c: Tensor, xk_c: Tensor, sq_k: Tensor, attn: Tensor, rows: slice,
                   settings: ReleaseSettings) -> tuple[Tensor, Tensor]:
    """(S, D) of a block (.., rows, keys): D = squared distances, S = max((A + eps) D, s_min^2) with forced self loops
    at s_min^2."""
    eps, s_min_sq, self_graph, drop_self_loops, query_offset = settings
    dist_sq = gram_distances(xq_c, xk_c, sq_k)
    scaled = mul_(attn + eps, dist_sq).clamp_min_(s_min_sq)
    if self_graph and not drop_self_loops:
        self_loops(scaled, rows, query_offset).fill_(s_min_sq)
    return scaled, dist_sq


def release_weights(log_scaled: Tensor, attn: Tensor, half_pm2: Tensor | float, shift: Tensor, rows: slice,
                    settings: ReleaseSettings, *, in_place: bool) -> Tensor:
    """A * exp((p - 2)/2 * log S - shift) (.., rows, keys), exactly 0 on non-edges (A = 0) and on dropped self loops.

    The weight W = A S^((p-2)/2) is formed as A times an exponential instead of exp(log A + ...): no log of the
    attention (zeros and subnormals take a slow path on CPU) and no mask pass for the non-edges, whose factor A is
    0. ``shift`` (>= the row maximum of the exponent's first term, or the log-normaliser) keeps exp <= 1 / total.
    """
    _, _, self_graph, drop_self_loops, query_offset = settings
    exponent = mul_(log_scaled, half_pm2) if in_place else log_scaled * half_pm2
    weights = mul_(exponent.sub_(shift).exp_(), attn)
    if self_graph and drop_self_loops:
        self_loops(weights, rows, query_offset).fill_(0.0)
    return weights


def self_loop_mask(pairs: Tensor, diagonal: Tensor) -> Tensor:
    """(rows, keys) boolean: key column == ``diagonal`` + row (the self loops of a block of rows)."""
    rows = torch.arange(pairs.shape[-2], device=pairs.device).unsqueeze(-1)
    keys = torch.arange(pairs.shape[-1], device=pairs.device)
    return keys == rows + diagonal.to(pairs.device)


# ------------------------------------------------------------------------------------------ compiled=True


def release_forward_block(xq_c: Tensor, xk_c: Tensor, sq_k: Tensor, attn: Tensor, x_keys: Tensor, x_rows: Tensor,
                          half: Tensor, log_c: Tensor, diagonal: Tensor, eps: float, s_min_sq: float,
                          self_graph: bool, drop_self_loops: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The ``release`` forward of one block of rows as one pure function (the ``compiled=True`` path).

    The formulas of :class:`~vlpeft.functional.p_laplacian.release.ReleaseAggregate`'s forward written out-of-place
    (for ``torch.compile`` to fuse): xq_c (.., rows, d) / xk_c (.., keys, d) centred features, sq_k (.., 1, keys),
    attn (.., rows, keys), x_keys / x_rows the uncentred key / row features, half = (p - 2) / 2 and log_c rows,
    ``diagonal`` (0-d integer tensor) the key column of the block's first row's self loop. Returns (out (.., rows, d),
    aggregate (.., rows, d), log-normaliser L (.., rows, 1)).
    """
    scaled = ((attn + eps) * gram_distances(xq_c, xk_c, sq_k)).clamp_min(s_min_sq)
    loops = self_loop_mask(scaled, diagonal) if self_graph else None
    if loops is not None and not drop_self_loops:
        scaled = torch.where(loops, s_min_sq, scaled)
    exponent = torch.log(scaled) * half
    shift = torch.maximum(exponent.amax(dim=-1, keepdim=True), log_c)
    weights = torch.exp(exponent - shift) * attn
    if loops is not None and drop_self_loops:
        weights = torch.where(loops, 0.0, weights)
    total = weights.sum(dim=-1, keepdim=True) + torch.exp(log_c - shift)
    log_norm = shift + torch.log(total)
    aggregated = thin_matmul(weights / total, x_keys)
    out = aggregated + torch.exp(log_c - log_norm) * x_rows if self_graph else aggregated
    return out, aggregated, log_norm


def release_backward_block(xq_c: Tensor, xk_c: Tensor, sq_k: Tensor, attn: Tensor, x_keys: Tensor, x_rows: Tensor,
                           half: Tensor, log_c: Tensor, diagonal: Tensor, log_norm: Tensor, grad: Tensor,
                           aggregated: Tensor, eps: float, s_min_sq: float, self_graph: bool,
                           drop_self_loops: bool, need_attn: bool, need_p: bool
                           ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """The ``release`` backward of one block of rows as one pure function (the ``compiled=True`` path).

    The chain rule of :class:`~vlpeft.functional.p_laplacian.release.ReleaseAggregate`'s backward, out-of-place;
    arguments as for :func:`release_forward_block` plus the saved L (.., rows, 1), the output gradient and the saved
    aggregate of the rows (.., rows, d). Returns (dL/dx rows (.., rows, d), dL/dx of the block's keys (.., keys, d),
    dL/dattn block (.., rows, keys) or None, per-row dL/dp or None, dL/dlog c rows).
    """
    dist_sq = gram_distances(xq_c, xk_c, sq_k)
    scaled = ((attn + eps) * dist_sq).clamp_min(s_min_sq)
    loops = self_loop_mask(scaled, diagonal) if self_graph else None
    if loops is not None and not drop_self_loops:
        scaled = torch.where(loops, s_min_sq, scaled)
    free = scaled > s_min_sq
    log_scaled = torch.log(scaled)
    omega = torch.exp(log_scaled * half - log_norm) * attn
    if loops is not None and drop_self_loops:
        omega = torch.where(loops, 0.0, omega)
    beta = torch.exp(log_c - log_norm)
    total = (grad * aggregated).sum(dim=-1, keepdim=True)
    if self_graph:
        grad_beta = (grad * x_rows).sum(dim=-1, keepdim=True)
        total = total + beta * grad_beta
        grad_log_c = beta * (grad_beta - total)
        grad_rows = beta * grad
    else:
        grad_log_c = -beta * total
        grad_rows = torch.zeros_like(xq_c)
    grad_log_w = (torch.matmul(grad, x_keys.transpose(-1, -2)) - total) * omega
    grad_keys = thin_matmul(omega.transpose(-1, -2), grad)
    grad_p = 0.5 * (grad_log_w * log_scaled).sum(dim=-1, keepdim=True) if need_p else None
    grad_scaled = torch.where(free, grad_log_w * half / scaled, 0.0)
    grad_attn = grad_log_w / attn.clamp_min(torch.finfo(attn.dtype).tiny) + grad_scaled * dist_sq if need_attn else None
    grad_dist = grad_scaled * (attn + eps)
    grad_rows = grad_rows + 2.0 * grad_dist.sum(dim=-1, keepdim=True) * xq_c - 2.0 * thin_matmul(grad_dist, xk_c)
    grad_keys = grad_keys + (2.0 * grad_dist.sum(dim=-2).unsqueeze(-1) * xk_c
                             - 2.0 * thin_matmul(grad_dist.transpose(-1, -2), xq_c))
    return grad_rows, grad_keys, grad_attn, grad_p, grad_log_c


_COMPILED_BLOCKS: dict[str, Callable[..., Any]] = {}
#: How the ``compiled=True`` block functions are wrapped (tests may replace it to check the math uncompiled).
_COMPILER: Callable[[Callable[..., Any]], Callable[..., Any]] = functools.partial(torch.compile, dynamic=True)


def compiled_release_block(direction: str) -> Callable[..., Any]:
    """The ``torch.compile``d :func:`release_forward_block` / :func:`release_backward_block` (built once)."""
    if direction not in _COMPILED_BLOCKS:
        function = release_forward_block if direction == "forward" else release_backward_block
        _COMPILED_BLOCKS[direction] = _COMPILER(function)
    return _COMPILED_BLOCKS[direction]
