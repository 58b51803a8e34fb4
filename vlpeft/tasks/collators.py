"""Collators: dataset items -> model inputs, per model family, using the model's processor.

Generative framing (one token sequence per training example, loss only on the target): each collator owns a
:class:`~vlpeft.tasks.sequence_encoder.SequenceEncoder`, which lays the (prompt, target) pairs out as the
family's :class:`~vlpeft.tasks.layouts.InputLayout` says (sequence kinds tabulated in :mod:`vlpeft.tasks.layouts`)
and is also the inference-side prompt encoder, so ranking and generation see the layout the model was trained on.

Padding is on the right, with ``attention_mask`` 0 and ``labels`` -100. ``max_length`` bounds the number of
*text* tokens of a sequence (image placeholder tokens are not counted): when a sequence is longer, tokens are
removed from the end of the prompt first, then from the end of the target (its end token is kept); every
truncated sequence is counted in ``collator.num_truncated``.

Discriminative framing: :class:`VQAClassificationCollator` (soft-score targets over an answer vocabulary) and
:class:`EntailmentClassificationCollator` (3-way label ids).

Images: items carry PIL images; ``processor.image_processor`` turns them into ``pixel_values``
(batch, 3, H, W), or (batch, 2, 3, H, W) for items with two images (``item["images"]``: NLVR2's pair).
Generative VQA repeats an item's image for each of its answer sequences.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from vlpeft.tasks.framing import (
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_ENTAILMENT_PROMPT,
    DEFAULT_LABEL_WORDS,
    DEFAULT_VQA_PROMPT,
    AnswerWeighting,
    TextExample,
    caption_examples,
    entailment_examples,
    format_prompt,
    vqa_examples,
)
from vlpeft.tasks.layouts import DEFAULT_LLAVA_TEMPLATE, families_where
from vlpeft.tasks.nlvr2 import DEFAULT_NLVR2_PROMPT, DEFAULT_NLVR2_WORDS, NLVR2_LABELS, nlvr2_examples
from vlpeft.tasks.sequence_encoder import (
    GENERATIVE_FAMILIES,
    SequenceEncoder,
    item_pixel_inputs,
    pixel_inputs,
    processor_parts,
)
from vlpeft.tasks.snli_ve import SNLI_VE_LABEL2ID, SNLI_VE_LABELS
from vlpeft.tasks.vqa import AnswerNormalizer, AnswerVocab, basic_answer_normalizer

__all__ = [
    "DECODER_ONLY_FAMILIES",
    "DEFAULT_LLAVA_TEMPLATE",
    "GENERATIVE_FAMILIES",
    "PREFIX_FAMILIES",
    "SEQUENCE_INFO_KEYS",
    "CaptionGenerativeCollator",
    "EntailmentClassificationCollator",
    "EntailmentGenerativeCollator",
    "NLVR2GenerativeCollator",
    "SequenceEncoder",
    "VQAClassificationCollator",
    "VQAGenerativeCollator",
    "pixel_inputs",
    "split_model_inputs",
]

#: Families whose text is one causal sequence (prompt then target in ``input_ids``): these support ranking by
#: sequence likelihood (derived from :mod:`vlpeft.tasks.layouts`).
DECODER_ONLY_FAMILIES: tuple[str, ...] = families_where(lambda layout: layout.ranks_candidates)
#: Families whose visual prefix precedes the text inside the model: the prefix's last position predicts the
#: first text token, so an empty prompt still trains (and scores) every target token.
PREFIX_FAMILIES: tuple[str, ...] = families_where(lambda layout: layout.prefix_predicts_first_token)
#: Keys of generative VQA batches that are not model inputs (pop them before ``model(**batch)``).
SEQUENCE_INFO_KEYS: tuple[str, ...] = ("sequence_weights", "sequence_item_index")


def split_model_inputs(batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_inputs, sequence_info)``: separate :data:`SEQUENCE_INFO_KEYS` from the model inputs."""
    model_inputs = {k: v for k, v in batch.items() if k not in SEQUENCE_INFO_KEYS}
    info = {k: v for k, v in batch.items() if k in SEQUENCE_INFO_KEYS}
    return model_inputs, info


class _GenerativeCollator(ABC):
    """Shared machinery: frame items into :class:`TextExample` s, encode, attach pixel values."""

    def __init__(self, processor: Any, family: str, max_length: int, model_config: Any,
                 llava_template: str | None) -> None:
        self.encoder = SequenceEncoder(processor, family, max_length, model_config, llava_template)

    @property
    def num_truncated(self) -> int:
        """Sequences truncated to ``max_length`` so far (exact count)."""
        return self.encoder.num_truncated

    @abstractmethod
    def examples(self, items: Sequence[Mapping[str, Any]]) -> list[TextExample]:
        """The training sequences of ``items`` (one or more per item)."""

    def _collate(self, items: Sequence[Mapping[str, Any]]) -> tuple[dict[str, torch.Tensor], list[TextExample]]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        examples = self.examples(items)
        index = [e.item_index for e in examples]
        pixels = item_pixel_inputs(self.encoder.image_processor, items, index)
        batch = self.encoder.encode([e.prompt for e in examples], [e.target for e in examples],
                                    pixels["pixel_values"])
        batch.update(pixels)
        return batch, examples

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return self._collate(items)[0]


class VQAGenerativeCollator(_GenerativeCollator):
    """VQA as text generation ("question + answer", loss on the answer).

    Output: the family's inputs for S >= batch sequences (see :class:`SequenceEncoder`), ``pixel_values``
    (S, 3, H, W) with each item's image repeated per answer, plus ``sequence_weights`` (S,) float and
    ``sequence_item_index`` (S,) long (the item each sequence came from); pop those two with
    :func:`split_model_inputs` before ``model(**inputs)`` and weight per-sequence losses with them
    (:func:`vlpeft.tasks.losses.weighted_sequence_loss`).

    Args:
        answer_weighting: ``"release"`` (one sequence per distinct answer, weight count/len(answers); the BLIP /
            p-adapter release), ``"scores"`` (weight = soft score) or ``"most_common"`` (one sequence, weight 1).
        prompt_template: format string with ``{question}``.
        max_length: text-token limit (default 40, p-adapter.md §5.2).
    """

    def __init__(self, processor: Any, family: str, *, max_length: int = 40, answer_weighting: AnswerWeighting =
                 "release", prompt_template: str = DEFAULT_VQA_PROMPT, answer_normalizer: AnswerNormalizer =
                 basic_answer_normalizer, model_config: Any = None,
                 llava_template: str | None = None) -> None:
        super().__init__(processor, family, max_length, model_config, llava_template)
        self.answer_weighting = answer_weighting
        self.prompt_template = prompt_template
        self.answer_normalizer = answer_normalizer
        format_prompt(prompt_template, question="")

    def examples(self, items: Sequence[Mapping[str, Any]]) -> list[TextExample]:
        return vqa_examples(items, self.prompt_template, self.answer_weighting, self.answer_normalizer)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch, examples = self._collate(items)
        batch["sequence_weights"] = torch.tensor([e.weight for e in examples], dtype=torch.float32)
        batch["sequence_item_index"] = torch.tensor([e.item_index for e in examples], dtype=torch.long)
        return batch


class EntailmentGenerativeCollator(_GenerativeCollator):
    """SNLI-VE as text: prompt "Is it correct that <hypothesis>?" and target the label word
    (``Correct`` / ``Ambiguous`` / ``Incorrect`` by default). Output: the family's inputs and ``pixel_values``
    (batch, 3, H, W); one sequence per item. ``max_length`` defaults to 100 (p-adapter.md §5.2)."""

    def __init__(self, processor: Any, family: str, *, max_length: int = 100,
                 prompt_template: str = DEFAULT_ENTAILMENT_PROMPT,
                 label_words: Mapping[str, str] = DEFAULT_LABEL_WORDS, model_config: Any = None,
                 llava_template: str | None = None) -> None:
        super().__init__(processor, family, max_length, model_config, llava_template)
        missing = set(SNLI_VE_LABELS) - set(label_words)
        if missing:
            raise ValueError(f"label_words lacks {sorted(missing)}; expected words for {SNLI_VE_LABELS}")
        self.label_words = dict(label_words)
        self.prompt_template = prompt_template
        format_prompt(prompt_template, hypothesis="")

    def examples(self, items: Sequence[Mapping[str, Any]]) -> list[TextExample]:
        return entailment_examples(items, self.prompt_template, self.label_words)


class CaptionGenerativeCollator(_GenerativeCollator):
    """Captioning: prompt (default "a picture of"; prompt tokens masked) followed by the caption.

    Use on the ``"pairs"`` view of :class:`~vlpeft.tasks.captions.CaptionDataset` (items with ``caption``).
    Output: the family's inputs and ``pixel_values`` (batch, 3, H, W). ``max_length`` defaults to 40.
    """

    def __init__(self, processor: Any, family: str, *, max_length: int = 40, prompt: str = DEFAULT_CAPTION_PROMPT,
                 caption_transform: Callable[[str], str] | None = None, model_config: Any = None,
                 llava_template: str | None = None) -> None:
        super().__init__(processor, family, max_length, model_config, llava_template)
        self.prompt = prompt.strip()
        self.caption_transform = caption_transform

    def examples(self, items: Sequence[Mapping[str, Any]]) -> list[TextExample]:
        return caption_examples(items, self.prompt, self.caption_transform)


class NLVR2GenerativeCollator(_GenerativeCollator):
    """NLVR2 as text: the sentence in ``prompt_template`` (``{sentence}``), the label's word as the target
    (:func:`~vlpeft.tasks.nlvr2.nlvr2_examples`). Output: the family's inputs and ``pixel_values``
    (batch, 2, 3, H, W), the left then the right image of each pair (the family must take two images per sample:
    ``InputLayout.two_images``)."""

    def __init__(self, processor: Any, family: str, *, max_length: int = 40, prompt_template: str | None = None,
                 label_words: Mapping[str, str] | None = None, model_config: Any = None,
                 llava_template: str | None = None) -> None:
        super().__init__(processor, family, max_length, model_config, llava_template)
        self.label_words = dict(DEFAULT_NLVR2_WORDS if label_words is None else label_words)
        missing = set(NLVR2_LABELS) - set(self.label_words)
        if missing:
            raise ValueError(f"label_words lacks {sorted(missing)}; expected words for {NLVR2_LABELS}")
        self.prompt_template = DEFAULT_NLVR2_PROMPT if prompt_template is None else prompt_template
        format_prompt(self.prompt_template, sentence="")

    def examples(self, items: Sequence[Mapping[str, Any]]) -> list[TextExample]:
        return nlvr2_examples(items, self.prompt_template, self.label_words)


class _ClassificationCollator:
    def __init__(self, processor: Any, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer, self.image_processor = processor_parts(processor)
        self.max_length = max_length
        self.num_truncated = 0

    def _encode(self, texts: list[str], images: list[Any]) -> dict[str, torch.Tensor]:
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        self.num_truncated += sum(n > self.max_length for n in lengths)
        enc = self.tokenizer(texts, add_special_tokens=True, padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        batch.update(pixel_inputs(self.image_processor, images))
        return batch


class VQAClassificationCollator(_ClassificationCollator):
    """VQA as classification over an answer vocabulary.

    Output: ``input_ids`` / ``attention_mask`` (batch, length) from the tokenizer with its special tokens
    (truncated to ``max_length``, default 40), ``pixel_values`` (batch, 3, H, W) and ``labels``
    (batch, num_answers) float32 soft scores (:meth:`AnswerVocab.soft_targets`; answers outside the vocabulary
    contribute nothing, as in VL-T5 / LXMERT).
    """

    def __init__(self, processor: Any, vocab: AnswerVocab, *, max_length: int = 40,
                 prompt_template: str = DEFAULT_VQA_PROMPT) -> None:
        super().__init__(processor, max_length)
        self.vocab = vocab
        self.prompt_template = prompt_template
        format_prompt(prompt_template, question="")

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        texts = [format_prompt(self.prompt_template, question=it["question"].strip()) for it in items]
        batch = self._encode(texts, [it["image"] for it in items])
        batch["labels"] = self.vocab.soft_targets([it.get("answer_scores") or {} for it in items])
        return batch


class EntailmentClassificationCollator(_ClassificationCollator):
    """SNLI-VE as 3-way classification: ``input_ids`` / ``attention_mask`` of the hypothesis (batch, length;
    ``max_length`` default 100), ``pixel_values`` (batch, 3, H, W), ``labels`` (batch,) long in
    :data:`~vlpeft.tasks.snli_ve.SNLI_VE_LABELS` order (entailment 0, neutral 1, contradiction 2)."""

    def __init__(self, processor: Any, *, max_length: int = 100) -> None:
        super().__init__(processor, max_length)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        labels = []
        for it in items:
            if it["label"] not in SNLI_VE_LABEL2ID:
                raise ValueError(f"item {it.get('pair_id')!r}: label {it['label']!r} not in {SNLI_VE_LABELS}")
            labels.append(SNLI_VE_LABEL2ID[it["label"]])
        batch = self._encode([it["hypothesis"].strip() for it in items], [it["image"] for it in items])
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch
