"""Tensor helpers shared by the variants' hand-written forward and backward passes (and the C-kernel wrappers).

Products: :func:`gram_distances` (pairwise squared distances as one matmul) and :func:`thin_matmul` (products with
a narrow right operand). Weights: :func:`edge_weights` / :func:`normalised_weights` (exponentials in log space,
exactly 0 on non-edges). Gradient assembly: :func:`reduce_to` (sum over broadcast axes), :func:`write_rows` /
:func:`add_key_rows` (a block's share into a full gradient), :func:`coefficient_grads` (p and mu).

Conventions: a block works on query rows (.., rows, d) and its leading key columns (.., keys, d); pairwise tensors
are (.., rows, keys); per-row scalars (.., rows, 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vlpeft.functional.p_laplacian.planning import concat_rows
from vlpeft.functional.shapes import broadcast_shapes

#: Below this output width, CPU BLAS runs (m, k) @ (k, d) several times faster as the transposed product.
THIN_WIDTH = 16


def reduce_to(grad: Tensor | None, like: Tensor, needed: bool) -> Tensor | None:
    """``grad`` summed to the shape of ``like`` (the axes broadcast in the forward pass), or None if not needed."""
    if not needed or grad is None:
        return None
    return grad.sum_to_size(like.shape) if grad.shape != like.shape else grad


def add(total: Tensor | None, term: Tensor) -> Tensor:
    """total + term, where a None total is 0."""
    return term if total is None else total + term


def write_rows(target: Tensor, rows: slice, grad: Tensor) -> None:
    """target[..., rows, :] = grad summed over the axes that were broadcast against ``target``."""
    view = target[..., rows, :]
    view.copy_(grad.sum_to_size(view.shape) if grad.shape != view.shape else grad)


def add_key_rows(total: Tensor | None, part: Tensor, n_k: int) -> Tensor:
    """total (.., n_k, d) + part (.., n, d) on the first n key rows (total starts as zeros when None)."""
    if part.shape[-2] == n_k:
        return part if total is None else total + part
    if total is None:
        total = part.new_zeros(*part.shape[:-2], n_k, part.shape[-1])
    elif broadcast_shapes(total.shape, part.shape[:-2] + total.shape[-2:]) != total.shape:
        total = total.expand(*part.shape[:-2], *total.shape[-2:]).clone()
    total[..., : part.shape[-2], :] += part
    return total


def coefficient_grads(need_p: bool, need_mu: bool, p: Tensor, mu: Tensor, grad_p_rows: list[Tensor],
                      grad_log_c_rows: list[Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of p and mu from per-row pieces (.., rows, 1): d/dp of the weights and of log c = log(2 mu / p)."""
    grad_p = grad_mu = None
    if need_p or need_mu:
        grad_log_c = concat_rows(grad_log_c_rows)
        if need_p:
            grad_p = (concat_rows(grad_p_rows) - grad_log_c / p).sum_to_size(p.shape)
        if need_mu:
            grad_mu = (grad_log_c / mu).sum_to_size(mu.shape)
    return grad_p, grad_mu


def thin_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a (.., m, k) @ b (.., k, d); for d < 16 on CPU computed as (b^T a^T)^T.

    The pairwise products of the release heads (d = r / heads, e.g. 8) have a thin right operand; CPU BLAS is
    slow for such shapes (1.5 ms vs 0.5 ms for (4, 643, 643) @ (4, 643, 8) on one thread) and fast for the
    transposed product, which reads the same operands and returns a transposed view.
    """
    if b.shape[-1] >= THIN_WIDTH or a.device.type != "cpu":
        return torch.matmul(a, b)
    return torch.matmul(b.transpose(-1, -2), a.transpose(-1, -2)).transpose(-1, -2)


def gram_distances(xq: Tensor, xk: Tensor, sq_k: Tensor) -> Tensor:
    """||xq_i - xk_j||^2 (.., n_q, n_k) as one matmul of augmented features [xq, |xq|^2, 1] . [-2 xk, 1, |xk|^2].

    ``xq`` (.., n_q, d), ``xk`` (.., n_k, d), ``sq_k`` = |xk|^2 as (.., 1, n_k). One product writes the result
    directly, instead of a Gram product followed by three elementwise passes over the (n_q, n_k) output.
    """
    sq_q = (xq * xq).sum(dim=-1, keepdim=True)
    ones_q = torch.ones_like(sq_q)
    lead_k = xk.shape[:-1]
    left = torch.cat((xq, sq_q, ones_q), dim=-1)
    right = torch.cat((-2.0 * xk, torch.ones(lead_k, dtype=xk.dtype, device=xk.device).unsqueeze(-1),
                       sq_k.transpose(-1, -2).expand(*lead_k, 1)), dim=-1)
    return torch.matmul(left, right.transpose(-1, -2))


def edge_weights(shifted_log_w: Tensor, non_edge: Tensor) -> Tensor:
    """exp(shifted_log_w) on edges and exactly 0 on non-edges, in place; both (.., rows, keys).

    Non-edges carry finite log weights (no -inf): on CPU, exp of -inf or of arguments whose result underflows
    runs several times slower than on ordinary values, so the argument is floored at log(tiny) + 8 (weights below
    ~e^8 * tiny, 3.5e-35 in float32, of the row's largest are raised to that) and non-edges are zeroed after.
    """
    floor = math.log(torch.finfo(shifted_log_w.dtype).tiny) + 8.0
    return shifted_log_w.clamp_min_(floor).exp_().masked_fill_(non_edge, 0.0)


def normalised_weights(log_w: Tensor, log_c: Tensor, non_edge: Tensor) -> tuple[Tensor, Tensor]:
    """(omega, L): omega = exp(log_w - L) on edges, 0 on non-edges, L = log(sum_edges exp(log_w) + exp(log_c)).

    ``log_w`` (.., rows, keys), ``log_c`` (.., rows, 1) or broadcastable. One exponential pass:
    omega = exp(log_w - shift) / total, L = shift + log(total); overwrites ``log_w``. The shift is the row maximum
    over all entries (non-edges included: they are finite) and log_c; any shift keeps the result exact as long as
    nothing overflows, and the non-edge values lie far below the edges' (they have log A = log(tiny) in
    ``release``; in ``paper`` a non-edge sits at log A = 0, above its row's edges by at most (p/2) |log A| of the
    largest edge, a few units for attention rows that sum to about 1).
    """
    shift = torch.maximum(log_w.amax(dim=-1, keepdim=True), log_c)
    weights = edge_weights(log_w.sub_(shift), non_edge)
    total = weights.sum(dim=-1, keepdim=True) + torch.exp(log_c - shift)
    return weights.div_(total), shift + torch.log(total)


def mul_(tensor: Tensor, other: Tensor | float) -> Tensor:
    """tensor * other, in place when the result has the shape of ``tensor``."""
    if isinstance(other, Tensor) and broadcast_shapes(tensor.shape, other.shape) != tensor.shape:
        return tensor * other
    return tensor.mul_(other)


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_j a[..., i, j] * b[..., i, j] as (.., rows, 1), without a (rows, n_k) temporary."""
    return torch.einsum("...ij,...ij->...i", a, b).unsqueeze(-1)
