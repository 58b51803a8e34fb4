"""The fused CPU kernels of the p-Laplacian block (vlpeft/functional/p_laplacian/cpu_kernels.py).

They compute in float32; the reference is the torch path in float64. The kernels must be as accurate as the
torch path's own float32 result (which uses the Gram form of the distances), for values and every gradient.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch
from _p_laplacian_references import leaf, make_attention, make_features

from vlpeft.functional import p_laplacian_aggregate
from vlpeft.functional.p_laplacian import cpu_kernels as cpu
from vlpeft.functional.p_laplacian import paper, release

#: Where each kernel entry point is looked up when it runs (to count its calls).
KERNEL_CALLERS = {"release_aggregate_cpu": release, "paper_forward_block": paper}
needs_kernel = pytest.mark.skipif(not cpu.kernel_available(), reason="no C compiler: fused CPU kernels not built")


def _run(inputs, options, *, dtype, kernel, monkeypatch, threads=1):
    """(output, gradients of x_q, x_kv, attn, p, mu) of one call, on the kernels or the torch path."""
    monkeypatch.setenv(cpu.ENV_SWITCH, "1" if kernel else "0")
    x_q, x_kv, attn, p, mu = (leaf(t.to(dtype)) for t in inputs)
    if options.get("shared_features"):
        x_q = x_kv  # self graph on the key nodes themselves: one leaf, as in the p-adapter layer
    kwargs = {"variant": "release", **{k: v for k, v in options.items() if k != "shared_features"}}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = p_laplacian_aggregate(x_q, x_kv, attn, p, mu, **kwargs)
        weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view_as(out)
        (out * weights).sum().backward()
    finally:
        torch.set_num_threads(previous)
    grads = [t.grad for t in (x_q, x_kv, attn, p, mu)]
    if options.get("shared_features"):
        grads[0] = torch.zeros_like(grads[1])
    return [out.detach(), *grads]


def _inputs(heads=2, n_q=23, n_k=23, d=8, *, causal=True, holes=0.0, zero_rows=(), offset=None, per_head_p=True,
            feature_heads=None):
    feature_heads = heads if feature_heads is None else feature_heads
    x_kv = make_features(2, feature_heads, n_k, d, seed=1)
    x_q = make_features(2, feature_heads, n_q, d, seed=3) if n_q != n_k else x_kv
    attn = make_attention(2, heads, n_q, n_k, causal=causal, holes=holes, zero_rows=zero_rows, offset=offset)
    p = torch.tensor([1.3, 1.7][:heads], dtype=torch.float64) if per_head_p else torch.tensor(1.5, dtype=torch.float64)
    return x_q, x_kv, attn, p, torch.tensor(0.3, dtype=torch.float64)


CASES = {
    "self_causal": (dict(), dict(graph="self", shared_features=True)),
    "self_causal_drop": (dict(), dict(graph="self", self_loop="drop", shared_features=True)),
    "self_padding_and_empty_rows": (dict(causal=False, holes=0.3, zero_rows=(4,)),
                                    dict(graph="self", shared_features=True)),
    "self_cached_queries": (dict(n_q=5, n_k=23), dict(graph="self", query_offset=18)),
    "bipartite_pooled": (dict(n_q=19, n_k=7, causal=False, holes=0.2), dict(graph="bipartite")),
    "bipartite_wide_features": (dict(n_q=11, n_k=90, d=13, causal=False, per_head_p=False),
                                dict(graph="bipartite")),
    "self_long_rows": (dict(heads=1, n_q=150, n_k=150), dict(graph="self", shared_features=True)),
    "paper": (dict(n_q=19, n_k=23, causal=False, holes=0.2, zero_rows=(3,)), dict(variant="paper")),
    "paper_causal_degrees": (dict(n_q=23, n_k=23), dict(variant="paper", causal_degrees=True)),
    "paper_causal_row_blocks": (dict(heads=1, n_q=300, n_k=300, d=16, per_head_p=False),
                                dict(variant="paper", causal_degrees=True)),
    "paper_chunked_past_degrees": (dict(n_q=9, n_k=23), dict(variant="paper", causal_degrees=True, chunk_size=4)),
    "paper_head_mean": (dict(heads=3, feature_heads=1, n_q=17, n_k=17, per_head_p=False),
                        dict(variant="paper", causal_degrees=True, attn_head_mean=True)),
}


@needs_kernel
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_as_accurate_as_the_torch_float32_path(case, monkeypatch):
    shape, options = CASES[case]
    inputs = _inputs(**shape)
    reference = _run(inputs, options, dtype=torch.float64, kernel=False, monkeypatch=monkeypatch)
    torch32 = _run(inputs, options, dtype=torch.float32, kernel=False, monkeypatch=monkeypatch)
    kernel = _run(inputs, options, dtype=torch.float32, kernel=True, monkeypatch=monkeypatch)
    names = ["output", "dx_q", "dx_kv", "dattn", "dp", "dmu"]
    for name, got, ours32, expected in zip(names, kernel, torch32, reference):
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
        scale = expected.abs().max().clamp_min(1e-30)
        kernel_error = ((got.double() - expected).abs().max() / scale).item()
        torch_error = ((ours32.double() - expected).abs().max() / scale).item()
        assert kernel_error <= 2.0 * torch_error + 2e-6, (name, kernel_error, torch_error)


@needs_kernel
def test_kernel_non_edges_get_zero_attention_gradient(monkeypatch):
    inputs = _inputs(causal=True, holes=0.3, zero_rows=(2,))
    _, _, _, grad_attn, _, _ = _run(inputs, dict(graph="self", shared_features=True), dtype=torch.float32,
                                    kernel=True, monkeypatch=monkeypatch)
    attn = inputs[2]
    assert torch.equal(grad_attn[attn == 0], torch.zeros_like(grad_attn[attn == 0]))


@needs_kernel
def test_kernel_results_do_not_depend_on_the_thread_count(monkeypatch):
    inputs = _inputs(heads=2, n_q=31, n_k=31)
    one = _run(inputs, dict(graph="self", shared_features=True), dtype=torch.float32, kernel=True,
               monkeypatch=monkeypatch, threads=1)
    two = _run(inputs, dict(graph="self", shared_features=True), dtype=torch.float32, kernel=True,
               monkeypatch=monkeypatch, threads=2)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@needs_kernel
def test_kernel_without_attention_gradient(monkeypatch):
    """No attention gradient requested (the kernel gets no buffer for it): the feature gradients still equal the
    torch path's."""
    x_q, x_kv, attn, p, mu = (t.float() for t in _inputs())
    grads = []
    for switch in ("1", "0"):
        monkeypatch.setenv(cpu.ENV_SWITCH, switch)
        x = leaf(x_kv)
        out = p_laplacian_aggregate(x, x, attn, p, mu, variant="release", graph="self")
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_kernels_run_only_for_float32_cpu_calls_when_switched_on(monkeypatch):
    calls = []
    for name in ("release_aggregate_cpu", "paper_forward_block"):
        real = getattr(cpu, name)
        monkeypatch.setattr(KERNEL_CALLERS[name], name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    x_q, x_kv, attn, p, mu = _inputs()

    def both_variants(*tensors):
        p_laplacian_aggregate(*tensors, variant="release", graph="self")
        p_laplacian_aggregate(*tensors, variant="paper")

    both_variants(x_kv, x_kv, attn, p, mu)  # float64: the torch path
    assert calls == []
    monkeypatch.setenv(cpu.ENV_SWITCH, "0")
    assert not cpu.kernel_available()
    both_variants(*(t.float() for t in (x_kv, x_kv, attn, p, mu)))
    assert calls == []
    monkeypatch.setenv(cpu.ENV_SWITCH, "auto")
    if not cpu.kernel_available():
        pytest.skip("no C compiler: fused CPU kernels not built")
    both_variants(*(t.float() for t in (x_kv, x_kv, attn, p, mu)))
    assert calls == ["release_aggregate_cpu", "paper_forward_block"]


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kernel_threads_work_in_a_forked_child(monkeypatch):
    """A child forked after the parent used the thread pool gets a pool of its own (no deadlock)."""
    inputs = _inputs(heads=2, n_q=31, n_k=31)
    options = dict(graph="self", shared_features=True)
    expected = _run(inputs, options, dtype=torch.float32, kernel=True, monkeypatch=monkeypatch, threads=2)[0]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    def child():
        result = _run(inputs, options, dtype=torch.float32, kernel=True, monkeypatch=monkeypatch, threads=2)[0]
        queue.put(bool(torch.equal(result, expected)))

    process = context.Process(target=child)
    process.start()
    process.join(timeout=30)
    if process.is_alive():
        process.kill()
    assert process.exitcode == 0, "the forked child did not finish"
    assert queue.get(timeout=5)


@needs_kernel
def test_kernels_leave_few_graphs_on_many_threads_to_the_torch_path(monkeypatch):
    """One thread per graph: a single graph (paper's head mean at batch 1) on more than 2 threads per graph runs the
    torch path, whose ops use every thread."""
    calls = []
    real = cpu.paper_forward_block
    monkeypatch.setattr(paper, "paper_forward_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    x_q, x_kv, attn, p, mu = (t.float() for t in _inputs(heads=3, feature_heads=1, per_head_p=False))
    x_q, x_kv, attn = x_q[:1], x_kv[:1], attn[:1]  # batch 1: one head-mean graph
    previous = torch.get_num_threads()
    try:
        for threads, used in ((2, True), (3, False)):
            calls.clear()
            torch.set_num_threads(threads)
            p_laplacian_aggregate(x_q, x_kv, attn, p, mu, variant="paper", causal_degrees=True, attn_head_mean=True)
            assert bool(calls) == used, threads
    finally:
        torch.set_num_threads(previous)
