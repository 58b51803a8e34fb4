"""Tests of vlpeft.functional.p_laplacian_aggregate against references written from the equations.

References (p-adapter.md):
- ``paper``: the full (N1 + N2) augmented graph [[0, M], [M^T, 0]] of Eq. 9, its degree matrix, explicit
  pairwise differences sqrt(M_ij / D_i) V_i - sqrt(M_ij / D_j) V_j (Eq. 14), alpha/beta (Eq. 15) and the
  dense update of Eq. 16 with diag matrices; the query rows are returned.
- ``release``: explicit pairwise G_ij = sqrt(A_ij + eps) (F_j - F_i) (§2.4 C) as (n, n, d) tensors, alpha,
  beta and diag_embed matmuls; with the documented floor s >= eps sqrt(d) ("floor" reference) or with the
  released eps * 1 shift ("literal" reference).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from vlpeft.functional import (
    PBounds,
    accumulate_column_degrees,
    adaptive_bins,
    mu_from_offset,
    p_from_theta,
    p_laplacian_aggregate,
    pool_keys,
    theta_from_p,
)

EPS = 1e-8
FLOOR = 1e-12


# ----------------------------------------------------------------------------------------------------------
# Naive references
# ----------------------------------------------------------------------------------------------------------


def _safe_inverse(values: torch.Tensor) -> torch.Tensor:
    """1/x where x > 0 and 0 elsewhere (the GCN convention 1/D := 0)."""
    return torch.where(values > 0, 1.0 / torch.where(values > 0, values, 1.0), 0.0)


def naive_paper(v_q, v_k, m, p, mu, floor=FLOOR):
    """Eqs. 9, 14-16 on the augmented graph; returns the query rows (B, H, N1, d)."""
    n1, n2 = m.shape[-2:]
    lead = m.shape[:-2]
    nodes = torch.cat([v_q.expand(*lead, n1, -1), v_k.expand(*lead, n2, -1)], dim=-2)
    adj = m.new_zeros(*lead, n1 + n2, n1 + n2)
    adj[..., :n1, n1:] = m
    adj[..., n1:, :n1] = m.transpose(-1, -2)
    inv_deg = _safe_inverse(adj.sum(dim=-1))
    left = torch.sqrt(adj * inv_deg.unsqueeze(-1)).unsqueeze(-1) * nodes.unsqueeze(-2)
    right = torch.sqrt(adj * inv_deg.unsqueeze(-2)).unsqueeze(-1) * nodes.unsqueeze(-3)
    norm_sq = ((left - right) ** 2).sum(dim=-1)
    norm_sq = torch.maximum(norm_sq, adj * floor)  # ||y_i - y_j||^2 >= floor
    safe = torch.where(adj > 0, norm_sq, 1.0)
    m_bar = torch.where(adj > 0, adj * safe ** ((p - 2) / 2), 0.0)
    c = 2 * mu / p
    alpha = 1.0 / (m_bar.sum(dim=-1) * inv_deg + c)
    beta = c * alpha
    d_half = torch.diag_embed(torch.sqrt(inv_deg))
    update = torch.diag_embed(alpha) @ d_half @ m_bar @ d_half @ nodes + torch.diag_embed(beta) @ nodes
    return update[..., :n1, :]


def naive_paper_causal(v_q, v_k, m, p, mu):
    """Causal degrees: row q is the cache-free result on the graph of queries 0..q (§2.5)."""
    rows = [naive_paper(v_q[..., : q + 1, :], v_k, m[..., : q + 1, :], p, mu)[..., q, :] for q in range(m.shape[-2])]
    return torch.stack(rows, dim=-2)


def _release_weights(nodes, adj, p, eps, literal):
    diff = nodes.unsqueeze(-3) - nodes.unsqueeze(-2)  # (.., n, n, d): F_j - F_i
    g = torch.sqrt(adj + eps).unsqueeze(-1) * diff
    if literal:
        g = g + eps
        s = g.norm(dim=-1)
    else:
        s = torch.clamp(g.norm(dim=-1), min=eps * math.sqrt(nodes.shape[-1]))
    return adj * s ** (p - 2)


def naive_release_self(f, a, p, mu, eps=EPS, self_loop="release", literal=False):
    """Self graph over n nodes f (B, H, n, d) with adjacency a (B, H, n, n), self loops included."""
    w = _release_weights(f, a, p, eps, literal)
    if self_loop == "drop":
        w = w * (1 - torch.eye(a.shape[-1], dtype=a.dtype))
    c = 2 * mu / p
    alpha = 1.0 / (w.sum(dim=-1) + c)
    beta = c * alpha
    return torch.diag_embed(alpha) @ w @ f + torch.diag_embed(beta) @ f


def naive_release_bipartite(f_q, f_k, a, p, mu, eps=EPS, literal=False):
    """Augmented [F_q; F_k] graph with [[0, P], [P^T, 0]]; the beta term is the zero off-diagonal block."""
    n1, n2 = a.shape[-2:]
    lead = a.shape[:-2]
    nodes = torch.cat([f_q.expand(*lead, n1, -1), f_k.expand(*lead, n2, -1)], dim=-2)
    adj = a.new_zeros(*lead, n1 + n2, n1 + n2)
    adj[..., :n1, n1:] = a
    adj[..., n1:, :n1] = a.transpose(-1, -2)
    w = _release_weights(nodes, adj, p, eps, literal)
    c = 2 * mu / p
    alpha = 1.0 / (w.sum(dim=-1) + c)
    beta_matrix = torch.diag_embed(c * alpha)
    update = torch.diag_embed(alpha) @ w @ nodes
    return update[..., :n1, :] + beta_matrix[..., :n1, n1:] @ nodes[..., n1:, :]


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def make_attention(batch, heads, n_q, n_k, *, dtype=torch.float64, causal=False, zero_rows=(), holes=0.0,
                   offset=None, seed=0):
    """Row-normalised attention with exact zeros for masks; rows listed in ``zero_rows`` are all zero."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, n_q, n_k, generator=gen, dtype=torch.float64)
    keep = torch.ones_like(logits, dtype=torch.bool)
    if causal:
        shift = n_k - n_q if offset is None else offset
        keep &= torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=shift)
    if holes:
        keep &= torch.rand(batch, heads, n_q, n_k, generator=gen, dtype=torch.float64) > holes
    for row in zero_rows:
        keep[..., row, :] = False
    weights = torch.exp(logits) * keep
    attn = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    return attn.to(dtype)


def make_features(batch, heads, n, d, *, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64).to(dtype)


def assert_close_rel(actual, expected, rel):
    """Elementwise tolerance ``rel`` relative to the largest magnitude of ``expected``."""
    scale = expected.abs().max().clamp_min(1e-30).item()
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rel, atol=rel * scale)


CASES = {
    "dense": {},
    "holes": {"holes": 0.3},
    "zero_rows": {"zero_rows": (0, 3), "holes": 0.2},
}


# ----------------------------------------------------------------------------------------------------------
# Efficient vs naive
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 1.25, 1.5, 2.0])
@pytest.mark.parametrize("case", sorted(CASES))
def test_paper_matches_naive(p, case):
    v_q, v_k = make_features(2, 3, 5, 6), make_features(2, 3, 7, 6, seed=2)
    attn = make_attention(2, 3, 5, 7, **CASES[case])
    expected = naive_paper(v_q, v_k, attn, p, 0.2)
    assert_close_rel(p_laplacian_aggregate(v_q, v_k, attn, p, 0.2), expected, 1e-9)
    got32 = p_laplacian_aggregate(v_q.float(), v_k.float(), attn.float(), p, 0.2)
    assert got32.dtype == torch.float32
    assert_close_rel(got32, expected, 1e-5)


def test_paper_head_mean_attention_broadcasts_and_per_head_p():
    v_q, v_k = make_features(2, 1, 4, 5), make_features(2, 1, 6, 5, seed=2)
    attn = make_attention(2, 3, 4, 6, holes=0.2)
    p = torch.tensor([1.25, 1.5, 2.0], dtype=torch.float64)
    mu = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    got = p_laplacian_aggregate(v_q, v_k, attn, p, mu)
    assert got.shape == (2, 3, 4, 5)
    for h in range(3):
        expected = naive_paper(v_q, v_k, attn[:, h : h + 1], p[h].item(), mu[h].item())
        assert_close_rel(got[:, h : h + 1], expected, 1e-9)


@pytest.mark.parametrize("p", [1.25, 1.75])
def test_paper_causal_degrees_match_prefix_graphs(p):
    v = make_features(2, 2, 6, 4)
    attn = make_attention(2, 2, 6, 6, causal=True, zero_rows=(2,))
    expected = naive_paper_causal(v, v, attn, p, 0.3)
    got = p_laplacian_aggregate(v, v, attn, p, 0.3, causal_degrees=True)
    assert_close_rel(got, expected, 1e-9)
    # Non-causal degrees leak future rows (H10): results differ.
    assert not torch.allclose(p_laplacian_aggregate(v, v, attn, p, 0.3), expected)


def test_paper_causal_cross_attention_rows_ignore_future_queries():
    v_q, v_k = make_features(1, 2, 5, 4), make_features(1, 2, 9, 4, seed=2)
    attn = make_attention(1, 2, 5, 9)
    got = p_laplacian_aggregate(v_q, v_k, attn, 1.5, 0.2, causal_degrees=True)
    assert_close_rel(got, naive_paper_causal(v_q, v_k, attn, 1.5, 0.2), 1e-9)


def test_paper_cached_decoding_equals_cache_free():
    n = 7
    v = make_features(2, 2, n, 4)
    attn = make_attention(2, 2, n, n, causal=True)
    full = p_laplacian_aggregate(v, v, attn, 1.25, 0.2, causal_degrees=True)
    past = None
    prompt = 3
    steps = [(0, prompt)] + [(t, t + 1) for t in range(prompt, n)]
    for start, stop in steps:
        rows = attn[..., start:stop, :stop]
        out = p_laplacian_aggregate(
            v[..., start:stop, :], v[..., :stop, :], rows, 1.25, 0.2, causal_degrees=True, past_column_degrees=past
        )
        assert_close_rel(out, full[..., start:stop, :], 1e-12)
        past = accumulate_column_degrees(rows, past)
    assert past.shape == (2, 2, n)


@pytest.mark.parametrize("p", [1.0, 1.25, 1.5, 2.0])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("self_loop", ["release", "drop"])
def test_release_self_matches_naive(p, case, self_loop):
    f = make_features(2, 3, 6, 8)
    attn = make_attention(2, 3, 6, 6, causal=True, **CASES[case])
    expected = naive_release_self(f, attn, p, 0.2, self_loop=self_loop)
    got = p_laplacian_aggregate(f, f, attn, p, 0.2, variant="release", graph="self", self_loop=self_loop)
    assert_close_rel(got, expected, 1e-9)
    got32 = p_laplacian_aggregate(f.float(), f.float(), attn.float(), p, 0.2, variant="release", graph="self",
                                  self_loop=self_loop)
    assert_close_rel(got32, expected, 1e-5)


@pytest.mark.parametrize("p", [1.0, 1.25, 1.5, 2.0])
@pytest.mark.parametrize("case", sorted(CASES))
def test_release_bipartite_matches_naive(p, case):
    f_q, f_k = make_features(2, 3, 5, 8), make_features(2, 3, 4, 8, seed=2)
    attn = make_attention(2, 3, 5, 4, **CASES[case])
    expected = naive_release_bipartite(f_q, f_k, attn, p, 0.2)
    assert_close_rel(p_laplacian_aggregate(f_q, f_k, attn, p, 0.2, variant="release"), expected, 1e-9)
    got32 = p_laplacian_aggregate(f_q.float(), f_k.float(), attn.float(), p, 0.2, variant="release")
    assert_close_rel(got32, expected, 1e-5)


@pytest.mark.parametrize("p", [1.25, 1.5, 1.75])
def test_release_float32_accuracy_with_shared_feature_offset(p):
    """Features with a large common offset (a bias): the centred Gram form keeps ~4e-7 relative accuracy."""
    f_q, f_k = make_features(2, 3, 30, 8, seed=4) + 10.0, make_features(2, 3, 16, 8, seed=5) + 10.0
    attn = make_attention(2, 3, 30, 16)
    expected = naive_release_bipartite(f_q, f_k, attn, p, 0.1)
    got = p_laplacian_aggregate(f_q.float(), f_k.float(), attn.float(), p, 0.1, variant="release")
    assert_close_rel(got, expected, 1e-6)


@pytest.mark.parametrize("p", [1.25, 1.5, 1.75])
def test_release_matches_literal_transcription(p):
    """Against the released eps * 1 shift (no floor): differences are O(eps) relative; tolerance 1e-6."""
    f = make_features(2, 3, 6, 8)
    attn = make_attention(2, 3, 6, 6, causal=True)
    literal = naive_release_self(f, attn, p, 0.1, literal=True)
    assert_close_rel(p_laplacian_aggregate(f, f, attn, p, 0.1, variant="release", graph="self"), literal, 1e-6)
    f_q, f_k = make_features(2, 3, 5, 8, seed=3), make_features(2, 3, 4, 8, seed=4)
    cross = make_attention(2, 3, 5, 4, seed=5)
    literal = naive_release_bipartite(f_q, f_k, cross, p, 0.1, literal=True)
    assert_close_rel(p_laplacian_aggregate(f_q, f_k, cross, p, 0.1, variant="release"), literal, 1e-6)


def test_release_self_loops_dominate_as_documented():
    """H2: at p = 1.25 the eps self loop takes almost all the mass, so U ~= F."""
    f = make_features(1, 2, 30, 8)
    attn = make_attention(1, 2, 30, 30, causal=True)
    out = p_laplacian_aggregate(f, f, attn, 1.25, 0.1, variant="release", graph="self")
    rel = (out - f).norm() / f.norm()
    assert rel < 1e-3
    dropped = p_laplacian_aggregate(f, f, attn, 1.25, 0.1, variant="release", graph="self", self_loop="drop")
    assert (dropped - f).norm() / f.norm() > 0.1


def test_release_self_query_offset_equals_cache_free():
    n = 6
    f = make_features(2, 2, n, 8)
    attn = make_attention(2, 2, n, n, causal=True)
    full = p_laplacian_aggregate(f, f, attn, 1.5, 0.2, variant="release", graph="self")
    for t in range(n):
        step = p_laplacian_aggregate(f[..., t : t + 1, :], f[..., : t + 1, :], attn[..., t : t + 1, : t + 1], 1.5,
                                     0.2, variant="release", graph="self")
        assert_close_rel(step, full[..., t : t + 1, :], 1e-12)
    middle = p_laplacian_aggregate(f[..., 2:4, :], f, attn[..., 2:4, :], 1.5, 0.2, variant="release", graph="self",
                                   query_offset=2)
    assert_close_rel(middle, full[..., 2:4, :], 1e-12)


# ----------------------------------------------------------------------------------------------------------
# p = 2 identities (§2.6) and zero-degree conventions
# ----------------------------------------------------------------------------------------------------------


def test_release_p2_identities():
    mu = 0.3
    f = make_features(2, 2, 6, 8)
    a = make_attention(2, 2, 6, 6, causal=True, holes=0.2)
    expected_self = (a @ f + mu * f) / (a.sum(-1, keepdim=True) + mu)
    got_self = p_laplacian_aggregate(f, f, a, 2.0, mu, variant="release", graph="self")
    assert_close_rel(got_self, expected_self, 1e-12)
    f_k = make_features(2, 2, 4, 8, seed=3)
    b = make_attention(2, 2, 6, 4, holes=0.2)
    expected_bip = (b @ f_k) / (b.sum(-1, keepdim=True) + mu)
    assert_close_rel(p_laplacian_aggregate(f, f_k, b, 2.0, mu, variant="release"), expected_bip, 1e-12)


def test_paper_p2_identity():
    mu = 0.2
    v_q, v_k = make_features(2, 2, 5, 6), make_features(2, 2, 7, 6, seed=2)
    m = make_attention(2, 2, 5, 7, holes=0.2)  # unmasked rows sum to 1, so D_qq = 1
    col = m.sum(dim=-2, keepdim=True)
    expected = (m / col.sqrt()) @ v_k / (1 + mu) + mu / (1 + mu) * v_q
    assert_close_rel(p_laplacian_aggregate(v_q, v_k, m, 2.0, mu), expected, 1e-12)


def test_zero_degree_rows():
    v_q, v_k = make_features(1, 2, 4, 6), make_features(1, 2, 5, 6, seed=2)
    attn = make_attention(1, 2, 4, 5, zero_rows=(1,))
    paper = p_laplacian_aggregate(v_q, v_k, attn, 1.25, 0.2)
    torch.testing.assert_close(paper[..., 1, :], v_q[..., 1, :], rtol=0, atol=1e-15)
    release = p_laplacian_aggregate(v_q, v_k, attn, 1.25, 0.2, variant="release")
    assert torch.equal(release[..., 1, :], torch.zeros_like(release[..., 1, :]))
    f = make_features(1, 2, 4, 6)
    square = make_attention(1, 2, 4, 4, causal=True, zero_rows=(2,))
    self_out = p_laplacian_aggregate(f, f, square, 1.25, 0.2, variant="release", graph="self")
    torch.testing.assert_close(self_out[..., 2, :], f[..., 2, :], rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------

GRAD_BOUNDS = (0.5, 3.0)  # finite differences move p around p0; 2.0 + h must stay admissible


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("p0", [1.25, 1.5, 1.75, 2.0])
@pytest.mark.parametrize(
    "setup",
    ["paper", "paper_causal", "release_bipartite", "release_self", "release_self_drop"],
)
def test_gradcheck(p0, setup):
    gen_h = 2
    p = _leaf(torch.tensor([p0, p0 - 0.1], dtype=torch.float64))
    mu = _leaf(torch.tensor(0.3, dtype=torch.float64))
    if setup.startswith("release_self"):
        x = _leaf(make_features(1, gen_h, 4, 3))
        attn = _leaf(make_attention(1, gen_h, 4, 4) * 0.9 + 0.1 / 4)
        policy = "drop" if setup.endswith("drop") else "release"

        def fn(x, attn, p, mu):
            return p_laplacian_aggregate(x, x, attn, p, mu, variant="release", graph="self", self_loop=policy,
                                         p_bounds=GRAD_BOUNDS)

        inputs = (x, attn, p, mu)
    else:
        x_q, x_kv = _leaf(make_features(1, gen_h, 3, 3)), _leaf(make_features(1, gen_h, 4, 3, seed=2))
        attn = _leaf(make_attention(1, gen_h, 3, 4) * 0.9 + 0.1 / 4)
        variant = "release" if setup.startswith("release") else "paper"
        extra = {"causal_degrees": True} if setup == "paper_causal" else {}

        def fn(x_q, x_kv, attn, p, mu):
            return p_laplacian_aggregate(x_q, x_kv, attn, p, mu, variant=variant, p_bounds=GRAD_BOUNDS, **extra)

        inputs = (x_q, x_kv, attn, p, mu)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Robustness: no NaN / inf
# ----------------------------------------------------------------------------------------------------------


def _robust_inputs(variant, graph, dtype):
    """Causal masks, an all-zero row, holes, duplicate tokens (zero distances) and self loops."""
    n_q, n_k, d = 6, 6, 8
    base = make_features(2, 2, n_k, d, dtype=torch.float32)
    base[..., 3, :] = base[..., 1, :]  # duplicate tokens
    x_kv = base
    x_q = base if graph == "self" else torch.cat([base[..., :3, :], base[..., 1:4, :]], dim=-2)
    attn = make_attention(2, 2, n_q, n_k, causal=True, zero_rows=(0, 4), holes=0.2, dtype=torch.float32)
    attn[..., 2, :] = 0.0
    attn[..., 2, 1] = 1.0  # a one-hot row onto a duplicate token
    return x_q.to(dtype), x_kv.to(dtype), attn.to(dtype)


ROBUST_SETUPS = [("paper", "bipartite", {}), ("paper", "bipartite", {"causal_degrees": True}),
                 ("release", "bipartite", {}), ("release", "self", {}),
                 ("release", "self", {"self_loop": "drop"})]


def _check_finite_forward_backward(x_q, x_kv, attn, p, mu, variant, graph, options, autocast_dtype=None):
    x_q, x_kv, attn = _leaf(x_q), _leaf(x_kv), _leaf(attn)
    p_t = _leaf(torch.tensor(p))
    mu_t = _leaf(torch.tensor(mu))
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        eye = torch.eye(x_kv.shape[-1], dtype=x_kv.dtype)
        q = torch.nn.functional.linear(x_q, eye)  # upstream projections: bf16 outputs under autocast
        kv = torch.nn.functional.linear(x_kv, eye)
        out = p_laplacian_aggregate(q, kv, attn, p_t, mu_t, variant=variant, graph=graph, **options)
    out.float().square().sum().backward()
    assert torch.isfinite(out).all()
    for tensor in (x_q, x_kv, attn, p_t, mu_t):
        assert torch.isfinite(tensor.grad).all()
    return out


@pytest.mark.parametrize("p", [1.0, 1.25, 1.5, 2.0])
@pytest.mark.parametrize("variant,graph,options", ROBUST_SETUPS)
@pytest.mark.parametrize("precision", ["float32", "bf16_autocast", "bf16_inputs", "fp16_inputs"])
def test_no_nan_or_inf(p, variant, graph, options, precision):
    dtype = {"bf16_inputs": torch.bfloat16, "fp16_inputs": torch.float16}.get(precision, torch.float32)
    autocast = torch.bfloat16 if precision == "bf16_autocast" else None
    x_q, x_kv, attn = _robust_inputs(variant, graph, dtype)
    out = _check_finite_forward_backward(x_q, x_kv, attn, p, 0.1, variant, graph, options, autocast)
    expected_dtype = torch.bfloat16 if autocast is not None else dtype
    assert out.dtype == expected_dtype
    # The block itself runs in float32: same result as a float32 call on the rounded inputs.
    with torch.no_grad():
        rounding = dtype if autocast is None else torch.bfloat16
        q, kv = x_q.to(rounding), x_kv.to(rounding)
        reference = p_laplacian_aggregate(q.float(), kv.float(), attn.float(), p, 0.1, variant=variant,
                                          graph=graph, **options)
    torch.testing.assert_close(out.float(), reference.to(out.dtype).float(), rtol=0, atol=0)


def test_masked_entries_get_finite_gradients_and_zero_weight():
    x_q, x_kv, attn = _robust_inputs("release", "self", torch.float32)
    for variant, graph, options in ROBUST_SETUPS:
        a = _leaf(attn)
        out = p_laplacian_aggregate(x_q, x_kv, a, 1.0, 0.1, variant=variant, graph=graph, **options)
        out.sum().backward()
        assert torch.isfinite(a.grad).all()
        if variant == "release":
            # Non-edges carry weight exactly 0: their gradient through the edge weight is 0.
            assert torch.equal(a.grad[attn == 0], torch.zeros_like(a.grad[attn == 0]))


# ----------------------------------------------------------------------------------------------------------
# Chunked mode
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,graph,options",
    [("paper", "bipartite", {}), ("paper", "bipartite", {"causal_degrees": True}),
     ("release", "bipartite", {}), ("release", "self", {}), ("release", "self", {"self_loop": "drop"})],
)
def test_chunked_equals_unchunked(variant, graph, options):
    n = 9
    x = make_features(2, 2, n, 5)
    x_q = x if graph == "self" else make_features(2, 2, n, 5, seed=7)
    attn = make_attention(2, 2, n, n, causal=True, zero_rows=(4,))
    results = []
    for chunk in (None, 2, 4, 100):
        leaves = [_leaf(t) for t in (x_q, x, attn)]
        p = _leaf(torch.tensor(1.4, dtype=torch.float64))
        mu = _leaf(torch.tensor(0.2, dtype=torch.float64))
        out = p_laplacian_aggregate(*leaves, p, mu, variant=variant, graph=graph, chunk_size=chunk, **options)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append([out.detach()] + [t.grad for t in (*leaves, p, mu)])
    for other in results[1:]:
        for got, expected in zip(other, results[0]):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _inputs():
    return make_features(1, 2, 3, 4), make_features(1, 2, 5, 4), make_attention(1, 2, 3, 5)


def test_p_out_of_range_raises_with_name():
    x_q, x_kv, attn = _inputs()
    for bad in (0.9, 2.1):
        with pytest.raises(ValueError, match=rf"p={bad}"):
            p_laplacian_aggregate(x_q, x_kv, attn, bad, 0.2)
    with pytest.raises(ValueError, match="p has out-of-range values"):
        p_laplacian_aggregate(x_q, x_kv, attn, torch.tensor([1.5, 2.5]), 0.2)
    with pytest.raises(ValueError, match="p=2.5"):
        p_laplacian_aggregate(x_q, x_kv, attn, 2.5, 0.2, p_bounds=(1.0, 2.0))
    assert torch.isfinite(p_laplacian_aggregate(x_q, x_kv, attn, 2.5, 0.2, p_bounds=None)).all()
    with pytest.raises(ValueError, match="p=-1.0"):
        p_laplacian_aggregate(x_q, x_kv, attn, -1.0, 0.2, p_bounds=None)
    with pytest.raises(ValueError, match="p_min"):
        p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, p_bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        p_laplacian_aggregate(x_q, x_kv, attn, torch.full((2, 2), 1.5), 0.2)


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_negative_attention_raises(variant):
    x_q, x_kv, attn = _inputs()
    attn = attn.clone()
    attn[..., 0, 0] = -1e-3
    with pytest.raises(ValueError, match="attn must be non-negative"):
        p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, variant=variant)


def test_mu_must_be_positive():
    x_q, x_kv, attn = _inputs()
    with pytest.raises(ValueError, match="mu=0.0"):
        p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.0)
    with pytest.raises(ValueError, match="mu has out-of-range values"):
        p_laplacian_aggregate(x_q, x_kv, attn, 1.5, torch.tensor([0.1, -0.1]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"variant": "paper", "graph": "self"}, "requires graph='bipartite'"),
        ({"variant": "other"}, "variant='other'"),
        ({"graph": "ring"}, "graph='ring'"),
        ({"eps": 1e-6}, r"\['eps'\]"),
        ({"variant": "release", "dist_floor": 1e-9}, r"\['dist_floor'\]"),
        ({"variant": "release", "self_loop": "drop"}, r"\['self_loop'\]"),
        ({"variant": "release", "causal_degrees": True}, "causal_degrees"),
        ({"past_column_degrees": torch.zeros(1, 2, 5)}, "causal_degrees=True"),
        ({"variant": "release", "graph": "self", "self_loop": "keep"}, "self_loop='keep'"),
        ({"chunk_size": 0}, "chunk_size=0"),
        ({"variant": "release", "eps": 0.0}, "eps=0.0"),
    ],
)
def test_option_errors(kwargs, match):
    x_q, x_kv, attn = _inputs()
    with pytest.raises(ValueError, match=match):
        p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, **kwargs)


def test_shape_errors():
    x_q, x_kv, attn = _inputs()
    with pytest.raises(ValueError, match="4-D"):
        p_laplacian_aggregate(x_q[0], x_kv, attn, 1.5, 0.2)
    with pytest.raises(ValueError, match="feature dims differ"):
        p_laplacian_aggregate(x_q, x_kv[..., :3], attn, 1.5, 0.2)
    with pytest.raises(ValueError, match=r"\(n_q, n_k\) = \(3, 5\)"):
        p_laplacian_aggregate(x_q, x_kv, attn[..., :4], 1.5, 0.2)
    with pytest.raises(ValueError, match="do not broadcast"):
        p_laplacian_aggregate(x_q, x_kv, make_attention(1, 3, 3, 5), 1.5, 0.2)
    with pytest.raises(ValueError, match="n_q <= n_k"):
        p_laplacian_aggregate(x_kv, x_q, make_attention(1, 2, 5, 3), 1.5, 0.2, variant="release", graph="self")
    with pytest.raises(ValueError, match="query_offset"):
        p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, variant="release", graph="self", query_offset=3)
    with pytest.raises(ValueError, match="past_column_degrees"):
        p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, causal_degrees=True, past_column_degrees=torch.zeros(1, 2, 6))


# ----------------------------------------------------------------------------------------------------------
# Key pooling and parametrisations
# ----------------------------------------------------------------------------------------------------------


def test_pool_keys_matches_explicit_bins():
    x = make_features(2, 1, 197, 4)[:, 0]  # (batch, n_k, d) before the head split
    attn = make_attention(2, 3, 5, 197)
    pooled_x, pooled_attn = pool_keys(x, attn, 16)
    assert pooled_x.shape == (2, 16, 4) and pooled_attn.shape == (2, 3, 5, 16)
    bins = adaptive_bins(197, 16)
    assert bins[0][0] == 0 and bins[-1][1] == 197
    for i, (start, stop) in enumerate(bins):
        torch.testing.assert_close(pooled_x[:, i], x[:, start:stop].mean(dim=1))
        torch.testing.assert_close(pooled_attn[..., i], attn[..., start:stop].mean(dim=-1))
    assert any(bins[i][1] > bins[i + 1][0] for i in range(15))  # neighbouring bins share a token
    with pytest.raises(ValueError, match="k=198"):
        pool_keys(x, attn, 198)
    with pytest.raises(ValueError, match="key columns"):
        pool_keys(x, attn[..., :100], 16)


def test_pooled_cross_attention_pipeline():
    x_kv = make_features(2, 1, 20, 8)[:, 0]
    attn = make_attention(2, 3, 4, 20)
    pooled_x, pooled_attn = pool_keys(x_kv, attn, 5)
    f_q = make_features(2, 3, 4, 8, seed=9)
    out = p_laplacian_aggregate(f_q, pooled_x.unsqueeze(1), pooled_attn, 1.5, 0.1, variant="release")
    expected = naive_release_bipartite(f_q, pooled_x.unsqueeze(1), pooled_attn, 1.5, 0.1)
    assert_close_rel(out, expected, 1e-9)


def test_p_theta_round_trip_and_errors():
    for p0 in (1.25, 1.5, 1.75):
        theta = theta_from_p(p0)
        assert p_from_theta(torch.tensor(theta, dtype=torch.float64)).item() == pytest.approx(p0, abs=1e-12)
    bounds = PBounds(0.5, 3.0)
    assert bounds.p_from_theta(torch.tensor(bounds.theta_from_p(2.0))).item() == pytest.approx(2.0, abs=1e-6)
    theta = torch.linspace(-50, 50, 11, requires_grad=True)
    p = p_from_theta(theta)
    assert ((p >= 1.0) & (p <= 2.0)).all()
    p.sum().backward()
    assert torch.isfinite(theta.grad).all()
    for p0 in (1.0, 2.0, 2.5):
        with pytest.raises(ValueError, match=f"p0={p0}"):
            theta_from_p(p0)
    with pytest.raises(ValueError, match="0 < p_min < p_max"):
        theta_from_p(1.5, 2.0, 1.0)
    with pytest.raises(ValueError, match="0 < p_min < p_max"):
        PBounds(0.0, 2.0)


def test_mu_from_offset():
    m = torch.tensor([0.0, 100.0, -100.0])
    torch.testing.assert_close(mu_from_offset(m, 0.1), torch.tensor([0.2, 0.3, 0.1]))
    with pytest.raises(ValueError, match="mu0=0.0"):
        mu_from_offset(m, 0.0)


def test_chunked_under_autocast_backward_is_finite_and_matches():
    x = make_features(1, 2, 8, 4, dtype=torch.float32)
    attn = make_attention(1, 2, 8, 8, causal=True, dtype=torch.float32)
    grads = []
    for chunk in (None, 3):
        leaf = _leaf(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = torch.nn.functional.linear(leaf, torch.eye(4))
            out = p_laplacian_aggregate(feats, feats, attn, 1.25, 0.1, variant="release", graph="self",
                                        chunk_size=chunk)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        grads.append(leaf.grad)
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def _peak_allocated_bytes(fn):
    """Peak live bytes allocated while running ``fn`` (replay of the profiler's allocation records)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
    live = peak = 0
    for record in records:
        live += record.nbytes()
        peak = max(peak, live)
    return peak


def test_chunking_bounds_extra_memory(torch_block_path):
    n, chunk = 128, 16
    x = _leaf(make_features(1, 2, n, 8, dtype=torch.float32))
    attn = _leaf(make_attention(1, 2, n, n, causal=True, dtype=torch.float32))

    def step(chunk_size):
        def fn():
            x.grad = attn.grad = None
            out = p_laplacian_aggregate(x, x, attn, 1.5, 0.2, variant="release", graph="self", chunk_size=chunk_size)
            out.sum().backward()
        return fn

    pair_bytes = 4 * 2 * n * n
    full = _peak_allocated_bytes(step(None))
    chunked = _peak_allocated_bytes(step(chunk))
    assert full > 4 * pair_bytes  # several (n, n) tensors are saved for backward
    # Chunked: the attention gradient (one (n, n) tensor) plus O(chunk * n) working memory.
    assert chunked < 2 * pair_bytes


def _saved_pair_tensors(fn, n_q: int, n_k: int) -> int:
    """How many tensors shaped like a (rows, keys) block of the (n_q, n_k) graph ``fn``'s autograd graph saves
    (features must be narrower than 8: wider tensors count as pairs)."""
    count = 0

    def pack(tensor):
        nonlocal count
        if tensor.dim() >= 2 and 1 < tensor.shape[-2] <= n_q and 8 <= tensor.shape[-1] <= n_k:
            count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return count


@pytest.mark.parametrize("causal", [False, True])
def test_paper_keeps_block_intermediates_only_without_chunks(causal):
    """Unchunked ``paper`` keeps each row block's intermediates for the backward pass (no second Gram product);
    with ``chunk_size`` it keeps only the attention and rebuilds them, so its memory stays O(chunk * n_k)."""
    n = 40
    x_q, x_kv = _leaf(make_features(1, 1, n, 6, seed=3)), _leaf(make_features(1, 1, n, 6))
    attn = _leaf(make_attention(1, 1, n, n, causal=True))

    def run(chunk_size):
        return lambda: p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, variant="paper", causal_degrees=causal,
                                             chunk_size=chunk_size)

    assert _saved_pair_tensors(run(8), n, n) == 1  # the attention
    assert _saved_pair_tensors(run(None), n, n) > 5
    with torch.no_grad():
        assert _saved_pair_tensors(run(None), n, n) == 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_attn_head_mean_equals_explicit_mean(causal, chunk_size):
    """attn_head_mean=True gives the values and gradients of the explicit head mean (paper variant)."""
    x_q = make_features(2, 1, 5, 3, seed=3).requires_grad_()
    x_kv = make_features(2, 1, 7, 3, seed=4).requires_grad_()
    attn = make_attention(2, 3, 5, 7, causal=causal, holes=0.2, seed=5).requires_grad_()
    p = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    grad_out = make_features(2, 1, 5, 3, seed=6)
    results = []
    for head_mean in (False, True):
        graph = attn if head_mean else attn.mean(dim=1, keepdim=True)
        out = p_laplacian_aggregate(x_q, x_kv, graph, p, 0.3, variant="paper", causal_degrees=causal,
                                    chunk_size=chunk_size, attn_head_mean=head_mean)
        grads = torch.autograd.grad(out, (x_q, x_kv, attn, p), grad_out)
        results.append((out, *grads))
    for explicit, fused in zip(*results):
        assert_close_rel(fused, explicit, 1e-12)


def test_attn_head_mean_gradcheck_and_errors():
    x_q = make_features(1, 1, 3, 2, seed=7).requires_grad_()
    x_kv = make_features(1, 1, 4, 2, seed=8).requires_grad_()
    attn = make_attention(1, 2, 3, 4, seed=9).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, m: p_laplacian_aggregate(a, b, m, 1.5, 0.2, variant="paper", attn_head_mean=True),
        (x_q, x_kv, attn))
    with pytest.raises(ValueError, match="attn_head_mean=True applies to variant='paper' only"):
        p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, variant="release", attn_head_mean=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal,chunk_size,head_mean", [(False, None, False), (True, None, True), (True, 2, True),
                                                         (False, 3, True)])
def test_paper_kv_basis_equals_the_expanded_key_features(dtype, causal, chunk_size, head_mean):
    """kv_basis: x_kv holds coordinates C and the key nodes are C B; values and all gradients (C, B, x_q, the
    attention, p) equal the call on the expanded features C B (float64: torch path; float32: CPU kernels)."""
    x_q = make_features(2, 1, 5, 6, dtype=dtype, seed=3).requires_grad_()
    coords = make_features(2, 1, 7, 4, dtype=dtype, seed=4).requires_grad_()
    basis = make_features(1, 1, 4, 6, dtype=dtype, seed=5)[0, 0].requires_grad_()
    heads = 3 if head_mean else 1
    attn = make_attention(2, heads, 5, 7, causal=causal, holes=0.2, zero_rows=(1,), seed=6).to(dtype).requires_grad_()
    p = torch.tensor(1.4, dtype=dtype, requires_grad=True)
    grad_out = make_features(2, 1, 5, 6, dtype=dtype, seed=7)
    options = dict(variant="paper", causal_degrees=causal, chunk_size=chunk_size, attn_head_mean=head_mean)
    factored = p_laplacian_aggregate(x_q, coords, attn, p, 0.3, kv_basis=basis, **options)
    expanded = p_laplacian_aggregate(x_q, coords @ basis, attn, p, 0.3, **options)
    rel = 1e-12 if dtype == torch.float64 else 2e-5
    assert_close_rel(factored, expanded, rel)
    inputs = (x_q, coords, basis, attn, p)
    for got, want in zip(torch.autograd.grad(factored, inputs, grad_out), torch.autograd.grad(expanded, inputs, grad_out)):
        assert_close_rel(got, want, 10 * rel)


def test_paper_kv_basis_gradcheck_and_errors():
    x_q = make_features(1, 1, 3, 3, seed=8).requires_grad_()
    coords = make_features(1, 1, 4, 2, seed=9).requires_grad_()
    basis = make_features(1, 1, 2, 3, seed=10)[0, 0].requires_grad_()
    attn = make_attention(1, 2, 3, 4, seed=11).requires_grad_()  # no zeros: gradcheck perturbs every entry
    assert torch.autograd.gradcheck(
        lambda a, c, b, m: p_laplacian_aggregate(a, c, m, 1.5, 0.2, variant="paper", causal_degrees=True,
                                                 attn_head_mean=True, kv_basis=b),
        (x_q, coords, basis, attn))
    with pytest.raises(ValueError, match="kv_basis applies to variant='paper' only"):
        p_laplacian_aggregate(x_q, coords, attn[:, :1], 1.5, 0.2, variant="release", kv_basis=basis)
    with pytest.raises(ValueError, match=r"kv_basis must be \(r, d\) = \(2, 3\).*got \(3, 3\)"):
        p_laplacian_aggregate(x_q, coords, attn, 1.5, 0.2, attn_head_mean=True, kv_basis=basis.new_ones(3, 3))
    with pytest.raises(ValueError, match="kv_basis must be a 2-D floating-point tensor"):
        p_laplacian_aggregate(x_q, coords, attn, 1.5, 0.2, attn_head_mean=True, kv_basis=basis[None])
    with pytest.raises(ValueError, match="feature dims differ: x_q has d=3, x_kv has d=2"):
        p_laplacian_aggregate(x_q, coords, attn, 1.5, 0.2, attn_head_mean=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("with_past", [False, True])
def test_return_column_degrees_equals_accumulate_column_degrees(dtype, chunk_size, with_past):
    """The running column degrees the block loop returns are what accumulate_column_degrees computes separately,
    and returning them leaves the aggregate unchanged."""
    x_q = make_features(2, 1, 5, 3, dtype=dtype, seed=20)
    x_kv = make_features(2, 1, 8, 3, dtype=dtype, seed=21)
    attn = make_attention(2, 3, 5, 8, causal=True, offset=3, seed=22).to(dtype)
    past = torch.rand(2, 1, 3, dtype=dtype) if with_past else None
    options = dict(variant="paper", causal_degrees=True, past_column_degrees=past, chunk_size=chunk_size,
                   attn_head_mean=True)
    out, degrees = p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, return_column_degrees=True, **options)
    assert degrees.shape == (2, 1, 8) and not degrees.requires_grad
    torch.testing.assert_close(degrees, accumulate_column_degrees(attn, past, head_mean=True))
    torch.testing.assert_close(out, p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, **options), rtol=0, atol=0)


def test_return_column_degrees_needs_causal_paper():
    x_q, x_kv, attn = make_features(1, 1, 3, 2), make_features(1, 1, 3, 2), make_attention(1, 1, 3, 3)
    for kwargs in ({"variant": "paper"}, {"variant": "release"}):
        with pytest.raises(ValueError, match="return_column_degrees=True applies to variant='paper' with "
                                             "causal_degrees=True only"):
            p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, return_column_degrees=True, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attn_block_plan_equals_reading_the_extents(dtype, monkeypatch):
    """A block plan (rows, keys right of which the attention is 0) gives the result and gradients of the default
    call (float64: torch path; float32: CPU kernels); with a plan neither a key-extent pass nor the separate
    non-negativity pass reads the per-head attention."""
    import vlpeft.functional.p_laplacian as module

    reads = []
    for name in ("_key_extents", "_check_attention"):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda a, *rest, _real=real, _name=name: reads.append((_name, a.shape))
                            or _real(a, *rest))
    x_q = make_features(1, 1, 9, 4, dtype=dtype, seed=30).requires_grad_()
    x_kv = make_features(1, 1, 9, 4, dtype=dtype, seed=31).requires_grad_()
    attn = make_attention(1, 3, 9, 9, causal=True, seed=32).to(dtype).requires_grad_()
    plan = [(slice(0, 3), 3), (slice(3, 6), 7), (slice(6, 9), 9)]  # upper bounds, not the exact last edges
    options = dict(variant="paper", causal_degrees=True, attn_head_mean=True)
    planned = p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, attn_block_plan=plan, **options)
    # only block rows of the head-mean graph are checked (torch path), never the whole per-head attention
    assert all(name == "_check_attention" and shape[-2] == 3 for name, shape in reads), reads
    reads.clear()
    default = p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, **options)
    assert ("_check_attention", attn.shape) in reads  # the default checks the whole per-head attention
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    assert_close_rel(planned, default, rel)
    grad_out = make_features(1, 1, 9, 4, dtype=dtype, seed=33)
    for got, want in zip(torch.autograd.grad(planned, (x_q, x_kv, attn), grad_out),
                         torch.autograd.grad(default, (x_q, x_kv, attn), grad_out)):
        assert_close_rel(got, want, 10 * rel)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attn_block_plan_checks(dtype):
    x_q, x_kv = make_features(1, 1, 4, 2, dtype=dtype), make_features(1, 1, 4, 2, dtype=dtype)
    attn = make_attention(1, 1, 4, 4, causal=True).to(dtype)
    good = [(slice(0, 2), 2), (slice(2, 4), 4)]
    for bad, message in (([(slice(0, 2), 2)], r"covers rows \[0, 2\), expected all 4"),
                         ([(slice(0, 2), 2), (slice(1, 4), 4)], "tiling the 4 query rows in order"),
                         ([(slice(0, 4), 5)], r"1 <= n_keys <= 4"),
                         ([(0, 4)], "tiling")):
        with pytest.raises(ValueError, match=message):
            p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, attn_block_plan=bad)
    with pytest.raises(ValueError, match="attn_block_plan applies to variant='paper' without chunk_size only"):
        p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, attn_block_plan=good, chunk_size=2)
    negative = attn.clone()
    negative[..., 3, 1] = -0.1  # inside a block: the block loop (torch path or C kernel) finds it
    with pytest.raises(ValueError, match="attn must be non-negative"):
        p_laplacian_aggregate(x_q, x_kv, negative, 1.5, 0.2, attn_block_plan=good)


def test_accumulate_column_degrees_head_mean():
    attn = make_attention(2, 3, 4, 6, causal=True, seed=10)
    past = torch.rand(2, 1, 2, dtype=torch.float64)
    fused = accumulate_column_degrees(attn, past, head_mean=True)
    explicit = accumulate_column_degrees(attn.mean(dim=1, keepdim=True), past)
    assert fused.shape == (2, 1, 6)
    assert_close_rel(fused, explicit, 1e-14)


def test_attn_head_mean_without_attention_gradient():
    """When attn needs no gradient the kernel keeps its mean only; values and feature gradients are unchanged."""
    x_q = make_features(1, 1, 4, 3, seed=11).requires_grad_()
    x_kv = make_features(1, 1, 6, 3, seed=12)
    attn = make_attention(1, 3, 4, 6, causal=True, seed=13)
    fused = p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, variant="paper", causal_degrees=True, chunk_size=3,
                                  attn_head_mean=True)
    explicit = p_laplacian_aggregate(x_q, x_kv, attn.mean(dim=1, keepdim=True), 1.5, 0.2, variant="paper",
                                     causal_degrees=True)
    assert_close_rel(fused, explicit, 1e-12)
    (grad_fused,) = torch.autograd.grad(fused.sum(), x_q)
    (grad_explicit,) = torch.autograd.grad(explicit.sum(), x_q)
    assert_close_rel(grad_fused, grad_explicit, 1e-12)


@pytest.mark.parametrize(
    "variant,graph,options",
    [("paper", "bipartite", {}), ("paper", "bipartite", {"causal_degrees": True}),
     ("paper", "bipartite", {"causal_degrees": True, "attn_head_mean": True}),
     ("release", "self", {}), ("release", "self", {"self_loop": "drop"}), ("release", "bipartite", {})],
)
def test_causal_key_truncation_equals_one_block(variant, graph, options):
    """Without chunk_size, a causal attention longer than one automatic row block is processed in row blocks that
    skip the keys right of their last edge; values and every gradient equal the single full block's."""
    import vlpeft.functional.p_laplacian as kernel

    n = 2 * kernel._AUTO_BLOCK_ROWS + 37  # two blocks of about _AUTO_BLOCK_ROWS rows
    heads = 2
    x = make_features(1, 1 if variant == "paper" else heads, n, 3, seed=11)
    x_q = x if graph == "self" else make_features(1, x.shape[1], n, 3, seed=12)
    attn = make_attention(1, heads if options.get("attn_head_mean") or variant == "release" else 1, n, n,
                          causal=True, zero_rows=(5,), holes=0.1, seed=13)
    weights = torch.linspace(-1, 1, x_q.numel(), dtype=x_q.dtype).view_as(x_q)
    results = []
    for chunk in (None, n):  # automatic blocks with key truncation vs one block of all rows and keys
        leaves = [_leaf(t) for t in (x_q, x, attn)]
        p, mu = _leaf(torch.tensor(1.3, dtype=torch.float64)), _leaf(torch.tensor(0.2, dtype=torch.float64))
        out = p_laplacian_aggregate(*leaves, p, mu, variant=variant, graph=graph, chunk_size=chunk, **options)
        (out * weights).sum().backward()
        results.append([out.detach()] + [t.grad for t in (*leaves, p, mu)])
    assert len(kernel._block_plan(attn, n, None)) > 1  # the automatic split is taken
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-12)
    if variant == "release" and graph == "self" and not options:
        assert_close_rel(results[0][0], naive_release_self(x, attn, 1.3, 0.2), 1e-10)


# ----------------------------------------------------------------------------------------------------------
# Attention recomputed in the backward pass (release, chunked, attention without gradient)
# ----------------------------------------------------------------------------------------------------------


def _saved_pairwise(fn, n_q, n_k):
    """Run ``fn`` and return how many tensors autograd saved whose last two dims are (n_q, n_k)."""
    count = 0

    def pack(tensor):
        nonlocal count
        count += int(tensor.dim() >= 2 and tuple(tensor.shape[-2:]) == (n_q, n_k))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, count


@pytest.mark.parametrize("self_loop", ["release", "drop"])
def test_release_recompute_attention_equals_kept_attention(self_loop):
    n, chunk = 11, 4
    attn = make_attention(2, 3, n, n, causal=True, zero_rows=(5,))  # needs no gradient
    x = make_features(2, 3, n, 4)
    calls = []

    def recompute(rows):
        calls.append(rows)
        return attn[..., rows, :].clone()

    grads = {}
    for use in (False, True):
        leaves = [_leaf(x), _leaf(torch.tensor(1.4, dtype=torch.float64)), _leaf(torch.tensor(0.3, dtype=torch.float64))]
        options = {"recompute_attention": recompute} if use else {}

        def run(leaves=leaves, options=options):
            return p_laplacian_aggregate(leaves[0], leaves[0], attn, leaves[1], leaves[2], variant="release",
                                         graph="self", self_loop=self_loop, chunk_size=chunk, **options)

        out, saved = _saved_pairwise(run, n, n)
        assert saved == (0 if use else 1)  # the attention is no longer kept for the backward pass
        (out * make_features(2, 3, n, 4, seed=7)).sum().backward()
        grads[use] = (out.detach(), *(leaf.grad for leaf in leaves))
    assert len(calls) == 3 and [c.start for c in calls] == [0, 4, 8]  # backward only, one call per block
    for kept, rebuilt in zip(grads[False], grads[True]):
        assert torch.equal(kept, rebuilt)


def test_release_recompute_attention_unused_without_chunks_or_with_attention_gradient():
    n = 9
    x = _leaf(make_features(1, 2, n, 4))
    calls = []

    def recompute(rows):
        calls.append(rows)
        return attn[..., rows, :].detach()

    attn = _leaf(make_attention(1, 2, n, n, causal=True))
    out = p_laplacian_aggregate(x, x, attn, 1.5, 0.2, variant="release", graph="self", chunk_size=3,
                                recompute_attention=recompute)
    out.sum().backward()
    assert attn.grad is not None and not calls  # the attention has a gradient: it is kept
    attn = attn.detach()
    out = p_laplacian_aggregate(x, x, attn, 1.5, 0.2, variant="release", graph="self", recompute_attention=recompute)
    out.sum().backward()
    assert not calls  # no chunk_size: the unchunked block keeps the attention


def test_recompute_attention_rejects_bad_use():
    x = make_features(1, 1, 5, 3)
    attn = make_attention(1, 1, 5, 5)
    with pytest.raises(ValueError, match="variant='release' only"):
        p_laplacian_aggregate(x, x, attn, 1.5, 0.2, variant="paper", chunk_size=2,
                              recompute_attention=lambda rows: attn[..., rows, :])
    with pytest.raises(TypeError, match="recompute_attention must be a callable"):
        p_laplacian_aggregate(x, x, attn, 1.5, 0.2, variant="release", graph="self", chunk_size=2,
                              recompute_attention=attn)
    leaf = _leaf(x)
    out = p_laplacian_aggregate(leaf, leaf, attn, 1.5, 0.2, variant="release", graph="self", chunk_size=2,
                                recompute_attention=lambda rows: attn[..., :1, :])
    with pytest.raises(ValueError, match=r"must return the attention rows \(batch, heads, 2, n_k\)"):
        out.sum().backward()


def test_automatic_row_blocks_are_even():
    import vlpeft.functional.p_laplacian as kernel

    blocks = kernel._even_row_slices(643, 128)
    assert [(b.start, b.stop) for b in blocks] == [(0, 129), (129, 258), (258, 387), (387, 516), (516, 643)]
    assert kernel._even_row_slices(100, 128) == [slice(0, 100)]


# ----------------------------------------------------------------------------------------------------------
# compiled=True (release): the block functions, checked uncompiled here (CI); compiled when VLPEFT_TEST_COMPILE=1
# ----------------------------------------------------------------------------------------------------------


def _release_results(options, chunk, compiled, dtype=torch.float64, n=13):
    x = make_features(2, 3, n, 4, dtype=dtype)
    attn = make_attention(2, 3, n, n, causal=True, zero_rows=(4,), holes=0.1, dtype=dtype)
    weights = make_features(2, 3, n, 4, seed=9, dtype=dtype)
    leaves = [_leaf(x), _leaf(attn), _leaf(torch.tensor(1.3, dtype=dtype)), _leaf(torch.tensor(0.2, dtype=dtype))]
    graph = options.get("graph", "self")
    extra = {k: v for k, v in options.items() if k != "graph"}
    out = p_laplacian_aggregate(leaves[0], leaves[0], leaves[1], leaves[2], leaves[3], variant="release", graph=graph,
                                chunk_size=chunk, compiled=compiled, **extra)
    (out * weights).sum().backward()
    return [out.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("options", [{}, {"self_loop": "drop"}, {"graph": "bipartite"}])
@pytest.mark.parametrize("chunk", [None, 4])
def test_release_block_functions_equal_default_path(uncompiled_release_blocks, options, chunk):
    calls = uncompiled_release_blocks
    expected = _release_results(options, chunk, compiled=False)
    got = _release_results(options, chunk, compiled=True)
    assert {"_release_forward_block", "_release_backward_block"} <= set(calls)
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-13)


def test_compiled_rejects_bad_use():
    x = make_features(1, 1, 5, 3)
    attn = make_attention(1, 1, 5, 5)
    with pytest.raises(ValueError, match="compiled=True applies to variant='release' only"):
        p_laplacian_aggregate(x, x, attn, 1.5, 0.2, variant="paper", compiled=True)
    with pytest.raises(TypeError, match="compiled must be a bool"):
        p_laplacian_aggregate(x, x, attn, 1.5, 0.2, variant="release", graph="self", compiled=1)


@pytest.mark.skipif(os.environ.get("VLPEFT_TEST_COMPILE") != "1",
                    reason="compiles with inductor (about a minute on a small CPU machine): set VLPEFT_TEST_COMPILE=1")
def test_release_compiled_equals_default_path_float32():
    """Compiled float32 results are as close to the float64 reference as the default path's (the fused loops use
    other exp/log implementations, so the two float32 paths differ by rounding, amplified by 1/A in dL/dA)."""
    for options in ({}, {"self_loop": "drop"}):
        reference = _release_results(options, 4, compiled=False, dtype=torch.float64, n=37)
        default = _release_results(options, 4, compiled=False, dtype=torch.float32, n=37)
        got = _release_results(options, 4, compiled=True, dtype=torch.float32, n=37)
        for value, plain, exact in zip(got, default, reference):
            scale = exact.abs().max()
            error = ((value.double() - exact).abs().max() / scale).item()
            default_error = ((plain.double() - exact).abs().max() / scale).item()
            assert error <= 4.0 * default_error + 1e-6, (error, default_error)
