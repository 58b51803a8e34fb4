"""The ``paper`` variant against the equation-level reference (Eqs. 9, 14-16 on the augmented graph),
its head-mean graph, grouped-query key bases and memory of the block intermediates."""

from __future__ import annotations

import pytest
import torch
from _p_laplacian_references import (
    CASES,
    assert_close_rel,
    leaf,
    make_attention,
    make_features,
    naive_paper,
    naive_paper_causal,
)

from vlpeft.functional import p_laplacian_aggregate


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


def test_paper_p2_identity():
    mu = 0.2
    v_q, v_k = make_features(2, 2, 5, 6), make_features(2, 2, 7, 6, seed=2)
    m = make_attention(2, 2, 5, 7, holes=0.2)  # unmasked rows sum to 1, so D_qq = 1
    col = m.sum(dim=-2, keepdim=True)
    expected = (m / col.sqrt()) @ v_k / (1 + mu) + mu / (1 + mu) * v_q
    assert_close_rel(p_laplacian_aggregate(v_q, v_k, m, 2.0, mu), expected, 1e-12)


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
    x_q, x_kv = leaf(make_features(1, 1, n, 6, seed=3)), leaf(make_features(1, 1, n, 6))
    attn = leaf(make_attention(1, 1, n, n, causal=True))

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
