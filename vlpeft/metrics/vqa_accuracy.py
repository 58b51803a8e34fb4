"""VQA accuracy as computed by the official evaluation (``GT-Vision-Lab/VQA`` ``vqaEval.py`` at ``a013f00``).

Per question (current official behaviour, the default):

1. Every ground-truth (GT) answer and the prediction: ``\\n``/``\\t`` -> space, then strip.
2. Only if the GT answers are not all identical (after step 1), the GT answers *and* the prediction are fully
   normalised (:func:`~vlpeft.metrics.vqa_normalize.normalize_answer`). If they are all identical nothing more is
   done to either side, so ``"Yes"`` or ``"yes."`` against ten ``"yes"`` scores 0.
3. For each GT answer g: ``matches`` = how many of the *other* GT answers equal the prediction (exact string
   match), ``acc_g = min(1, matches / 3)``. The question accuracy is the mean of ``acc_g``. With 10 GT answers of
   which c equal the prediction this is exactly ``min(1, 0.3 * c)``.

Aggregates are ``round(100 * mean, 2)`` over all questions, per answer type and per question type, as in the
official ``setAccuracy``.

``legacy_2017=True`` reproduces the revision before the 2021 fix ("Fixed processing answers bug"; e.g. commit
``c4e6a0e``): the prediction is always whitespace-stripped and fully normalised, the GT answers are neither
whitespace-stripped nor lowercased and only get :func:`process_punctuation`, and only when they are not all
identical (compared raw). Use it only to compare with numbers produced by that revision.

Leave-one-out detail: the official code drops the left-out annotator with ``item != gtAnsDatum`` (dict
comparison). On official annotations every answer record carries a distinct ``answer_id``, so exactly one
record is dropped; here the left-out answer is dropped by position, which is identical for official data and
stays correct for answer lists without ``answer_id``.

The VL-T5 style evaluator used by the routing-functions code instead scores a prediction by looking it up in a
precomputed ``label`` dict ``{answer: soft score}`` (:func:`vqa_label_accuracy`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlpeft.metrics.vqa_normalize import normalize_answer, process_punctuation, strip_whitespace

__all__ = [
    "VQAScore",
    "vqa_accuracy",
    "vqa_label_accuracy",
    "vqa_label_score",
    "vqa_soft_score",
]

QuestionId = Hashable

_ROUND_DIGITS = 2  # the official VQAEval(n=2)
_MATCHES_FOR_FULL_CREDIT = 3


@dataclass(frozen=True)
class VQAScore:
    """Result of :func:`vqa_accuracy`.

    Attributes:
        overall: accuracy in percent over all evaluated questions, rounded to 2 decimals.
        per_answer_type: percent per ``answer_type`` (``"yes/no"``, ``"number"``, ``"other"``), rounded to 2
            decimals; empty when the annotations carry no ``answer_type``.
        per_question_type: percent per ``question_type``, rounded to 2 decimals; empty when absent.
        per_question: question id -> accuracy of that question as a fraction in [0, 1] (not rounded).
        num_questions: number of evaluated questions.
        legacy_2017: whether the pre-2021 behaviour was used.
    """

    overall: float
    per_answer_type: dict[str, float] = field(default_factory=dict)
    per_question_type: dict[str, float] = field(default_factory=dict)
    per_question: dict[QuestionId, float] = field(default_factory=dict)
    num_questions: int = 0
    legacy_2017: bool = False


def _leave_one_out_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Mean over annotators of min(1, matches among the other annotators / 3), as the official loop computes it."""
    per_annotator = []
    for left_out in range(len(gt_answers)):
        matches = sum(1 for j, gt in enumerate(gt_answers) if j != left_out and gt == prediction)
        per_annotator.append(min(1, float(matches) / _MATCHES_FOR_FULL_CREDIT))
    return float(sum(per_annotator)) / len(per_annotator)


def vqa_soft_score(prediction: str, gt_answers: Sequence[str], *, legacy_2017: bool = False) -> float:
    """Official VQA accuracy of one prediction against the GT answers of one question, in [0, 1].

    Args:
        prediction: the predicted answer string (raw; normalisation happens here).
        gt_answers: the annotators' answers (10 in VQA v2 / VizWiz), raw strings.
        legacy_2017: use the pre-2021 official behaviour (see the module docstring).

    Raises:
        TypeError: if the prediction or a GT answer is not a string.
        ValueError: if ``gt_answers`` is empty.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}: {prediction!r}")
    if isinstance(gt_answers, str):
        raise TypeError(f"gt_answers must be a sequence of strings, not a single string: {gt_answers!r}")
    gts = list(gt_answers)
    if not gts:
        raise ValueError("gt_answers is empty; the VQA accuracy needs at least one ground-truth answer")
    for gt in gts:
        if not isinstance(gt, str):
            raise TypeError(f"every GT answer must be a str, got {type(gt).__name__}: {gt!r}")

    if legacy_2017:
        pred = normalize_answer(prediction)
        if len(set(gts)) > 1:
            gts = [process_punctuation(gt) for gt in gts]
        return _leave_one_out_accuracy(pred, gts)

    pred = strip_whitespace(prediction)
    gts = [strip_whitespace(gt) for gt in gts]
    if len(set(gts)) > 1:
        pred = normalize_answer(pred)
        gts = [normalize_answer(gt) for gt in gts]
    return _leave_one_out_accuracy(pred, gts)


def _predictions_by_id(predictions: Mapping[QuestionId, str] | Iterable[Mapping[str, Any]]) -> dict:
    if isinstance(predictions, Mapping):
        return dict(predictions)
    if isinstance(predictions, str | bytes):
        raise TypeError("predictions must be a dict {question_id: answer} or a list of records, not a string")
    by_id: dict[QuestionId, str] = {}
    for i, record in enumerate(predictions):
        if not isinstance(record, Mapping) or "question_id" not in record or "answer" not in record:
            raise ValueError(
                f"prediction record #{i} must be a mapping with keys 'question_id' and 'answer', got {record!r}"
            )
        qid = record["question_id"]
        if qid in by_id:
            raise ValueError(f"question_id {qid!r} appears more than once in the predictions")
        by_id[qid] = record["answer"]
    return by_id


def _gt_strings(record: Mapping[str, Any]) -> list[str]:
    qid = record.get("question_id")
    answers = record.get("answers")
    if not isinstance(answers, Sequence) or isinstance(answers, str) or len(answers) == 0:
        raise ValueError(
            f"annotation for question_id {qid!r} needs a non-empty list 'answers' of "
            f"{{'answer': str}} records (or strings), got {answers!r}"
        )
    out = []
    for answer in answers:
        text = answer.get("answer") if isinstance(answer, Mapping) else answer
        if not isinstance(text, str):
            raise ValueError(f"annotation for question_id {qid!r} has an answer that is not a string: {answer!r}")
        out.append(text)
    return out


def _describe_id_mismatch(missing: list, label: str, other_ids: Iterable[QuestionId]) -> str:
    shown = ", ".join(repr(q) for q in missing[:5]) + (" ..." if len(missing) > 5 else "")
    message = f"{len(missing)} question id(s) {label}: {shown}"
    other_as_str = {str(q) for q in other_ids}
    if any(str(q) in other_as_str for q in missing):
        message += " (the ids match as strings: are ids int on one side and str on the other?)"
    return message


def _rounded_percent(values: list[float]) -> float:
    return round(100 * float(sum(values)) / len(values), _ROUND_DIGITS)


def _type_field(records: list[Mapping[str, Any]], key: str) -> list[str] | None:
    present = [key in r for r in records]
    if not any(present):
        return None
    if not all(present):
        missing = [r.get("question_id") for r, has in zip(records, present) if not has][:5]
        raise ValueError(f"'{key}' is present in some annotations but missing for question_id(s) {missing}")
    return [str(r[key]) for r in records]


def vqa_accuracy(
    predictions: Mapping[QuestionId, str] | Iterable[Mapping[str, Any]],
    annotations: Iterable[Mapping[str, Any]],
    *,
    question_ids: Iterable[QuestionId] | None = None,
    legacy_2017: bool = False,
) -> VQAScore:
    """Official VQA accuracy over a set of questions.

    Args:
        predictions: ``{question_id: answer}`` or a list of ``{"question_id": ..., "answer": ...}`` records (the
            official results-file format).
        annotations: official annotation records, each with ``"question_id"``, ``"answers"`` (a list of
            ``{"answer": str, ...}``, usually 10; plain strings are accepted too) and optionally
            ``"answer_type"`` and ``"question_type"``.
        question_ids: evaluate only these questions (like the official ``evaluate(quesIds)``). By default the
            predicted and annotated question ids must be the same set, as the official ``loadRes`` requires.
        legacy_2017: use the pre-2021 official behaviour (see the module docstring).

    Returns:
        A :class:`VQAScore`; aggregates are percentages rounded to 2 decimals, in annotation order.

    Raises:
        ValueError: on duplicate or mismatching question ids, malformed records, or an empty evaluation set.
        TypeError: if a predicted answer is not a string.
    """
    preds = _predictions_by_id(predictions)
    records: dict[QuestionId, Mapping[str, Any]] = {}
    for i, record in enumerate(annotations):
        if not isinstance(record, Mapping) or "question_id" not in record:
            raise ValueError(f"annotation #{i} must be a mapping with a 'question_id', got {record!r}")
        qid = record["question_id"]
        if qid in records:
            raise ValueError(f"question_id {qid!r} appears more than once in the annotations")
        records[qid] = record

    if question_ids is None:
        missing_pred = [q for q in records if q not in preds]
        missing_ann = [q for q in preds if q not in records]
        problems = []
        if missing_pred:
            problems.append(_describe_id_mismatch(missing_pred, "annotated but not predicted", preds))
        if missing_ann:
            problems.append(_describe_id_mismatch(missing_ann, "predicted but not annotated", records))
        if problems:
            raise ValueError(
                "predictions and annotations must cover the same questions (pass question_ids= to evaluate a "
                "subset): " + "; ".join(problems)
            )
        selected = list(records)
    else:
        selected = list(question_ids)
        if len(set(selected)) != len(selected):
            raise ValueError("question_ids contains duplicates")
        not_annotated = [q for q in selected if q not in records]
        not_predicted = [q for q in selected if q not in preds]
        if not_annotated:
            raise ValueError(_describe_id_mismatch(not_annotated, "requested but not annotated", records))
        if not_predicted:
            raise ValueError(_describe_id_mismatch(not_predicted, "requested but not predicted", preds))
    if not selected:
        raise ValueError("nothing to evaluate: no questions were given")

    chosen = [records[q] for q in selected]
    answer_types = _type_field(chosen, "answer_type")
    question_types = _type_field(chosen, "question_type")

    per_question: dict[QuestionId, float] = {}
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for i, (qid, record) in enumerate(zip(selected, chosen)):
        prediction = preds[qid]
        if not isinstance(prediction, str):
            raise TypeError(
                f"predicted answer for question_id {qid!r} must be a str, got {type(prediction).__name__}"
            )
        accuracy = vqa_soft_score(prediction, _gt_strings(record), legacy_2017=legacy_2017)
        per_question[qid] = accuracy
        if answer_types is not None:
            by_answer_type.setdefault(answer_types[i], []).append(accuracy)
        if question_types is not None:
            by_question_type.setdefault(question_types[i], []).append(accuracy)

    return VQAScore(
        overall=_rounded_percent(list(per_question.values())),
        per_answer_type={k: _rounded_percent(v) for k, v in by_answer_type.items()},
        per_question_type={k: _rounded_percent(v) for k, v in by_question_type.items()},
        per_question=per_question,
        num_questions=len(per_question),
        legacy_2017=legacy_2017,
    )


def vqa_label_score(prediction: str, label: Mapping[str, float]) -> float:
    """VL-T5 style score of one prediction: ``label.get(prediction, 0)``, no normalisation.

    ``label`` is the per-question ``{answer: soft score}`` dict of the VL-T5 / routing-functions data files
    (``karpathy_*.json``), whose scores are the official leave-one-out values (0.3, 0.6, 0.9, 1.0 for 1..4+
    matching annotators). The prediction must be an answer string exactly as it appears in the answer vocabulary.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}: {prediction!r}")
    if not isinstance(label, Mapping):
        raise TypeError(f"label must be a mapping {{answer: score}}, got {type(label).__name__}")
    return float(label.get(prediction, 0.0))


def vqa_label_accuracy(
    predictions: Mapping[QuestionId, str], labels: Mapping[QuestionId, Mapping[str, float]]
) -> float:
    """Mean VL-T5 style score over the predicted questions, in percent (not rounded).

    This mirrors ``VQAEvaluator.evaluate`` of VL-T5 (used by the routing-functions code), which returns the same
    mean as a fraction; multiply that fraction by 100 to compare.

    Raises:
        ValueError: if ``predictions`` is empty or a predicted question has no label.
    """
    if not predictions:
        raise ValueError("predictions is empty; nothing to evaluate")
    missing = [q for q in predictions if q not in labels]
    if missing:
        raise ValueError(_describe_id_mismatch(missing, "predicted but without a label", labels))
    total = sum(vqa_label_score(answer, labels[qid]) for qid, answer in predictions.items())
    return 100.0 * total / len(predictions)
