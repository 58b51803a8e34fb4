"""Tiny twins of the Idefics3 family: Idefics3 and SmolVLM (image splitting, pixel shuffle, chat format)."""

from __future__ import annotations

import _twin_checks as checks
import torch
from vlpeft.testing.twins.base import Sample

from vlpeft.testing.twins import Twin, tiny_image
from vlpeft.testing.twins import idefics3 as idefics3_twin
from vlpeft.testing.twins import smolvlm as smolvlm_twin

MODULES = {"idefics3": idefics3_twin, "smolvlm": smolvlm_twin}
BOS = {"idefics3": "<|begin_of_text|>", "smolvlm": "<|im_start|>"}

twin = checks.twin_fixture(sorted(MODULES), scope="module")


def test_batch_of_one_and_two_images_trains(twin: Twin) -> None:
    batch = twin.batch(twin.samples((1, 2)))
    checks.check_loss_and_embedding_gradient(twin, batch)
    assert (batch["labels"] != -100).any()


def test_image_tokens_differ_with_image_count_and_size(twin: Twin) -> None:
    one, two = checks.image_token_counts(twin, twin.batch(twin.samples((1, 2))))
    assert one < two
    small, large = checks.image_token_counts(twin, twin.batch(twin.samples((1, 1))))
    assert small < large


def test_generation_with_and_without_cache(twin: Twin) -> None:
    # A random twin may emit the image placeholder; without the cache its pixels are passed again at every step and
    # the extra placeholder has no features. Real checkpoints do not generate it.
    checks.check_generation_with_and_without_cache(twin, twin.generation_batch(twin.samples((1, 2))),
                                                   suppress_tokens=[twin.model.config.image_token_id])


def test_outputs_depend_on_images(twin: Twin) -> None:
    twin.model.eval()
    batch = twin.batch(twin.samples((1, 2)), with_labels=False)
    # Negating keeps the all-zero padding images (which the model drops) all-zero.
    logits, changed = checks.logits_with_other_pixels(twin, batch, torch.neg)
    assert not torch.allclose(logits, changed)


def test_tiles_plus_global_image_and_pixel_layout(twin: Twin) -> None:
    module = MODULES[twin.spec.name]
    tile, per_tile = module.TILE, module.IMAGE_TOKENS_PER_TILE
    tokenizer = twin.tokenizer
    small = Sample((tiny_image(tile, tile, 1),), "what is this ?", "a square")
    large = Sample((tiny_image(2 * tile, 2 * tile, 2),), "what is this ?", "a square")
    batch = twin.batch([small, large])
    ids = batch["input_ids"]

    # A tile-sized image is only the global image; a 2x2-tile image is 4 tiles plus the global image.
    assert checks.image_token_counts(twin, batch) == [per_tile, 5 * per_tile]
    row_col = tokenizer.convert_tokens_to_ids([f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)])
    fake, global_img = tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<global-img>"])
    for i, tiles in enumerate((0, 4)):
        sample = ids[i].tolist()
        assert sample.count(global_img) == 1
        assert sum(sample.count(t) for t in row_col) == tiles
        assert sample.count(fake) == tiles + 2

    # (batch, images, 3, H, W) with one frame per tile plus the global one; padding frames are zero and masked.
    pixels, mask = batch["pixel_values"], batch["pixel_attention_mask"]
    assert pixels.shape == (2, 5, 3, tile, tile)
    assert mask.shape == (2, 5, tile, tile)
    assert mask[0, 0].all() and not mask[0, 1:].any() and mask[1].all()
    assert (pixels[0, 1:] == 0).all()

    # The pixel-shuffle connector turns (tile / patch)^2 patches into per_tile tokens of scale^2 x the width.
    config = twin.model.config
    patches = (tile // config.vision_config.patch_size) ** 2
    assert per_tile == patches // config.scale_factor**2 < patches
    projection = twin.model.model.connector.modality_projection.proj
    assert projection.in_features == config.vision_config.hidden_size * config.scale_factor**2
    with torch.no_grad():
        features = twin.model.model.get_image_features(pixels, mask).pooler_output
    assert [f.shape for f in features] == [(per_tile, config.text_config.hidden_size),
                                           (5 * per_tile, config.text_config.hidden_size)]

    # The tokens the processor writes are special tokens of the tokenizer, at small ids.
    written = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", "<row_6_col_6>"]
    decoder = tokenizer.added_tokens_decoder
    for token in written:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id < 64 and decoder[token_id].content == token and decoder[token_id].special


def test_chat_format(twin: Twin) -> None:
    sample = twin.samples((1,))[0]
    render = twin.processor.apply_chat_template
    text = render(sample.messages(), tokenize=False)
    assert text.startswith(BOS[twin.spec.name] + "User:<image>")
    assert "<end_of_utterance>\nAssistant: " in text and text.endswith("<end_of_utterance>\n")
    prompt = render(sample.messages(with_answer=False), tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<end_of_utterance>\nAssistant:")
    encoded = twin.tokenizer.apply_chat_template(
        [{"role": "user", "content": "what is this ?"}, {"role": "assistant", "content": "a red circle"}],
        tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )
    answer = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert twin.tokenizer.convert_ids_to_tokens(answer) == ["a", "red", "circle", "<end_of_utterance>"]
    assert twin.tokenizer.eos_token == "<end_of_utterance>"
