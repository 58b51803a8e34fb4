"""Shared fixtures and checks for the chat-VLM twin tests (``tests/test_twins_*.py``): a training step's loss and
embedding gradient, greedy generation with and without the KV cache, and logits under changed pixels."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch

from vlpeft.testing.twins import Twin, build_twin


def twin_fixture(names: Iterable[str], *, scope: str = "function") -> Any:
    """A ``twin`` fixture building each of the twins ``names`` in turn; assign it to ``twin`` in the test module."""

    @pytest.fixture(scope=scope, params=list(names))
    def twin(request: pytest.FixtureRequest) -> Twin:
        return build_twin(request.param)

    return twin


def image_token_mask(twin: Twin, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where ``batch["input_ids"]`` holds the twin's image placeholder token."""
    return batch["input_ids"] == twin.model.config.image_token_id


def image_token_counts(twin: Twin, batch: dict[str, torch.Tensor]) -> list[int]:
    """How many image placeholder tokens each sample of ``batch`` has."""
    return image_token_mask(twin, batch).sum(dim=1).tolist()


def check_loss_and_embedding_gradient(twin: Twin, batch: dict[str, torch.Tensor]) -> None:
    """One forward/backward on the labelled ``batch``: a finite loss, and a finite, non-zero gradient on the input
    embeddings (gradients are cleared first)."""
    twin.model.zero_grad()
    loss = twin.model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grad = twin.model.get_input_embeddings().weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def check_generation_with_and_without_cache(twin: Twin, inputs: dict[str, torch.Tensor], **options: Any) -> None:
    """Greedy generation of 4 new tokens per prompt of ``inputs`` gives the same tokens with the KV cache as without
    it (eval mode, the model's mode restored afterwards); ``options`` go to ``generate``."""
    model = twin.model
    training = model.training
    model.eval()
    try:
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False, **options)
        uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False, **options)
    finally:
        model.train(training)
    assert cached.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 4)
    assert torch.equal(cached, uncached)


def logits_with_other_pixels(
    twin: Twin, batch: dict[str, torch.Tensor], change: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of ``batch`` and of ``batch`` with its pixel values replaced by ``change(pixel_values)`` (no
    gradients, the model's mode as it is)."""
    with torch.no_grad():
        logits = twin.model(**batch).logits
        other = twin.model(**dict(batch, pixel_values=change(batch["pixel_values"]))).logits
    return logits, other


def check_outputs_depend_on_flipped_images(twin: Twin) -> None:
    """In eval mode, flipping every image of a batch of one- and two-image samples left-right changes the logits."""
    twin.model.eval()
    batch = twin.batch(twin.samples((1, 2)), with_labels=False)
    logits, changed = logits_with_other_pixels(twin, batch, lambda pixels: torch.flip(pixels, dims=[-1]))
    assert (logits - changed).abs().max() > 1e-3
