"""Every method on every chat-VLM twin, end to end: forward with images and loss, backward, optimiser step,
disabling, save / load, and cached generation (issue: any image-text-to-text model).

Each method is attached with its defaults, as a new user would (no target names): the placement comes from the
model description derived from the model itself.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import vlpeft
from vlpeft.testing.twins import TWINS, build_twin

METHODS = {
    "padapter_release": lambda: vlpeft.PAdapterConfig(variant="release"),
    "padapter_paper": lambda: vlpeft.PAdapterConfig(variant="paper"),
    "lora": lambda: vlpeft.RoutedLoraConfig(),
    "routed_lora_mul": lambda: vlpeft.RoutedLoraConfig(routing="mul"),
    "routed_lora_add": lambda: vlpeft.RoutedLoraConfig(routing="add"),
    "routed_lora_matmul": lambda: vlpeft.RoutedLoraConfig(routing="matmul"),
    "routed_lora_matmul_expand": lambda: vlpeft.RoutedLoraConfig(routing="matmul_expand"),
    "adapter": lambda: vlpeft.AdapterConfig(),
    "routed_adapter": lambda: vlpeft.AdapterConfig(routing="mul"),
}


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _step(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    loss = model(**batch).loss
    assert torch.isfinite(loss), loss
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("twin_name", sorted(TWINS))
def test_method_on_twin(twin_name: str, method: str, tmp_path) -> None:
    twin = build_twin(twin_name)
    model = twin.model.eval()
    samples = twin.samples((1, 2))
    batch = twin.batch(samples)
    base_logits = _logits(model, batch)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}

    wrapped = peft.get_peft_model(model, METHODS[method]())
    trainable = {name: p for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable, "the method adapted nothing"
    assert all(".vision" not in name and ".visual." not in name for name in trainable), "vision tower is opt-in"
    # Default placement: the language model only.
    # A small step: Adam's first update is about lr * sign(gradient) per element, so a large lr would replace the
    # adapters' N(0, 0.02) initialisation by a sign pattern and could switch off every ReLU unit of a tiny bottleneck.
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-3)

    # Forward with images and a loss; backward reaches every trainable tensor; two steps so that tensors behind a
    # zero-initialised one (LoRA A behind B = 0) get a non-zero gradient too. A tensor counts as reached when either
    # step gave it a non-zero gradient.
    _step(wrapped, batch, optimizer)
    for name, parameter in trainable.items():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    reached = {name for name, p in trainable.items() if bool(p.grad.abs().sum() > 0)}
    _step(wrapped, batch, optimizer)
    silent = [name for name, p in trainable.items() if name not in reached and not bool(p.grad.abs().sum() > 0)]
    assert not silent, f"no gradient reached {silent}"

    # Frozen weights are unchanged by the optimiser.
    for name, parameter in wrapped.get_base_model().named_parameters():
        if not parameter.requires_grad and name in frozen:
            assert torch.equal(parameter, frozen[name]), name

    # The trained adapter changes the outputs; disabled, the model is the base model again.
    adapted_logits = _logits(wrapped, batch)
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-6)
    with wrapped.disable_adapter():
        torch.testing.assert_close(_logits(wrapped, batch), base_logits, rtol=1e-5, atol=1e-5)

    # Save / load round trip into a fresh twin with the same base weights.
    wrapped.save_pretrained(tmp_path)
    fresh = build_twin(twin_name).model.eval()
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(_logits(loaded, batch), adapted_logits, rtol=1e-5, atol=1e-5)

    # Greedy generation with the KV cache equals generation without it.
    prompts = twin.generation_batch(samples)
    options = {"max_new_tokens": 4, "do_sample": False, "suppress_tokens": _image_tokens(twin)}
    with torch.no_grad():
        cached = wrapped.generate(**copy.copy(prompts), use_cache=True, **options)
        uncached = wrapped.generate(**copy.copy(prompts), use_cache=False, **options)
    assert torch.equal(cached, uncached)


def _image_tokens(twin) -> list[int]:
    """Placeholder ids a random twin must not generate (a generated placeholder has no image features)."""
    config = twin.model.config
    ids = {getattr(config, key, None) for key in ("image_token_id", "image_token_index")}
    return sorted(i for i in ids if isinstance(i, int))
