"""p-adapter ``release`` on interface models with the fused GPU kernels selected automatically.

On a CUDA GPU with Triton (or under ``TRITON_INTERPRET=1``), a LLaVA model's adapted Llama self-attention runs the
fused attention + p-Laplacian kernels instead of eager attention + the torch aggregation; its loss and gradients
must equal the torch path's (``VLPEFT_BACKEND=torch``). Elsewhere (CI), a request for the kernels falls back to the
torch path unchanged, and the recorded backend says why.
"""

import peft
import pytest
import torch

from vlpeft.functional.p_laplacian import triton_attention as fused_module
from vlpeft.functional.p_laplacian import triton_support
from vlpeft.functional.p_laplacian.triton_support import triton_available
from vlpeft.testing import build_tiny_model
from vlpeft.tuners.p_adapter import PAdapterConfig, padapter_backends

KERNEL_DEVICE = ("cuda" if torch.cuda.is_available() else "cpu") if triton_available() else None


def _loss_and_grads(device):
    torch.manual_seed(0)
    tiny = build_tiny_model("llava", seed=0)
    model = peft.get_peft_model(tiny.model, PAdapterConfig(variant="release", p_init=1.25, key_pool_size=3))
    model.to(device).train()
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tiny.inputs.items()}
    loss = model(**inputs).loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, padapter_backends(model)


def _count_kernel_calls(monkeypatch):
    calls = []
    original = fused_module.fused_attention_p_laplacian

    def counting(*args, **kwargs):
        calls.append("triton")
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_module, "fused_attention_p_laplacian", counting)
    return calls


@pytest.mark.skipif(KERNEL_DEVICE is None, reason="needs Triton with a CUDA GPU (or TRITON_INTERPRET=1)")
def test_fused_kernels_are_selected_and_match_the_torch_path(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    fused_loss, fused_grads, fused_backends = _loss_and_grads(KERNEL_DEVICE)
    assert calls and set(calls) == {"triton"}, "the adapted attention did not use the fused kernels"
    assert {choice.attention for choice in fused_backends.values()} == {"fused"}
    calls.clear()
    monkeypatch.setenv("VLPEFT_BACKEND", "torch")
    torch_loss, torch_grads, torch_backends = _loss_and_grads(KERNEL_DEVICE)
    assert calls == []
    assert {choice.name for choice in torch_backends.values()} == {"torch"}
    torch.testing.assert_close(fused_loss, torch_loss, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == torch_grads.keys()
    for name in fused_grads:
        if "padapter_p" in name or "padapter_mu" in name:
            # Scalar gradients that are sums with cancellation over every (query, key) pair: in float32 both paths
            # are off their float64 value by up to ~1e-3 relative on this model (measured), in different ways.
            torch.testing.assert_close(fused_grads[name], torch_grads[name], rtol=3e-3, atol=1e-9)
            continue
        scale = torch_grads[name].abs().max().clamp_min(1e-12)
        error = ((fused_grads[name] - torch_grads[name]).abs().max() / scale).item()
        assert error < 1e-4, f"{name}: gradient differs by {error:.2e} of its largest entry"


@pytest.mark.skipif(KERNEL_DEVICE is not None, reason="the kernels can run here")
def test_requested_kernels_fall_back_to_the_torch_path_where_they_cannot_run(monkeypatch):
    reference_loss, reference_grads, _ = _loss_and_grads("cpu")
    monkeypatch.setattr(triton_support, "triton_unavailable_reason", lambda: None)  # the glue declines per call
    calls = _count_kernel_calls(monkeypatch)
    loss, grads, backends = _loss_and_grads("cpu")
    assert calls == [] and backends
    for choice in backends.values():
        assert choice.attention != "fused" and "the tensors are on cpu, the kernels run on cuda" in choice.reason
    assert torch.equal(loss, reference_loss)
    for name in grads:
        assert torch.equal(grads[name], reference_grads[name]), name
