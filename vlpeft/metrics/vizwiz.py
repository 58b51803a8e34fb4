"""VizWiz-VQA accuracy as the official VizWiz evaluation computes it (``vqaEval.py`` of the VizWiz VQA API by Qing
Li, distributed with the VizWiz-VQA dataset and used by the VizWiz challenge).

Facts relied on (read from that file's ``VQAEval.evaluate``):

1. Questions are keyed by the image file name (``"VizWiz_val_00000000.jpg"``); VizWiz has one question per image
   and no ``question_id``. Results files are ``[{"image": ..., "answer": ...}]``.
2. The **prediction** is always normalised: ``\\n``/``\\t`` -> space, strip, ``processPunctuation`` and
   ``processDigitArticle`` (the same functions as VQAv2's, see :mod:`vlpeft.metrics.vqa_normalize`), whatever the
   ground-truth (GT) answers are.
3. The **GT answers are compared raw** (``item['answer'] == resAns``): no stripping, lowercasing or punctuation
   processing on that side. (The VizWiz annotations are already lower-case, clean strings.)
4. Per question: for each of the (10) annotators i, ``min(1, #{j != i: gt_j == prediction} / 3)``, averaged over
   the annotators: the VQA leave-one-out formula, dropping by position (``i != j``), exactly as
   :func:`vlpeft.metrics.vqa_accuracy._leave_one_out_accuracy` does.
5. Every question is scored, unanswerable ones included: their GT answers are mostly ``"unanswerable"``, so the
   prediction ``"unanswerable"`` earns credit there like any other answer.
6. Aggregates: ``round(100 * mean, 2)`` overall and per ``answer_type`` (``"other"``, ``"yes/no"``, ``"number"``,
   ``"unanswerable"``); there is no ``question_type``.

Where this differs from the VQAv2 evaluation (:func:`vlpeft.metrics.vqa_accuracy`): VQAv2 (2021 revision)
normalises the prediction and the GT answers only when the GT answers are not all identical, and then normalises
both sides; VizWiz always normalises the prediction and never the GT answers. VizWiz's contractions table also
differs from VQAv2's: most replacement values use the typographic apostrophe ``’`` (U+2019), e.g. ``dont`` ->
``don’t`` where VQAv2 gives ``don't`` (:data:`VIZWIZ_CONTRACTIONS`).

Not reproduced: the API's ``caption_metric`` (BLEU/CIDEr of the answers, a side report) and
``evaluate_unanswerability`` (average precision / F1 of a separate ``answerable`` confidence, the challenge's
answerability track).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from vlpeft.metrics.vqa_accuracy import VQAScore, _leave_one_out_accuracy
from vlpeft.metrics.vqa_normalize import (
    VQA_ARTICLES,
    VQA_CONTRACTIONS,
    VQA_NUMBER_WORDS,
    process_punctuation,
    strip_whitespace,
)

__all__ = ["VIZWIZ_CONTRACTIONS", "normalize_vizwiz_prediction", "vizwiz_accuracy", "vizwiz_soft_score"]

_CURLY = "\u2019"
# Entries of the VizWiz table that keep the ASCII apostrophe: these values, and these keys.
_ASCII_VALUES = frozenset({"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"})
_ASCII_KEYS = frozenset({"couldn'tve", "hadn'tve"})


def _vizwiz_contractions() -> dict[str, str]:
    table = {}
    for key, value in VQA_CONTRACTIONS.items():
        vkey = key if key in _ASCII_KEYS else key.replace("'", _CURLY)
        table[vkey] = value if key in _ASCII_VALUES else value.replace("'", _CURLY)
    return table


VIZWIZ_CONTRACTIONS: dict[str, str] = _vizwiz_contractions()
"""The VizWiz evaluation's contractions table: VQAv2's entries with ``’`` for ``'``, except the values of ``aint``,
``arent``, ``cant``, ``couldve``, ``couldnt``, ``weve``, ``wheres``, ``whove`` and the keys ``couldn'tve``,
``hadn'tve``, which keep ``'`` as in the VizWiz file."""


def normalize_vizwiz_prediction(text: str) -> str:
    """The VizWiz evaluation's processing of a predicted answer: whitespace, punctuation, digits/articles and the
    VizWiz contractions table."""
    if not isinstance(text, str):
        raise TypeError(f"prediction must be a str, got {type(text).__name__}: {text!r}")
    words = []
    for word in process_punctuation(strip_whitespace(text)).lower().split():
        word = VQA_NUMBER_WORDS.get(word, word)
        if word not in VQA_ARTICLES:
            words.append(word)
    return " ".join(VIZWIZ_CONTRACTIONS.get(word, word) for word in words)


def vizwiz_soft_score(prediction: str, gt_answers: Sequence[str]) -> float:
    """VizWiz accuracy of one prediction against one question's raw GT answers, in [0, 1]."""
    if isinstance(gt_answers, str) or not gt_answers:
        raise ValueError(f"gt_answers must be a non-empty list of strings, got {gt_answers!r}")
    for gt in gt_answers:
        if not isinstance(gt, str):
            raise TypeError(f"every GT answer must be a str, got {type(gt).__name__}: {gt!r}")
    return _leave_one_out_accuracy(normalize_vizwiz_prediction(prediction), list(gt_answers))


def vizwiz_accuracy(
    predictions: Mapping[Hashable, str] | Iterable[Mapping[str, Any]],
    annotations: Iterable[Mapping[str, Any]],
) -> VQAScore:
    """Official VizWiz-VQA accuracy.

    Args:
        predictions: ``{image: answer}`` or the official results list ``[{"image": ..., "answer": ...}]``.
        annotations: VizWiz annotation records ``{"image", "answers": [{"answer": str, ...}] (or strings),
            "answer_type"?}``.

    Returns:
        a :class:`~vlpeft.metrics.vqa_accuracy.VQAScore`: ``overall`` and ``per_answer_type`` in percent rounded
        to 2 decimals, ``per_question`` keyed by image name (fractions).

    Raises:
        ValueError: duplicate, missing or extra images; an annotation without answers; nothing to evaluate.
    """
    if isinstance(predictions, Mapping):
        preds = dict(predictions)
    else:
        preds = {}
        for i, record in enumerate(predictions):
            if not isinstance(record, Mapping) or "image" not in record or "answer" not in record:
                raise ValueError(f"prediction record #{i} needs keys 'image' and 'answer', got {record!r}")
            if record["image"] in preds:
                raise ValueError(f"image {record['image']!r} is predicted more than once")
            preds[record["image"]] = record["answer"]
    per_question: dict[Hashable, float] = {}
    by_type: dict[str, list[float]] = {}
    for i, record in enumerate(annotations):
        if not isinstance(record, Mapping) or "image" not in record:
            raise ValueError(f"annotation #{i} needs an 'image' key, got {record!r}")
        image = record["image"]
        if image in per_question:
            raise ValueError(f"image {image!r} appears more than once in the annotations")
        if image not in preds:
            raise ValueError(f"image {image!r} is annotated but not predicted")
        answers = record.get("answers")
        if not isinstance(answers, Sequence) or isinstance(answers, str) or not answers:
            raise ValueError(f"annotation for image {image!r} needs a non-empty 'answers' list, got {answers!r}")
        gts = [a.get("answer") if isinstance(a, Mapping) else a for a in answers]
        accuracy = vizwiz_soft_score(preds[image], gts)
        per_question[image] = accuracy
        if record.get("answer_type") is not None:
            by_type.setdefault(str(record["answer_type"]), []).append(accuracy)
    extra = [image for image in preds if image not in per_question]
    if extra:
        raise ValueError(f"{len(extra)} predicted image(s) are not annotated: {extra[:5]}")
    if not per_question:
        raise ValueError("nothing to evaluate: no annotations were given")

    def percent(values: list[float]) -> float:
        return round(100 * float(sum(values)) / len(values), 2)

    return VQAScore(overall=percent(list(per_question.values())),
                    per_answer_type={k: percent(v) for k, v in by_type.items()},
                    per_question=per_question, num_questions=len(per_question))
