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
(n_q, n_k, d) tensor is ever built. Memory is O(batch * heads * n_q * n_k), or O(batch * heads * chunk * n_k)
with ``chunk_size``.

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
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from vlpeft.functional._precision import autocast_disabled, compute_dtype, output_dtype
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
) -> Tensor:
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
        chunk_size: process query rows in blocks of this size with checkpoint recomputation (exact).

    Returns:
        (batch, heads, n_q, d) in the promoted dtype of x_q and x_kv. Computed in float32 (float64 if any
        input is float64) with autocast disabled.
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
    n_q, n_k, lead = _check_shapes(x_q, x_kv, attn)
    if options["graph"] == "self":
        options["query_offset"] = _resolve_query_offset(query_offset, n_q, n_k)
    if past_column_degrees is not None:
        _check_past_degrees(past_column_degrees, n_k, lead)
    _check_p(p, p_bounds)
    _check_mu(mu)

    out_dtype = output_dtype(x_q.dtype, x_kv.dtype)
    dtype = compute_dtype(x_q.dtype, x_kv.dtype, attn.dtype)
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
            out = _run_paper(xq, xkv, att, p_t, mu_t, past, options)
    return out.to(out_dtype)


def accumulate_column_degrees(attn: Tensor, past_column_degrees: Tensor | None = None) -> Tensor:
    """Running column degrees for cached ``paper`` decoding with causal degrees.

    Args:
        attn: attention of the current queries (batch, heads, n_q, n_k).
        past_column_degrees: previous running degrees (batch, heads, n_past), n_past <= n_k, or None.

    Returns:
        (batch, heads, n_k) in float32 (float64 for float64 inputs): past (zero-padded to n_k) plus the
        column sums of ``attn``. Pass it as ``past_column_degrees`` for the next decoding step.
    """
    if attn.dim() != 4:
        raise ValueError(f"attn must be 4-D (batch, heads, n_q, n_k), got shape {tuple(attn.shape)}")
    dtype = compute_dtype(attn.dtype)
    with autocast_disabled(attn.device.type):
        total = attn.to(dtype).sum(dim=-2)
        if past_column_degrees is not None:
            _check_past_degrees(past_column_degrees, attn.shape[-1], tuple(attn.shape[:2]))
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


def _check_shapes(x_q: Tensor, x_kv: Tensor, attn: Tensor) -> tuple[int, int, tuple[int, ...]]:
    for name, tensor in (("x_q", x_q), ("x_kv", x_kv), ("attn", attn)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 4:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, rows, cols), got {shape}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {tensor.dtype}")
    n_q, d = x_q.shape[-2:]
    n_k, d_kv = x_kv.shape[-2:]
    if d != d_kv:
        raise ValueError(f"feature dims differ: x_q has d={d}, x_kv has d={d_kv}")
    if d < 1 or n_k < 1:
        raise ValueError(f"need d >= 1 and n_k >= 1, got d={d}, n_k={n_k}")
    if tuple(attn.shape[-2:]) != (n_q, n_k):
        raise ValueError(
            f"attn must end in (n_q, n_k) = ({n_q}, {n_k}) to match x_q and x_kv, got {tuple(attn.shape)}"
        )
    try:
        lead = torch.broadcast_shapes(x_q.shape[:2], x_kv.shape[:2], attn.shape[:2])
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
        torch.broadcast_shapes(tuple(past.shape[:2]), lead)
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


def _check_mu(mu: Scalar) -> None:
    _check_positive(mu, "mu", "mu must be > 0 (so that 2 mu / p keeps alpha finite on empty rows)")


def _check_positive(value: Scalar, name: str, requirement: str) -> None:
    if isinstance(value, Tensor):
        _check_tensor_values(value, name, lambda v: (v > 0) & torch.isfinite(v), requirement)
        return
    number = _as_float(value, name)
    if not (math.isfinite(number) and number > 0.0):
        raise ValueError(f"{name}={number} is out of range: {requirement}")


def _as_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float or a floating-point tensor, got {type(value).__name__}")
    return float(value)


def _check_tensor_values(value: Tensor, name: str, is_ok: Callable[[Tensor], Tensor], requirement: str) -> None:
    """Check a coefficient tensor; CPU values are checked eagerly, accelerator values without a host sync."""
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {value.dtype}")
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
# Row-block kernels (float32/float64, autocast off)
# ----------------------------------------------------------------------------------------------------------


def _squared_distances(x_q: Tensor, x_kv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(||x_q||^2 (.., n_q, 1), ||x_kv||^2 (.., 1, n_k), Gram x_q x_kv^T (.., n_q, n_k)) from one matmul."""
    sq_q = (x_q * x_q).sum(dim=-1, keepdim=True)
    sq_k = (x_kv * x_kv).sum(dim=-1).unsqueeze(-2)
    gram = torch.matmul(x_q, x_kv.transpose(-1, -2))
    return sq_q, sq_k, gram


def _log_normaliser(log_w: Tensor, log_c: Tensor) -> Tensor:
    """L = logsumexp({log_w[..., j]}_j U {log_c}) over the last axis, keepdim; log_w may hold -inf."""
    shift = torch.maximum(log_w.amax(dim=-1, keepdim=True), log_c).detach()
    total = torch.exp(log_w - shift).sum(dim=-1, keepdim=True) + torch.exp(log_c - shift)
    return shift + torch.log(total)


def _safe_log(value: Tensor, positive: Tensor) -> Tensor:
    """log(value) where ``positive``, 0 elsewhere, with finite gradients everywhere."""
    return torch.log(torch.where(positive, value, torch.ones_like(value)))


def _release_rows(
    x_q: Tensor,
    x_kv: Tensor,
    attn: Tensor,
    p: Tensor,
    mu: Tensor,
    *,
    eps: float,
    self_graph: bool,
    drop_self_loops: bool,
    diag_offset: int,
) -> Tensor:
    edge = attn > 0
    if self_graph:
        rows = torch.arange(attn.shape[-2], device=attn.device).unsqueeze(-1)
        cols = torch.arange(attn.shape[-1], device=attn.device)
        self_loop = cols == rows + diag_offset
        if drop_self_loops:
            edge = edge & ~self_loop
    # Distances are translation invariant: centring on the key mean reduces the Gram cancellation error
    # when the features share a large offset (e.g. a bias). The shift is a constant for autograd.
    centre = x_kv.mean(dim=-2, keepdim=True).detach()
    sq_q, sq_k, gram = _squared_distances(x_q - centre, x_kv - centre)
    s_min_sq = eps * eps * x_q.shape[-1]
    scaled_sq = ((torch.where(edge, attn, 1.0) + eps) * (sq_q + sq_k - 2.0 * gram)).clamp_min(s_min_sq)
    if self_graph and not drop_self_loops:
        scaled_sq = torch.where(self_loop, s_min_sq, scaled_sq)
    log_w = _safe_log(attn, edge) + 0.5 * (p - 2.0) * torch.log(scaled_sq)
    log_w = torch.where(edge, log_w, -math.inf)
    log_c = torch.log(2.0 * mu / p)
    log_norm = _log_normaliser(log_w, log_c)
    out = torch.matmul(torch.exp(log_w - log_norm), x_kv)
    if self_graph:
        out = out + torch.exp(log_c - log_norm) * x_q
    return out


def _paper_rows(
    x_q: Tensor,
    x_kv: Tensor,
    attn: Tensor,
    p: Tensor,
    mu: Tensor,
    column_base: Tensor,
    *,
    dist_floor: float,
    causal: bool,
) -> Tensor:
    """``column_base``: full column degrees (.., 1, n_k) if not causal, else degrees of earlier queries."""
    edge = attn > 0
    row_deg = attn.sum(dim=-1, keepdim=True)
    col_deg = column_base + torch.cumsum(attn, dim=-2) if causal else column_base
    row_pos = row_deg > 0
    col_pos = col_deg > 0
    log_row = _safe_log(row_deg, row_pos)
    log_col = _safe_log(col_deg, col_pos)
    inv_sqrt_row = torch.where(row_pos, torch.exp(-0.5 * log_row), 0.0)
    inv_sqrt_col = torch.where(col_pos, torch.exp(-0.5 * log_col), 0.0)
    sq_q, sq_k, gram = _squared_distances(x_q, x_kv)
    dist_sq = (
        sq_q * inv_sqrt_row.square()
        + sq_k * inv_sqrt_col.square()
        - 2.0 * gram * (inv_sqrt_row * inv_sqrt_col)
    ).clamp_min(dist_floor)
    log_m_bar = 0.5 * p * _safe_log(attn, edge) + 0.5 * (p - 2.0) * torch.log(dist_sq)
    log_w = torch.where(edge, log_m_bar - log_row, -math.inf)
    log_c = torch.log(2.0 * mu / p)
    log_norm = _log_normaliser(log_w, log_c)
    coefficients = torch.exp(log_w - log_norm + 0.5 * (log_row - log_col))
    return torch.matmul(coefficients, x_kv) + torch.exp(log_c - log_norm) * x_q


# ----------------------------------------------------------------------------------------------------------
# Drivers (whole block or query chunks with checkpoint recomputation)
# ----------------------------------------------------------------------------------------------------------


def _call(fn: Callable[..., Tensor], chunked: bool, *args: Tensor) -> Tensor:
    if chunked and torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _chunks(n_q: int, chunk_size: int | None) -> list[tuple[int, int]]:
    if chunk_size is None or n_q <= 0:
        return [(0, n_q)]
    return [(start, min(start + chunk_size, n_q)) for start in range(0, n_q, chunk_size)]


def _run_release(x_q: Tensor, x_kv: Tensor, attn: Tensor, p: Tensor, mu: Tensor, options: dict) -> Tensor:
    self_graph = options["graph"] == "self"
    chunked = options["chunk_size"] is not None
    outputs = []
    for start, stop in _chunks(x_q.shape[-2], options["chunk_size"]):
        fn = functools.partial(
            _release_rows,
            eps=options["eps"],
            self_graph=self_graph,
            drop_self_loops=self_graph and options["self_loop"] == "drop",
            diag_offset=(options["query_offset"] + start) if self_graph else 0,
        )
        rows = slice(start, stop)
        outputs.append(_call(fn, chunked, x_q[..., rows, :], x_kv, attn[..., rows, :], p, mu))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)


def _pad_past(past: Tensor, n_k: int) -> Tensor:
    return torch.nn.functional.pad(past, (0, n_k - past.shape[-1]))


def _run_paper(
    x_q: Tensor, x_kv: Tensor, attn: Tensor, p: Tensor, mu: Tensor, past: Tensor | None, options: dict
) -> Tensor:
    causal = options["causal_degrees"]
    chunked = options["chunk_size"] is not None
    n_k = attn.shape[-1]
    if causal:
        base = attn.new_zeros(()) if past is None else _pad_past(past, n_k).unsqueeze(-2)
    else:
        base = attn.sum(dim=-2, keepdim=True)
    fn = functools.partial(_paper_rows, dist_floor=options["dist_floor"], causal=causal)
    outputs = []
    for start, stop in _chunks(x_q.shape[-2], options["chunk_size"]):
        rows = slice(start, stop)
        attn_rows = attn[..., rows, :]
        outputs.append(_call(fn, chunked, x_q[..., rows, :], x_kv, attn_rows, p, mu, base))
        if causal and stop < x_q.shape[-2]:
            base = base + attn_rows.sum(dim=-2, keepdim=True)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)
