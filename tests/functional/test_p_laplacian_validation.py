"""Input and option checks of ``p_laplacian_aggregate``: errors name the offending value."""

from __future__ import annotations

import pytest
import torch
from _p_laplacian_references import make_attention, make_features

from vlpeft.functional import p_laplacian_aggregate


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
