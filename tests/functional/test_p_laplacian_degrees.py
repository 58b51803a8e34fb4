"""Causal column degrees of the ``paper`` variant across KV-cached decoding steps (running sums of earlier
queries' attention): cached decoding equals cache-free decoding."""

from __future__ import annotations

import pytest
import torch
from _p_laplacian_references import assert_close_rel, make_attention, make_features

from vlpeft.functional import accumulate_column_degrees, p_laplacian_aggregate


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


def test_accumulate_column_degrees_head_mean():
    attn = make_attention(2, 3, 4, 6, causal=True, seed=10)
    past = torch.rand(2, 1, 2, dtype=torch.float64)
    fused = accumulate_column_degrees(attn, past, head_mean=True)
    explicit = accumulate_column_degrees(attn.mean(dim=1, keepdim=True), past)
    assert fused.shape == (2, 1, 6)
    assert_close_rel(fused, explicit, 1e-14)
