"""Text-only baselines: how well can the *text alone* answer the test split?

They read the standard files (so they work on real VQAv2 / SNLI-VE / Karpathy data too) and use the official
metrics of :mod:`vlpeft.metrics`:

- VQA: the most frequent training answer per question type, and per exact question text (falling back to the
  question type for questions not seen in training); the better of the two is reported.
- SNLI-VE: the most frequent training label overall, and per exact hypothesis text (falling back to overall).
- Captioning: the single most frequent training caption, given for every test image (CIDEr-D).

An image-conditioned model must beat these by a wide margin; on the built-in benchmark they sit near chance.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlpeft.metrics.captioning import UnofficialCaptionMetricsWarning, caption_scores
from vlpeft.metrics.entailment import entailment_accuracy
from vlpeft.metrics.vqa_accuracy import vqa_accuracy


def _load(path: Path) -> Any:
    with Path(path).open("r", encoding="utf-8") as handle:
        return json.load(handle)


def _normalise_text(text: str) -> str:
    return " ".join(text.lower().replace("?", " ").replace(".", " ").split())


def _most_common(counter: Counter) -> str:
    # ties broken alphabetically so the baseline is deterministic
    best = max(counter.values())
    return min(k for k, v in counter.items() if v == best)


def vqa_text_only(
    train_questions: Path, train_annotations: Path, test_questions: Path, test_annotations: Path
) -> dict[str, Any]:
    """VQA accuracy (official, percent) of the per-question-type and per-question majority answers."""
    train_q = {q["question_id"]: q["question"] for q in _load(train_questions)["questions"]}
    by_type: dict[str, Counter] = {}
    by_text: dict[str, Counter] = {}
    overall: Counter = Counter()
    for ann in _load(train_annotations)["annotations"]:
        answer = ann["multiple_choice_answer"]
        by_type.setdefault(ann["question_type"], Counter())[answer] += 1
        by_text.setdefault(_normalise_text(train_q[ann["question_id"]]), Counter())[answer] += 1
        overall[answer] += 1
    if not overall:
        raise ValueError(f"no training annotations in {str(train_annotations)!r}")
    test_q = {q["question_id"]: q["question"] for q in _load(test_questions)["questions"]}
    annotations = _load(test_annotations)["annotations"]

    def by_type_answer(ann: Mapping[str, Any]) -> str:
        counter = by_type.get(ann["question_type"])
        return _most_common(counter) if counter else _most_common(overall)

    per_type = {a["question_id"]: by_type_answer(a) for a in annotations}
    per_text = {}
    for a in annotations:
        counter = by_text.get(_normalise_text(test_q[a["question_id"]]))
        per_text[a["question_id"]] = _most_common(counter) if counter else per_type[a["question_id"]]
    score_type = vqa_accuracy(per_type, annotations)
    score_text = vqa_accuracy(per_text, annotations)
    results = {"question type": score_type.overall, "question text": score_text.overall}
    best = max(results, key=results.get)
    return {
        "accuracy": results[best],
        "best": best,
        "per_question_type": score_type.overall,
        "per_question_text": score_text.overall,
        "per_answer_type": dict(score_text.per_answer_type) if best == "question text" else dict(
            score_type.per_answer_type),
    }


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with Path(path).open("r", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def snli_ve_text_only(train_jsonl: Path, test_jsonl: Path) -> dict[str, Any]:
    """Accuracy (percent) of the overall and per-hypothesis majority labels (hypothesis = ``sentence2``)."""
    overall: Counter = Counter()
    by_text: dict[str, Counter] = {}
    for record in _read_jsonl(train_jsonl):
        overall[record["gold_label"]] += 1
        by_text.setdefault(_normalise_text(record["sentence2"]), Counter())[record["gold_label"]] += 1
    if not overall:
        raise ValueError(f"no training pairs in {str(train_jsonl)!r}")
    test = _read_jsonl(test_jsonl)
    gold = [r["gold_label"] for r in test]
    majority = _most_common(overall)
    per_text = []
    for r in test:
        counter = by_text.get(_normalise_text(r["sentence2"]))
        per_text.append(_most_common(counter) if counter else majority)
    results = {
        "overall": entailment_accuracy([majority] * len(test), gold).overall,
        "hypothesis text": entailment_accuracy(per_text, gold).overall,
    }
    best = max(results, key=results.get)
    return {"accuracy": results[best], "best": best, "overall_majority": results["overall"],
            "per_hypothesis_text": results["hypothesis text"]}


def caption_text_only(karpathy_json: Path, split: str = "test") -> dict[str, Any]:
    """CIDEr-D (and BLEU-4) of giving every ``split`` image the most frequent training caption."""
    images = _load(karpathy_json)["images"]
    counter: Counter = Counter()
    references: dict[int, list[str]] = {}
    for image in images:
        raws = [s["raw"] for s in image["sentences"]]
        if image["split"] in ("train", "restval"):
            counter.update(" ".join(s["tokens"]) for s in image["sentences"])
        elif image["split"] == split:
            references[image["cocoid"]] = raws
    if not counter or not references:
        raise ValueError(f"{str(karpathy_json)!r} needs training captions and {split!r} images")
    caption = _most_common(counter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnofficialCaptionMetricsWarning)
        scores = caption_scores({k: caption for k in references}, references, metrics=("Bleu", "CIDEr"))
    return {"CIDEr": scores.scores["CIDEr"], "Bleu_4": scores.scores["Bleu_4"], "caption": caption}


def text_only_baselines(files) -> dict[str, Any]:
    """All three baselines on the test split of a benchmark laid out as
    :class:`~vlpeft.data.synth.BenchmarkFiles`."""
    return {
        "vqa": vqa_text_only(files.vqa_questions("train"), files.vqa_annotations("train"),
                             files.vqa_questions("test"), files.vqa_annotations("test")),
        "snli_ve": snli_ve_text_only(files.ve_jsonl["train"], files.ve_jsonl["test"]),
        "caption": caption_text_only(files.karpathy_json, "test"),
    }
