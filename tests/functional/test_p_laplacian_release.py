"""The ``release`` variant against the released code's formulas (explicit pairwise differences, diag_embed
matmuls; floor and literal eps shift), its p = 2 identities, cached queries and recomputed attention rows."""

from __future__ import annotations

import pytest
import torch
from _p_laplacian_references import (
    CASES,
    assert_close_rel,
    leaf,
    make_attention,
    make_features,
    naive_release_bipartite,
    naive_release_self,
)

from vlpeft.functional import p_laplacian_aggregate


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
        leaves = [leaf(x), leaf(torch.tensor(1.4, dtype=torch.float64)), leaf(torch.tensor(0.3, dtype=torch.float64))]
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
    x = leaf(make_features(1, 2, n, 4))
    calls = []

    def recompute(rows):
        calls.append(rows)
        return attn[..., rows, :].detach()

    attn = leaf(make_attention(1, 2, n, n, causal=True))
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
    x_leaf = leaf(x)
    out = p_laplacian_aggregate(x_leaf, x_leaf, attn, 1.5, 0.2, variant="release", graph="self", chunk_size=2,
                                recompute_attention=lambda rows: attn[..., :1, :])
    with pytest.raises(ValueError, match=r"must return the attention rows \(batch, heads, 2, n_k\)"):
        out.sum().backward()
