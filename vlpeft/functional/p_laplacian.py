"""One step of p-Laplacian message passing on an attention graph (p-adapter.md §2-3).

Shapes: x_q (batch, heads, n_q, d), x_kv (batch, heads, n_k, d), attn (batch, heads, n_q, n_k); the
batch and heads axes broadcast against each other (e.g. a head-mean attention with heads = 1).

Two variants:

- ``paper``: Eqs. 14-16 on the bipartite graph [[0, M], [M^T, 0]] over query and value nodes, with
  degree normalisation, the beta term on the query's own feature, 1/D := 0 for zero degrees and a squared
  distance floor ``dist_floor``. Efficient form of §3.2: with y_i = x_i / sqrt(D_i),
  log Mbar_qj = (p/2) log M_qj + ((p-2)/2) log max(||y_q - y_j||^2, dist_floor).
- ``release``: the released code's semantics (§2.4 C-D, efficient form §3.1) without degree normalisation:
  s_qj = max(sqrt(A_qj + eps) ||x_q - x_j||, eps sqrt(d)), log W_qj = log A_qj + (p - 2) log s_qj.
  ``graph="self"`` keeps the beta term (U_i = sum_j omega_ij F_j + beta_i F_i, self loops per
  ``self_loop``); ``graph="bipartite"`` drops it (U_q = sum_j omega_qj F_j).

Both variants normalise in log space, L_q = logsumexp({log w_qj} U {log(2 mu / p)}), so every coefficient
lies in [0, 1]; pairwise squared distances come from one batched Gram matmul, clamped, and no
(n_q, n_k, d) tensor is ever built. Each variant is one autograd Function with a hand-written backward. ``release``
recomputes its (n_q, n_k) intermediates there instead of storing them; ``paper`` keeps some per row block of its
single head-mean graph (C-kernel path: the Gram product and the head mean; torch path: its intermediates) unless
``chunk_size`` is given, which makes it recompute them too. The working memory is O(batch * heads * n_q * n_k)
during the call, or O(batch * heads * chunk * n_k) with ``chunk_size``. Each block of query rows works on the
leading key columns that hold its edges only (a causal attention has none right of its diagonal; those pairs have
weight 0 and get no gradient through it), so a causal graph costs about half a dense one; without ``chunk_size`` the rows are split
into blocks for this only when it skips enough pairs. ``release`` forms its weights as A exp(h log S - m) rather
than exp(log A + h log S - m): the same numbers without a log of the attention or a mask pass for non-edges.

Resolution: squared distances come from the Gram identity (for ``release`` on features centred on the key
mean), so pairs closer than about sqrt(machine eps) * ||x|| (~3e-4 ||x|| in float32) are not resolved: for
them (e.g. exact duplicate tokens off the diagonal) the weight follows rounding, bounded by the floor,
not the exact distance. ``release`` self loops are set to the floor exactly (§3.1 step 4).

Edges: an attention entry is an edge iff it is > 0. Non-edges (padding/causal masks, zero blocks) get
weight exactly 0; the gradient reaching them through the edge weight is 0 (the one-sided derivative of
M^{p/2} at 0 is infinite for p < 2), and in the ``paper`` variant they still receive the gradient of the
degree sums. Softmax-masked entries receive no gradient upstream anyway.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from vlpeft.functional._precision import autocast_disabled, compute_dtype, output_dtype
from vlpeft.functional._shapes import broadcast_shapes
from vlpeft.functional.p_laplacian_cpu import (
    kernel_applies,
    paper_backward_block,
    paper_forward_block,
    release_aggregate_cpu,
    release_kernel_applies,
)
from vlpeft.functional.parameters import DEFAULT_P_BOUNDS, check_p_bounds

VARIANTS: tuple[str, ...] = ("paper", "release")
GRAPHS: tuple[str, ...] = ("bipartite", "self")
SELF_LOOP_POLICIES: tuple[str, ...] = ("release", "drop")
RELEASE_EPS: float = 1e-8
PAPER_DIST_FLOOR: float = 1e-12

Scalar = float | Tensor


def p_laplacian_aggregate(
    x_q: Tensor,
    x_kv: Tensor,
    attn: Tensor,
    p: Scalar,
    mu: Scalar,
    *,
    variant: Literal["paper", "release"] = "paper",
    graph: Literal["bipartite", "self"] = "bipartite",
    p_bounds: tuple[float, float] | None = DEFAULT_P_BOUNDS,
    eps: float | None = None,
    dist_floor: float | None = None,
    self_loop: Literal["release", "drop"] | None = None,
    query_offset: int | None = None,
    causal_degrees: bool = False,
    past_column_degrees: Tensor | None = None,
    chunk_size: int | None = None,
    attn_head_mean: bool = False,
    recompute_attention: Callable[[slice], Tensor] | None = None,
    compiled: bool = False,
    kv_basis: Tensor | None = None,
    return_column_degrees: bool = False,
    attn_block_plan: Sequence[tuple[slice, int]] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Aggregate node features with one p-Laplacian step on the attention graph.

    Args:
        x_q: query-node features (batch, heads, n_q, d). ``paper``: V̂ of the queries; ``release``: F.
        x_kv: key/value-node features (batch, heads, n_k, d).
        attn: post-softmax attention (batch, heads, n_q, n_k), non-negative; zero entries are non-edges,
            rows may be entirely zero.
        p: float, 0-d tensor, per-head tensor (heads,) or a tensor broadcastable to (batch, heads, n_q, 1).
        mu: same forms as ``p``; must be > 0.
        variant: "paper" or "release".
        graph: "bipartite" or "self". ``paper`` accepts only "bipartite": its graph over [Q; V] nodes is
            bipartite for self- and cross-attention alike (Eq. 9).
        p_bounds: (p_min, p_max); p must lie in [p_min, p_max]. ``None`` is the raw mode of faithful
            ``release`` training: only p > 0 is required.
        eps: ``release`` only, default 1e-8; the floor is s_min = eps * sqrt(d).
        dist_floor: ``paper`` only, default 1e-12; floor of ||y_q - y_j||^2.
        self_loop: ``release`` + ``graph="self"`` only. "release" (default): s_ii := s_min, i.e.
            W_ii = A_ii * s_min^(p-2) (the released huge self loops); "drop": W_ii = 0.
        query_offset: ``release`` + ``graph="self"`` only: query row i is key node ``query_offset + i``
            (default n_k - n_q: the queries are the last n_q nodes, as in KV-cached decoding).
            x_q[..., i, :] must be the features of that key node.
        causal_degrees: ``paper`` only. False: column degrees D_j = sum over all queries of M_qj.
            True: D_j^(q) = past_j + sum_{q' <= q} M_q'j (§2.5, H10), so row q depends on rows <= q only.
        past_column_degrees: ``paper`` with ``causal_degrees=True`` only: (batch, heads, n_past), n_past
            <= n_k, the column sums of the attention of all earlier queries (right-padded with zeros; under
            causality earlier queries put no mass on newer keys). With it, KV-cached decoding equals
            cache-free decoding; maintain it with :func:`accumulate_column_degrees`. Without it, the
            queries are taken to be the first ones of the sequence.
        chunk_size: process query rows in blocks of this size, in the forward and (recomputed) in the backward
            pass, bounding the working memory to O(batch * heads * chunk_size * n_k) (exact). Without it, ``paper``
            keeps its blocks' intermediates (about six tensors of the head-mean graph's size) for the backward
            pass instead of recomputing them; ``release`` recomputes them either way.
        attn_head_mean: ``paper`` only. ``attn`` is per-head (batch, heads, n_q, n_k) and the graph is its mean
            over heads (§2.5), averaged block by block inside the kernel: no (n_q, n_k) mean tensor is built or
            kept for the backward pass (the per-head attention is kept by the attention's own backward anyway; when
            ``attn`` needs no gradient the mean is taken up front and kept instead, 1 / heads of its size).
            x_q / x_kv / the result then have heads = 1 (or broadcast to it).
        recompute_attention: ``release`` only, used only with ``chunk_size`` and only when ``attn`` needs no gradient
            (e.g. the first adapted layer of a frozen model, whose attention nothing else keeps for the backward
            pass): a callable mapping a slice of query rows to exactly ``attn[..., rows, :]`` (batch, heads, rows,
            n_k), e.g. the attention's own computation re-run on those query rows. The backward pass then rebuilds
            each block of rows from it instead of keeping ``attn`` alive between the passes, so the memory kept for
            the backward pass is O(batch * heads * n_q * d) and the working memory O(batch * heads * chunk_size * n_k).
            If the recomputation differs from ``attn`` by float rounding, the gradient follows that difference.
        compiled: ``release`` only, opt-in. Run each block's forward and backward work through ``torch.compile``
            (inductor; on CPU its C++ backend, so a C++ compiler must be installed): the dozen elementwise passes
            over the (rows, n_k) block become a few fused loops. The same formulas as the default path (equal up
            to float rounding). The first calls compile (tens of seconds per shape class on a small CPU machine);
            later calls with other block shapes reuse the dynamic-shape graphs.
        kv_basis: ``paper`` only: (r, d). ``x_kv`` (batch, heads, n_k, r) then holds coordinates and the key-node
            features are ``x_kv @ kv_basis``; the result equals the call with those features, up to float rounding.
            The pairwise products (Gram and aggregation, forward and backward) then run on r features instead of d,
            e.g. under grouped-query attention, whose values span kv_heads * head_dim (+ 1 for an output bias)
            dimensions of the d-dimensional V̂ (see the p-adapter layer). Gradients reach ``kv_basis`` too.
        return_column_degrees: ``paper`` with ``causal_degrees=True`` only: also return the running column degrees
            after these queries, (batch, heads, n_k) (heads = 1 with ``attn_head_mean``), i.e. what
            :func:`accumulate_column_degrees` gives for the next cached decoding step, taken from the block loop's
            own running sums instead of another pass over the attention. No gradient flows through them.
        attn_block_plan: ``paper`` without ``chunk_size`` only: blocks of query rows ``[(rows, n_keys), ...]``, in
            order and covering all rows, with ``attn[..., rows, n_keys:]`` exactly 0 (e.g. the plan of
            :func:`~vlpeft.functional.blocked_eager_attention`, whose skipped keys have probability 0). The block
            loop then uses them instead of reading the attention for its key extents, and checks non-negativity on
            the entries it reads (the graph's, i.e. the head mean with ``attn_head_mean``) instead of in a separate
            pass; entries right of a block's ``n_keys`` are taken to be 0 as promised.

    Returns:
        (batch, heads, n_q, d) in the promoted dtype of x_q and x_kv, or ``(that, column degrees)`` with
        ``return_column_degrees``. Computed in float32 (float64 if any input is float64) with autocast disabled.
    """
    options = _resolve_options(
        variant=variant,
        graph=graph,
        eps=eps,
        dist_floor=dist_floor,
        self_loop=self_loop,
        query_offset=query_offset,
        causal_degrees=causal_degrees,
        past_column_degrees=past_column_degrees,
        chunk_size=chunk_size,
    )
    if attn_head_mean and variant != "paper":
        raise ValueError(f"attn_head_mean=True applies to variant='paper' only, got variant={variant!r}")
    options["head_mean"] = bool(attn_head_mean)
    if recompute_attention is not None:
        if variant != "release":
            raise ValueError(f"recompute_attention applies to variant='release' only, got variant={variant!r}")
        if not callable(recompute_attention):
            raise TypeError(f"recompute_attention must be a callable (rows: slice) -> Tensor or None, got "
                            f"{type(recompute_attention).__name__}")
    if not isinstance(compiled, bool):
        raise TypeError(f"compiled must be a bool, got {compiled!r}")
    if compiled and variant != "release":
        raise ValueError(f"compiled=True applies to variant='release' only, got variant={variant!r}")
    options["compiled"] = compiled
    # Only where it saves memory: chunked, and nothing else keeps the attention for a gradient of its own.
    options["recompute"] = (recompute_attention if chunk_size is not None
                            and not (torch.is_grad_enabled() and attn.requires_grad) else None)
    if kv_basis is not None and variant != "paper":
        raise ValueError(f"kv_basis applies to variant='paper' only, got variant={variant!r}")
    if attn_block_plan is not None:
        if variant != "paper" or chunk_size is not None:
            raise ValueError("attn_block_plan applies to variant='paper' without chunk_size only, got "
                             f"variant={variant!r}, chunk_size={chunk_size!r}")
        attn_block_plan = _checked_block_plan(attn_block_plan, attn.shape[-2], attn.shape[-1])
    options["block_plan"] = attn_block_plan
    if return_column_degrees and not (variant == "paper" and causal_degrees):
        raise ValueError("return_column_degrees=True applies to variant='paper' with causal_degrees=True only, got "
                         f"variant={variant!r}, causal_degrees={causal_degrees!r}")
    n_q, n_k, lead = _check_shapes(x_q, x_kv, attn[:, :1] if attn_head_mean and attn.dim() == 4 else attn, kv_basis)
    if options["graph"] == "self":
        options["query_offset"] = _resolve_query_offset(query_offset, n_q, n_k)
    if past_column_degrees is not None:
        _check_past_degrees(past_column_degrees, n_k, lead)
    _check_p(p, p_bounds)
    _check_mu(mu)
    if attn_block_plan is None:
        _check_attention(attn)  # with a plan, the block loop checks the entries it reads

    out_dtype = output_dtype(x_q.dtype, x_kv.dtype)
    dtype = compute_dtype(x_q.dtype, x_kv.dtype, attn.dtype, *(() if kv_basis is None else (kv_basis.dtype,)))
    with autocast_disabled(x_q.device.type):
        xq = x_q.to(dtype)
        xkv = x_kv.to(dtype)
        att = attn.to(dtype)
        p_t = _as_coefficient(p, "p", dtype, x_q.device)
        mu_t = _as_coefficient(mu, "mu", dtype, x_q.device)
        if options["variant"] == "release":
            out = _run_release(xq, xkv, att, p_t, mu_t, options)
        else:
            past = None if past_column_degrees is None else past_column_degrees.to(dtype)
            basis = None if kv_basis is None else kv_basis.to(dtype)
            out, degrees = _run_paper(xq, xkv, att, p_t, mu_t, past, options, basis)
            if return_column_degrees:
                return out.to(out_dtype), degrees.squeeze(-2)
    return out.to(out_dtype)


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
            _check_past_degrees(past_column_degrees, attn.shape[-1], tuple(total.shape[:2]))
            total = total + _pad_past(past_column_degrees.to(dtype), attn.shape[-1])
    return total


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _resolve_options(
    *,
    variant: str,
    graph: str,
    eps: float | None,
    dist_floor: float | None,
    self_loop: str | None,
    query_offset: int | None,
    causal_degrees: bool,
    past_column_degrees: Tensor | None,
    chunk_size: int | None,
) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {VARIANTS}")
    if graph not in GRAPHS:
        raise ValueError(f"graph={graph!r} is not one of {GRAPHS}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got chunk_size={chunk_size!r}")
    options: dict = {"variant": variant, "graph": graph, "chunk_size": chunk_size}
    if variant == "paper":
        if graph != "bipartite":
            raise ValueError(
                f"variant='paper' requires graph='bipartite', got graph={graph!r}: the paper's graph "
                "(Eq. 9) is the bipartite [Q; V] graph for self- and cross-attention; pass query-node "
                "features as x_q and value-node features as x_kv"
            )
        _reject_for(variant, eps=eps, self_loop=self_loop, query_offset=query_offset)
        if past_column_degrees is not None and not causal_degrees:
            raise ValueError("past_column_degrees is only used with causal_degrees=True")
        floor = PAPER_DIST_FLOOR if dist_floor is None else float(dist_floor)
        if not (math.isfinite(floor) and floor > 0.0):
            raise ValueError(f"dist_floor must be a finite number > 0, got dist_floor={dist_floor}")
        options.update(dist_floor=floor, causal_degrees=bool(causal_degrees))
        return options
    _reject_for(variant, dist_floor=dist_floor, past_column_degrees=past_column_degrees)
    if causal_degrees:
        raise ValueError("causal_degrees=True applies to variant='paper' only; 'release' has no degrees")
    eps_value = RELEASE_EPS if eps is None else float(eps)
    if not (math.isfinite(eps_value) and eps_value > 0.0):
        raise ValueError(f"eps must be a finite number > 0, got eps={eps}")
    options["eps"] = eps_value
    if graph == "bipartite":
        _reject_for("release with graph='bipartite'", self_loop=self_loop, query_offset=query_offset)
        return options
    policy = "release" if self_loop is None else self_loop
    if policy not in SELF_LOOP_POLICIES:
        raise ValueError(f"self_loop={self_loop!r} is not one of {SELF_LOOP_POLICIES}")
    options["self_loop"] = policy
    return options


def _reject_for(context: str, **given: object) -> None:
    used = [name for name, value in given.items() if value is not None]
    if used:
        raise ValueError(f"option(s) {used} do not apply to variant {context}")


def _check_shapes(x_q: Tensor, x_kv: Tensor, attn: Tensor,
                  kv_basis: Tensor | None = None) -> tuple[int, int, tuple[int, ...]]:
    for name, tensor in (("x_q", x_q), ("x_kv", x_kv), ("attn", attn)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 4:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, rows, cols), got {shape}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {tensor.dtype}")
    n_q, d = x_q.shape[-2:]
    n_k, d_kv = x_kv.shape[-2:]
    if kv_basis is not None:
        if not isinstance(kv_basis, Tensor) or kv_basis.dim() != 2 or not kv_basis.is_floating_point():
            shape = tuple(kv_basis.shape) if isinstance(kv_basis, Tensor) else type(kv_basis).__name__
            raise ValueError(f"kv_basis must be a 2-D floating-point tensor (r, d), got {shape}")
        if tuple(kv_basis.shape) != (d_kv, d):
            raise ValueError(f"kv_basis must be (r, d) = ({d_kv}, {d}) for x_kv with r={d_kv} coordinates and x_q "
                             f"with d={d} features, got {tuple(kv_basis.shape)}")
        if kv_basis.device != x_q.device:
            raise ValueError(f"kv_basis is on {kv_basis.device}, x_q on {x_q.device}")
    elif d != d_kv:
        raise ValueError(f"feature dims differ: x_q has d={d}, x_kv has d={d_kv}")
    if d < 1 or n_k < 1:
        raise ValueError(f"need d >= 1 and n_k >= 1, got d={d}, n_k={n_k}")
    if tuple(attn.shape[-2:]) != (n_q, n_k):
        raise ValueError(
            f"attn must end in (n_q, n_k) = ({n_q}, {n_k}) to match x_q and x_kv, got {tuple(attn.shape)}"
        )
    try:
        lead = broadcast_shapes(x_q.shape[:2], x_kv.shape[:2], attn.shape[:2])
    except RuntimeError as err:
        raise ValueError(
            "batch/heads axes do not broadcast: x_q "
            f"{tuple(x_q.shape[:2])}, x_kv {tuple(x_kv.shape[:2])}, attn {tuple(attn.shape[:2])}"
        ) from err
    if not (x_q.device == x_kv.device == attn.device):
        raise ValueError(f"inputs on different devices: {x_q.device}, {x_kv.device}, {attn.device}")
    return n_q, n_k, tuple(lead)


def _resolve_query_offset(query_offset: int | None, n_q: int, n_k: int) -> int:
    if n_q > n_k:
        raise ValueError(f"graph='self' needs n_q <= n_k (queries are a subset of the nodes), got {n_q} > {n_k}")
    if query_offset is None:
        return n_k - n_q
    if isinstance(query_offset, bool) or not isinstance(query_offset, int) or not 0 <= query_offset <= n_k - n_q:
        raise ValueError(f"query_offset must be an int in [0, n_k - n_q] = [0, {n_k - n_q}], got {query_offset!r}")
    return query_offset


def _check_past_degrees(past: Tensor, n_k: int, lead: tuple[int, ...]) -> None:
    if not isinstance(past, Tensor) or past.dim() != 3 or past.shape[-1] > n_k:
        shape = tuple(past.shape) if isinstance(past, Tensor) else type(past).__name__
        raise ValueError(f"past_column_degrees must be (batch, heads, n_past) with n_past <= n_k={n_k}, got {shape}")
    try:
        broadcast_shapes(tuple(past.shape[:2]), lead)
    except RuntimeError as err:
        raise ValueError(f"past_column_degrees batch/heads {tuple(past.shape[:2])} do not broadcast with {lead}") from err


def _check_p(p: Scalar, p_bounds: tuple[float, float] | None) -> None:
    if p_bounds is None:
        _check_positive(p, "p", "p must be > 0 (raw mode, p_bounds=None)")
        return
    p_min, p_max = (float(v) for v in p_bounds)
    check_p_bounds(p_min, p_max)
    requirement = f"p must lie in [p_min, p_max] = [{p_min}, {p_max}]"
    if isinstance(p, Tensor):
        _check_tensor_values(p, "p", lambda v: (v >= p_min) & (v <= p_max), requirement)
        return
    value = _as_float(p, "p")
    if not p_min <= value <= p_max:
        raise ValueError(f"p={value} is out of range: {requirement}")


def _check_attention(attn: Tensor) -> None:
    """Attention must be non-negative (zeros are non-edges); one reduction, no host sync off the CPU."""
    if attn.numel() == 0:
        return
    smallest = attn.detach().amin()
    if attn.device.type == "cpu":
        if bool(smallest < 0):
            raise ValueError(f"attn must be non-negative (post-softmax attention), got a minimum of {smallest.item()}")
    else:
        torch._assert_async(smallest >= 0, "attn must be non-negative (post-softmax attention)")


def _checked_block_plan(plan: Sequence[tuple[slice, int]], n_q: int, n_k: int) -> list[tuple[slice, int]]:
    """``plan`` as a list after checking that its row slices tile [0, n_q) in order with key counts in [1, n_k]."""
    checked, start = [], 0
    for entry in plan:
        rows, keys = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, None)
        if (not isinstance(rows, slice) or rows.start != start or rows.step not in (None, 1)
                or not isinstance(rows.stop, int) or rows.stop <= start or isinstance(keys, bool)
                or not isinstance(keys, int) or not 1 <= keys <= n_k):
            raise ValueError(f"attn_block_plan must be [(slice(start, stop), n_keys), ...] tiling the {n_q} query "
                             f"rows in order with 1 <= n_keys <= {n_k}; got {entry!r} after row {start}")
        checked.append((slice(start, rows.stop), keys))
        start = rows.stop
    if start != n_q:
        raise ValueError(f"attn_block_plan covers rows [0, {start}), expected all {n_q} query rows")
    return checked


def _check_mu(mu: Scalar) -> None:
    _check_positive(mu, "mu", "mu must be > 0 (so that 2 mu / p keeps alpha finite on empty rows)")


def _check_positive(value: Scalar, name: str, requirement: str) -> None:
    if isinstance(value, Tensor):
        _check_tensor_values(value, name, _positive_finite, requirement)
        return
    number = _as_float(value, name)
    if not (math.isfinite(number) and number > 0.0):
        raise ValueError(f"{name}={number} is out of range: {requirement}")


def _positive_finite(value: Tensor | float) -> Tensor | bool:
    if isinstance(value, Tensor):
        return (value > 0) & torch.isfinite(value)
    return value > 0 and math.isfinite(value)


def _as_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float or a floating-point tensor, got {type(value).__name__}")
    return float(value)


def _check_tensor_values(value: Tensor, name: str, is_ok: Callable[[Any], Any], requirement: str) -> None:
    """Check a coefficient tensor; CPU values are checked eagerly, accelerator values without a host sync.

    ``is_ok`` maps a tensor to a boolean tensor and a float to a bool (one CPU value is checked as a float: one op
    instead of four, and this runs for every adapted layer and step).
    """
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {value.dtype}")
    if value.device.type == "cpu" and value.numel() == 1:
        number = value.item()
        if not is_ok(number):
            raise ValueError(f"{name}={number} is out of range: {requirement}")
        return
    ok = is_ok(value.detach())
    if value.device.type == "cpu":
        if not bool(ok.all()):
            bad = value.detach()[~ok].flatten()[:8].tolist()
            raise ValueError(f"{name} has out-of-range values {bad}: {requirement}")
    else:
        torch._assert_async(ok.all(), f"{name} is out of range: {requirement}")


def _as_coefficient(value: Scalar, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Return a tensor broadcastable against (batch, heads, n_q, 1)."""
    if not isinstance(value, Tensor):
        return torch.tensor(float(value), dtype=dtype, device=device)
    value = value.to(device=device, dtype=dtype)
    if value.dim() == 0:
        return value
    if value.dim() == 1:
        return value.view(-1, 1, 1)
    if value.dim() == 4 and value.shape[-1] == 1:
        return value
    raise ValueError(
        f"{name} must be a float, a 0-d tensor, a per-head tensor (heads,), or 4-D broadcastable to "
        f"(batch, heads, n_q, 1); got shape {tuple(value.shape)}"
    )


# ----------------------------------------------------------------------------------------------------------
# Fused kernels (float32/float64, autocast off)
#
# Each variant is one autograd Function with a hand-written backward, working on blocks of query rows (of
# ``chunk_size``, or automatic ones, see :func:`_block_plan`). ``release`` saves only its inputs and the per-row
# log-normaliser L (batch, heads, n_q, 1); its backward recomputes the per-head (rows, n_k) intermediates block by
# block. ``paper`` (one head-mean graph, so its intermediates are 1 / heads the size of the attention) keeps each
# block's intermediates for the backward pass unless ``chunk_size`` is given, in which case it recomputes them
# like ``release``. With ``chunk_size`` neither keeps an (n_q, n_k) tensor of its own alive between forward and
# backward and the working memory is O(chunk_size * n_k). Both run a few dozen tensor operations per block
# instead of the hundred-odd autograd nodes of the op-by-op graph.
#
# Gradient conventions (as autograd gives for the op-by-op formulas): clamped distances (below the floor) and
# ``release`` self loops forced to the floor pass no gradient to the distances; non-edges get no gradient through
# their (zero) weight; the centring shift of ``release`` is a constant.
# ----------------------------------------------------------------------------------------------------------


def _row_block(tensor: Tensor, rows: slice) -> Tensor:
    """Rows of a tensor broadcastable to (.., n_q, 1 or n_k); coefficients without a row axis pass through."""
    return tensor[..., rows, :] if tensor.dim() >= 2 and tensor.shape[-2] != 1 else tensor


def _reduce_to(grad: Tensor | None, like: Tensor, needed: bool) -> Tensor | None:
    if not needed or grad is None:
        return None
    return grad.sum_to_size(like.shape) if grad.shape != like.shape else grad


def _add(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total + term


def _write_rows(target: Tensor, rows: slice, grad: Tensor) -> None:
    """target[..., rows, :] = grad summed over the axes that were broadcast against ``target``."""
    view = target[..., rows, :]
    view.copy_(grad.sum_to_size(view.shape) if grad.shape != view.shape else grad)


def _concat_rows(blocks: list[Tensor]) -> Tensor:
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-2)


def _coefficient_grads(need_p: bool, need_mu: bool, p: Tensor, mu: Tensor, grad_p_rows: list[Tensor],
                       grad_log_c_rows: list[Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of p and mu from per-row pieces: d/dp of the weights and of log c = log(2 mu / p)."""
    grad_p = grad_mu = None
    if need_p or need_mu:
        grad_log_c = _concat_rows(grad_log_c_rows)
        if need_p:
            grad_p = (_concat_rows(grad_p_rows) - grad_log_c / p).sum_to_size(p.shape)
        if need_mu:
            grad_mu = (grad_log_c / mu).sum_to_size(mu.shape)
    return grad_p, grad_mu


#: Below this output width, CPU BLAS runs (m, k) @ (k, d) several times faster as the transposed product.
_THIN_WIDTH = 16


def _thin_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a (.., m, k) @ b (.., k, d); for d < 16 on CPU computed as (b^T a^T)^T.

    The pairwise products of the release heads (d = r / heads, e.g. 8) have a thin right operand; CPU BLAS is
    slow for such shapes (1.5 ms vs 0.5 ms for (4, 643, 643) @ (4, 643, 8) on one thread) and fast for the
    transposed product, which reads the same operands and returns a transposed view.
    """
    if b.shape[-1] >= _THIN_WIDTH or a.device.type != "cpu":
        return torch.matmul(a, b)
    return torch.matmul(b.transpose(-1, -2), a.transpose(-1, -2)).transpose(-1, -2)


def _gram_distances(xq: Tensor, xk: Tensor, sq_k: Tensor) -> Tensor:
    """||xq_i - xk_j||^2 (.., n_q, n_k) as one matmul of augmented features [xq, |xq|^2, 1] . [-2 xk, 1, |xk|^2].

    ``sq_k`` is |xk|^2 as (.., 1, n_k). One product writes the result directly, instead of a Gram product followed
    by three elementwise passes over the (n_q, n_k) output.
    """
    sq_q = (xq * xq).sum(dim=-1, keepdim=True)
    ones_q = torch.ones_like(sq_q)
    lead_k = xk.shape[:-1]
    left = torch.cat((xq, sq_q, ones_q), dim=-1)
    right = torch.cat((-2.0 * xk, torch.ones(lead_k, dtype=xk.dtype, device=xk.device).unsqueeze(-1),
                       sq_k.transpose(-1, -2).expand(*lead_k, 1)), dim=-1)
    return torch.matmul(left, right.transpose(-1, -2))


def _edge_weights(shifted_log_w: Tensor, non_edge: Tensor) -> Tensor:
    """exp(shifted_log_w) on edges and exactly 0 on non-edges, in place.

    Non-edges carry finite log weights (no -inf): on CPU, exp of -inf or of arguments whose result underflows
    runs several times slower than on ordinary values, so the argument is floored at log(tiny) + 8 (weights below
    ~e^8 * tiny, 3.5e-35 in float32, of the row's largest are raised to that) and non-edges are zeroed after.
    """
    floor = math.log(torch.finfo(shifted_log_w.dtype).tiny) + 8.0
    return shifted_log_w.clamp_min_(floor).exp_().masked_fill_(non_edge, 0.0)


def _normalised_weights(log_w: Tensor, log_c: Tensor, non_edge: Tensor) -> tuple[Tensor, Tensor]:
    """(omega, L): omega = exp(log_w - L) on edges, 0 on non-edges, L = log(sum_edges exp(log_w) + exp(log_c)).

    One exponential pass: omega = exp(log_w - shift) / total, L = shift + log(total); overwrites ``log_w``. The
    shift is the row maximum over all entries (non-edges included: they are finite) and log_c; any shift keeps
    the result exact as long as nothing overflows, and the non-edge values lie far below the edges' (they have
    log A = log(tiny) in ``release``; in ``paper`` a non-edge sits at log A = 0, above its row's edges by at most
    (p/2) |log A| of the largest edge, a few units for attention rows that sum to about 1).
    """
    shift = torch.maximum(log_w.amax(dim=-1, keepdim=True), log_c)
    weights = _edge_weights(log_w.sub_(shift), non_edge)
    total = weights.sum(dim=-1, keepdim=True) + torch.exp(log_c - shift)
    return weights.div_(total), shift + torch.log(total)


#: Query rows per block when no ``chunk_size`` is given, used only where the attention has an empty upper-right
#: staircase (causal masks): each block then works on the key columns that hold its edges only.
_AUTO_BLOCK_ROWS = 128
#: Split into row blocks without a ``chunk_size`` only if that skips at least this fraction of the pairs.
_AUTO_BLOCK_MIN_SAVING = 0.15


def _key_extents(attn: Tensor, slices: list[slice]) -> list[int]:
    """For each block of query rows, 1 + the last key column with a non-zero attention entry (at least 1).

    Attention of a causal block has no edge right of its diagonal: those pairs have weight exactly 0 in both
    variants and receive no gradient through their weight, so a block only needs its leading key columns. One
    reduction per block (a read of the attention) and one host read of the extents.
    """
    n_k = attn.shape[-1]
    marks = []
    for rows in slices:
        columns = attn[..., rows, :].detach().amax(dim=-2).reshape(-1, n_k).amax(dim=0)  # (n_k,)
        marks.append(columns > 0)
    positions = torch.arange(1, n_k + 1, device=attn.device)
    ends = (torch.stack(marks) * positions).amax(dim=-1)
    return [max(1, int(end)) for end in ends.tolist()]


def _block_plan(attn: Tensor, n_q: int, chunk_size: int | None) -> list[tuple[slice, int]]:
    """Blocks of query rows with the number of leading key columns each needs (see :func:`_key_extents`).

    With ``chunk_size`` the blocks are its row blocks. Without, the rows are split into equal blocks of about
    :data:`_AUTO_BLOCK_ROWS` (see :func:`_even_row_slices`) only when that skips enough pairs (a causal attention
    skips about half); otherwise one block of all rows (over all keys when the rows make one block anyway: then the
    attention is not read for extents at all).
    """
    n_k = attn.shape[-1]
    if n_q == 0:
        return [(slice(0, 0), n_k)]
    if chunk_size is not None:
        slices = _row_slices(n_q, chunk_size)
        return list(zip(slices, _key_extents(attn, slices)))
    slices = _even_row_slices(n_q, _AUTO_BLOCK_ROWS)
    if len(slices) == 1:
        return [(slices[0], n_k)]  # nothing to skip between blocks; trailing empty key columns are rare
    extents = _key_extents(attn, slices)
    pairs = sum((rows.stop - rows.start) * keys for rows, keys in zip(slices, extents))
    if pairs <= (1.0 - _AUTO_BLOCK_MIN_SAVING) * n_q * n_k:
        return list(zip(slices, extents))
    return [(slice(0, n_q), max(extents))]


def _mul_(tensor: Tensor, other: Tensor | float) -> Tensor:
    """tensor * other, in place when the result has the shape of ``tensor``."""
    if isinstance(other, Tensor) and broadcast_shapes(tensor.shape, other.shape) != tensor.shape:
        return tensor * other
    return tensor.mul_(other)


def _self_loops(pairs: Tensor, rows: slice, query_offset: int) -> Tensor:
    """View of the self-loop entries (query i, key node query_offset + i) of a block of rows ``rows``."""
    return pairs.diagonal(offset=query_offset + rows.start, dim1=-2, dim2=-1)


def _release_scaled(xq_c: Tensor, xk_c: Tensor, sq_k: Tensor, attn: Tensor, rows: slice,
                    settings: tuple) -> tuple[Tensor, Tensor]:
    """(S, D) of a block: D = squared distances, S = max((A + eps) D, s_min^2) with forced self loops at s_min^2."""
    eps, s_min_sq, self_graph, drop_self_loops, query_offset = settings
    dist_sq = _gram_distances(xq_c, xk_c, sq_k)
    scaled = _mul_(attn + eps, dist_sq).clamp_min_(s_min_sq)
    if self_graph and not drop_self_loops:
        _self_loops(scaled, rows, query_offset).fill_(s_min_sq)
    return scaled, dist_sq


def _release_weights(log_scaled: Tensor, attn: Tensor, half_pm2: Tensor, shift: Tensor, rows: slice,
                     settings: tuple, *, in_place: bool) -> Tensor:
    """A * exp((p - 2)/2 * log S - shift), exactly 0 on non-edges (A = 0) and on dropped self loops.

    The weight W = A S^((p-2)/2) is formed as A times an exponential instead of exp(log A + ...): no log of the
    attention (zeros and subnormals take a slow path on CPU) and no mask pass for the non-edges, whose factor A is
    0. ``shift`` (>= the row maximum of the exponent's first term, or the log-normaliser) keeps exp <= 1 / total.
    """
    _, _, self_graph, drop_self_loops, query_offset = settings
    exponent = _mul_(log_scaled, half_pm2) if in_place else log_scaled * half_pm2
    weights = _mul_(exponent.sub_(shift).exp_(), attn)
    if self_graph and drop_self_loops:
        _self_loops(weights, rows, query_offset).fill_(0.0)
    return weights


def _release_forward_block(xq_c: Tensor, xk_c: Tensor, sq_k: Tensor, attn: Tensor, x_keys: Tensor, x_rows: Tensor,
                           half: Tensor, log_c: Tensor, diagonal: Tensor, eps: float, s_min_sq: float,
                           self_graph: bool, drop_self_loops: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The ``release`` forward of one block of rows as one pure function (the ``compiled=True`` path).

    The formulas of :class:`_ReleaseAggregate`'s forward written out-of-place (for ``torch.compile`` to fuse):
    xq_c (.., rows, d) / xk_c (.., keys, d) centred features, sq_k (.., 1, keys), attn (.., rows, keys), x_keys /
    x_rows the uncentred key / row features, half = (p - 2) / 2 and log_c rows, ``diagonal`` (0-d integer tensor)
    the key column of the block's first row's self loop. Returns (out, aggregate, log-normaliser L (.., rows, 1)).
    """
    scaled = ((attn + eps) * _gram_distances(xq_c, xk_c, sq_k)).clamp_min(s_min_sq)
    loops = _self_loop_mask(scaled, diagonal) if self_graph else None
    if loops is not None and not drop_self_loops:
        scaled = torch.where(loops, s_min_sq, scaled)
    exponent = torch.log(scaled) * half
    shift = torch.maximum(exponent.amax(dim=-1, keepdim=True), log_c)
    weights = torch.exp(exponent - shift) * attn
    if loops is not None and drop_self_loops:
        weights = torch.where(loops, 0.0, weights)
    total = weights.sum(dim=-1, keepdim=True) + torch.exp(log_c - shift)
    log_norm = shift + torch.log(total)
    aggregated = _thin_matmul(weights / total, x_keys)
    out = aggregated + torch.exp(log_c - log_norm) * x_rows if self_graph else aggregated
    return out, aggregated, log_norm


def _release_backward_block(xq_c: Tensor, xk_c: Tensor, sq_k: Tensor, attn: Tensor, x_keys: Tensor, x_rows: Tensor,
                            half: Tensor, log_c: Tensor, diagonal: Tensor, log_norm: Tensor, grad: Tensor,
                            aggregated: Tensor, eps: float, s_min_sq: float, self_graph: bool,
                            drop_self_loops: bool, need_attn: bool, need_p: bool
                            ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """The ``release`` backward of one block of rows as one pure function (the ``compiled=True`` path).

    The chain rule of :class:`_ReleaseAggregate`'s backward, out-of-place; arguments as for
    :func:`_release_forward_block` plus the saved L, the output gradient and the saved aggregate of the rows.
    Returns (dL/dx rows, dL/dx of the block's keys, dL/dattn block or None, per-row dL/dp or None, dL/dlog c rows).
    """
    dist_sq = _gram_distances(xq_c, xk_c, sq_k)
    scaled = ((attn + eps) * dist_sq).clamp_min(s_min_sq)
    loops = _self_loop_mask(scaled, diagonal) if self_graph else None
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
    grad_keys = _thin_matmul(omega.transpose(-1, -2), grad)
    grad_p = 0.5 * (grad_log_w * log_scaled).sum(dim=-1, keepdim=True) if need_p else None
    grad_scaled = torch.where(free, grad_log_w * half / scaled, 0.0)
    grad_attn = grad_log_w / attn.clamp_min(torch.finfo(attn.dtype).tiny) + grad_scaled * dist_sq if need_attn else None
    grad_dist = grad_scaled * (attn + eps)
    grad_rows = grad_rows + 2.0 * grad_dist.sum(dim=-1, keepdim=True) * xq_c - 2.0 * _thin_matmul(grad_dist, xk_c)
    grad_keys = grad_keys + (2.0 * grad_dist.sum(dim=-2).unsqueeze(-1) * xk_c
                             - 2.0 * _thin_matmul(grad_dist.transpose(-1, -2), xq_c))
    return grad_rows, grad_keys, grad_attn, grad_p, grad_log_c


def _self_loop_mask(pairs: Tensor, diagonal: Tensor) -> Tensor:
    """(rows, keys) boolean: key column == ``diagonal`` + row (the self loops of a block of rows)."""
    rows = torch.arange(pairs.shape[-2], device=pairs.device).unsqueeze(-1)
    keys = torch.arange(pairs.shape[-1], device=pairs.device)
    return keys == rows + diagonal.to(pairs.device)


_COMPILED_BLOCKS: dict[str, Callable[..., Any]] = {}
#: How the ``compiled=True`` block functions are wrapped (tests may replace it to check the math uncompiled).
_COMPILER: Callable[[Callable[..., Any]], Callable[..., Any]] = functools.partial(torch.compile, dynamic=True)


def _compiled_release_block(direction: str) -> Callable[..., Any]:
    """The ``torch.compile``d :func:`_release_forward_block` / :func:`_release_backward_block` (built once)."""
    if direction not in _COMPILED_BLOCKS:
        function = _release_forward_block if direction == "forward" else _release_backward_block
        _COMPILED_BLOCKS[direction] = _COMPILER(function)
    return _COMPILED_BLOCKS[direction]


class _ReleaseAggregate(torch.autograd.Function):
    """U = Σ_j ω_qj x_kv,j (+ β_q x_q for the self graph), ``release`` weights (§3.1).

    Per block of query rows and its key columns (see :func:`_block_plan`): S = max((A + eps) D, s_min^2),
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
        plan = _block_plan(attn, x_q.shape[-2], chunk_size)
        outputs, aggregates, normalisers = [], [], []
        forward_block = _compiled_release_block("forward") if compiled else None
        for rows, n_keys in plan:
            attn_rows = attn[..., rows, :n_keys]
            if forward_block is not None:
                out, aggregated, log_norm = forward_block(
                    x_q[..., rows, :] - centre, xk_c[..., :n_keys, :], sq_k[..., :n_keys], attn_rows,
                    x_kv[..., :n_keys, :], x_q[..., rows, :], _row_block(half_pm2, rows), _row_block(log_c, rows),
                    torch.tensor(query_offset + rows.start), eps, settings[1], self_graph, drop_self_loops)
                outputs.append(out)
                aggregates.append(aggregated)
                normalisers.append(log_norm)
                continue
            scaled, dist_sq = _release_scaled(x_q[..., rows, :] - centre, xk_c[..., :n_keys, :],
                                              sq_k[..., :n_keys], attn_rows, rows, settings)
            del dist_sq
            half_rows = _row_block(half_pm2, rows)
            log_c_rows = _row_block(log_c, rows)
            exponent = _mul_(scaled.log_(), half_rows)
            shift = torch.maximum(exponent.amax(dim=-1, keepdim=True), log_c_rows)
            weights = _release_weights(exponent, attn_rows, 1.0, shift, rows, settings, in_place=True)
            del scaled, exponent
            total = weights.sum(dim=-1, keepdim=True) + torch.exp(log_c_rows - shift)
            log_norm = shift + torch.log(total)
            aggregated = _thin_matmul(weights.div_(total), x_kv[..., :n_keys, :]).contiguous()
            del weights
            out = aggregated
            if self_graph:
                out = aggregated + torch.exp(log_c_rows - log_norm) * x_q[..., rows, :]
            outputs.append(out)
            aggregates.append(aggregated)
            normalisers.append(log_norm)
        # The aggregate sum_j omega_qj x_j (rows x d) gives the backward's row totals without an (n_q, n_k) product.
        # With ``recompute`` (attn needs no gradient) the backward rebuilds the attention rows block by block.
        ctx.save_for_backward(x_q, x_kv, attn if recompute is None else None, p, mu, _concat_rows(normalisers),
                              _concat_rows(aggregates))
        ctx.settings = settings
        ctx.plan = plan
        ctx.recompute = recompute
        ctx.compiled = compiled
        return _concat_rows(outputs)

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
            backward_block = _compiled_release_block("backward") if ctx.compiled else None
            for rows, n_keys in plan:
                attn_rows = attn[..., rows, :n_keys] if attn is not None else _recomputed_rows(ctx.recompute, rows,
                                                                                                n_keys, x_q)
                if backward_block is not None:
                    grad_xq, grad_xk_rows, block_grad, grad_p_row, grad_log_c_row = backward_block(
                        x_q[..., rows, :] - centre, xk_c[..., :n_keys, :], sq_k[..., :n_keys], attn_rows,
                        x_kv[..., :n_keys, :], x_q[..., rows, :], _row_block(half_pm2, rows), _row_block(log_c, rows),
                        torch.tensor(query_offset + rows.start), log_norm_all[..., rows, :], grad_out[..., rows, :],
                        aggregated_all[..., rows, :], eps, s_min_sq, self_graph, drop_self_loops, needs[2], needs[3])
                    grad_xq_rows.append(grad_xq)
                    grad_xk = _add_key_rows(grad_xk, grad_xk_rows, n_k)
                    grad_log_c_rows.append(grad_log_c_row)
                    if needs[3]:
                        grad_p_rows.append(grad_p_row)
                    if needs[2]:
                        if whole:
                            grad_attn = block_grad.sum_to_size(attn.shape)
                        else:
                            _write_rows(grad_attn[..., :n_keys], rows, block_grad)
                            grad_attn[..., rows, n_keys:] = 0.0
                    continue
                xk_rows, xkv_rows = xk_c[..., :n_keys, :], x_kv[..., :n_keys, :]
                xq_c = x_q[..., rows, :] - centre
                scaled, dist_sq = _release_scaled(xq_c, xk_rows, sq_k[..., :n_keys], attn_rows, rows, ctx.settings)
                free = torch.gt(scaled, s_min_sq, out=torch.empty_like(scaled))  # 1 above the floor, else 0
                log_scaled = torch.log(scaled)
                log_norm = log_norm_all[..., rows, :]
                half_rows = _row_block(half_pm2, rows)
                omega = _release_weights(log_scaled, attn_rows, half_rows, log_norm, rows, ctx.settings,
                                         in_place=False)
                beta = torch.exp(_row_block(log_c, rows) - log_norm)
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
                grad_log_w = _mul_(torch.matmul(grad, xkv_rows.transpose(-1, -2)).sub_(total), omega)  # 0 on non-edges
                grad_xk = _add_key_rows(grad_xk, _thin_matmul(omega.transpose(-1, -2), grad), n_k)
                del omega
                if needs[3]:
                    grad_p_rows.append(0.5 * _row_dot(grad_log_w, log_scaled))
                # dL/dS = dL/dlog W * h / S where S is above the floor (forced self loops sit exactly on it).
                if log_scaled.shape == grad_log_w.shape:  # reuse its buffer
                    grad_scaled = torch.mul(grad_log_w, half_rows, out=log_scaled)
                else:
                    grad_scaled = grad_log_w * half_rows
                grad_scaled = _mul_(grad_scaled, free).div_(scaled)
                del log_scaled
                if needs[2]:
                    # dL/dlog W is 0 on non-edges, where A = 0: dividing by max(A, tiny) leaves it 0.
                    inverse = torch.clamp_min(attn_rows, tiny, out=scaled) if scaled.shape == attn_rows.shape \
                        else attn_rows.clamp_min(tiny)
                    block_grad = grad_log_w.div_(inverse).addcmul_(grad_scaled, dist_sq)
                    if whole:
                        grad_attn = block_grad.sum_to_size(attn.shape)
                    else:
                        _write_rows(grad_attn[..., :n_keys], rows, block_grad)
                        grad_attn[..., rows, n_keys:] = 0.0
                    del block_grad
                del grad_log_w, dist_sq, scaled
                grad_dist = _mul_(grad_scaled, torch.add(attn_rows, eps, out=free) if free.shape == attn_rows.shape
                                  else attn_rows + eps)
                del free
                grad_xq = _add(grad_xq, 2.0 * grad_dist.sum(dim=-1, keepdim=True) * xq_c
                               - 2.0 * _thin_matmul(grad_dist, xk_rows))
                grad_xq_rows.append(grad_xq)
                grad_xk = _add_key_rows(grad_xk, 2.0 * grad_dist.sum(dim=-2).unsqueeze(-1) * xk_rows
                                        - 2.0 * _thin_matmul(grad_dist.transpose(-1, -2), xq_c), n_k)
                del grad_dist, grad_scaled
            grad_p, grad_mu = _coefficient_grads(needs[3], needs[4], p, mu, grad_p_rows, grad_log_c_rows)
            return (
                _reduce_to(_concat_rows(grad_xq_rows), x_q, needs[0]),
                _reduce_to(grad_xk, x_kv, needs[1]),
                grad_attn,
                grad_p,
                grad_mu,
                None, None, None, None, None, None, None,
            )


def _add_key_rows(total: Tensor | None, part: Tensor, n_k: int) -> Tensor:
    """total (.., n_k, d) + part (.., n, d) on the first n key rows (total starts as zeros when None)."""
    if part.shape[-2] == n_k:
        return part if total is None else total + part
    if total is None:
        total = part.new_zeros(*part.shape[:-2], n_k, part.shape[-1])
    elif broadcast_shapes(total.shape, part.shape[:-2] + total.shape[-2:]) != total.shape:
        total = total.expand(*part.shape[:-2], *total.shape[-2:]).clone()
    total[..., : part.shape[-2], :] += part
    return total


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_j a[..., i, j] * b[..., i, j] as (.., rows, 1), without a (rows, n_k) temporary."""
    return torch.einsum("...ij,...ij->...i", a, b).unsqueeze(-1)


def _row_slices(n_q: int, chunk_size: int | None) -> list[slice]:
    if chunk_size is None or n_q <= chunk_size:
        return [slice(0, n_q)]
    return [slice(start, min(start + chunk_size, n_q)) for start in range(0, n_q, chunk_size)]


def _even_row_slices(n_q: int, target: int) -> list[slice]:
    """round(n_q / target) blocks of (nearly) equal size, e.g. 643 rows -> 5 blocks of 129/128 rows instead of 5 x 128
    + 3: each block costs a fixed Python/dispatch overhead (dozens of small ops), so a small last block is waste."""
    blocks = max(1, round(n_q / target))
    size = -(-n_q // blocks)
    return [slice(start, min(start + size, n_q)) for start in range(0, n_q, size)]


class _PaperBlock:
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
    _SAVED = ("omega", "log_sum", "dist_sq", "free", "inv_sqrt_col", "gram", "attn_or_one", "inv_sqrt_row",
              "sqrt_row", "sq_q")

    def saved(self, omega: Tensor) -> tuple[Tensor, ...]:
        """The tensors the backward pass reads, with the block's normalised weights ``omega``."""
        self.omega = omega
        return tuple(getattr(self, name) for name in self._SAVED)

    @classmethod
    def from_saved(cls, tensors: tuple[Tensor, ...]) -> _PaperBlock:
        """A block restored from :meth:`saved` (for the backward pass only)."""
        block = cls.__new__(cls)
        for name, tensor in zip(cls._SAVED, tensors, strict=True):
            setattr(block, name, tensor)
        return block


class _PaperAggregate(torch.autograd.Function):
    """(Σ_j c_qj k_j (.., n_q, r), β_q (.., n_q, 1), running column degrees (.., 1, n_k)) with the ``paper``
    coefficients c, β (§3.2); the degrees (base plus these rows' column sums, causal) carry no gradient.

    The nodes enter through their Gram products and squared norms only: ``x_q`` (.., n_q, r) and the keys ``x_kv``
    (.., n_k, r) with x_q . x_kv_j = V̂_q . V̂_j, and ``sq_q`` (.., n_q, 1) / ``sq_k`` (.., 1, n_k) = |V̂|^2. The
    caller forms Ū_q = (Σ_j c_qj k_j) B + β_q V̂_q (B the keys' basis, or the identity). ``base``: see
    :func:`_run_paper`.
    """

    @staticmethod
    def forward(ctx: Any, x_q: Tensor, x_kv: Tensor, sq_q: Tensor, sq_k: Tensor, attn: Tensor, p: Tensor, mu: Tensor,
                base: Tensor, dist_floor: float, causal: bool, chunk_size: int | None, head_mean: bool,
                block_plan: list[tuple[slice, int]] | None) -> tuple[Tensor, Tensor, Tensor]:
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
        plan = _block_plan(attn, x_q.shape[-2], chunk_size) if block_plan is None else block_plan
        # Fused CPU kernels (float32 CPU): the elementwise work of each block in C around the same BLAS products.
        kernel = kernel_applies(x_q, x_kv, attn, p, mu, graphs=_graph_count(x_q, x_kv, attn, head_mean))
        for rows, n_keys in plan:
            attn_rows = _graph_rows(attn, rows, head_mean, n_keys)
            xq_rows, x_keys = x_q[..., rows, :], x_kv[..., :n_keys, :]
            log_c_rows = _row_block(log_c, rows)
            if kernel:
                gram = torch.matmul(xq_rows, x_keys.transpose(-1, -2))
                coefficients, log_norm = paper_forward_block(
                    gram, attn_rows, _key_columns(running, n_keys), _row_block(sq_q, rows), sq_k[..., :n_keys],
                    _row_block(p, rows), log_c_rows, dist_floor=dist_floor, causal=causal)
                # Kept: the Gram product, and the head mean when taken (the backward pass then reads no per-head
                # attention). Keeping the weights too (no log/exp in the backward kernel) measured no faster: the
                # saved C time was spent on the extra (rows, keys) tensors.
                for_backward = (gram, attn_rows) if head_mean else (gram,)
            else:
                if block_plan is not None:
                    _check_attention(attn_rows)  # the C kernel checks the rows it reads itself
                col_deg = _key_columns(running, n_keys)
                if causal:
                    col_deg = col_deg + torch.cumsum(attn_rows, dim=-2)
                block = _PaperBlock(xq_rows, x_keys, _row_block(sq_q, rows), sq_k[..., :n_keys], attn_rows, col_deg,
                                    _row_block(p, rows), dist_floor)
                omega, log_norm = _normalised_weights(block.log_w, log_c_rows, block.non_edge)
                coefficients = omega * block.scale() if keep else omega.mul_(block.scale())
                for_backward = block.saved(omega) if keep else ()
                del block, omega, col_deg
            outputs.append(_thin_matmul(coefficients, x_keys))
            betas.append(torch.exp(log_c_rows - log_norm))
            normalisers.append(log_norm)
            bases.append(running)
            if keep:
                kept.extend(for_backward)
            if causal:
                running = running + _pad_keys(attn_rows.sum(dim=-2, keepdim=True), n_k)
            del coefficients, attn_rows, for_backward  # before the next block is built
        ctx.save_for_backward(x_q, x_kv, sq_q, sq_k, attn, p, mu, _concat_rows(normalisers), *bases, *kept)
        ctx.settings = (dist_floor, causal, plan, head_mean, keep, kernel)
        ctx.mark_non_differentiable(running)
        return _concat_rows(outputs), _concat_rows(betas), running

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor, grad_beta_all: Tensor, _: Tensor | None) -> tuple[Tensor | None, ...]:
        x_q, x_kv, sq_q, sq_k, attn, p, mu, log_norm_all, *bases = ctx.saved_tensors
        dist_floor, causal, plan, head_mean, kept, kernel = ctx.settings
        if kept:
            bases, kept_tensors = bases[:len(plan)], bases[len(plan):]
            per_block = (2 if head_mean else 1) if kernel else len(_PaperBlock._SAVED)
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
                p_rows, log_c_rows = _row_block(p, rows), _row_block(log_c, rows)
                xq, x_keys = x_q[..., rows, :], x_kv[..., :n_keys, :]
                log_norm = log_norm_all[..., rows, :]
                grad, grad_beta = grad_out[..., rows, :], grad_beta_all[..., rows, :]
                later = carry  # the later blocks' column-degree gradient, before this block's
                carry_keys = _key_columns(carry, n_keys) if causal and carry is not None else None
                saved = tuple(kept_tensors[index * per_block:(index + 1) * per_block]) if kept else ()
                if kernel:
                    attn_rows = saved[1] if len(saved) > 1 else _graph_rows(attn, rows, head_mean, n_keys)
                    gram = saved[0] if kept else torch.matmul(xq, x_keys.transpose(-1, -2))
                    part = _paper_backward_kernel(gram, attn_rows, _key_columns(bases[index], n_keys), xq, x_keys,
                                                  _row_block(sq_q, rows), sq_k[..., :n_keys], grad, grad_beta, p_rows,
                                                  log_c_rows, log_norm, carry_keys, dist_floor, causal)
                    del gram, attn_rows
                else:
                    if kept:
                        block = _PaperBlock.from_saved(saved)
                        omega = block.omega
                    else:
                        attn_rows = _graph_rows(attn, rows, head_mean, n_keys)
                        col_deg = _key_columns(bases[index], n_keys)
                        if causal:
                            col_deg = col_deg + torch.cumsum(attn_rows, dim=-2)
                        block = _PaperBlock(xq, x_keys, _row_block(sq_q, rows), sq_k[..., :n_keys], attn_rows, col_deg,
                                            p_rows, dist_floor)
                        omega = _edge_weights(block.log_w.sub_(log_norm), block.non_edge)
                        del attn_rows, col_deg
                    part = _paper_backward_torch(block, omega, xq, x_keys, sq_k[..., :n_keys], grad, grad_beta, p_rows,
                                                 log_c_rows, log_norm, carry_keys, causal)
                    del block, omega
                del saved
                grad_xq_rows[index], grad_p_rows[index], grad_log_c_rows[index] = part.grad_xq, part.grad_p, \
                    part.grad_log_c
                grad_sq_q_rows[index] = part.grad_sq_q
                grad_xk = _add_key_rows(grad_xk, part.grad_xk, n_k)
                grad_sq_k = _add_key_rows(grad_sq_k, part.grad_sq_k.transpose(-1, -2), n_k)
                block_sum = _pad_keys(part.column_sum, n_k)
                carry = block_sum if carry is None else carry + block_sum
                if whole and ctx.needs_input_grad[4]:
                    block_grad = part.grad_attn
                    grad_attn_full = (block_grad.sum_to_size(graph_shape) if block_grad.shape != graph_shape
                                      else block_grad)
                elif grad_attn_full is not None:
                    _write_rows(grad_attn_full[..., :n_keys], rows, part.grad_attn)
                    if n_keys < n_k:
                        # Right of the block's last edge only the degree sums depend on the (zero) attention: the
                        # row degree, and (causal) the column degrees of the later rows.
                        rest = part.grad_row_deg if not causal or later is None \
                            else part.grad_row_deg + later[..., n_keys:]
                        _write_rows(grad_attn_full[..., n_keys:], rows, rest.expand(*rest.shape[:-1], n_k - n_keys))
                del part  # this block's (rows, n_k) tensors, before the next block's are built
            needs = ctx.needs_input_grad
            grad_p, grad_mu = _coefficient_grads(needs[5], needs[6], p, mu, grad_p_rows, grad_log_c_rows)
            if head_mean and grad_attn_full is not None:
                # d mean / d attn_h = 1 / heads: a broadcast view over the heads, not a dense (.., heads, n_q, n_k)
                # copy. A consumer that reads it (the blocked attention's backward) reads it block by block; where
                # autograd adds another gradient of the attention, it writes the sum into a new tensor, which is
                # what a dense copy followed by an in-place add costs, without the copy.
                grad_attn_full = grad_attn_full.div_(attn.shape[1]).expand(attn.shape)
            return (
                _reduce_to(_concat_rows(grad_xq_rows), x_q, needs[0]),
                _reduce_to(grad_xk, x_kv, needs[1]),
                _reduce_to(_concat_rows(grad_sq_q_rows), sq_q, needs[2]),
                _reduce_to(grad_sq_k.transpose(-1, -2), sq_k, needs[3]),
                grad_attn_full,
                grad_p,
                grad_mu,
                _reduce_to(carry, bases[0], needs[7]),
                None, None, None, None, None,
            )


class _PaperBlockBackward(NamedTuple):
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


def _paper_backward_torch(block: _PaperBlock, omega: Tensor, xq: Tensor, x_keys: Tensor, sq_keys: Tensor,
                          grad: Tensor, grad_beta: Tensor, p_rows: Tensor, log_c_rows: Tensor, log_norm: Tensor,
                          carry: Tensor | None, causal: bool) -> _PaperBlockBackward:
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
    grad_p = 0.5 * _row_dot(grad_log_w, block.log_sum)
    grad_log_row = 0.5 * t_sum - grad_log_w.sum(dim=-1, keepdim=True)
    grad_dist = torch.where(block.free, grad_log_w / block.dist_sq, 0.0).mul_(0.5 * (p_rows - 2.0))
    # dist = sq_q r^2 + sq_k c^2 - 2 gram r c, with r = D_q^(-1/2), c = D_j^(-1/2); g = dL/ddist * c.
    # ir and ic are 0 where the degree is 0, so the degree terms vanish there as they should.
    grad_dist_ic = grad_dist * ic
    grad_gram = grad_dist_ic * (-2.0 * ir)
    grad_dist_sum = grad_dist.sum(dim=-1, keepdim=True)
    grad_ir = 2.0 * block.sq_q * ir * grad_dist_sum - 2.0 * _row_dot(grad_dist_ic, block.gram)
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
    grad_xq = _thin_matmul(grad_gram, x_keys)
    grad_xk = _thin_matmul(coefficients.transpose(-1, -2), grad) + _thin_matmul(grad_gram.transpose(-1, -2), xq)
    return _PaperBlockBackward(grad_xq, grad_xk, grad_dist_sum * ir.square(), (grad_dist_ic * ic).sum(-2, keepdim=True),
                               grad_attn, grad_row_deg, grad_p, grad_log_c, grad_col_deg.sum(dim=-2, keepdim=True))


def _paper_backward_kernel(gram: Tensor, attn_rows: Tensor, col_base: Tensor, xq: Tensor, x_keys: Tensor,
                           sq_rows: Tensor, sq_keys: Tensor, grad: Tensor, grad_beta: Tensor, p_rows: Tensor,
                           log_c_rows: Tensor, log_norm: Tensor, carry: Tensor | None, dist_floor: float,
                           causal: bool) -> _PaperBlockBackward:
    """One ``paper`` block's gradients by the fused CPU kernel around the BLAS products."""
    part = paper_backward_block(gram, attn_rows, col_base, sq_rows, sq_keys, p_rows, log_c_rows, log_norm,
                                torch.matmul(grad, x_keys.transpose(-1, -2)), grad_beta, carry,
                                dist_floor=dist_floor, causal=causal)
    grad_xq = _thin_matmul(part.grad_gram, x_keys)
    grad_xk = (_thin_matmul(part.coefficients.transpose(-1, -2), grad)
               + _thin_matmul(part.grad_gram.transpose(-1, -2), xq))
    return _PaperBlockBackward(grad_xq, grad_xk, part.grad_sq_q, part.grad_sq_k, part.grad_attn, part.grad_row_deg,
                               part.grad_p, part.grad_log_c, part.column_sum)


# ----------------------------------------------------------------------------------------------------------
# Drivers
# ----------------------------------------------------------------------------------------------------------


def _graph_count(x_q: Tensor, x_kv: Tensor, attn: Tensor, head_mean: bool) -> int:
    """The number of independent graphs of a call: the product of its broadcast leading (batch, heads) shape."""
    graph_lead = (attn.shape[0], 1) if head_mean else attn.shape[:-2]
    return math.prod(broadcast_shapes(x_q.shape[:-2], x_kv.shape[:-2], graph_lead))


def _run_release(x_q: Tensor, x_kv: Tensor, attn: Tensor, p: Tensor, mu: Tensor, options: dict) -> Tensor:
    self_graph = options["graph"] == "self"
    if release_kernel_applies(x_q, x_kv, attn, p, mu, graphs=_graph_count(x_q, x_kv, attn, False),
                              compiled=options["compiled"], recompute=options["recompute"]):
        return release_aggregate_cpu(x_q, x_kv, attn, p, mu, eps=options["eps"], self_graph=self_graph,
                                     drop_self_loops=self_graph and options["self_loop"] == "drop",
                                     query_offset=options["query_offset"] if self_graph else 0)
    return _ReleaseAggregate.apply(
        x_q, x_kv, attn, p, mu, options["eps"], self_graph, self_graph and options["self_loop"] == "drop",
        options["query_offset"] if self_graph else 0, options["chunk_size"], options["recompute"],
        options["compiled"],
    )


def _recomputed_rows(recompute: Callable[[slice], Tensor], rows: slice, n_keys: int, like: Tensor) -> Tensor:
    """``attn[..., rows, :n_keys]`` rebuilt by a ``recompute_attention`` callable, in the dtype of ``like``."""
    with torch.no_grad():
        block = recompute(rows)
    n_rows = rows.stop - rows.start
    if not isinstance(block, Tensor) or block.dim() != 4 or block.shape[-2] != n_rows or block.shape[-1] < n_keys:
        shape = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
        raise ValueError(f"recompute_attention({rows}) must return the attention rows (batch, heads, {n_rows}, n_k), "
                         f"got {shape}")
    return block[..., :n_keys].to(like.dtype)


def _pad_past(past: Tensor, n_k: int) -> Tensor:
    return torch.nn.functional.pad(past, (0, n_k - past.shape[-1]))


def _graph_rows(attn: Tensor, rows: slice, head_mean: bool, n_keys: int) -> Tensor:
    """Rows of the graph's attention: ``attn[..., rows, :n_keys]``, averaged over heads (keepdim) with ``head_mean``."""
    block = attn[..., rows, :n_keys]
    return block.mean(dim=1, keepdim=True) if head_mean else block


def _key_columns(tensor: Tensor, n_keys: int) -> Tensor:
    """The first ``n_keys`` key columns of a (.., 1, n_k) tensor (0-d tensors pass through)."""
    return tensor[..., :n_keys] if tensor.dim() > 0 else tensor


def _pad_keys(tensor: Tensor, n_k: int) -> Tensor:
    """A (.., 1, n_keys) tensor zero-padded to n_k key columns."""
    return tensor if tensor.shape[-1] == n_k else torch.nn.functional.pad(tensor, (0, n_k - tensor.shape[-1]))


def _run_paper(
    x_q: Tensor, x_kv: Tensor, attn: Tensor, p: Tensor, mu: Tensor, past: Tensor | None, options: dict,
    kv_basis: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(Ū, column degrees) with Ū_q = Σ_j c_qj V̂_j + β_q V̂_q. With ``kv_basis`` (r, d) the key nodes are
    V̂_j = x_kv_j B: the Gram products and the aggregate are taken in the r coordinates (x_q B^T . x_kv_j,
    (Σ_j c_qj x_kv_j) B).

    ``base``: full column degrees (.., 1, n_k) of all queries, or (causal) the degrees of earlier queries; the
    column degrees returned are (causal) base plus these queries' column sums, (.., 1, n_k).
    """
    causal = options["causal_degrees"]
    head_mean = options["head_mean"]
    if head_mean and not (torch.is_grad_enabled() and attn.requires_grad):
        # No gradient flows to the attention, so nothing else need keep the per-head tensor alive for backward
        # (e.g. the first layer of a frozen model): keep only the 1 / heads sized mean.
        attn = attn.mean(dim=1, keepdim=True)
        head_mean = False
    if causal:
        base = attn.new_zeros(()) if past is None else _pad_past(past, attn.shape[-1]).unsqueeze(-2)
    else:
        base = attn.sum(dim=-2, keepdim=True)
        if head_mean:
            base = base.mean(dim=1, keepdim=True)
    if kv_basis is None:
        gram_q, sq_k = x_q, (x_kv * x_kv).sum(dim=-1).unsqueeze(-2)
    else:
        # |x_kv B|^2 as the quadratic form x_kv (B B^T) x_kv^T: r-wide products instead of d-wide key nodes.
        gram_q = torch.matmul(x_q, kv_basis.transpose(-1, -2))
        sq_k = (torch.matmul(x_kv, kv_basis @ kv_basis.transpose(-1, -2)) * x_kv).sum(dim=-1).unsqueeze(-2)
    aggregate, beta, degrees = _PaperAggregate.apply(
        gram_q, x_kv, (x_q * x_q).sum(dim=-1, keepdim=True), sq_k, attn, p, mu, base, options["dist_floor"], causal,
        options["chunk_size"], head_mean, options["block_plan"])
    if kv_basis is not None:
        aggregate = torch.matmul(aggregate, kv_basis)
    return torch.addcmul(aggregate, beta, x_q), degrees
