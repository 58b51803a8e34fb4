"""The fused attention + release p-Laplacian kernels (vlpeft.functional.p_laplacian.triton_attention).

Kernel tests run where the kernels can run: on a CUDA GPU with Triton, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` in the environment before pytest starts; slow, small shapes only). Elsewhere (CI) they are
skipped, and the tests of the torch path, the dispatch and the input checks run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlpeft.functional import p_laplacian_aggregate
from vlpeft.functional.p_laplacian.triton_attention import (
    UNATTENDED_SCORE,
    attention_p_laplacian,
    attention_p_laplacian_reference,
    fused_kernel_supported,
    triton_available,
)

KERNEL_DEVICE = ("cuda" if torch.cuda.is_available() else "cpu") if triton_available() else None
needs_kernel = pytest.mark.skipif(KERNEL_DEVICE is None, reason="needs Triton with a CUDA GPU (or TRITON_INTERPRET=1)")
MIN = torch.finfo(torch.float32).min


def _inputs(batch=2, heads=4, kv_heads=2, n=50, head_dim=16, d_f=8, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    q = make(batch, heads, n, head_dim)
    k = make(batch, kv_heads, n, head_dim)
    v = make(batch, kv_heads, n, head_dim)
    feats = (torch.randn(batch, heads, n, d_f, generator=gen)).to(device).requires_grad_()
    return q, k, v, feats


def _padding_bias(batch: int, n: int, pads: list[int], device: str = "cpu") -> torch.Tensor:
    """Left padding: the first pads[b] keys of sample b are masked (additive, transformers' eager convention)."""
    bias = torch.zeros(batch, 1, n, n, device=device)
    for b, pad in enumerate(pads):
        bias[b, ..., :pad] = MIN
    return bias


def _run(backend, q, k, v, feats, p, mu, **kw):
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    p_t = torch.tensor(p, device=q.device, dtype=wide, requires_grad=True)
    mu_t = torch.tensor(mu, device=q.device, dtype=wide, requires_grad=True)
    out, agg = attention_p_laplacian(q, k, v, feats, p_t, mu_t, backend=backend, **kw)
    gen = torch.Generator().manual_seed(7)
    g_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    g_agg = torch.randn(agg.shape, generator=gen).to(agg.device)
    loss = (out.to(wide) * g_out.to(wide)).sum() + (agg * g_agg.to(agg.dtype)).sum()
    grads = torch.autograd.grad(loss, (q, k, v, feats, p_t, mu_t))
    return (out, agg, *grads)


NAMES = ("out", "aggregated", "dq", "dk", "dv", "dfeatures", "dp", "dmu")


def _float64(*tensors):
    return tuple(t.detach().double().requires_grad_() for t in tensors)


def _assert_close(got, want, rtol, names=NAMES, coefficient_rtol=None):
    """Max error relative to the largest entry; p and mu gradients (sums over every row, with cancellation in
    float32) get ``coefficient_rtol``."""
    for name, a, b in zip(names, got, want, strict=True):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        tol = coefficient_rtol if coefficient_rtol is not None and name in ("dp", "dmu") else rtol
        err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()
        assert err <= tol, f"{name}: max error {err:.3g} relative to its largest entry exceeds {tol}"


# ------------------------------------------------------------------------------------------------ torch path (CI)


def test_reference_is_softmax_attention_then_release_aggregation():
    q, k, v, feats = _inputs(kv_heads=4)
    bias = _padding_bias(2, 50, [0, 9])
    out, agg = attention_p_laplacian_reference(q, k, v, feats, 1.4, 0.3, causal=True, attn_bias=bias)
    causal = torch.ones(50, 50, dtype=torch.bool).tril()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~causal, float("-inf")))
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(16) + bias
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    rows = (scores.masked_fill(~causal, float("-inf")).amax(-1, keepdim=True) > UNATTENDED_SCORE)
    want = p_laplacian_aggregate(feats, feats, probs * rows, 1.4, 0.3, variant="release", graph="self")
    torch.testing.assert_close(agg, want, rtol=1e-5, atol=1e-6)


def test_reference_grouped_query_heads_read_their_key_value_head():
    q, k, v, feats = _inputs(heads=4, kv_heads=2)
    out, _ = attention_p_laplacian_reference(q, k, v, feats, 1.5, 0.2)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_have_no_graph_edges_and_stay_finite():
    q, k, v, feats = _inputs(batch=1, kv_heads=4, n=12)
    bias = _padding_bias(1, 12, [12])  # every key masked for every query
    out, agg = attention_p_laplacian_reference(q, k, v, feats, 1.2, 0.2, attn_bias=bias)
    torch.testing.assert_close(agg, feats)  # no edges: U_i = F_i
    torch.testing.assert_close(out, v.mean(dim=-2, keepdim=True).expand_as(out))  # softmax of equal scores
    out_inf, agg_inf = attention_p_laplacian_reference(q, k, v, feats, 1.2, 0.2,
                                                       attn_bias=torch.full((1, 1, 12, 12), float("-inf")))
    assert torch.equal(out_inf, torch.zeros_like(out_inf))
    torch.testing.assert_close(agg_inf, feats)


def test_auto_backend_on_cpu_is_the_torch_path():
    q, k, v, feats = _inputs()
    got = attention_p_laplacian(q, k, v, feats, 1.5, 0.2, causal=True)
    want = attention_p_laplacian_reference(q, k, v, feats, 1.5, 0.2, causal=True)
    if KERNEL_DEVICE != "cpu":
        assert not fused_kernel_supported(q, k, v, feats)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


@pytest.mark.skipif(KERNEL_DEVICE is not None, reason="Triton can run here")
def test_triton_backend_without_triton_or_gpu_raises_naming_the_reason():
    q, k, v, feats = _inputs()
    with pytest.raises(RuntimeError, match="backend='triton' needs Triton, CUDA tensors"):
        attention_p_laplacian(q, k, v, feats, 1.5, 0.2, backend="triton")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"p": 2.5}, r"p=2.5 is out of range"),
        ({"mu": 0.0}, r"mu=0.0 is out of range"),
        ({"self_loop": "keep"}, r"self_loop='keep' is not one of"),
        ({"backend": "cuda"}, r"backend='cuda' is not one of"),
        ({"eps": -1.0}, r"eps must be a finite number > 0"),
    ],
)
def test_bad_options_raise_naming_the_value(change, message):
    q, k, v, feats = _inputs()
    kwargs = {"p": 1.5, "mu": 0.2} | change
    p, mu = kwargs.pop("p"), kwargs.pop("mu")
    with pytest.raises(ValueError, match=message):
        attention_p_laplacian(q, k, v, feats, p, mu, **kwargs)


def test_bad_shapes_raise_naming_the_shapes():
    q, k, v, feats = _inputs(heads=4, kv_heads=2)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        attention_p_laplacian(q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1), feats, 1.5, 0.2)
    with pytest.raises(ValueError, match=r"features must be \(batch, heads, n, d_f\)"):
        attention_p_laplacian(q, k, v, feats[:, :, :10], 1.5, 0.2)
    with pytest.raises(ValueError, match=r"only the self graph"):
        attention_p_laplacian(q, k[:, :, :10], v[:, :, :10], feats, 1.5, 0.2)
    with pytest.raises(ValueError, match=r"attn_bias of shape \(2, 1, 50, 49\) does not broadcast"):
        attention_p_laplacian(q, k, v, feats, 1.5, 0.2, attn_bias=torch.zeros(2, 1, 50, 49))


# ------------------------------------------------------------------------------------------------ the kernels


def _kernel_case(dtype=torch.float32, **shape):
    return _inputs(dtype=dtype, device=KERNEL_DEVICE, **shape)


@needs_kernel
@pytest.mark.parametrize(
    ("causal", "pads", "self_loop", "p", "shape"),
    [
        (True, None, "release", 1.5, {}),
        (True, [0, 13], "release", 1.2, {"n": 70, "heads": 2, "kv_heads": 2}),
        (False, [5, 0], "drop", 1.8, {"n": 37, "d_f": 12}),
        (False, None, "release", 1.05, {"n": 130, "heads": 2, "kv_heads": 1, "head_dim": 32}),
    ],
)
def test_kernel_matches_torch_path_float32_values_and_gradients(causal, pads, self_loop, p, shape):
    q, k, v, feats = _kernel_case(**shape)
    bias = None if pads is None else _padding_bias(q.shape[0], q.shape[2], pads, device=KERNEL_DEVICE)
    kwargs = {"causal": causal, "attn_bias": bias, "self_loop": self_loop}
    got = _run("triton", q, k, v, feats, p, 0.2, **kwargs)
    if bias is not None:
        kwargs["attn_bias"] = bias.double()
    want = _run("torch", *_float64(q, k, v, feats), p, 0.2, **kwargs)  # float64 composition
    _assert_close(got, want, rtol=1e-5, coefficient_rtol=2e-4)


@needs_kernel
def test_kernel_per_head_bias_and_per_head_p():
    q, k, v, feats = _kernel_case(n=45, heads=2, kv_heads=2)
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(2, 2, 45, 45, generator=gen).to(KERNEL_DEVICE)
    p = torch.tensor([1.3, 1.7], device=KERNEL_DEVICE, requires_grad=True)
    results = []
    for backend in ("triton", "torch"):
        out, agg = attention_p_laplacian(q, k, v, feats, p, 0.5, attn_bias=bias, backend=backend)
        grads = torch.autograd.grad(out.sum() + (agg * agg).sum(), (q, feats, p))
        results.append((out, agg, *grads))
    _assert_close(results[0], results[1], rtol=5e-5, names=("out", "aggregated", "dq", "dfeatures", "dp"))


@needs_kernel
@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="bfloat16 tensor-core path: GPU only")
def test_kernel_bfloat16_inputs_accumulate_in_float32():
    q, k, v, feats = _kernel_case(dtype=torch.bfloat16, n=300, heads=4, kv_heads=2, head_dim=64)
    bias = _padding_bias(2, 300, [0, 40], device="cuda")
    got = _run("triton", q, k, v, feats, 1.5, 0.2, causal=True, attn_bias=bias)
    # The reference computes in float32 from the same bfloat16 inputs; the kernel's products run on tensor cores
    # (bfloat16 operands, float32 accumulation), as flash attention does.
    want = _run("torch", q, k, v, feats, 1.5, 0.2, causal=True, attn_bias=bias)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    _assert_close(got, want, rtol=3e-2)


@needs_kernel
@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="memory is measured on the GPU")
def test_kernel_memory_is_linear_in_sequence_length():
    n = 4096
    q, k, v, feats = _kernel_case(dtype=torch.bfloat16, batch=1, heads=4, kv_heads=4, n=n, head_dim=64)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, agg = attention_p_laplacian(q, k, v, feats, 1.5, 0.2, causal=True, backend="triton")
    (out.float().sum() + agg.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    one_score_matrix = 4 * n * n * 4  # (heads, n, n) float32
    assert extra < one_score_matrix / 8, f"extra memory {extra} bytes is not O(n)"
