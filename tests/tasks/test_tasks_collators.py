"""Collators on tiny models: every generative family, classification framing, masking, weights, truncation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlpeft.tasks import (
    AnswerVocab,
    CaptionDataset,
    CaptionGenerativeCollator,
    EntailmentClassificationCollator,
    EntailmentGenerativeCollator,
    VQAClassificationCollator,
    VQAGenerativeCollator,
    build_tiny_processor,
    split_model_inputs,
    weighted_sequence_loss,
)
from vlpeft.testing import build_tiny_model, tiny_images

FAMILIES = ["blip_caption", "git", "blip_vqa", "blip2", "llava", "paligemma", "vision_encoder_decoder", "vit_gpt2"]
IMAGES = tiny_images(3, size=40)
VQA_ITEMS = [
    {"image": IMAGES[0], "question_id": 1, "question": "What color is the box?",
     "answers": ["red"] * 6 + ["blue"] * 4, "answer_scores": {"red": 1.0, "blue": 1.0}},
    {"image": IMAGES[1], "question_id": 2, "question": "How many cats are there?",
     "answers": ["two"] * 10, "answer_scores": {"two": 1.0}},
]
SNLI_ITEMS = [
    {"image": IMAGES[0], "pair_id": "a", "hypothesis": "A box is red.", "label": "entailment"},
    {"image": IMAGES[1], "pair_id": "b", "hypothesis": "Cats sleep on a long green sofa.", "label": "neutral"},
    {"image": IMAGES[2], "pair_id": "c", "hypothesis": "Nothing.", "label": "contradiction"},
]
CAPTION_ITEMS = [
    {"image": IMAGES[0], "image_id": 1, "caption": "A red box on a table."},
    {"image": IMAGES[2], "image_id": 3, "caption": "Two cats."},
]
TEXTS = ["what color is the box", "how many cats are there", "red blue two", "a box is red",
         "cats sleep on a long green sofa", "nothing", "a red box on a table.", "two cats."]

_cache: dict[str, tuple] = {}


def tiny(family: str):
    if family not in _cache:
        _cache[family] = (build_tiny_model(family), build_tiny_processor(family, TEXTS))
    return _cache[family]


def _forward(tm, batch: dict) -> torch.Tensor:
    inputs, _ = split_model_inputs(batch)
    loss = tm.model(**inputs).loss
    assert loss is not None and torch.isfinite(loss)
    return loss


def _decode_labels(processor, labels_row: torch.Tensor) -> list[str]:
    ids = [int(i) for i in labels_row if i != -100]
    return processor.tokenizer.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_vqa_generative_every_family(family: str):
    tm, processor = tiny(family)
    batch = VQAGenerativeCollator(processor, family, model_config=tm.model.config)(VQA_ITEMS)
    # release weighting: one sequence per distinct answer, weight count / 10
    assert batch["sequence_weights"].tolist() == pytest.approx([0.4, 0.6, 1.0])  # blue, red, two
    assert batch["sequence_item_index"].tolist() == [0, 0, 1]
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][2])
    eos = "[EOS]"
    assert [_decode_labels(processor, row) for row in batch["labels"]] == [["blue", eos], ["red", eos], ["two", eos]]
    ids_key = "decoder_input_ids" if family in ("blip_vqa", "vision_encoder_decoder") else "input_ids"
    mask_key = "decoder_attention_mask" if ids_key == "decoder_input_ids" else "attention_mask"
    assert (batch["labels"][batch[mask_key] == 0] == -100).all()
    if tm.image_token_id is not None:
        assert ((batch["input_ids"] == tm.image_token_id).sum(dim=1) == tm.num_image_tokens).all()
    if family == "paligemma":
        assert torch.equal(batch["token_type_ids"].bool(), batch["labels"] != -100)
    _forward(tm, batch)


@pytest.mark.parametrize(
    "family", ["blip_caption", "blip2", "llava", "paligemma", "vision_encoder_decoder", "vit_gpt2"]
)
def test_entailment_and_caption_generative(family: str):
    tm, processor = tiny(family)
    batch = EntailmentGenerativeCollator(processor, family, model_config=tm.model.config)(SNLI_ITEMS)
    assert [_decode_labels(processor, r)[0] for r in batch["labels"]] == ["correct", "ambiguous", "incorrect"]
    assert "sequence_weights" not in batch
    _forward(tm, batch)
    batch = CaptionGenerativeCollator(processor, family, model_config=tm.model.config)(CAPTION_ITEMS)
    assert _decode_labels(processor, batch["labels"][1]) == ["two", "cats", ".", "[EOS]"]
    if family == "blip_caption":  # [bos] a picture of two cats . [eos]: the prompt is masked
        tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][1][:8].tolist())
        assert tokens == ["[BOS]", "a", "picture", "of", "two", "cats", ".", "[EOS]"]
        assert batch["labels"][1][:4].tolist() == [-100] * 4
    _forward(tm, batch)


def test_caption_collator_on_loaded_dataset(tmp_path: Path):
    folder = tmp_path / "val2014"
    folder.mkdir()
    for k, image in enumerate(IMAGES[:2]):
        image.save(folder / f"COCO_val2014_{k + 1:012d}.jpg")
    ann = {"images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"},
                      {"id": 2, "file_name": "COCO_val2014_000000000002.jpg"}],
           "annotations": [{"image_id": 1, "id": 1, "caption": "A red box."},
                           {"image_id": 2, "id": 2, "caption": "Two cats."},
                           {"image_id": 2, "id": 3, "caption": "Cats."}]}
    (tmp_path / "cap.json").write_text(json.dumps(ann))
    ds = CaptionDataset.from_coco(tmp_path / "cap.json", tmp_path)
    tm, processor = tiny("blip_caption")
    batch = CaptionGenerativeCollator(processor, "blip_caption", model_config=tm.model.config)([ds[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 3
    _forward(tm, batch)


def test_weighted_sequence_loss_matches_model_mean_loss_and_release_weights():
    tm, processor = tiny("blip_caption")
    batch = VQAGenerativeCollator(processor, "blip_caption", model_config=tm.model.config)(VQA_ITEMS)
    inputs, info = split_model_inputs(batch)
    out = tm.model(**inputs)
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    smoothing = tm.model.config.text_config.label_smoothing
    uniform = weighted_sequence_loss(out.logits, batch["labels"], torch.ones(3), n_tokens,
                                     label_smoothing=smoothing)
    assert uniform.item() == pytest.approx(out.loss.item(), rel=1e-5)
    weighted = weighted_sequence_loss(out.logits, batch["labels"], info["sequence_weights"], num_items=2)
    per_seq = [weighted_sequence_loss(out.logits[i:i + 1], batch["labels"][i:i + 1], torch.ones(1), 1)
               for i in range(3)]
    expected = (0.4 * per_seq[0] + 0.6 * per_seq[1] + 1.0 * per_seq[2]) / 2
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)


def test_answer_weighting_modes_and_missing_answers():
    tm, processor = tiny("blip_caption")
    scores = VQAGenerativeCollator(processor, "blip_caption", answer_weighting="scores")(VQA_ITEMS)
    assert scores["sequence_weights"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    top = VQAGenerativeCollator(processor, "blip_caption", answer_weighting="most_common")(VQA_ITEMS)
    assert [_decode_labels(processor, r)[0] for r in top["labels"]] == ["red", "two"]
    label_only = [{**VQA_ITEMS[0], "answers": [], "answer_scores": {"red": 0.9, "blue": 0.3}}]
    weights = VQAGenerativeCollator(processor, "blip_caption")(label_only)["sequence_weights"]
    assert weights.tolist() == pytest.approx([0.25, 0.75])  # score / sum(scores), sorted answers
    with pytest.raises(ValueError, match="question 7 has no answers"):
        VQAGenerativeCollator(processor, "blip_caption")([{**VQA_ITEMS[0], "question_id": 7, "answers": [],
                                                            "answer_scores": {}}])


def test_truncation_keeps_target_and_counts():
    tm, processor = tiny("llava")
    collator = EntailmentGenerativeCollator(processor, "llava", max_length=14, model_config=tm.model.config)
    batch = collator(SNLI_ITEMS)
    text_tokens = ((batch["input_ids"] != tm.image_token_id) & (batch["attention_mask"] == 1)).sum(dim=1)
    assert (text_tokens <= 14).all() and text_tokens.tolist()[2] == 13
    assert collator.num_truncated == 2  # the two longer hypotheses
    assert [_decode_labels(processor, r)[0] for r in batch["labels"]] == ["correct", "ambiguous", "incorrect"]
    _forward(tm, batch)
    with pytest.raises(ValueError, match="too small"):
        EntailmentGenerativeCollator(processor, "llava", max_length=4)(SNLI_ITEMS)


def test_collator_argument_errors():
    tm, processor = tiny("blip_caption")
    with pytest.raises(ValueError, match="unknown generative family"):
        VQAGenerativeCollator(processor, "blip3")
    with pytest.raises(ValueError, match="label_words lacks"):
        EntailmentGenerativeCollator(processor, "blip_caption", label_words={"entailment": "Yes"})
    with pytest.raises(ValueError, match="empty batch"):
        CaptionGenerativeCollator(processor, "blip_caption")([])
    with pytest.raises(ValueError, match="'pairs' view"):
        CaptionGenerativeCollator(processor, "blip_caption")([{"image": IMAGES[0], "image_id": 1,
                                                               "references": ["x"]}])
    with pytest.raises(TypeError, match="tokenizer"):
        VQAGenerativeCollator(object(), "blip_caption")


@pytest.mark.parametrize("family", ["vit_bert", "vit_roberta"])
def test_classification_collators_on_the_composite(family: str):
    processor = build_tiny_processor(family, TEXTS)
    vocab = AnswerVocab(["red", "two", "blue", "green"])
    collator = VQAClassificationCollator(processor, vocab)
    batch = collator(VQA_ITEMS)
    assert batch["labels"].shape == (2, 4) and batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    assert batch["input_ids"][:, 0].tolist() == [1, 1] and batch["pixel_values"].shape == (2, 3, 32, 32)
    assert (batch["input_ids"] < 99).all()
    vqa_model = build_tiny_model(family, num_labels=4, problem_type="multi_label").model
    assert torch.isfinite(vqa_model(**batch).loss)
    short = VQAClassificationCollator(processor, vocab, max_length=5)
    assert short(VQA_ITEMS)["input_ids"].shape[1] == 5 and short.num_truncated == 2

    ent = EntailmentClassificationCollator(processor)(SNLI_ITEMS)
    assert ent["labels"].tolist() == [0, 1, 2] and ent["labels"].dtype == torch.long
    ve_model = build_tiny_model(family, num_labels=3, problem_type="single_label").model
    assert torch.isfinite(ve_model(**ent).loss)
    with pytest.raises(ValueError, match="label '-'"):
        EntailmentClassificationCollator(processor)([{**SNLI_ITEMS[0], "label": "-"}])


def test_tiny_processor_vocab_fits_and_special_ids():
    processor = build_tiny_processor("blip_caption", TEXTS + [f"word{i}" for i in range(500)], vocab_size=40)
    tok = processor.tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<image>")) == (0, 1, 2, 3)
    ids = tok(" ".join(f"word{i}" for i in range(500)))["input_ids"]
    assert max(ids) < 40 and 4 in ids  # rare words become [UNK]
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_processor("blip3", TEXTS)
