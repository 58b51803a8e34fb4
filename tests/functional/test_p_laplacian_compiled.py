"""``compiled=True`` (release): the pure block functions, checked uncompiled here (CI); compiled when
``VLPEFT_TEST_COMPILE=1``."""

from __future__ import annotations

import os

import pytest
import torch
from _p_laplacian_references import leaf, make_attention, make_features

from vlpeft.functional import p_laplacian_aggregate


def _release_results(options, chunk, compiled, dtype=torch.float64, n=13):
    x = make_features(2, 3, n, 4, dtype=dtype)
    attn = make_attention(2, 3, n, n, causal=True, zero_rows=(4,), holes=0.1, dtype=dtype)
    weights = make_features(2, 3, n, 4, seed=9, dtype=dtype)
    leaves = [leaf(x), leaf(attn), leaf(torch.tensor(1.3, dtype=dtype)), leaf(torch.tensor(0.2, dtype=dtype))]
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
    assert {"release_forward_block", "release_backward_block"} <= set(calls)
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
