"""Shared checks for the routed LoRA and bottleneck adapter tests (tiny random models, CPU, offline)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from vlpeft._transformers_compat import disable_activation_checkpointing, enable_activation_checkpointing
from vlpeft.testing import TinyModel

PREFIXES = ("routed_lora_", "bottleneck_adapter_")


def wrap(tiny: TinyModel, config: Any) -> PeftModel:
    """A PEFT model around a fresh copy of ``tiny.model`` (the tiny model itself stays pristine)."""
    return get_peft_model(copy.deepcopy(tiny.model), config)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def logits_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits


def adapter_gradients(model: PeftModel, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One forward/backward in train mode; returns the gradients of the trainable parameters."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"trainable parameter {name} got no gradient"
            grads[name] = param.grad.detach().clone()
        else:
            assert param.grad is None, f"frozen parameter {name} got a gradient"
    return grads


def check_train_step(model: PeftModel, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward/backward: only adapter parameters are trainable, they all get finite gradients, and the
    up-projections (B / W_u) get non-zero ones."""
    grads = adapter_gradients(model, inputs)
    assert grads, "no trainable parameters"
    for name, grad in grads.items():
        assert any(prefix in name for prefix in PREFIXES), f"non-adapter parameter {name} is trainable"
        assert torch.isfinite(grad).all(), name
    ups = [g for n, g in grads.items() if "routed_lora_B" in n or "bottleneck_adapter_up" in n]
    assert ups and all(g.abs().sum() > 0 for g in ups)
    return grads


def check_checkpointing_gradients(model: PeftModel, inputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Gradient checkpointing (recomputation in backward, after the forward's frame is closed) gives the same
    gradients."""
    base = model.get_base_model()
    enable_activation_checkpointing(base)
    try:
        grads = adapter_gradients(model, inputs)
    finally:
        disable_activation_checkpointing(base)
    assert grads.keys() == reference.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def check_save_load(model: PeftModel, tiny: TinyModel, inputs: dict[str, torch.Tensor], directory: Path) -> None:
    model.eval()
    with torch.no_grad():
        expected = logits_of(model, inputs)
    model.save_pretrained(directory)
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny.model), directory)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded, inputs), expected, rtol=1e-5, atol=1e-5)


def check_disable_and_unload(model: PeftModel, tiny: TinyModel, inputs: dict[str, torch.Tensor]) -> None:
    model.eval()
    base = copy.deepcopy(tiny.model).eval()
    with torch.no_grad():
        reference = logits_of(base, inputs)
        adapted = logits_of(model, inputs)
        assert not torch.allclose(adapted, reference, atol=1e-6), "the adapter does not change the output"
        with model.disable_adapter():
            torch.testing.assert_close(logits_of(model, inputs), reference, rtol=0, atol=1e-6)
        unloaded = model.unload()
        torch.testing.assert_close(logits_of(unloaded, inputs), reference, rtol=0, atol=1e-6)
    assert not any(prefix in name for name, _ in unloaded.named_parameters() for prefix in PREFIXES)


def check_beam_generation(model: PeftModel, tiny: TinyModel, *, num_beams: int = 2, max_new_tokens: int = 4) -> None:
    """Generating for a batch of two different images equals generating for each image alone."""
    model.eval()
    inputs = tiny.generation_inputs(batch_size=2)
    settings = {"num_beams": num_beams, "do_sample": False, "max_new_tokens": max_new_tokens}
    with torch.no_grad():
        batch = model.generate(**inputs, **settings)
        for row in range(2):
            alone = model.generate(**{k: v[row : row + 1] for k, v in inputs.items()}, **settings)
            torch.testing.assert_close(batch[row : row + 1, : alone.shape[1]], alone)


def check_batch_equals_single(model: PeftModel, inputs: dict[str, torch.Tensor]) -> None:
    """Each sample's logits in a batch of different images equal its logits alone (features follow samples)."""
    model.eval()
    with torch.no_grad():
        batch = logits_of(model, inputs)
        for row in range(batch.shape[0]):
            alone = logits_of(model, {k: v[row : row + 1] for k, v in inputs.items()})
            torch.testing.assert_close(batch[row : row + 1], alone, rtol=1e-4, atol=1e-4)


def run_all_checks(tiny: TinyModel, config: Any, plain_config: Any, directory: Path, *, generate: bool = True) -> None:
    """Every check of the issue on one (family, method, routing) combination."""
    inputs = tiny.inputs
    model = wrap(tiny, config)
    assert trainable_count(model) == trainable_count(wrap(tiny, plain_config)), "routing must add no parameters"
    grads = check_train_step(model, inputs)
    check_checkpointing_gradients(model, inputs, grads)
    check_batch_equals_single(model, inputs)
    if generate:
        check_beam_generation(model, tiny)
    check_save_load(model, tiny, inputs, directory)
    check_disable_and_unload(model, tiny, inputs)
