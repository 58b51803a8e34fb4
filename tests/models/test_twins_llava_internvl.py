"""Tiny twins of LLaVA-NeXT, LLaVA-OneVision and InternVL: valid inputs, training step, generation, image dependence,
tiles, and placeholder counts equal to the model's image features per sample."""

from __future__ import annotations

import _twin_checks as checks
import torch
from PIL import Image

from vlpeft.testing.twins import Sample, Twin, build_twin, tiny_image

NAMES = ("llava_next", "llava_onevision", "internvl")
#: (small, large) single images per twin, (width, height): the large one is cut into more tiles.
SMALL_LARGE = {
    "llava_next": ((16, 16), (32, 32)),
    "llava_onevision": ((16, 16), (48, 48)),
    "internvl": ((16, 16), (32, 32)),
}

twin = checks.twin_fixture(NAMES)


def _tiles(twin: Twin, image: Image.Image) -> int:
    """How many tiles (crops plus base view / thumbnail) the image processor makes of one image on its own."""
    processed = twin.processor.image_processor([image])
    if twin.spec.name == "internvl":
        return int(processed["num_patches"][0])
    return int(processed["pixel_values"][0].shape[0])


def _feature_counts(twin: Twin, batch: dict[str, torch.Tensor], samples: list[Sample]) -> list[int]:
    """Per sample, how many feature vectors ``model.model.get_image_features`` gives for its images."""
    model = twin.model.model
    per_sample = [len(s.images) for s in samples]
    with torch.no_grad():
        if twin.spec.name == "internvl":
            # pixel_values holds every tile of the batch in order; split it by the tiles of each sample's images.
            tiles = [sum(twin.processor.image_processor(list(s.images))["num_patches"]) for s in samples]
            assert sum(tiles) == batch["pixel_values"].shape[0]
            counts = []
            for chunk in torch.split(batch["pixel_values"], tiles):
                features = model.get_image_features(pixel_values=chunk).pooler_output
                counts.append(features.shape[0] * features.shape[1])
            return counts
        extra = {"batch_num_images": batch["batch_num_images"]} if "batch_num_images" in batch else {}
        features = model.get_image_features(batch["pixel_values"], batch["image_sizes"], **extra).pooler_output
    lengths = [f.shape[0] for f in features]
    assert len(lengths) == sum(per_sample)
    bounds = torch.tensor([0, *per_sample]).cumsum(0).tolist()
    return [sum(lengths[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def test_batch_gives_finite_loss_and_embedding_gradient(twin: Twin) -> None:
    batch = twin.batch(twin.samples((1, 2)))
    assert (batch["labels"] != -100).any(dim=1).all()
    # right padding: each row's labels end where its attention mask ends
    last = batch["attention_mask"].sum(dim=1) - 1
    assert (batch["labels"].gather(1, last[:, None]) != -100).all()
    checks.check_loss_and_embedding_gradient(twin, batch)


def test_grouped_query_attention(twin: Twin) -> None:
    config = twin.model.config.text_config
    assert config.num_attention_heads == 2 * config.num_key_value_heads
    attention = twin.model.model.language_model.layers[0].self_attn
    assert attention.k_proj.out_features * 2 == attention.q_proj.out_features


def test_placeholder_counts_follow_the_images(twin: Twin) -> None:
    one, two = checks.image_token_counts(twin, twin.batch(twin.samples((1, 2))))
    assert one != two
    small, large = (tiny_image(w, h, seed=i) for i, (w, h) in enumerate(SMALL_LARGE[twin.spec.name]))
    assert _tiles(twin, large) > _tiles(twin, small)
    samples = [Sample((small,), "what is this ?", "a square"), Sample((large,), "what is this ?", "a square")]
    few, many = checks.image_token_counts(twin, twin.batch(samples))
    assert many > few


def test_generate_with_and_without_cache_agree(twin: Twin) -> None:
    inputs = twin.generation_batch(twin.samples((1, 2)))
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padding
    checks.check_generation_with_and_without_cache(twin, inputs)


def test_outputs_depend_on_the_images(twin: Twin) -> None:
    checks.check_outputs_depend_on_flipped_images(twin)


def test_placeholder_counts_equal_image_features_per_sample(twin: Twin) -> None:
    for counts in ((1, 2), (2, 1)):
        samples = twin.samples(counts)
        batch = twin.batch(samples, with_labels=False)
        assert checks.image_token_counts(twin, batch) == _feature_counts(twin, batch, samples)


def test_chat_format(twin: Twin) -> None:
    sample = twin.samples((1,))[0]
    text = twin.processor.apply_chat_template(sample.messages(), tokenize=False)
    if twin.spec.name == "llava_next":
        assert text == f"<s>[INST] <image>\n{sample.prompt} [/INST] {sample.answer}</s>"
    else:
        image = "<image>" if twin.spec.name == "llava_onevision" else "<IMG_CONTEXT>"
        assert text.startswith(f"<|im_start|>user\n{image}\n{sample.prompt}<|im_end|>\n<|im_start|>assistant\n")
    tokens = twin.tokenizer.convert_ids_to_tokens(twin.tokenizer(text)["input_ids"])
    assert twin.tokenizer.unk_token not in tokens
    for token in ("[INST]", "[/INST]", "<|im_start|>", "<|im_end|>"):
        if token in text:
            assert token in tokens


def test_llava_next_tiles_are_unpadded_with_a_newline_per_row() -> None:
    twin = build_twin("llava_next")
    image = tiny_image(16, 16, seed=0)  # square into a 1x2 pinpoint (2x4 patches): half of it is padding
    batch = twin.batch([Sample((image,), "what is this ?", "a square")], with_labels=False)
    # base view 2x2 + unpadded grid 2x2 + one newline for each of its 2 rows
    assert checks.image_token_counts(twin, batch) == [4 + 2 * 2 + 2]
    assert batch["pixel_values"].shape[1] == 3  # base view + 2 tiles


def test_llava_onevision_single_image_tiles_multi_image_one_view_each() -> None:
    twin = build_twin("llava_onevision")
    per_view = twin.processor.num_image_tokens + 1  # one view and its newline
    batch = twin.batch(twin.samples((1, 2)), with_labels=False)
    assert batch["batch_num_images"].tolist() == [1, 2]
    single, multi = checks.image_token_counts(twin, batch)
    assert multi == 2 * per_view
    # 48x48 alone: a 3x3 grid (6x6 features) shrunk below anyres_max_4 to 4x4, a newline per row, the base view
    assert single == 4 * 4 + 4 + per_view - 1


def test_internvl_tiles_framed_and_pixel_shuffled() -> None:
    twin = build_twin("internvl")
    samples = twin.samples((1, 2))
    batch = twin.batch(samples, with_labels=False)
    tokenizer = twin.tokenizer
    start, end = tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
    context = twin.model.config.image_token_id
    seq = twin.model.config.image_seq_length
    # each image is <img> + (its tiles x image_seq_length) <IMG_CONTEXT> + </img>
    tiles = [n for s in samples for n in twin.processor.image_processor(list(s.images))["num_patches"]]
    runs = []
    for row in batch["input_ids"].tolist():
        starts = [i for i, t in enumerate(row) if t == start]
        for i in starts:
            j = row.index(end, i)
            assert set(row[i + 1:j]) == {context}
            runs.append(j - i - 1)
    assert runs == [seq * n for n in tiles]
    # 16x16 patches per tile, 2x2 pixel-shuffled into 4 tokens of 4x the vision width
    vision = twin.model.config.vision_config
    patches = (vision.image_size[0] // vision.patch_size[0]) ** 2
    assert seq == patches // 4
    assert twin.model.model.multi_modal_projector.layer_norm.normalized_shape == (4 * vision.hidden_size,)
