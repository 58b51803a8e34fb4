"""CLIP-BART's ``seq2seq`` sequence kind (VL-T5 / VL-Adapter's BART inputs), the pixel inputs of two-image items
(NLVR2's pair) and NLVR2 inference/metric helpers, on the tiny CLIP-BART and tiny processors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlpeft.metrics.nlvr2 import nlvr2_scores
from vlpeft.tasks.collators import NLVR2GenerativeCollator, VQAGenerativeCollator
from vlpeft.tasks.inference import _label_of
from vlpeft.tasks.layouts import layout_for
from vlpeft.tasks.losses import TokenObjective
from vlpeft.tasks.processors import build_tiny_processor
from vlpeft.tasks.sequence_encoder import SequenceEncoder, item_pixel_inputs, pixel_inputs
from vlpeft.testing import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, build_tiny_model

TEXTS = ["what colour is the square", "red", "blue", "green", "the left image has a red square"]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("clip_bart", seed=1)


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor("clip_bart", TEXTS, image_size=layout_for("clip_bart").tiny_image_size)


def _image(colour: str) -> Image.Image:
    return Image.new("RGB", (20, 30), colour)


def _ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tiny_processor_matches_the_tiny_model(tiny, processor):
    """The layout's tiny image size is the tiny model's (56: a 7 x 7 grid of 8-pixel patches, as ViT-B/32 at 224)."""
    assert layout_for("clip_bart").tiny_image_size == tiny.image_size == 56
    pixels = pixel_inputs(processor.image_processor, [_image("red")])["pixel_values"]
    assert pixels.shape == (1, 3, 56, 56)


def test_rows_are_the_encoder_prompt_and_the_bart_decoder_target(tiny, processor):
    encoder = SequenceEncoder(processor, "clip_bart", 16, tiny.model.config)
    batch = encoder.encode(["what colour is the square", "what colour"], ["red", "blue green"], None)
    start = tiny.model.config.decoder_start_token_id
    assert start == EOS_TOKEN_ID  # BART starts decoding from </s>
    question = _ids(processor, "what colour is the square")
    assert batch["input_ids"][0].tolist() == [BOS_TOKEN_ID, *question, EOS_TOKEN_ID]  # <s> prompt </s>
    short = [BOS_TOKEN_ID, *_ids(processor, "what colour"), EOS_TOKEN_ID]
    assert batch["input_ids"][1].tolist() == short + [PAD_TOKEN_ID] * (len(question) + 2 - len(short))
    assert batch["attention_mask"][1].tolist() == [1] * len(short) + [0] * (len(question) + 2 - len(short))
    red, blue_green = _ids(processor, "red"), _ids(processor, "blue green")
    # decoder: [start] <s> target </s>; labels: the same ids after [start] (next-token aligned, as causal rows)
    assert batch["decoder_input_ids"][0].tolist() == [start, BOS_TOKEN_ID, *red, EOS_TOKEN_ID, PAD_TOKEN_ID]
    assert batch["labels"][0].tolist() == [-100, BOS_TOKEN_ID, *red, EOS_TOKEN_ID, -100]
    assert batch["labels"][1].tolist() == [-100, BOS_TOKEN_ID, *blue_green, EOS_TOKEN_ID]
    assert batch["decoder_attention_mask"][0].tolist() == [1, 1, 1, 1, 0]
    # inference encodes the prompt exactly as training did; generate's output is decoded whole (no prompt echo)
    assert encoder.sequence.prompt_ids(["what colour"], 0) == [short]
    assert encoder.strip_prompt([start, BOS_TOKEN_ID, *red, EOS_TOKEN_ID], short) == [start, BOS_TOKEN_ID, *red,
                                                                                     EOS_TOKEN_ID]
    assert encoder.decode([start, BOS_TOKEN_ID, *red, EOS_TOKEN_ID]) == "red"
    assert not encoder.supports_ranking and encoder.num_truncated == 0


def test_truncation_keeps_the_end_token_and_counts_in_training_only(tiny, processor):
    encoder = SequenceEncoder(processor, "clip_bart", 4, tiny.model.config)
    batch = encoder.encode(["what colour is the square"], ["blue green red"], None)
    assert batch["input_ids"][0].tolist() == [BOS_TOKEN_ID, *_ids(processor, "what colour"), EOS_TOKEN_ID]
    assert batch["decoder_input_ids"][0].tolist()[1:] == [BOS_TOKEN_ID, *_ids(processor, "blue green"),
                                                          EOS_TOKEN_ID]
    assert encoder.num_truncated == 2
    assert encoder.sequence.prompt_ids(["what colour is the square"], 0) == [batch["input_ids"][0].tolist()]
    assert encoder.num_truncated == 2


def test_token_objective_on_these_rows_is_barts_own_loss(tiny, processor):
    """The objective (logits at t scored against label t + 1) on the collated rows equals BART's own mean token loss
    with VL-T5's labels ``<s> target </s>`` (which BART shifts right behind the decoder start)."""
    model = tiny.model.eval()
    collate = VQAGenerativeCollator(processor, "clip_bart", answer_weighting="most_common",
                                    prompt_template="vqa: {question}", model_config=model.config)
    items = [{"image": _image("red"), "question": "what colour is the square", "answers": ["red"] * 10},
             {"image": _image("blue"), "question": "what colour", "answers": ["blue green"] * 10}]
    batch = collate(items)
    assert batch["pixel_values"].shape == (2, 3, 56, 56)
    labels = batch.pop("labels")
    inputs = {k: v for k, v in batch.items() if not k.startswith("sequence_")}
    with torch.no_grad():
        ours = model(**inputs)
        objective = TokenObjective()
        loss = objective(ours, labels, {}, objective.count({"labels": labels}))
        bart = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     pixel_values=inputs["pixel_values"], labels=labels[:, 1:].contiguous()).loss
    torch.testing.assert_close(loss, bart)


def test_two_image_items_give_one_row_of_images_per_sample(processor):
    items = [{"images": [_image("red"), _image("blue")]}, {"images": [_image("green"), _image("red")]}]
    pixels = item_pixel_inputs(processor.image_processor, items)["pixel_values"]
    assert pixels.shape == (2, 2, 3, 56, 56)
    one = pixel_inputs(processor.image_processor, [_image("green")])["pixel_values"][0]
    torch.testing.assert_close(pixels[1, 0], one)  # sample 1, its left image
    repeated = item_pixel_inputs(processor.image_processor, items, [1, 1, 0])["pixel_values"]
    torch.testing.assert_close(repeated[2], pixels[0])
    with pytest.raises(ValueError, match="same number of images"):
        item_pixel_inputs(processor.image_processor, [items[0], {"images": [_image("red")]}])


def test_nlvr2_collator_feeds_both_images_and_the_label_word(tiny, processor):
    collate = NLVR2GenerativeCollator(processor, "clip_bart", prompt_template="nlvr: {sentence}",
                                      model_config=tiny.model.config)
    items = [{"images": [_image("red"), _image("blue")], "image": _image("red"), "sentence": "a red square",
              "label": "True", "identifier": "dev-1-0-0"},
             {"images": [_image("blue"), _image("red")], "image": _image("blue"), "sentence": "a red square",
              "label": "False", "identifier": "dev-1-1-0"}]
    batch = collate(items)
    assert batch["pixel_values"].shape == (2, 2, 3, 56, 56)
    words = [processor.tokenizer.decode([t for t in row.tolist() if t >= 0], skip_special_tokens=True)
             for row in batch["labels"]]
    assert words == ["true", "false"]  # the tiny tokenizer lower-cases
    assert batch["input_ids"][0].tolist()[1:3] == _ids(processor, "nlvr:")
    with pytest.raises(ValueError, match="label_words lacks"):
        NLVR2GenerativeCollator(processor, "clip_bart", label_words={"True": "yes"})


def test_generated_nlvr2_answers_map_to_labels_and_others_count_wrong():
    words = {"True": "True", "False": "False"}
    assert [_label_of(t, words) for t in ("true", " False.", "TRUE", "maybe")] == ["True", "False", "True", "maybe"]
    score = nlvr2_scores({"dev-1-0-0": "True", "dev-1-1-0": "maybe"}, {"dev-1-0-0": "True", "dev-1-1-0": "True"},
                         invalid="wrong")
    assert (score.accuracy, score.consistency, score.num_invalid) == (50.0, 0.0, 1)
    with pytest.raises(ValueError, match="'maybe' of example 'dev-1-1-0' is not True or False"):
        nlvr2_scores({"dev-1-0-0": "True", "dev-1-1-0": "maybe"}, {"dev-1-0-0": "True", "dev-1-1-0": "True"})
