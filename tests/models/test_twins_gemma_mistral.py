"""Tiny twins of Gemma 3 and Mistral 3: valid inputs, training step, generation, image dependence, structure."""

from __future__ import annotations

import _twin_checks as checks
import torch

from vlpeft.testing.twins import Twin, build_twin

NAMES = ("gemma3", "mistral3")

twin = checks.twin_fixture(NAMES)


def test_batch_gives_finite_loss_and_embedding_gradient(twin: Twin) -> None:
    batch = twin.batch(twin.samples((1, 2)))
    assert (batch["labels"] != -100).any(dim=1).all()
    checks.check_loss_and_embedding_gradient(twin, batch)


def test_placeholder_counts_follow_the_images(twin: Twin) -> None:
    one, two = checks.image_token_counts(twin, twin.batch(twin.samples((1, 2))))
    assert two > one
    if twin.spec.name == "gemma3":  # a fixed mm_tokens_per_image per image, whatever its size
        assert (one, two) == (4, 8)


def test_generate_with_and_without_cache_agree(twin: Twin) -> None:
    checks.check_generation_with_and_without_cache(twin, twin.generation_batch(twin.samples((1, 2))))


def test_outputs_depend_on_the_images(twin: Twin) -> None:
    checks.check_outputs_depend_on_flipped_images(twin)


def test_chat_format(twin: Twin) -> None:
    sample = twin.samples((1,))[0]
    text = twin.processor.apply_chat_template(sample.messages(), tokenize=False)
    if twin.spec.name == "gemma3":
        assert text.startswith("<bos><start_of_turn>user\n<start_of_image>")
        assert "<start_of_turn>model\n" in text and "assistant" not in text
    else:
        assert text == f"<s>[INST][IMG]{sample.prompt}[/INST]{sample.answer}</s>"
    tokens = twin.tokenizer.convert_ids_to_tokens(twin.tokenizer(text)["input_ids"])
    assert twin.tokenizer.unk_token not in tokens


def test_gemma3_sliding_window_and_bidirectional_image_attention() -> None:
    twin = build_twin("gemma3")
    twin.model.eval()
    twin.model.set_attn_implementation("eager")
    config = twin.model.config.text_config
    window = config.sliding_window
    batch = twin.batch(twin.samples((1, 2)), with_labels=False)
    length = batch["input_ids"].shape[1]
    assert length > 2 * window
    with torch.no_grad():
        attentions = twin.model(**batch, output_attentions=True).attentions
    assert len(attentions) == len(config.layer_types) == 2
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}

    q = torch.arange(length).view(-1, 1)
    k = torch.arange(length).view(1, -1)
    valid = batch["attention_mask"].bool()
    pairs = valid[:, :, None] & valid[:, None, :]  # (batch, query, key) both real tokens
    far = (q - k >= window) & pairs
    image = batch["token_type_ids"] == 1
    runs = torch.cumsum(image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1], dim=1)
    same_image = image[:, :, None] & image[:, None, :] & (runs[:, :, None] == runs[:, None, :])
    future = (k > q) & pairs
    for layer_type, weights in zip(config.layer_types, attentions, strict=True):
        attends = weights.abs().amax(dim=1) > 0  # (batch, query, key), any head
        if layer_type == "sliding_attention":
            assert not attends[far].any()
        else:
            assert attends[far].all()
        # an image's soft tokens see each other both ways; every other future key stays masked
        assert attends[future & same_image].all()
        assert not attends[future & ~same_image].any()
        assert (future & same_image).any()


def test_mistral3_image_size_sets_the_placeholder_grid() -> None:
    twin = build_twin("mistral3")
    samples = twin.samples((1, 1))
    sizes = [s.images[0].size for s in samples]
    assert sizes[0] != sizes[1]
    batch = twin.batch(samples)
    counts = checks.image_token_counts(twin, batch)
    assert counts[0] != counts[1]
    # one [IMG] per merged 2x2 patch group, rows closed by [IMG_BREAK], the last by [IMG_END]
    step = twin.processor.patch_size * twin.processor.spatial_merge_size
    rows, cols = (batch["image_sizes"] // step).unbind(dim=1)
    assert counts == (rows * cols).tolist()
    tokenizer = twin.tokenizer
    for i, ids in enumerate(batch["input_ids"].tolist()):
        assert ids.count(tokenizer.convert_tokens_to_ids("[IMG_BREAK]")) == rows[i] - 1
        assert ids.count(tokenizer.convert_tokens_to_ids("[IMG_END]")) == 1
    features = twin.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    assert [f.shape[0] for f in features] == counts
