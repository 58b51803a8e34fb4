"""Row-block and chunk planning: chunked equals unchunked, bounded memory, causal key truncation, block plans
from the blocked attention, even automatic blocks."""

from __future__ import annotations

import pytest
import torch
from _p_laplacian_references import assert_close_rel, leaf, make_attention, make_features, naive_release_self

from vlpeft.functional import p_laplacian_aggregate
from vlpeft.functional.p_laplacian import paper, planning


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
        leaves = [leaf(t) for t in (x_q, x, attn)]
        p = leaf(torch.tensor(1.4, dtype=torch.float64))
        mu = leaf(torch.tensor(0.2, dtype=torch.float64))
        out = p_laplacian_aggregate(*leaves, p, mu, variant=variant, graph=graph, chunk_size=chunk, **options)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append([out.detach()] + [t.grad for t in (*leaves, p, mu)])
    for other in results[1:]:
        for got, expected in zip(other, results[0]):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_chunked_under_autocast_backward_is_finite_and_matches():
    x = make_features(1, 2, 8, 4, dtype=torch.float32)
    attn = make_attention(1, 2, 8, 8, causal=True, dtype=torch.float32)
    grads = []
    for chunk in (None, 3):
        x_leaf = leaf(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = torch.nn.functional.linear(x_leaf, torch.eye(4))
            out = p_laplacian_aggregate(feats, feats, attn, 1.25, 0.1, variant="release", graph="self",
                                        chunk_size=chunk)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        grads.append(x_leaf.grad)
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
    x = leaf(make_features(1, 2, n, 8, dtype=torch.float32))
    attn = leaf(make_attention(1, 2, n, n, causal=True, dtype=torch.float32))

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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attn_block_plan_equals_reading_the_extents(dtype, monkeypatch):
    """A block plan (rows, keys right of which the attention is 0) gives the result and gradients of the default
    call (float64: torch path; float32: CPU kernels); with a plan neither a key-extent pass nor the separate
    non-negativity pass reads the per-head attention."""
    reads = []
    for module, name in ((planning, "key_extents"), (paper, "check_attention")):
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
    assert all(name == "check_attention" and shape[-2] == 3 for name, shape in reads), reads
    reads.clear()
    default = p_laplacian_aggregate(x_q, x_kv, attn, 1.5, 0.2, **options)
    assert ("check_attention", attn.shape) in reads  # the default checks the whole per-head attention
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


@pytest.mark.parametrize(
    "variant,graph,options",
    [("paper", "bipartite", {}), ("paper", "bipartite", {"causal_degrees": True}),
     ("paper", "bipartite", {"causal_degrees": True, "attn_head_mean": True}),
     ("release", "self", {}), ("release", "self", {"self_loop": "drop"}), ("release", "bipartite", {})],
)
def test_causal_key_truncation_equals_one_block(variant, graph, options):
    """Without chunk_size, a causal attention longer than one automatic row block is processed in row blocks that
    skip the keys right of their last edge; values and every gradient equal the single full block's."""
    n = 2 * planning.AUTO_BLOCK_ROWS + 37  # two blocks of about AUTO_BLOCK_ROWS rows
    heads = 2
    x = make_features(1, 1 if variant == "paper" else heads, n, 3, seed=11)
    x_q = x if graph == "self" else make_features(1, x.shape[1], n, 3, seed=12)
    attn = make_attention(1, heads if options.get("attn_head_mean") or variant == "release" else 1, n, n,
                          causal=True, zero_rows=(5,), holes=0.1, seed=13)
    weights = torch.linspace(-1, 1, x_q.numel(), dtype=x_q.dtype).view_as(x_q)
    results = []
    for chunk in (None, n):  # automatic blocks with key truncation vs one block of all rows and keys
        leaves = [leaf(t) for t in (x_q, x, attn)]
        p, mu = leaf(torch.tensor(1.3, dtype=torch.float64)), leaf(torch.tensor(0.2, dtype=torch.float64))
        out = p_laplacian_aggregate(*leaves, p, mu, variant=variant, graph=graph, chunk_size=chunk, **options)
        (out * weights).sum().backward()
        results.append([out.detach()] + [t.grad for t in (*leaves, p, mu)])
    assert len(planning.block_plan(attn, n, None)) > 1  # the automatic split is taken
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-12)
    if variant == "release" and graph == "self" and not options:
        assert_close_rel(results[0][0], naive_release_self(x, attn, 1.3, 0.2), 1e-10)


def test_automatic_row_blocks_are_even():
    blocks = planning.even_row_slices(643, 128)
    assert [(b.start, b.stop) for b in blocks] == [(0, 129), (129, 258), (258, 387), (387, 516), (516, 643)]
    assert planning.even_row_slices(100, 128) == [slice(0, 100)]
