"""Routing's x_R on dynamic-resolution and multi-image twins: built per sample from the visual tokens that belong to
it, found through the image placeholder positions (or the cross-attention states, for Mllama)."""

from __future__ import annotations

import peft
import pytest
import torch

import vlpeft
from vlpeft.glue.families import detect_family
from vlpeft.glue.visual_features import find_visual_contexts
from vlpeft.testing.twins import TWINS, build_twin

PLACEHOLDER_TWINS = sorted(name for name in TWINS if name != "mllama")


def _language_inputs_embeds(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The language model's inputs_embeds for ``batch`` (recorded by a hook on the language model)."""
    family = detect_family(model)
    seen: dict[str, torch.Tensor] = {}

    def record(_module, _args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.get_submodule(family.visual_feature_module).register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen["embeds"]


@pytest.mark.parametrize("twin_name", PLACEHOLDER_TWINS)
def test_x_r_is_each_samples_own_placeholder_rows(twin_name: str) -> None:
    twin = build_twin(twin_name)
    model = twin.model.eval()
    samples = twin.samples((1, 2))  # different numbers and sizes of images
    batch = twin.batch(samples, with_labels=False)
    family = detect_family(model)
    assert family.visual_feature_output == "placeholder_embeds"
    embeds = _language_inputs_embeds(model, batch)
    ids = batch["input_ids"]
    expected = [embeds[i][ids[i] == family.image_token_id] for i in range(ids.shape[0])]
    assert expected[0].shape[0] != expected[1].shape[0], "the twin's samples should differ in visual tokens"

    wrapped = peft.get_peft_model(model, vlpeft.RoutedLoraConfig(routing="matmul", pooling="none"))
    context = find_visual_contexts(wrapped)[0]
    with torch.no_grad():
        wrapped.get_base_model()(**batch)  # outside a PeftModel scope the latest features stay readable
    width = embeds.shape[-1]
    x_r, mask = context.visual_input(family.visual_feature_module, "none", 2, requester="test", width=width)
    assert mask is not None and mask.sum(dim=1).tolist() == [e.shape[0] for e in expected]
    for i, rows in enumerate(expected):
        torch.testing.assert_close(x_r[i, : rows.shape[0]], rows)
        assert bool((x_r[i, rows.shape[0]:] == 0).all())
    mean, _ = context.visual_input(family.visual_feature_module, "mean", 2, requester="test", width=width)
    torch.testing.assert_close(mean[:, 0], torch.stack([rows.mean(dim=0) for rows in expected]))
    cls, _ = context.visual_input(family.visual_feature_module, "cls", 2, requester="test", width=width)
    torch.testing.assert_close(cls[:, 0], torch.stack([rows[0] for rows in expected]))


@pytest.mark.parametrize("routing,pooling", [("matmul", "none"), ("mul", "mean"), ("matmul_expand", "cls")])
@pytest.mark.parametrize("twin_name", ["qwen2_vl", "idefics3", "llava_next", "gemma3"])
def test_routed_output_of_a_sample_does_not_depend_on_the_other_samples_images(
    twin_name: str, routing: str, pooling: str
) -> None:
    """Sample 0 gives the same logits alone and next to a sample with other numbers and sizes of images: each
    sample routes with its own visual features. (Not Mllama: its base model already depends on the batch's
    padding images, whose keys masked text rows attend to in transformers 5.25.)"""
    twin = build_twin(twin_name)
    config = vlpeft.RoutedLoraConfig(routing=routing, pooling=pooling, init_lora_weights=False)
    wrapped = peft.get_peft_model(twin.model.eval(), config)
    samples = twin.samples((1, 2))
    together = twin.batch(samples, with_labels=False)
    alone = twin.batch(samples[:1], with_labels=False)
    with torch.no_grad():
        joint = wrapped(**together).logits
        single = wrapped(**alone).logits
        with wrapped.disable_adapter():
            base = wrapped(**alone).logits
    n = int(alone["attention_mask"][0].sum())
    assert not torch.allclose(single[0, :n], base[0, :n], atol=1e-4), "the routed adapter has no effect"
    torch.testing.assert_close(joint[0, :n], single[0, :n], rtol=1e-4, atol=1e-4)


def test_mllama_x_r_is_the_cross_attention_states_of_real_tiles() -> None:
    twin = build_twin("mllama")
    model = twin.model.eval()
    batch = twin.batch(twin.samples((1, 2)), with_labels=False)
    family = detect_family(model)
    assert family.visual_feature_output == "cross_attention_states"
    wrapped = peft.get_peft_model(model, vlpeft.RoutedLoraConfig(routing="matmul", pooling="none"))
    context = find_visual_contexts(wrapped)[0]
    with torch.no_grad():
        wrapped.get_base_model()(**batch)
    width = model.config.text_config.hidden_size
    x_r, mask = context.visual_input(family.visual_feature_module, "none", 2, requester="test", width=width)
    # Real tiles: the aspect-ratio mask of real images (ids > 0), expanded over each tile's patches.
    tiles = batch["aspect_ratio_mask"].bool() & (batch["aspect_ratio_ids"] > 0).unsqueeze(-1)
    patches = x_r.shape[1] // tiles[0].numel()
    expected = tiles.reshape(2, -1).repeat_interleave(patches, dim=1)
    assert mask is not None and torch.equal(mask, expected)
    assert mask.sum(dim=1).tolist()[0] < mask.sum(dim=1).tolist()[1]
    assert bool((x_r[~mask] == 0).all())
