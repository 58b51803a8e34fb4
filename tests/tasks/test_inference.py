"""Inference shares the training layout: exact ranking equals the brute-force best training loss, and batched
generation equals one-by-one generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlpeft.tasks.collators import CaptionGenerativeCollator, VQAGenerativeCollator
from vlpeft.tasks.inference import predict_captions, rank_candidates
from vlpeft.tasks.processors import build_tiny_processor
from vlpeft.testing import build_tiny_model, tiny_images

CANDIDATES = ["red", "green", "blue", "a yellow square", "no", "two red things"]
FAMILIES = ["blip_caption", "llava", "vit_gpt2", "paligemma", "blip2"]


def _setup(family: str):
    tiny = build_tiny_model(family, seed=3)
    processor = build_tiny_processor(family, ["what colour is it", *CANDIDATES, "a square that is red"])
    return tiny.model.eval(), processor


def _items(n: int):
    return [{"image": image, "question": "what colour is it?", "answers": ["red"] * 10, "question_id": i,
             "image_id": i} for i, image in enumerate(tiny_images(n, size=32, seed=5))]


def _training_losses(model, collator, item, candidates) -> torch.Tensor:
    """Summed target-token CE of each candidate, computed from the training collator's batch."""
    items = [{**item, "answers": [c] * 10} for c in candidates]
    batch = collator(items)
    batch.pop("sequence_weights"), batch.pop("sequence_item_index")
    labels = batch.pop("labels")
    logits = model(**batch).logits
    extra = logits.shape[1] - labels.shape[1]
    labels = torch.cat([labels.new_full((labels.shape[0], extra), -100), labels], 1)
    token = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=-100, reduction="none")
    return token.sum(1)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_exact_ranking_equals_brute_force_best_training_loss(family):
    model, processor = _setup(family)
    collator = VQAGenerativeCollator(processor, family, max_length=32, model_config=model.config)
    encoder = collator.encoder
    items = _items(3)
    extra, prompts = encoder.encode_prompts(items, [it["question"] for it in items])
    candidates = [encoder.encode_target(c) for c in CANDIDATES]
    picks = rank_candidates(model, encoder, extra, prompts, candidates, top_k=len(candidates))
    for item, pick in zip(items, picks):
        losses = _training_losses(model, collator, item, CANDIDATES)
        assert pick == int(losses.argmin()), (family, losses)
    # top_k = 1 keeps the candidate whose first token is most likely
    first = rank_candidates(model, encoder, extra, prompts, candidates, top_k=1)
    assert len(first) == len(items) and all(0 <= p < len(candidates) for p in first)


@pytest.mark.parametrize("family", ["blip_caption", "vit_gpt2", "llava"])
def test_batched_generation_equals_one_by_one(family):
    model, processor = _setup(family)
    collator = CaptionGenerativeCollator(processor, family, max_length=16, model_config=model.config,
                                         prompt="" if family == "vit_gpt2" else "a picture of")
    items = _items(4)
    prompt = collator.prompt
    batched = predict_captions(model, items, encoder=collator.encoder, prompt=prompt, batch_size=4, max_new_tokens=5)
    single = predict_captions(model, items, encoder=collator.encoder, prompt=prompt, batch_size=1, max_new_tokens=5)
    assert batched == single
    assert [r["image_id"] for r in batched] == [0, 1, 2, 3]
    assert len({r["caption"] for r in batched}) > 1  # outputs depend on the image


def test_ranking_rejects_encoder_decoder_layouts():
    tiny = build_tiny_model("blip_vqa", seed=0)
    processor = build_tiny_processor("blip_vqa", CANDIDATES)
    encoder = VQAGenerativeCollator(processor, "blip_vqa", model_config=tiny.model.config).encoder
    items = _items(1)
    extra, prompts = encoder.encode_prompts(items, ["what colour is it?"])
    with pytest.raises(ValueError, match="cannot score candidates"):
        rank_candidates(tiny.model, encoder, extra, prompts, [encoder.encode_target("red")])
