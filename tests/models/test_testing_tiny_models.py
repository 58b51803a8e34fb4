"""Tests for the tiny random-config model factory (vlpeft.testing)."""

from __future__ import annotations

import pytest
import torch

from vlpeft.testing import (
    FAMILIES,
    GENERATIVE_FAMILIES,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    build_tiny_model,
    images_to_pixel_values,
    tiny_images,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_forward_backward(family: str) -> None:
    tiny = build_tiny_model(family)
    assert tiny.family == family
    outputs = tiny.model(**tiny.inputs)
    assert outputs.loss is not None and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    grads = [p.grad for p in tiny.model.parameters() if p.requires_grad and p.grad is not None]
    assert grads, f"{family}: no parameter received a gradient"
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_deterministic_in_seed(family: str) -> None:
    first = build_tiny_model(family, seed=3)
    second = build_tiny_model(family, seed=3)
    other = build_tiny_model(family, seed=4)
    loss_first = first.model(**first.inputs).loss
    loss_second = second.model(**second.inputs).loss  # train mode: zero dropout keeps it deterministic
    assert torch.equal(loss_first, loss_second)
    params_first = torch.cat([p.detach().flatten() for p in first.model.parameters()])
    params_other = torch.cat([p.detach().flatten() for p in other.model.parameters()])
    assert not torch.equal(params_first, params_other)


@pytest.mark.parametrize("family", GENERATIVE_FAMILIES)
def test_family_generates_greedy_and_beam(family: str) -> None:
    tiny = build_tiny_model(family)
    model = tiny.model.eval()
    inputs = tiny.generation_inputs(batch_size=2)
    with torch.no_grad():
        greedy = model.generate(**inputs, num_beams=1, do_sample=False, max_new_tokens=4)
        beam = model.generate(**inputs, num_beams=2, do_sample=False, max_new_tokens=4)
    assert greedy.shape[0] == 2 and beam.shape[0] == 2
    assert int(greedy.max()) < tiny.vocab_size and int(beam.max()) < tiny.vocab_size


@pytest.mark.parametrize("family", GENERATIVE_FAMILIES)
def test_generation_depends_on_the_image(family: str) -> None:
    """Different images must lead to different outputs, so that image-routing tests can fail."""
    tiny = build_tiny_model(family)
    model = tiny.model.eval()
    inputs = tiny.generation_inputs(batch_size=2)
    # Same text for both examples, different images.
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in inputs:
            inputs[key] = inputs[key][:1].repeat(2, 1)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            num_beams=1,
            do_sample=False,
            max_new_tokens=3,
            output_scores=True,
            return_dict_in_generate=True,
        )
    first_step = out.scores[0]
    assert (first_step[0] - first_step[1]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["blip2", "llava", "paligemma"])
def test_image_token_families_have_placeholders(family: str) -> None:
    tiny = build_tiny_model(family)
    assert tiny.image_token_id == IMAGE_TOKEN_ID
    counts = (tiny.inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1)
    assert counts.tolist() == [tiny.num_image_tokens] * 2
    assert (tiny.inputs["labels"][:, : tiny.num_image_tokens] == -100).all()


def test_examples_have_distinct_images_and_padding() -> None:
    tiny = build_tiny_model("blip_caption")
    inputs = tiny.example_inputs(batch_size=3, seq_len=5, num_padding=2)
    pixels = inputs["pixel_values"]
    assert pixels.shape == (3, 3, 32, 32)
    assert not torch.equal(pixels[0], pixels[1]) and not torch.equal(pixels[1], pixels[2])
    mask = inputs["attention_mask"]
    assert mask[:2].all() and mask[2].sum() == mask.shape[1] - 2
    assert (inputs["input_ids"][2][mask[2] == 0] == PAD_TOKEN_ID).all()
    assert (inputs["labels"][mask == 0] == -100).all()
    loss = tiny.model(**inputs).loss
    assert torch.isfinite(loss)


def test_left_padded_generation_inputs() -> None:
    tiny = build_tiny_model("llava")
    inputs = tiny.generation_inputs(batch_size=2, seq_len=4, num_padding=2)
    assert inputs["attention_mask"][1, :2].tolist() == [0, 0]
    assert (inputs["input_ids"][1] == IMAGE_TOKEN_ID).sum() == tiny.num_image_tokens
    with torch.no_grad():
        out = tiny.model.eval().generate(**inputs, max_new_tokens=2)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)


def test_unpacks_as_model_and_inputs() -> None:
    model, inputs = build_tiny_model("git")
    assert isinstance(inputs, dict) and "pixel_values" in inputs
    assert model(**inputs).loss is not None


def test_overrides_are_applied_and_checked() -> None:
    tiny = build_tiny_model("llava", num_hidden_layers=1, attn_implementation="eager")
    assert tiny.model.config.text_config.num_hidden_layers == 1
    assert tiny.model.config.text_config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="unknown overrides"):
        build_tiny_model("llava", not_a_field=1)
    with pytest.raises(ValueError, match="unknown tiny model family"):
        build_tiny_model("not_a_family")
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_model("git", hidden_size=30)


def test_dropout_override_reaches_sub_configs() -> None:
    tiny = build_tiny_model("blip_caption", dropout=0.25)
    assert tiny.model.config.text_config.hidden_dropout_prob == 0.25
    assert tiny.model.config.vision_config.attention_dropout == 0.25


def test_tiny_images_are_deterministic_and_distinct() -> None:
    first = tiny_images(3, size=16, seed=1)
    again = tiny_images(3, size=16, seed=1)
    assert [im.tobytes() for im in first] == [im.tobytes() for im in again]
    assert len({im.tobytes() for im in first}) == 3
    pixels = images_to_pixel_values(first, size=8)
    assert pixels.shape == (3, 3, 8, 8) and pixels.min() >= -1.0 and pixels.max() <= 1.0
    with pytest.raises(ValueError, match="n must be"):
        tiny_images(0)
