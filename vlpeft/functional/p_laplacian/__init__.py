"""One step of p-Laplacian message passing on an attention graph (p-adapter.md §2-3): the numerical core of p-adapter.

Shapes: x_q (batch, heads, n_q, d), x_kv (batch, heads, n_k, d), attn (batch, heads, n_q, n_k); the
batch and heads axes broadcast against each other (e.g. a head-mean attention with heads = 1).

:func:`p_laplacian_aggregate` is the public entry: it maps its keyword options onto one variant's typed options and
calls that variant's entry point:

- ``paper`` (:mod:`.paper`, :func:`.paper.paper_aggregate` with :class:`.paper.PaperOptions`): Eqs. 14-16 on the
  bipartite graph [[0, M], [M^T, 0]] over query and value nodes, with degree normalisation (column degrees and their
  KV-cache running sums in :mod:`.degrees`), the beta term on the query's own feature, 1/D := 0 for zero degrees and
  a squared distance floor ``dist_floor``.
- ``release`` (:mod:`.release`, :func:`.release.release_aggregate` with :class:`.release.ReleaseOptions`): the
  released code's semantics without degree normalisation, on a self graph (beta term, self loops) or a bipartite one.

Both normalise in log space, L_q = logsumexp({log w_qj} U {log(2 mu / p)}), so every coefficient lies in [0, 1];
pairwise squared distances come from one batched Gram matmul, clamped, and no (n_q, n_k, d) tensor is ever built.
Each variant is one autograd Function with a hand-written backward, working on blocks of query rows (:mod:`.planning`)
with shared helpers (:mod:`.gradients`) after shared input checks (:mod:`.validation`). The working memory is
O(batch * heads * n_q * n_k) during the call, or O(batch * heads * chunk * n_k) with ``chunk_size``. A causal graph
costs about half a dense one: each block of query rows works on the leading key columns that hold its edges only.

Edges: an attention entry is an edge iff it is > 0. Non-edges (padding/causal masks, zero blocks) get
weight exactly 0; the gradient reaching them through the edge weight is 0 (the one-sided derivative of
M^{p/2} at 0 is infinite for p < 2), and in the ``paper`` variant they still receive the gradient of the
degree sums. Softmax-masked entries receive no gradient upstream anyway.

Backends (:mod:`.backend`, :func:`.backend.choose_backend`, the one place that decides and says why): the torch path,
the fused C kernels on float32 CPU calls (:mod:`.cpu_kernels`, ``cpu_kernels.c``), and for the attention of
``release`` self-attention on GPUs the fused Triton kernels (:mod:`.triton_attention`, :mod:`.triton_kernels`).
Override with ``VLPEFT_BACKEND=torch|cpu|triton``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor

from vlpeft.functional.p_laplacian.backend import (
    BACKEND_OVERRIDES,
    BACKENDS,
    AggregationFacts,
    AttentionFacts,
    BackendChoice,
    BackendUnavailableError,
    choose_backend,
    recording_backends,
)
from vlpeft.functional.p_laplacian.degrees import accumulate_column_degrees
from vlpeft.functional.p_laplacian.paper import PaperOptions, paper_aggregate
from vlpeft.functional.p_laplacian.release import ReleaseOptions, release_aggregate
from vlpeft.functional.p_laplacian.validation import (
    GRAPHS,
    PAPER_DIST_FLOOR,
    RELEASE_EPS,
    SELF_LOOP_POLICIES,
    VARIANTS,
    Scalar,
    check_chunk_size,
)
from vlpeft.functional.parameters import DEFAULT_P_BOUNDS

__all__ = [
    "BACKENDS",
    "BACKEND_OVERRIDES",
    "GRAPHS",
    "PAPER_DIST_FLOOR",
    "RELEASE_EPS",
    "SELF_LOOP_POLICIES",
    "VARIANTS",
    "AggregationFacts",
    "AttentionFacts",
    "BackendChoice",
    "BackendUnavailableError",
    "PaperOptions",
    "ReleaseOptions",
    "accumulate_column_degrees",
    "choose_backend",
    "p_laplacian_aggregate",
    "paper_aggregate",
    "recording_backends",
    "release_aggregate",
]


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
    backend: str = "auto",
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
            :func:`~vlpeft.functional.blocked_attention.blocked_eager_attention`, whose skipped keys have probability 0). The block
            loop then uses them instead of reading the attention for its key extents, and checks non-negativity on
            the entries it reads (the graph's, i.e. the head mean with ``attn_head_mean``) instead of in a separate
            pass; entries right of a block's ``n_keys`` are taken to be 0 as promised.

    Returns:
        (batch, heads, n_q, d) in the promoted dtype of x_q and x_kv, or ``(that, column degrees)`` with
        ``return_column_degrees``. Computed in float32 (float64 if any input is float64) with autocast disabled.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {VARIANTS}")
    if graph not in GRAPHS:
        raise ValueError(f"graph={graph!r} is not one of {GRAPHS}")
    check_chunk_size(chunk_size)
    if not isinstance(compiled, bool):
        raise TypeError(f"compiled must be a bool, got {compiled!r}")
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
        _only_for_release(recompute_attention=recompute_attention is not None, compiled=compiled)
        if return_column_degrees and not causal_degrees:
            raise ValueError("return_column_degrees=True applies to variant='paper' with causal_degrees=True only, "
                             f"got variant={variant!r}, causal_degrees={causal_degrees!r}")
        paper = PaperOptions(dist_floor=PAPER_DIST_FLOOR if dist_floor is None else float(dist_floor),
                             causal_degrees=bool(causal_degrees), chunk_size=chunk_size,
                             attn_head_mean=bool(attn_head_mean), return_column_degrees=bool(return_column_degrees),
                             backend=backend)
        return paper_aggregate(x_q, x_kv, attn, p, mu, paper, p_bounds=p_bounds,
                               past_column_degrees=past_column_degrees, kv_basis=kv_basis,
                               attn_block_plan=attn_block_plan)
    _reject_for(variant, dist_floor=dist_floor, past_column_degrees=past_column_degrees)
    if causal_degrees:
        raise ValueError("causal_degrees=True applies to variant='paper' only; 'release' has no degrees")
    if graph == "bipartite":
        _reject_for("release with graph='bipartite'", self_loop=self_loop, query_offset=query_offset)
    if attn_head_mean:
        raise ValueError(f"attn_head_mean=True applies to variant='paper' only, got variant={variant!r}")
    if kv_basis is not None:
        raise ValueError(f"kv_basis applies to variant='paper' only, got variant={variant!r}")
    if attn_block_plan is not None:
        raise ValueError("attn_block_plan applies to variant='paper' without chunk_size only, got "
                         f"variant={variant!r}, chunk_size={chunk_size!r}")
    if return_column_degrees:
        raise ValueError("return_column_degrees=True applies to variant='paper' with causal_degrees=True only, got "
                         f"variant={variant!r}, causal_degrees={causal_degrees!r}")
    release = ReleaseOptions(graph=graph, eps=RELEASE_EPS if eps is None else float(eps),
                             self_loop="release" if self_loop is None else self_loop, query_offset=query_offset,
                             chunk_size=chunk_size, compiled=compiled, backend=backend)
    return release_aggregate(x_q, x_kv, attn, p, mu, release, p_bounds=p_bounds, recompute_attention=recompute_attention)


def _reject_for(context: str, **given: object) -> None:
    """Options given (not None) that the variant ``context`` does not take are an error naming them."""
    used = [name for name, value in given.items() if value is not None]
    if used:
        raise ValueError(f"option(s) {used} do not apply to variant {context}")


def _only_for_release(**given: bool) -> None:
    """``release``-only options given to ``paper`` are an error naming the option."""
    for name, used in given.items():
        if used:
            raise ValueError(f"{name}{'=True' if name == 'compiled' else ''} applies to variant='release' only, got "
                             "variant='paper'")
