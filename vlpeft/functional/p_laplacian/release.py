"""The ``release`` variant of the p-Laplacian block: the released code's semantics (p-adapter.md §2.4 C-D) in the
efficient form of §3.1, without degree normalisation.

s_qj = max(sqrt(A_qj + eps) ||x_q - x_j||, eps sqrt(d)), log W_qj = log A_qj + (p - 2) log s_qj, normalised in log
space with the self term: L_q = logsumexp({log W_qj} U {log(2 mu / p)}). ``graph="self"`` keeps the beta term
(U_i = sum_j omega_ij F_j + beta_i F_i, self loops per ``self_loop``); ``graph="bipartite"`` drops it
(U_q = sum_j omega_qj F_j). Shapes: x_q (batch, heads, n_q, d), x_kv (batch, heads, n_k, d), attn
(batch, heads, n_q, n_k); the result (batch, heads, n_q, d).

Resolution: squared distances come from the Gram identity on features centred on the key mean, so pairs closer than
about sqrt(machine eps) * ||x|| (~3e-4 ||x|| in float32) are not resolved; self loops are set to the floor exactly
(§3.1 step 4). The weights are formed as A exp(h log S - m) rather than exp(log A + h log S - m): the same numbers
without a log of the attention or a mask pass for non-edges.

:class:`ReleaseAggregate` saves only its inputs and the per-row log-normaliser L (batch, heads, n_q, 1); its backward
recomputes the per-head (rows, n_k) intermediates block by block. On float32 CPU calls the fused C kernels
(:mod:`~vlpeft.functional.p_laplacian.cpu_kernels`) compute the whole block instead, as
:func:`~vlpeft.functional.p_laplacian.backend.choose_backend` decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from vlpeft.functional.p_laplacian.backend import AggregationFacts, check_override, choose_backend
from vlpeft.functional.p_laplacian.cpu_kernels import kernel_blocker, release_aggregate_cpu
from vlpeft.functional.p_laplacian.gradients import (
    add,
    add_key_rows,
    coefficient_grads,
    mul_,
    reduce_to,
    row_dot,
    thin_matmul,
    write_rows,
)
from vlpeft.functional.p_laplacian.planning import block_plan, concat_rows, graph_count, row_block
from vlpeft.functional.p_laplacian.release_blocks import (
    compiled_release_block,
    release_scaled,
    release_weights,
)
from vlpeft.functional.p_laplacian.validation import (
    GRAPHS,
    RELEASE_EPS,
    SELF_LOOP_POLICIES,
    Scalar,
    as_coefficient,
    check_attention,
    check_chunk_size,
    check_mu,
    check_p,
    check_positive_option,
    check_shapes,
    resolve_query_offset,
)
from vlpeft.functional.parameters import DEFAULT_P_BOUNDS
from vlpeft.functional.precision import autocast_disabled, compute_dtype, output_dtype


@dataclass(frozen=True)
class ReleaseOptions:
    """Options of the ``release`` variant (see :func:`vlpeft.functional.p_laplacian_aggregate` for each).

    Attributes:
        graph: "bipartite" (no beta term) or "self" (queries are key nodes; beta term and self loops).
        eps: inside sqrt(A + eps); the floor of the scaled norm is s_min = eps * sqrt(d).
        self_loop: self graph only: "release" (W_ii = A_ii s_min^(p-2)) or "drop" (W_ii = 0).
        query_offset: self graph only: query row i is key node ``query_offset + i`` (default n_k - n_q).
        chunk_size: query rows per block (memory O(batch * heads * chunk_size * n_k)), or None.
        compiled: run each block through ``torch.compile`` (the pure block functions).
        backend: "auto", "torch", "cpu" or "triton" (no Triton kernel computes the aggregation alone: as "auto").
    """

    graph: Literal["bipartite", "self"] = "bipartite"
    eps: float = RELEASE_EPS
    self_loop: Literal["release", "drop"] = "release"
    query_offset: int | None = None
    chunk_size: int | None = None
    compiled: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.graph not in GRAPHS:
            raise ValueError(f"graph={self.graph!r} is not one of {GRAPHS}")
        check_positive_option(float(self.eps), "eps")
        if self.self_loop not in SELF_LOOP_POLICIES:
            raise ValueError(f"self_loop={self.self_loop!r} is not one of {SELF_LOOP_POLICIES}")
        check_chunk_size(self.chunk_size)
        if not isinstance(self.compiled, bool):
            raise TypeError(f"compiled must be a bool, got {self.compiled!r}")
        check_override(self.backend, "backend")


def release_aggregate(
    x_q: Tensor,
    x_kv: Tensor,
    attn: Tensor,
    p: Scalar,
    mu: Scalar,
    options: ReleaseOptions = ReleaseOptions(),
    *,
    p_bounds: tuple[float, float] | None = DEFAULT_P_BOUNDS,
    recompute_attention: Callable[[slice], Tensor] | None = None,
) -> Tensor:
    """One ``release`` p-Laplacian step: U (batch, heads, n_q, d) in the promoted dtype of x_q and x_kv.

    Args:
        x_q: query-node features F (batch, heads, n_q, d); for the self graph the features of key nodes
            ``query_offset + i``.
        x_kv: key-node features (batch, heads, n_k, d).
        attn: post-softmax attention (batch, heads, n_q, n_k), non-negative; zero entries are non-edges.
        p, mu: floats, 0-d, per-head (heads,) or (batch, heads, n_q, 1) tensors; p within ``p_bounds`` (None: p > 0),
            mu > 0.
        options: :class:`ReleaseOptions`.
        recompute_attention: rows -> ``attn[..., rows, :]``; with ``chunk_size`` and an ``attn`` that needs no
            gradient, the backward pass rebuilds the attention rows from it instead of keeping ``attn``.

    Computed in float32 (float64 if any input is float64) with autocast disabled.
    """
    if recompute_attention is not None and not callable(recompute_attention):
        raise TypeError(f"recompute_attention must be a callable (rows: slice) -> Tensor or None, got "
                        f"{type(recompute_attention).__name__}")
    n_q, n_k, _ = check_shapes(x_q, x_kv, attn)
    self_graph = options.graph == "self"
    query_offset = resolve_query_offset(options.query_offset, n_q, n_k) if self_graph else 0
    check_p(p, p_bounds)
    check_mu(mu)
    check_attention(attn)
    # Only where it saves memory: chunked, and nothing else keeps the attention for a gradient of its own.
    recompute = (recompute_attention if options.chunk_size is not None
                 and not (torch.is_grad_enabled() and attn.requires_grad) else None)
    out_dtype = output_dtype(x_q.dtype, x_kv.dtype)
    dtype = compute_dtype(x_q.dtype, x_kv.dtype, attn.dtype)
    drop_self_loops = self_graph and options.self_loop == "drop"
    with autocast_disabled(x_q.device.type):
        xq, xkv, att = x_q.to(dtype), x_kv.to(dtype), attn.to(dtype)
        p_t = as_coefficient(p, "p", dtype, x_q.device)
        mu_t = as_coefficient(mu, "mu", dtype, x_q.device)
        blocker = release_kernel_blocker(xq, xkv, att, p_t, mu_t, compiled=options.compiled, recompute=recompute)
        facts = AggregationFacts(blocker, torch.get_num_threads(), graph_count(xq, xkv, att, False))
        if choose_backend(facts, options.backend).name == "cpu":
            out = release_aggregate_cpu(xq, xkv, att, p_t, mu_t, eps=options.eps, self_graph=self_graph,
                                        drop_self_loops=drop_self_loops, query_offset=query_offset)
        else:
            out = ReleaseAggregate.apply(xq, xkv, att, p_t, mu_t, options.eps, self_graph, drop_self_loops,
                                         query_offset, options.chunk_size, recompute, options.compiled)
    return out.to(out_dtype)


def release_kernel_blocker(*tensors: Tensor, compiled: bool, recompute: object) -> str | None:
    """Why the C kernels cannot compute this ``release`` call (dtype/device, ``compiled``, recomputed attention)."""
    if compiled:
        return "compiled=True runs the torch.compile block functions"
    if recompute is not None:
        return "the attention rows are recomputed in the backward pass (recompute_attention)"
    return kernel_blocker(*tensors)


def recomputed_rows(recompute: Callable[[slice], Tensor], rows: slice, n_keys: int, like: Tensor) -> Tensor:
    """``attn[..., rows, :n_keys]`` (batch, heads, rows, n_keys) rebuilt by a ``recompute_attention`` callable, in the
    dtype of ``like``."""
    with torch.no_grad():
        block = recompute(rows)
    n_rows = rows.stop - rows.start
    if not isinstance(block, Tensor) or block.dim() != 4 or block.shape[-2] != n_rows or block.shape[-1] < n_keys:
        shape = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
        raise ValueError(f"recompute_attention({rows}) must return the attention rows (batch, heads, {n_rows}, n_k), "
                         f"got {shape}")
    return block[..., :n_keys].to(like.dtype)


class ReleaseAggregate(torch.autograd.Function):
    """U = Σ_j ω_qj x_kv,j (+ β_q x_q for the self graph), ``release`` weights (§3.1).

    Per block of query rows and its key columns (see :func:`~vlpeft.functional.p_laplacian.planning.block_plan`): S = max((A + eps) D, s_min^2),
    W = A exp(h log S - m) with h = (p - 2) / 2 and m = max(max_j h log S_qj, log c) (so every factor is <= 1),
    omega = W / (sum_j W + c e^-m), log-normaliser L = m + log(sum_j W + c e^-m). The backward pass recomputes S and
    omega = A exp(h log S - L) from the saved L and applies the chain rule with
    dL/dlog W = omega (G X^T - total), dL/dA = dL/dlog W (1 / A + h [S free] / (A + eps)) (0 on non-edges),
    dL/dD = dL/dlog W h [S free] / D, written as dL/dS = dL/dlog W h [S free] / S times (A + eps) resp. D.
    """

    @staticmethod
    def forward(ctx: Any, x_q: Tensor, x_kv: Tensor, attn: Tensor, p: Tensor, mu: Tensor, eps: float,
                self_graph: bool, drop_self_loops: bool, query_offset: int, chunk_size: int | None,
                recompute: Callable[[slice], Tensor] | None, compiled: bool) -> Tensor:
        centre = x_kv.mean(dim=-2, keepdim=True)
        xk_c = x_kv - centre
        sq_k = (xk_c * xk_c).sum(dim=-1).unsqueeze(-2)
        log_c = torch.log(2.0 * mu / p)
        half_pm2 = 0.5 * (p - 2.0)
        settings = (eps, eps * eps * x_q.shape[-1], self_graph, drop_self_loops, query_offset)
        plan = block_plan(attn, x_q.shape[-2], chunk_size)
        outputs, aggregates, normalisers = [], [], []
        forward_block = compiled_release_block("forward") if compiled else None
        for rows, n_keys in plan:
            attn_rows = attn[..., rows, :n_keys]
            if forward_block is not None:
                out, aggregated, log_norm = forward_block(
                    x_q[..., rows, :] - centre, xk_c[..., :n_keys, :], sq_k[..., :n_keys], attn_rows,
                    x_kv[..., :n_keys, :], x_q[..., rows, :], row_block(half_pm2, rows), row_block(log_c, rows),
                    torch.tensor(query_offset + rows.start), eps, settings[1], self_graph, drop_self_loops)
                outputs.append(out)
                aggregates.append(aggregated)
                normalisers.append(log_norm)
                continue
            scaled, dist_sq = release_scaled(x_q[..., rows, :] - centre, xk_c[..., :n_keys, :],
                                              sq_k[..., :n_keys], attn_rows, rows, settings)
            del dist_sq
            half_rows = row_block(half_pm2, rows)
            log_c_rows = row_block(log_c, rows)
            exponent = mul_(scaled.log_(), half_rows)
            shift = torch.maximum(exponent.amax(dim=-1, keepdim=True), log_c_rows)
            weights = release_weights(exponent, attn_rows, 1.0, shift, rows, settings, in_place=True)
            del scaled, exponent
            total = weights.sum(dim=-1, keepdim=True) + torch.exp(log_c_rows - shift)
            log_norm = shift + torch.log(total)
            aggregated = thin_matmul(weights.div_(total), x_kv[..., :n_keys, :]).contiguous()
            del weights
            out = aggregated
            if self_graph:
                out = aggregated + torch.exp(log_c_rows - log_norm) * x_q[..., rows, :]
            outputs.append(out)
            aggregates.append(aggregated)
            normalisers.append(log_norm)
        # The aggregate sum_j omega_qj x_j (rows x d) gives the backward's row totals without an (n_q, n_k) product.
        # With ``recompute`` (attn needs no gradient) the backward rebuilds the attention rows block by block.
        ctx.save_for_backward(x_q, x_kv, attn if recompute is None else None, p, mu, concat_rows(normalisers),
                              concat_rows(aggregates))
        ctx.settings = settings
        ctx.plan = plan
        ctx.recompute = recompute
        ctx.compiled = compiled
        return concat_rows(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x_q, x_kv, attn, p, mu, log_norm_all, aggregated_all = ctx.saved_tensors
        eps, s_min_sq, self_graph, drop_self_loops, query_offset = ctx.settings
        plan = ctx.plan
        needs = ctx.needs_input_grad
        n_k = x_kv.shape[-2]
        with autocast_disabled(grad_out.device.type):
            centre = x_kv.mean(dim=-2, keepdim=True)
            xk_c = x_kv - centre
            sq_k = (xk_c * xk_c).sum(dim=-1).unsqueeze(-2)
            log_c = torch.log(2.0 * mu / p)
            half_pm2 = 0.5 * (p - 2.0)
            tiny = torch.finfo(x_q.dtype).tiny
            grad_xq_rows, grad_p_rows, grad_log_c_rows = [], [], []
            whole = len(plan) == 1 and plan[0][1] == n_k
            grad_attn = torch.empty_like(attn) if needs[2] and not whole else None
            grad_xk = None
            backward_block = compiled_release_block("backward") if ctx.compiled else None
            for rows, n_keys in plan:
                attn_rows = attn[..., rows, :n_keys] if attn is not None else recomputed_rows(ctx.recompute, rows,
                                                                                                n_keys, x_q)
                if backward_block is not None:
                    grad_xq, grad_xk_rows, block_grad, grad_p_row, grad_log_c_row = backward_block(
                        x_q[..., rows, :] - centre, xk_c[..., :n_keys, :], sq_k[..., :n_keys], attn_rows,
                        x_kv[..., :n_keys, :], x_q[..., rows, :], row_block(half_pm2, rows), row_block(log_c, rows),
                        torch.tensor(query_offset + rows.start), log_norm_all[..., rows, :], grad_out[..., rows, :],
                        aggregated_all[..., rows, :], eps, s_min_sq, self_graph, drop_self_loops, needs[2], needs[3])
                    grad_xq_rows.append(grad_xq)
                    grad_xk = add_key_rows(grad_xk, grad_xk_rows, n_k)
                    grad_log_c_rows.append(grad_log_c_row)
                    if needs[3]:
                        grad_p_rows.append(grad_p_row)
                    if needs[2]:
                        if whole:
                            grad_attn = block_grad.sum_to_size(attn.shape)
                        else:
                            write_rows(grad_attn[..., :n_keys], rows, block_grad)
                            grad_attn[..., rows, n_keys:] = 0.0
                    continue
                xk_rows, xkv_rows = xk_c[..., :n_keys, :], x_kv[..., :n_keys, :]
                xq_c = x_q[..., rows, :] - centre
                scaled, dist_sq = release_scaled(xq_c, xk_rows, sq_k[..., :n_keys], attn_rows, rows, ctx.settings)
                free = torch.gt(scaled, s_min_sq, out=torch.empty_like(scaled))  # 1 above the floor, else 0
                log_scaled = torch.log(scaled)
                log_norm = log_norm_all[..., rows, :]
                half_rows = row_block(half_pm2, rows)
                omega = release_weights(log_scaled, attn_rows, half_rows, log_norm, rows, ctx.settings,
                                         in_place=False)
                beta = torch.exp(row_block(log_c, rows) - log_norm)
                grad = grad_out[..., rows, :]
                # sum_j omega_qj dL/domega_qj = grad_q . sum_j omega_qj x_j
                total = (grad * aggregated_all[..., rows, :]).sum(dim=-1, keepdim=True)
                grad_xq = None
                if self_graph:
                    grad_beta = (grad * x_q[..., rows, :]).sum(dim=-1, keepdim=True)
                    total = total + beta * grad_beta
                    grad_log_c_rows.append(beta * (grad_beta - total))
                    grad_xq = beta * grad
                else:
                    grad_log_c_rows.append(-beta * total)
                grad_log_w = mul_(torch.matmul(grad, xkv_rows.transpose(-1, -2)).sub_(total), omega)  # 0 on non-edges
                grad_xk = add_key_rows(grad_xk, thin_matmul(omega.transpose(-1, -2), grad), n_k)
                del omega
                if needs[3]:
                    grad_p_rows.append(0.5 * row_dot(grad_log_w, log_scaled))
                # dL/dS = dL/dlog W * h / S where S is above the floor (forced self loops sit exactly on it).
                if log_scaled.shape == grad_log_w.shape:  # reuse its buffer
                    grad_scaled = torch.mul(grad_log_w, half_rows, out=log_scaled)
                else:
                    grad_scaled = grad_log_w * half_rows
                grad_scaled = mul_(grad_scaled, free).div_(scaled)
                del log_scaled
                if needs[2]:
                    # dL/dlog W is 0 on non-edges, where A = 0: dividing by max(A, tiny) leaves it 0.
                    inverse = torch.clamp_min(attn_rows, tiny, out=scaled) if scaled.shape == attn_rows.shape \
                        else attn_rows.clamp_min(tiny)
                    block_grad = grad_log_w.div_(inverse).addcmul_(grad_scaled, dist_sq)
                    if whole:
                        grad_attn = block_grad.sum_to_size(attn.shape)
                    else:
                        write_rows(grad_attn[..., :n_keys], rows, block_grad)
                        grad_attn[..., rows, n_keys:] = 0.0
                    del block_grad
                del grad_log_w, dist_sq, scaled
                grad_dist = mul_(grad_scaled, torch.add(attn_rows, eps, out=free) if free.shape == attn_rows.shape
                                  else attn_rows + eps)
                del free
                grad_xq = add(grad_xq, 2.0 * grad_dist.sum(dim=-1, keepdim=True) * xq_c
                               - 2.0 * thin_matmul(grad_dist, xk_rows))
                grad_xq_rows.append(grad_xq)
                grad_xk = add_key_rows(grad_xk, 2.0 * grad_dist.sum(dim=-2).unsqueeze(-1) * xk_rows
                                        - 2.0 * thin_matmul(grad_dist.transpose(-1, -2), xq_c), n_k)
                del grad_dist, grad_scaled
            grad_p, grad_mu = coefficient_grads(needs[3], needs[4], p, mu, grad_p_rows, grad_log_c_rows)
            return (
                reduce_to(concat_rows(grad_xq_rows), x_q, needs[0]),
                reduce_to(grad_xk, x_kv, needs[1]),
                grad_attn,
                grad_p,
                grad_mu,
                None, None, None, None, None, None, None,
            )
