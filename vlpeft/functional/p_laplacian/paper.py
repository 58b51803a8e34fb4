"""The ``paper`` variant of the p-Laplacian block: Eqs. 14-16 of p-adapter.md on the bipartite graph [[0, M], [M^T, 0]]
over query and value nodes, in the efficient form of §3.2.

Degree normalisation, the beta term on the query's own feature, 1/D := 0 for zero degrees and a squared distance
floor ``dist_floor``: with y_i = x_i / sqrt(D_i), log Mbar_qj = (p/2) log M_qj + ((p-2)/2) log max(||y_q - y_j||^2,
dist_floor), normalised in log space, L_q = logsumexp({log w_qj} U {log(2 mu / p)}). Column degrees are all queries'
column sums, or causal (:mod:`~vlpeft.functional.p_laplacian.degrees`). Shapes: x_q (batch, heads, n_q, d), x_kv
(batch, heads, n_k, d) (or (batch, heads, n_k, r) coordinates with a ``kv_basis`` (r, d)), attn (batch, heads, n_q,
n_k); the result (batch, heads, n_q, d).

:class:`PaperAggregate` works on one head-mean graph per batch entry (so its intermediates are 1 / heads the size of
the attention) and keeps each block's intermediates for the backward pass unless ``chunk_size`` is given, in which
case it recomputes them. On float32 CPU calls the elementwise work of each block runs in the fused C kernels around
the same BLAS products, as :func:`~vlpeft.functional.p_laplacian.backend.choose_backend` decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlpeft.functional.p_laplacian.backend import AggregationFacts, check_override, choose_backend
from vlpeft.functional.p_laplacian.cpu_kernels import kernel_blocker, paper_forward_block
from vlpeft.functional.p_laplacian.degrees import check_past_degrees, initial_column_degrees
from vlpeft.functional.p_laplacian.gradients import (
    add_key_rows,
    coefficient_grads,
    edge_weights,
    normalised_weights,
    reduce_to,
    thin_matmul,
    write_rows,
)
from vlpeft.functional.p_laplacian.paper_blocks import (
    PaperBlock,
    graph_rows,
    paper_backward_kernel,
    paper_backward_torch,
)
from vlpeft.functional.p_laplacian.planning import (
    Plan,
    block_plan,
    checked_block_plan,
    concat_rows,
    graph_count,
    key_columns,
    pad_keys,
    row_block,
)
from vlpeft.functional.p_laplacian.validation import (
    PAPER_DIST_FLOOR,
    Scalar,
    as_coefficient,
    check_attention,
    check_chunk_size,
    check_mu,
    check_p,
    check_positive_option,
    check_shapes,
)
from vlpeft.functional.parameters import DEFAULT_P_BOUNDS
from vlpeft.functional.precision import autocast_disabled, compute_dtype, output_dtype


@dataclass(frozen=True)
class PaperOptions:
    """Options of the ``paper`` variant (see :func:`vlpeft.functional.p_laplacian_aggregate` for each).

    Attributes:
        dist_floor: floor of ||y_q - y_j||^2.
        causal_degrees: D_j^(q) = past_j + sum_{q' <= q} M_q'j instead of all queries' column sums.
        chunk_size: query rows per block, recomputed in the backward pass (memory O(batch * chunk_size * n_k)),
            or None (blocks keep their intermediates).
        attn_head_mean: the graph is the mean over the heads of a per-head ``attn``, taken block by block.
        return_column_degrees: causal degrees only: also return the running column degrees (batch, heads, n_k).
        backend: "auto", "torch", "cpu" or "triton" (no Triton kernel computes the aggregation alone: as "auto").
    """

    dist_floor: float = PAPER_DIST_FLOOR
    causal_degrees: bool = False
    chunk_size: int | None = None
    attn_head_mean: bool = False
    return_column_degrees: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_positive_option(float(self.dist_floor), "dist_floor")
        check_chunk_size(self.chunk_size)
        if self.return_column_degrees and not self.causal_degrees:
            raise ValueError("return_column_degrees=True applies to variant='paper' with causal_degrees=True only, "
                             f"got causal_degrees={self.causal_degrees!r}")
        check_override(self.backend, "backend")


def paper_aggregate(
    x_q: Tensor,
    x_kv: Tensor,
    attn: Tensor,
    p: Scalar,
    mu: Scalar,
    options: PaperOptions = PaperOptions(),
    *,
    p_bounds: tuple[float, float] | None = DEFAULT_P_BOUNDS,
    past_column_degrees: Tensor | None = None,
    kv_basis: Tensor | None = None,
    attn_block_plan: Sequence[tuple[slice, int]] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """One ``paper`` p-Laplacian step: Ū (batch, heads, n_q, d) in the promoted dtype of x_q and x_kv.

    Args:
        x_q: query-node features V̂ of the queries (batch, heads, n_q, d).
        x_kv: value-node features (batch, heads, n_k, d), or their coordinates (batch, heads, n_k, r) in
            ``kv_basis`` (r, d).
        attn: post-softmax attention (batch, heads, n_q, n_k), non-negative; zero entries are non-edges. With
            ``options.attn_head_mean`` per-head, and x_q / x_kv / the result have heads = 1 (or broadcast to it).
        p, mu: floats, 0-d, per-head (heads,) or (batch, heads, n_q, 1) tensors; p within ``p_bounds`` (None: p > 0),
            mu > 0.
        options: :class:`PaperOptions`.
        past_column_degrees: causal degrees only: (batch, heads, n_past) column sums of all earlier queries.
        kv_basis: (r, d) basis of the key nodes (gradients reach it too).
        attn_block_plan: without ``chunk_size``: row blocks ``[(rows, n_keys), ...]`` with ``attn[..., rows,
            n_keys:]`` exactly 0 (e.g. the blocked eager attention's plan); the block loop then reads no key extents
            and checks non-negativity on the entries it reads.

    Returns:
        Ū, or ``(Ū, column degrees (batch, heads, n_k))`` with ``options.return_column_degrees``. Computed in
        float32 (float64 if any input is float64) with autocast disabled.
    """
    if past_column_degrees is not None and not options.causal_degrees:
        raise ValueError("past_column_degrees is only used with causal_degrees=True")
    if attn_block_plan is not None and options.chunk_size is not None:
        raise ValueError("attn_block_plan applies to variant='paper' without chunk_size only, got "
                         f"variant='paper', chunk_size={options.chunk_size!r}")
    head_mean = options.attn_head_mean
    _, n_k, lead = check_shapes(x_q, x_kv, attn[:, :1] if head_mean and attn.dim() == 4 else attn, kv_basis)
    planned = None if attn_block_plan is None else checked_block_plan(attn_block_plan, attn.shape[-2], n_k)
    if past_column_degrees is not None:
        check_past_degrees(past_column_degrees, n_k, lead)
    check_p(p, p_bounds)
    check_mu(mu)
    if planned is None:
        check_attention(attn)  # with a plan, the block loop checks the entries it reads
    out_dtype = output_dtype(x_q.dtype, x_kv.dtype)
    dtype = compute_dtype(x_q.dtype, x_kv.dtype, attn.dtype, *(() if kv_basis is None else (kv_basis.dtype,)))
    with autocast_disabled(x_q.device.type):
        past = None if past_column_degrees is None else past_column_degrees.to(dtype)
        basis = None if kv_basis is None else kv_basis.to(dtype)
        out, degrees = _run(x_q.to(dtype), x_kv.to(dtype), attn.to(dtype), as_coefficient(p, "p", dtype, x_q.device),
                            as_coefficient(mu, "mu", dtype, x_q.device), past, options, basis, planned)
    if options.return_column_degrees:
        return out.to(out_dtype), degrees.squeeze(-2)
    return out.to(out_dtype)


def _run(x_q: Tensor, x_kv: Tensor, attn: Tensor, p: Tensor, mu: Tensor, past: Tensor | None, options: PaperOptions,
         kv_basis: Tensor | None, planned: Plan | None) -> tuple[Tensor, Tensor]:
    """(Ū, column degrees) with Ū_q = Σ_j c_qj V̂_j + β_q V̂_q, on validated compute-dtype inputs. With ``kv_basis``
    (r, d) the key nodes are V̂_j = x_kv_j B: the Gram products and the aggregate are taken in the r coordinates
    (x_q B^T . x_kv_j, (Σ_j c_qj x_kv_j) B). The column degrees returned are (causal) the running degrees after
    these queries, (.., 1, n_k), else all queries' column sums.
    """
    causal = options.causal_degrees
    head_mean = options.attn_head_mean
    if head_mean and not (torch.is_grad_enabled() and attn.requires_grad):
        # No gradient flows to the attention, so nothing else need keep the per-head tensor alive for backward
        # (e.g. the first layer of a frozen model): keep only the 1 / heads sized mean.
        attn = attn.mean(dim=1, keepdim=True)
        head_mean = False
    base = initial_column_degrees(attn, past, causal=causal, head_mean=head_mean)
    if kv_basis is None:
        gram_q, sq_k = x_q, (x_kv * x_kv).sum(dim=-1).unsqueeze(-2)
    else:
        # |x_kv B|^2 as the quadratic form x_kv (B B^T) x_kv^T: r-wide products instead of d-wide key nodes.
        gram_q = torch.matmul(x_q, kv_basis.transpose(-1, -2))
        sq_k = (torch.matmul(x_kv, kv_basis @ kv_basis.transpose(-1, -2)) * x_kv).sum(dim=-1).unsqueeze(-2)
    # Fused CPU kernels (float32 CPU): the elementwise work of each block in C around the same BLAS products.
    facts = AggregationFacts(kernel_blocker(gram_q, x_kv, attn, p, mu), torch.get_num_threads(),
                             graph_count(gram_q, x_kv, attn, head_mean))
    kernel = choose_backend(facts, options.backend).name == "cpu"
    aggregate, beta, degrees = PaperAggregate.apply(
        gram_q, x_kv, (x_q * x_q).sum(dim=-1, keepdim=True), sq_k, attn, p, mu, base, options.dist_floor, causal,
        options.chunk_size, head_mean, planned, kernel)
    if kv_basis is not None:
        aggregate = torch.matmul(aggregate, kv_basis)
    return torch.addcmul(aggregate, beta, x_q), degrees


class PaperAggregate(torch.autograd.Function):
    """(Σ_j c_qj k_j (.., n_q, r), β_q (.., n_q, 1), running column degrees (.., 1, n_k)) with the ``paper``
    coefficients c, β (§3.2); the degrees (base plus these rows' column sums, causal) carry no gradient.

    The nodes enter through their Gram products and squared norms only: ``x_q`` (.., n_q, r) and the keys ``x_kv``
    (.., n_k, r) with x_q . x_kv_j = V̂_q . V̂_j, and ``sq_q`` (.., n_q, 1) / ``sq_k`` (.., 1, n_k) = |V̂|^2. The
    caller forms Ū_q = (Σ_j c_qj k_j) B + β_q V̂_q (B the keys' basis, or the identity). ``base``: see
    :func:`_run`.
    """

    @staticmethod
    def forward(ctx: Any, x_q: Tensor, x_kv: Tensor, sq_q: Tensor, sq_k: Tensor, attn: Tensor, p: Tensor, mu: Tensor,
                base: Tensor, dist_floor: float, causal: bool, chunk_size: int | None, head_mean: bool,
                planned: Plan | None, kernel: bool) -> tuple[Tensor, Tensor, Tensor]:
        log_c = torch.log(2.0 * mu / p)
        outputs, betas, normalisers, bases = [], [], [], []
        # Without chunk_size each block keeps what its backward pass reads (the Gram product and the head-mean rows on
        # the C-kernel path, about ten (rows, keys) tensors of the single head-mean graph on the torch path), so it
        # needs no second Gram product; with chunk_size they are rebuilt block by block there, so that the memory
        # stays O(chunk_size * n_k).
        keep = chunk_size is None and any(ctx.needs_input_grad)
        kept: list[Tensor] = []
        running = base
        n_k = x_kv.shape[-2]
        plan = block_plan(attn, x_q.shape[-2], chunk_size) if planned is None else planned
        for rows, n_keys in plan:
            attn_rows = graph_rows(attn, rows, head_mean, n_keys)
            xq_rows, x_keys = x_q[..., rows, :], x_kv[..., :n_keys, :]
            log_c_rows = row_block(log_c, rows)
            if kernel:
                gram = torch.matmul(xq_rows, x_keys.transpose(-1, -2))
                coefficients, log_norm = paper_forward_block(
                    gram, attn_rows, key_columns(running, n_keys), row_block(sq_q, rows), sq_k[..., :n_keys],
                    row_block(p, rows), log_c_rows, dist_floor=dist_floor, causal=causal)
                # Kept: the Gram product, and the head mean when taken (the backward pass then reads no per-head
                # attention). Keeping the weights too (no log/exp in the backward kernel) measured no faster: the
                # saved C time was spent on the extra (rows, keys) tensors.
                for_backward = (gram, attn_rows) if head_mean else (gram,)
            else:
                if planned is not None:
                    check_attention(attn_rows)  # the C kernel checks the rows it reads itself
                col_deg = key_columns(running, n_keys)
                if causal:
                    col_deg = col_deg + torch.cumsum(attn_rows, dim=-2)
                block = PaperBlock(xq_rows, x_keys, row_block(sq_q, rows), sq_k[..., :n_keys], attn_rows, col_deg,
                                    row_block(p, rows), dist_floor)
                omega, log_norm = normalised_weights(block.log_w, log_c_rows, block.non_edge)
                coefficients = omega * block.scale() if keep else omega.mul_(block.scale())
                for_backward = block.saved(omega) if keep else ()
                del block, omega, col_deg
            outputs.append(thin_matmul(coefficients, x_keys))
            betas.append(torch.exp(log_c_rows - log_norm))
            normalisers.append(log_norm)
            bases.append(running)
            if keep:
                kept.extend(for_backward)
            if causal:
                running = running + pad_keys(attn_rows.sum(dim=-2, keepdim=True), n_k)
            del coefficients, attn_rows, for_backward  # before the next block is built
        ctx.save_for_backward(x_q, x_kv, sq_q, sq_k, attn, p, mu, concat_rows(normalisers), *bases, *kept)
        ctx.settings = (dist_floor, causal, plan, head_mean, keep, kernel)
        ctx.mark_non_differentiable(running)
        return concat_rows(outputs), concat_rows(betas), running

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor, grad_beta_all: Tensor, _: Tensor | None) -> tuple[Tensor | None, ...]:
        x_q, x_kv, sq_q, sq_k, attn, p, mu, log_norm_all, *bases = ctx.saved_tensors
        dist_floor, causal, plan, head_mean, kept, kernel = ctx.settings
        if kept:
            bases, kept_tensors = bases[:len(plan)], bases[len(plan):]
            per_block = (2 if head_mean else 1) if kernel else len(PaperBlock.SAVED)
        n_k = x_kv.shape[-2]
        with autocast_disabled(grad_out.device.type):
            log_c = torch.log(2.0 * mu / p)
            slices = [rows for rows, _ in plan]
            grad_xq_rows: list[Tensor] = [None] * len(slices)  # type: ignore[list-item]
            grad_sq_q_rows: list[Tensor] = [None] * len(slices)  # type: ignore[list-item]
            # head_mean: the gradient of the (batch, 1, n_q, n_k) mean graph, spread over the heads at the end.
            graph_shape = (attn.shape[0], 1, *attn.shape[2:]) if head_mean else attn.shape
            # One block over all rows and keys: its gradient is the whole gradient (no copy into a full tensor).
            whole = len(plan) == 1 and plan[0][1] == n_k
            grad_attn_full = attn.new_empty(graph_shape) if ctx.needs_input_grad[4] and not whole else None
            grad_p_rows: list[Tensor] = [None] * len(slices)  # type: ignore[list-item]
            grad_log_c_rows: list[Tensor] = [None] * len(slices)  # type: ignore[list-item]
            grad_xk = grad_sq_k = None
            carry = None  # causal: gradient w.r.t. the running column degrees after the current block
            for index in reversed(range(len(slices))):
                rows, n_keys = plan[index]
                p_rows, log_c_rows = row_block(p, rows), row_block(log_c, rows)
                xq, x_keys = x_q[..., rows, :], x_kv[..., :n_keys, :]
                log_norm = log_norm_all[..., rows, :]
                grad, grad_beta = grad_out[..., rows, :], grad_beta_all[..., rows, :]
                later = carry  # the later blocks' column-degree gradient, before this block's
                carry_keys = key_columns(carry, n_keys) if causal and carry is not None else None
                saved = tuple(kept_tensors[index * per_block:(index + 1) * per_block]) if kept else ()
                if kernel:
                    attn_rows = saved[1] if len(saved) > 1 else graph_rows(attn, rows, head_mean, n_keys)
                    gram = saved[0] if kept else torch.matmul(xq, x_keys.transpose(-1, -2))
                    part = paper_backward_kernel(gram, attn_rows, key_columns(bases[index], n_keys), xq, x_keys,
                                                  row_block(sq_q, rows), sq_k[..., :n_keys], grad, grad_beta, p_rows,
                                                  log_c_rows, log_norm, carry_keys, dist_floor, causal)
                    del gram, attn_rows
                else:
                    if kept:
                        block = PaperBlock.from_saved(saved)
                        omega = block.omega
                    else:
                        attn_rows = graph_rows(attn, rows, head_mean, n_keys)
                        col_deg = key_columns(bases[index], n_keys)
                        if causal:
                            col_deg = col_deg + torch.cumsum(attn_rows, dim=-2)
                        block = PaperBlock(xq, x_keys, row_block(sq_q, rows), sq_k[..., :n_keys], attn_rows, col_deg,
                                            p_rows, dist_floor)
                        omega = edge_weights(block.log_w.sub_(log_norm), block.non_edge)
                        del attn_rows, col_deg
                    part = paper_backward_torch(block, omega, xq, x_keys, sq_k[..., :n_keys], grad, grad_beta, p_rows,
                                                 log_c_rows, log_norm, carry_keys, causal)
                    del block, omega
                del saved
                grad_xq_rows[index], grad_p_rows[index], grad_log_c_rows[index] = part.grad_xq, part.grad_p, \
                    part.grad_log_c
                grad_sq_q_rows[index] = part.grad_sq_q
                grad_xk = add_key_rows(grad_xk, part.grad_xk, n_k)
                grad_sq_k = add_key_rows(grad_sq_k, part.grad_sq_k.transpose(-1, -2), n_k)
                block_sum = pad_keys(part.column_sum, n_k)
                carry = block_sum if carry is None else carry + block_sum
                if whole and ctx.needs_input_grad[4]:
                    block_grad = part.grad_attn
                    grad_attn_full = (block_grad.sum_to_size(graph_shape) if block_grad.shape != graph_shape
                                      else block_grad)
                elif grad_attn_full is not None:
                    write_rows(grad_attn_full[..., :n_keys], rows, part.grad_attn)
                    if n_keys < n_k:
                        # Right of the block's last edge only the degree sums depend on the (zero) attention: the
                        # row degree, and (causal) the column degrees of the later rows.
                        rest = part.grad_row_deg if not causal or later is None \
                            else part.grad_row_deg + later[..., n_keys:]
                        write_rows(grad_attn_full[..., n_keys:], rows, rest.expand(*rest.shape[:-1], n_k - n_keys))
                del part  # this block's (rows, n_k) tensors, before the next block's are built
            needs = ctx.needs_input_grad
            grad_p, grad_mu = coefficient_grads(needs[5], needs[6], p, mu, grad_p_rows, grad_log_c_rows)
            if head_mean and grad_attn_full is not None:
                # d mean / d attn_h = 1 / heads: a broadcast view over the heads, not a dense (.., heads, n_q, n_k)
                # copy. A consumer that reads it (the blocked attention's backward) reads it block by block; where
                # autograd adds another gradient of the attention, it writes the sum into a new tensor, which is
                # what a dense copy followed by an in-place add costs, without the copy.
                grad_attn_full = grad_attn_full.div_(attn.shape[1]).expand(attn.shape)
            return (
                reduce_to(concat_rows(grad_xq_rows), x_q, needs[0]),
                reduce_to(grad_xk, x_kv, needs[1]),
                reduce_to(concat_rows(grad_sq_q_rows), sq_q, needs[2]),
                reduce_to(grad_sq_k.transpose(-1, -2), sq_k, needs[3]),
                grad_attn_full,
                grad_p,
                grad_mu,
                reduce_to(carry, bases[0], needs[7]),
                None, None, None, None, None, None,
            )
