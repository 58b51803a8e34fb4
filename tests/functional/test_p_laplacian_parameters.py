"""Key pooling and the parametrisations of p and mu."""

from __future__ import annotations

import pytest
import torch
from _p_laplacian_references import assert_close_rel, make_attention, make_features, naive_release_bipartite

from vlpeft.functional import (
    PBounds,
    adaptive_bins,
    mu_from_offset,
    p_from_theta,
    p_laplacian_aggregate,
    pool_keys,
    theta_from_p,
)


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
