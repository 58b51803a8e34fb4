"""Each task's metrics from its prediction records (``(records, dataset) -> {metric name: value}``), as the task
bindings (:mod:`vlpeft.training.task_binding`, :mod:`vlpeft.training.chat_binding`) score evaluation and test
predictions: percent for accuracies, the pycocoevalcap scale for caption metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlpeft.metrics import caption_scores, entailment_accuracy, vqa_accuracy, vqa_label_accuracy
from vlpeft.metrics.exact_match import gqa_accuracy
from vlpeft.metrics.nlvr2 import nlvr2_scores
from vlpeft.metrics.vizwiz import vizwiz_accuracy

__all__ = ["CAPTION_EVAL_METRICS"]

CAPTION_EVAL_METRICS = ("Bleu", "ROUGE_L", "CIDEr")


def _items(dataset: Any) -> Any:
    return dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset


def _gold_answers(record: Any) -> set[str]:
    """A VQA record's answers as scored (the soft-score keys, else the raw answers); empty for test questions."""
    return set(getattr(record, "answer_scores", None) or ()) or set(getattr(record, "answers", None) or ())


def _unanswerable_count(records: Sequence[Any], candidates: set[str]) -> tuple[int, int]:
    """(questions with answers none of which is a candidate, questions with answers)."""
    golds = [gold for gold in map(_gold_answers, records) if gold]
    return sum(1 for gold in golds if not gold & candidates), len(golds)


def _vqa_score(records: list[dict[str, Any]], dataset: Any,
               candidates: Sequence[str] | None = None) -> dict[str, float]:
    """VQA accuracy of ``records``; with ``candidates`` (the answers ranking / the classifier can pick from), also
    ``unanswerable``: how many of the scored questions have none of their answers among them."""
    scores = _vqa_accuracy(records, dataset)
    if candidates is not None:
        by_id = {r.question_id: r for r in _items(dataset).records}
        scored = [by_id[p["question_id"]] for p in records]
        scores["unanswerable"] = float(_unanswerable_count(scored, set(candidates))[0])
    return scores


def _vqa_accuracy(records: list[dict[str, Any]], dataset: Any) -> dict[str, float]:
    by_id = {r.question_id: r for r in _items(dataset).records}
    predicted = {p["question_id"]: p["answer"] for p in records}
    if getattr(_items(dataset), "official_metric", None) == "vizwiz":
        return _vizwiz_accuracy(predicted, [by_id[q] for q in predicted])
    with_answers = [by_id[q] for q in predicted if by_id[q].answers]
    if len(with_answers) == len(predicted):
        annotations = [{"question_id": r.question_id, "answers": list(r.answers),
                        "answer_type": r.answer_type, "question_type": r.question_type} for r in with_answers]
        return {"vqa_accuracy": vqa_accuracy(predicted, annotations).overall}
    labels = {q: by_id[q].answer_scores for q in predicted}
    return {"vqa_accuracy": vqa_label_accuracy(predicted, labels)}


def _vizwiz_accuracy(predicted: dict[Any, str], records: list[Any]) -> dict[str, float]:
    """VizWiz-VQA data: the official VizWiz evaluation (:mod:`vlpeft.metrics.vizwiz`) under the VQA metric name
    ``vqa_accuracy`` (the selection metric of ``task.type: vqa``) and as ``vizwiz_accuracy``, plus
    ``vizwiz_accuracy_<answer type>``. Questions without answers (the test split) are not scored."""
    records = [r for r in records if r.answers]
    if not records:
        return {}
    score = vizwiz_accuracy({r.question_id: predicted[r.question_id] for r in records},
                            [{"image": r.question_id, "answers": list(r.answers), "answer_type": r.answer_type}
                             for r in records])
    out = {"vqa_accuracy": score.overall, "vizwiz_accuracy": score.overall}
    out.update({f"vizwiz_accuracy_{k.replace('/', '_')}": v for k, v in score.per_answer_type.items()})
    return out


def _gqa_score(records: list[dict[str, Any]], dataset: Any) -> dict[str, float]:
    """GQA exact-match accuracy: ``accuracy`` after the VQA answer normalisation of both sides, ``accuracy_strict``
    as the official ``eval.py`` (raw strings), and per structural type (:mod:`vlpeft.metrics.exact_match`)."""
    by_id = {r.question_id: r for r in _items(dataset).records}
    predicted = {p["question_id"]: p["answer"] for p in records if by_id[p["question_id"]].answer is not None}
    if not predicted:
        return {}
    gold = {q: by_id[q].answer for q in predicted}
    types = {q: by_id[q].structural_type for q in predicted if by_id[q].structural_type}
    score = gqa_accuracy(predicted, gold, groups=types)
    out = {"accuracy": score.overall, "accuracy_strict": gqa_accuracy(predicted, gold, normalize=False).overall}
    out.update({f"accuracy_{group}": value for group, value in score.per_group.items()})
    return out


def _nlvr2_score(records: list[dict[str, Any]], dataset: Any, generated: bool = False) -> dict[str, float]:
    """NLVR2 ``accuracy`` and ``consistency`` (:mod:`vlpeft.metrics.nlvr2`, as the official eval script). With
    ``generated`` (labels generated as text) a prediction other than True/False counts wrong, and ``invalid``
    reports how many there were."""
    gold = {r.identifier: r.label for r in _items(dataset).records}
    predicted = {p["identifier"]: p["label"] for p in records}
    score = nlvr2_scores(predicted, {k: gold[k] for k in predicted}, invalid="wrong" if generated else "raise")
    out = {"accuracy": score.accuracy, "consistency": score.consistency}
    if generated:
        out["invalid"] = float(score.num_invalid)
    return out


def _entailment_score(records: list[dict[str, Any]], dataset: Any, generated: bool = False) -> dict[str, float]:
    """SNLI-VE ``accuracy`` overall and per gold class (:mod:`vlpeft.metrics.entailment`). With ``generated``
    (labels generated as text) a prediction other than the three labels counts wrong, and ``invalid`` reports how
    many there were (as :func:`_nlvr2_score`)."""
    gold = {r.pair_id: r.label for r in _items(dataset).records}
    predicted = {p["pair_id"]: p["label"] for p in records}
    score = entailment_accuracy(predicted, {k: gold[k] for k in predicted}, invalid="wrong" if generated else "raise")
    out = {"accuracy": score.overall}
    out.update({f"accuracy_{k}": v for k, v in score.per_class.items() if v is not None})
    if generated:
        out["invalid"] = float(score.num_invalid)
    return out


def _caption_score(records: list[dict[str, Any]], dataset: Any, use_java: bool | None) -> dict[str, float]:
    references = _items(dataset).references()
    predicted = {p["image_id"]: p["caption"] for p in records}
    scores = caption_scores(predicted, {k: references[k] for k in predicted}, use_java=use_java,
                            metrics=CAPTION_EVAL_METRICS)
    out = {k: float(v) for k, v in scores.scores.items() if v is not None}
    if "CIDEr" in out and "Bleu_4" in out:
        out["CIDEr+Bleu_4"] = out["CIDEr"] + out["Bleu_4"]
    return out
