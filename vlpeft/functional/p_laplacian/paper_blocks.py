"""The ``paper`` weights and their chain rule for one block of query rows (p-adapter.md §3.2).

A block: query rows x_q (.., rows, r) with squared norms sq_q (.., rows, 1), its leading key columns x_kv
(.., keys, r) with sq_k (.., 1, keys), the graph's attention rows (.., rows, keys) and column degrees (.., 1, keys),
or per (row, key) with causal degrees. :class:`PaperBlock` holds the weights' intermediates (torch path);
:func:`paper_backward_torch` and :func:`paper_backward_kernel` (fused C kernel, float32 CPU) give one block's share
of the gradients as a :class:`PaperBlockBackward`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vlpeft.functional.p_laplacian.cpu_kernels import paper_backward_block
from vlpeft.functional.p_laplacian.gradients import row_dot, thin_matmul


def graph_rows(attn: Tensor, rows: slice, head_mean: bool, n_keys: int) -> Tensor:
    """Rows of the graph's attention: ``attn[..., rows, :n_keys]``, averaged over heads (keepdim) with ``head_mean``."""
    block = attn[..., rows, :n_keys]
    return block.mean(dim=1, keepdim=True) if head_mean else block


class PaperBlock:
    """Intermediates of the ``paper`` weights for one block of query rows (§3.2).

    With r = D_q^(-1/2) per row and c = D_j^(-1/2) per key column (or per (q, j) with causal degrees), both 0 where
    the degree is 0: dist = |x_q|^2 r^2 + |x_j|^2 c^2 - 2 (x_q . x_j) r c, floored at ``dist_floor``;
    log W = (p/2) log A + ((p - 2)/2) log dist - log D_q (finite on non-edges, where A is read as 1 and the weight
    is zeroed later); the aggregation coefficient of an edge is its normalised weight times sqrt(D_q) c.
    """

    def __init__(self, x_q: Tensor, x_kv: Tensor, sq_q: Tensor, sq_k: Tensor, attn: Tensor, col_deg: Tensor,
                 p: Tensor, dist_floor: float) -> None:
        edge = attn > 0
        row_deg = attn.sum(dim=-1, keepdim=True)
        row_pos = row_deg > 0
        self.log_row = row_deg.masked_fill(~row_pos, 1.0).log_()
        self.inv_sqrt_row = torch.exp(-0.5 * self.log_row).masked_fill_(~row_pos, 0.0)
        self.sqrt_row = torch.exp(0.5 * self.log_row)  # 1 on empty rows, whose coefficients are all 0 anyway
        # c = D_j^(-1/2), 0 where D_j = 0. An edge (A_qj > 0) always has D_j >= A_qj > 0.
        self.inv_sqrt_col = torch.rsqrt(col_deg).masked_fill_(col_deg <= 0, 0.0)
        self.sq_q = sq_q
        self.gram = torch.matmul(x_q, x_kv.transpose(-1, -2))
        ir, ic = self.inv_sqrt_row, self.inv_sqrt_col
        dist_sq = torch.addcmul(self.sq_q * ir.square(), sq_k * ic, ic).addcmul_(self.gram, ir * ic, value=-2.0)
        self.free = dist_sq > dist_floor  # distances above the floor carry gradient
        self.dist_sq = dist_sq.clamp_min_(dist_floor)
        self.attn_or_one = torch.where(edge, attn, 1.0)
        log_attn = torch.log(self.attn_or_one)
        log_dist = torch.log(self.dist_sq)
        self.log_w = torch.addcmul(log_dist * (0.5 * (p - 2.0)), log_attn, 0.5 * p).sub_(self.log_row)
        self.log_sum = log_attn.add_(log_dist)  # d log W / dp = (log A + log dist) / 2
        self.non_edge = ~edge

    def scale(self) -> Tensor:
        """sqrt(D_q / D_j) (rows, keys): the factor from a normalised weight to an aggregation coefficient."""
        return self.sqrt_row * self.inv_sqrt_col

    #: What the backward pass reads (:meth:`saved` / :meth:`from_saved`).
    SAVED = ("omega", "log_sum", "dist_sq", "free", "inv_sqrt_col", "gram", "attn_or_one", "inv_sqrt_row",
              "sqrt_row", "sq_q")

    def saved(self, omega: Tensor) -> tuple[Tensor, ...]:
        """The tensors the backward pass reads, with the block's normalised weights ``omega``."""
        self.omega = omega
        return tuple(getattr(self, name) for name in self.SAVED)

    @classmethod
    def from_saved(cls, tensors: tuple[Tensor, ...]) -> PaperBlock:
        """A block restored from :meth:`saved` (for the backward pass only)."""
        block = cls.__new__(cls)
        for name, tensor in zip(cls.SAVED, tensors, strict=True):
            setattr(block, name, tensor)
        return block


class PaperBlockBackward(NamedTuple):
    """One ``paper`` block's share of the gradients (rows of x_q, the block's key rows of x_kv, its graph rows)."""

    grad_xq: Tensor  # (.., rows, r): through the Gram products only
    grad_xk: Tensor  # (.., keys, r): through the Gram and aggregation products
    grad_sq_q: Tensor  # (.., rows, 1)
    grad_sq_k: Tensor  # (.., 1, keys)
    grad_attn: Tensor  # (.., rows, keys), row- and (causal) column-degree terms included
    grad_row_deg: Tensor  # (.., rows, 1)
    grad_p: Tensor  # (.., rows, 1), through the weights
    grad_log_c: Tensor  # (.., rows, 1)
    column_sum: Tensor  # (.., 1, keys): sum over the block's rows of dL/dD_j


def paper_backward_torch(block: PaperBlock, omega: Tensor, xq: Tensor, x_keys: Tensor, sq_keys: Tensor,
                          grad: Tensor, grad_beta: Tensor, p_rows: Tensor, log_c_rows: Tensor, log_norm: Tensor,
                          carry: Tensor | None, causal: bool) -> PaperBlockBackward:
    """The chain rule of one ``paper`` block on its intermediates (torch path); ``grad`` / ``grad_beta``: the
    gradients of the block's aggregate and beta; ``carry`` (.., 1, keys): the later blocks' column-degree gradient
    (causal)."""
    beta = torch.exp(log_c_rows - log_norm)
    ir, ic = block.inv_sqrt_row, block.inv_sqrt_col
    coefficients = omega * block.scale()
    # coefficients = omega * scale; t = dL/dscale * scale = dL/domega * omega.
    t = torch.matmul(grad, x_keys.transpose(-1, -2)).mul_(coefficients)
    t_sum = t.sum(dim=-1, keepdim=True)
    total = t_sum + beta * grad_beta
    grad_log_w = torch.addcmul(t, omega, total, value=-1.0)  # exactly 0 on non-edges
    grad_log_c = beta * (grad_beta - total)
    grad_p = 0.5 * row_dot(grad_log_w, block.log_sum)
    grad_log_row = 0.5 * t_sum - grad_log_w.sum(dim=-1, keepdim=True)
    grad_dist = torch.where(block.free, grad_log_w / block.dist_sq, 0.0).mul_(0.5 * (p_rows - 2.0))
    # dist = sq_q r^2 + sq_k c^2 - 2 gram r c, with r = D_q^(-1/2), c = D_j^(-1/2); g = dL/ddist * c.
    # ir and ic are 0 where the degree is 0, so the degree terms vanish there as they should.
    grad_dist_ic = grad_dist * ic
    grad_gram = grad_dist_ic * (-2.0 * ir)
    grad_dist_sum = grad_dist.sum(dim=-1, keepdim=True)
    grad_ir = 2.0 * block.sq_q * ir * grad_dist_sum - 2.0 * row_dot(grad_dist_ic, block.gram)
    grad_row_deg = (-0.5 * grad_ir * ir + grad_log_row) * ir.square()
    # dL/dD_j = (-c/2 dL/dc - t/2) c^2 with dL/dc = 2 g' (sq_k c - gram r): c^2 (g (r gram - sq_k c) - t/2)
    grad_col_deg = (block.gram * ir).addcmul_(sq_keys, ic, value=-1.0).mul_(grad_dist_ic)
    grad_col_deg = grad_col_deg.add_(t, alpha=-0.5).mul_(ic).mul_(ic)
    grad_attn = torch.addcmul(grad_row_deg, grad_log_w.div_(block.attn_or_one), 0.5 * p_rows)
    if causal:
        # col_deg = base + cumsum(attn_rows): reverse cumulative sum over the rows, plus the later blocks'
        # dependence on this block's column sums.
        grad_attn = grad_attn + grad_col_deg.flip(-2).cumsum(-2).flip(-2)
        if carry is not None:
            grad_attn = grad_attn + carry
    grad_xq = thin_matmul(grad_gram, x_keys)
    grad_xk = thin_matmul(coefficients.transpose(-1, -2), grad) + thin_matmul(grad_gram.transpose(-1, -2), xq)
    return PaperBlockBackward(grad_xq, grad_xk, grad_dist_sum * ir.square(), (grad_dist_ic * ic).sum(-2, keepdim=True),
                               grad_attn, grad_row_deg, grad_p, grad_log_c, grad_col_deg.sum(dim=-2, keepdim=True))


def paper_backward_kernel(gram: Tensor, attn_rows: Tensor, col_base: Tensor, xq: Tensor, x_keys: Tensor,
                           sq_rows: Tensor, sq_keys: Tensor, grad: Tensor, grad_beta: Tensor, p_rows: Tensor,
                           log_c_rows: Tensor, log_norm: Tensor, carry: Tensor | None, dist_floor: float,
                           causal: bool) -> PaperBlockBackward:
    """One ``paper`` block's gradients by the fused CPU kernel around the BLAS products."""
    part = paper_backward_block(gram, attn_rows, col_base, sq_rows, sq_keys, p_rows, log_c_rows, log_norm,
                                torch.matmul(grad, x_keys.transpose(-1, -2)), grad_beta, carry,
                                dist_floor=dist_floor, causal=causal)
    grad_xq = thin_matmul(part.grad_gram, x_keys)
    grad_xk = (thin_matmul(part.coefficients.transpose(-1, -2), grad)
               + thin_matmul(part.grad_gram.transpose(-1, -2), xq))
    return PaperBlockBackward(grad_xq, grad_xk, part.grad_sq_q, part.grad_sq_k, part.grad_attn, part.grad_row_deg,
                               part.grad_p, part.grad_log_c, part.column_sum)
