"""p-adapter models on the fused CPU kernels: losses and gradients against the same model in float64.

A float64 model computes its p-Laplacian blocks in float64 on the torch path, so it is the reference for both
float32 paths; the kernels must be as accurate as the torch float32 path (for ``release`` they are far more
accurate: direct distances instead of the Gram form).
"""

from __future__ import annotations

import peft
import pytest
import torch

from vlpeft.functional.p_laplacian import cpu_kernels as p_laplacian_cpu
from vlpeft.functional.p_laplacian import paper, release
from vlpeft.testing import build_tiny_model
from vlpeft.tuners.p_adapter import PAdapterConfig

pytestmark = pytest.mark.skipif(not p_laplacian_cpu.kernel_available(), reason="fused CPU kernels not built")


def _loss_and_grads(family: str, variant: str, dtype: torch.dtype, kernels: bool, monkeypatch):
    monkeypatch.setenv(p_laplacian_cpu.ENV_SWITCH, "1" if kernels else "0")
    torch.manual_seed(0)
    tiny = build_tiny_model(family, seed=0)
    model = peft.get_peft_model(tiny.model.to(dtype), PAdapterConfig(variant=variant)).train()
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny.inputs.items()}
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llava", "blip_caption"])
@pytest.mark.parametrize("variant", ["paper", "release"])
def test_kernels_are_as_accurate_as_the_torch_float32_path(family, variant, monkeypatch):
    calls = []
    for name in ("release_aggregate_cpu", "paper_forward_block"):
        real = getattr(p_laplacian_cpu, name)
        monkeypatch.setattr(release if name == "release_aggregate_cpu" else paper, name,
                            lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    reference_loss, reference = _loss_and_grads(family, variant, torch.float64, False, monkeypatch)
    assert not calls  # float64: torch path
    kernel_loss, kernel = _loss_and_grads(family, variant, torch.float32, True, monkeypatch)
    assert calls  # the kernels ran
    torch_loss, torch32 = _loss_and_grads(family, variant, torch.float32, False, monkeypatch)
    torch.testing.assert_close(kernel_loss, reference_loss, rtol=1e-6, atol=1e-6)
    for name, expected in reference.items():
        scale = expected.abs().max().clamp_min(1e-30)
        kernel_error = ((kernel[name] - expected).abs().max() / scale).item()
        torch_error = ((torch32[name] - expected).abs().max() / scale).item()
        assert kernel_error <= max(2.0 * torch_error, 2e-5), (name, kernel_error, torch_error)
