"""Activation (gradient) checkpointing gives the same loss and gradients as training without it, for p-adapter and
the routed methods on the chat-VLM twins (the routed layers' visual features and p-adapter's attention capture
must survive recomputation), both non-reentrant and reentrant (the default of ``prepare_model_for_kbit_training``:
visual features that require grad only through ``enable_input_require_grads`` are cut from their frozen graph)."""

from __future__ import annotations

import peft
import pytest
import torch

import vlpeft
from vlpeft._transformers_compat import enable_activation_checkpointing
from vlpeft.testing.twins import build_twin

METHODS = {
    "padapter_release": lambda: vlpeft.PAdapterConfig(variant="release", init_weights="normal"),
    "padapter_paper": lambda: vlpeft.PAdapterConfig(variant="paper"),
    "routed_lora_matmul": lambda: vlpeft.RoutedLoraConfig(routing="matmul", pooling="none", init_lora_weights=False),
    "routed_adapter_mul": lambda: vlpeft.AdapterConfig(routing="mul"),
}


def _loss_and_gradients(
    twin_name: str, method: str, checkpointing: bool, reentrant: bool = False
) -> tuple[torch.Tensor, dict]:
    twin = build_twin(twin_name)
    torch.manual_seed(0)  # the adapters' initialisation
    model = peft.get_peft_model(twin.model, METHODS[method]())
    model.train()
    if checkpointing:
        enable_activation_checkpointing(model.get_base_model(), use_reentrant=reentrant)
        model.get_base_model().enable_input_require_grads()
    batch = twin.batch(twin.samples((1, 2)))
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("twin_name", ["qwen2_5_vl", "smolvlm", "gemma3", "mllama"])
def test_checkpointing_gives_the_same_gradients(twin_name: str, method: str, reentrant: bool) -> None:
    loss, grads = _loss_and_gradients(twin_name, method, checkpointing=False)
    loss_ckpt, grads_ckpt = _loss_and_gradients(twin_name, method, checkpointing=True, reentrant=reentrant)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and grads
    assert any(bool(g.abs().sum() > 0) for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=name)
