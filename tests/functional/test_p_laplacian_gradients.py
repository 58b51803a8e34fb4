"""Gradients of both variants (gradcheck in float64), zero-degree conventions, and robustness: no NaN or inf
under masks, empty rows, duplicate tokens and half-precision inputs or autocast."""

from __future__ import annotations

import pytest
import torch
from _p_laplacian_references import leaf, make_attention, make_features

from vlpeft.functional import p_laplacian_aggregate


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


GRAD_BOUNDS = (0.5, 3.0)  # finite differences move p around p0; 2.0 + h must stay admissible


@pytest.mark.parametrize("p0", [1.25, 1.5, 1.75, 2.0])
@pytest.mark.parametrize(
    "setup",
    ["paper", "paper_causal", "release_bipartite", "release_self", "release_self_drop"],
)
def test_gradcheck(p0, setup):
    gen_h = 2
    p = leaf(torch.tensor([p0, p0 - 0.1], dtype=torch.float64))
    mu = leaf(torch.tensor(0.3, dtype=torch.float64))
    if setup.startswith("release_self"):
        x = leaf(make_features(1, gen_h, 4, 3))
        attn = leaf(make_attention(1, gen_h, 4, 4) * 0.9 + 0.1 / 4)
        policy = "drop" if setup.endswith("drop") else "release"

        def fn(x, attn, p, mu):
            return p_laplacian_aggregate(x, x, attn, p, mu, variant="release", graph="self", self_loop=policy,
                                         p_bounds=GRAD_BOUNDS)

        inputs = (x, attn, p, mu)
    else:
        x_q, x_kv = leaf(make_features(1, gen_h, 3, 3)), leaf(make_features(1, gen_h, 4, 3, seed=2))
        attn = leaf(make_attention(1, gen_h, 3, 4) * 0.9 + 0.1 / 4)
        variant = "release" if setup.startswith("release") else "paper"
        extra = {"causal_degrees": True} if setup == "paper_causal" else {}

        def fn(x_q, x_kv, attn, p, mu):
            return p_laplacian_aggregate(x_q, x_kv, attn, p, mu, variant=variant, p_bounds=GRAD_BOUNDS, **extra)

        inputs = (x_q, x_kv, attn, p, mu)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


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
    x_q, x_kv, attn = leaf(x_q), leaf(x_kv), leaf(attn)
    p_t = leaf(torch.tensor(p))
    mu_t = leaf(torch.tensor(mu))
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
        a = leaf(attn)
        out = p_laplacian_aggregate(x_q, x_kv, a, 1.0, 0.1, variant=variant, graph=graph, **options)
        out.sum().backward()
        assert torch.isfinite(a.grad).all()
        if variant == "release":
            # Non-edges carry weight exactly 0: their gradient through the edge weight is 0.
            assert torch.equal(a.grad[attn == 0], torch.zeros_like(a.grad[attn == 0]))
