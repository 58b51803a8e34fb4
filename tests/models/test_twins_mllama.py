"""The Llama 3.2 Vision twin: real Mllama classes at tiny size, inputs through the real processor."""

from __future__ import annotations

import _twin_checks as checks
import pytest
import torch
from transformers.models.mllama.modeling_mllama import (
    MllamaCrossAttentionDecoderLayer,
    MllamaSelfAttentionDecoderLayer,
)
from vlpeft.testing.twins.mllama import CROSS_ATTENTION_LAYERS

from vlpeft.testing.twins import Twin, build_twin


@pytest.fixture(scope="module")
def twin() -> Twin:
    return build_twin("mllama")


def _image_token_id(twin: Twin) -> int:
    return twin.model.config.image_token_id


def _other_pixels(pixel_values: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return pixel_values + torch.randn(pixel_values.shape, generator=generator)


def test_loss_and_embedding_gradient(twin: Twin) -> None:
    batch = twin.batch(twin.samples((1, 2)))
    assert batch["pixel_values"].shape[:3] == (2, 2, 4)  # (batch, images, tiles)
    checks.check_loss_and_embedding_gradient(twin, batch)
    twin.model.zero_grad()


def test_images_and_tiles_per_sample(twin: Twin) -> None:
    batch = twin.batch(twin.samples((1, 2)))
    # one <|image|> token per image, whatever its size: 1 and 2
    counts = (batch["input_ids"] == _image_token_id(twin)).sum(dim=1)
    assert counts.tolist() == [1, 2]
    # the images of 16x16, 32x16 and 32x32 are cut into 1, 2 (1x2) and 4 (2x2) tiles of 16x16
    tiles = batch["cross_attention_mask"].amax(dim=1).sum(dim=-1)
    assert tiles.tolist() == [[1, 0], [2, 4]]
    assert batch["aspect_ratio_ids"].tolist() == [[1, 0], [2, 6]]  # 0: no image; (1, 2) and (2, 2) of the 8 ratios
    assert batch["aspect_ratio_mask"].sum(dim=-1).tolist() == [[1, 1], [2, 4]]  # padding images keep tile 0 set


def test_generate_with_and_without_cache(twin: Twin) -> None:
    samples = twin.samples((1, 2))
    inputs = twin.generation_batch(samples)
    assert (inputs["attention_mask"][:, 0] == 0).any()  # left-padded: the prompts differ in length
    checks.check_generation_with_and_without_cache(twin, inputs)


def test_logits_depend_on_the_images(twin: Twin) -> None:
    batch = twin.batch(twin.samples((1, 2)), with_labels=False)
    logits, other = checks.logits_with_other_pixels(twin, batch, _other_pixels)
    last = batch["attention_mask"].sum(dim=1) - 1
    rows = torch.arange(2)
    assert not torch.allclose(logits[rows, last], other[rows, last])


def test_cross_attention_layers_see_the_image_and_only_they_do(twin: Twin) -> None:
    language_model = twin.model.model.language_model
    assert list(twin.model.config.text_config.cross_attention_layers) == list(CROSS_ATTENTION_LAYERS) == [1]
    for index, layer in enumerate(language_model.layers):
        expected = MllamaCrossAttentionDecoderLayer if index in CROSS_ATTENTION_LAYERS else MllamaSelfAttentionDecoderLayer
        assert type(layer) is expected
        assert hasattr(layer, "cross_attn") == (index in CROSS_ATTENTION_LAYERS)

    batch = twin.batch(twin.samples((1, 2)), with_labels=False)
    seq_len = batch["input_ids"].shape[1]
    records: dict[str, list[torch.Tensor]] = {}

    def keep(name: str):
        def hook(module, args, output):
            records.setdefault(name, []).append((args[0] if name.endswith("k_in") else output).detach())
        return hook

    handles = [twin.model.model.multi_modal_projector.register_forward_hook(keep("projector"))]
    for index, layer in enumerate(language_model.layers):
        handles.append(layer.register_forward_hook(keep(f"layer{index}")))
        attention = layer.cross_attn if index in CROSS_ATTENTION_LAYERS else layer.self_attn
        handles.append(attention.k_proj.register_forward_hook(keep(f"layer{index}.k_in")))
    try:
        with torch.no_grad():
            twin.model(**batch)
            twin.model(**dict(batch, pixel_values=_other_pixels(batch["pixel_values"])))
    finally:
        for handle in handles:
            handle.remove()

    # The cross-attention layer's keys are the projected image features: (batch * images * tiles, patches, hidden)
    projected = records["projector"][0]
    batch_size, images, tiles, patches, hidden = projected.shape
    assert (batch_size, images, tiles) == (2, 2, 4)
    assert torch.equal(records["layer1.k_in"][0], projected.reshape(-1, patches, hidden))
    # ... while the self-attention layers attend over the text only.
    for index in (0, 2):
        assert records[f"layer{index}.k_in"][0].shape == (2, seq_len, hidden)
    # New pixels, same text: the layer before the cross-attention layer is unchanged, the cross-attention layer is not.
    assert torch.equal(records["layer0"][0], records["layer0"][1])
    assert not torch.allclose(records["layer1"][0], records["layer1"][1])


def test_cross_attention_mask_from_the_processor(twin: Twin) -> None:
    batch = twin.batch(twin.samples((1, 2)), with_labels=False)
    mask = batch["cross_attention_mask"]  # (batch, text, images, tiles)
    image_positions = [torch.nonzero(ids == _image_token_id(twin)).flatten().tolist() for ids in batch["input_ids"]]
    tiles = [[1], [2, 4]]
    for sample, positions in enumerate(image_positions):
        first = positions[0]
        assert first > 0 and not mask[sample, :first].any()  # text before the first <|image|> sees no image
        for image, position in enumerate(positions):
            # consecutive <|image|> tokens: each image is seen from its own token to the end of the sequence
            seen = mask[sample, :, image].sum(dim=-1)
            assert (seen[position:] == tiles[sample][image]).all() and not seen[:position].any()
    assert not mask[0, :, 1].any()  # the first sample's padding image

    # The model applies the mask: rows that see an image give no weight to padding images or padding tiles.
    implementation = twin.model.config._attn_implementation
    twin.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = twin.model(**batch, output_attentions=True).attentions
    finally:
        twin.model.set_attn_implementation(implementation)
    weights = attentions[CROSS_ATTENTION_LAYERS[0]]  # (batch, heads, text, images * tiles * patches)
    patches = weights.shape[-1] // (2 * 4)
    allowed = mask.repeat_interleave(patches, dim=3).flatten(2).bool()  # (batch, text, images * tiles * patches)
    seeing = allowed.any(dim=-1)
    masked_weight = weights.masked_fill(allowed.unsqueeze(1), 0.0).sum(dim=-1)
    assert torch.all(masked_weight.transpose(1, 2)[seeing] < 1e-6)
