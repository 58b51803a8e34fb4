"""VQA candidate answers (``task.answer_list`` or the training answers) and how many questions they cannot answer
(the coverage line printed before training, and the classifier's refusal above
:data:`MAX_UNANSWERABLE_TRAIN_SHARE`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlpeft.tasks.vqa import AnswerVocab
from vlpeft.training.config import ConfigError, TrainConfig
from vlpeft.training.task_scores import _items, _unanswerable_count

__all__ = ["MAX_UNANSWERABLE_TRAIN_SHARE", "AnswerCoverage", "answer_coverage", "answer_list", "check_answer_coverage"]


def answer_list(config: TrainConfig, train: Any) -> list[str] | None:
    """VQA candidate answers / classifier vocabulary: ``task.answer_list`` (JSON list, or an ``ans2label`` dict),
    else built from the training records (most frequent first), else ``None``."""
    path = config.resolve_path(config.task.answer_list)
    if path is not None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"task.answer_list: {str(path)!r} is not valid JSON ({error}); expected a JSON list of "
                              "answer strings or an ans2label mapping") from error
        if isinstance(data, dict):
            data = sorted(data, key=data.get) if all(isinstance(v, int) for v in data.values()) else list(data)
        if not isinstance(data, list) or not all(isinstance(a, str) for a in data) or not data:
            raise ConfigError(f"task.answer_list: {path} must hold a non-empty JSON list of answer strings")
        return data
    if train is None:
        return None
    return list(AnswerVocab.build(_items(train).records).label2ans)


#: Largest share of training questions the VQA classifier (discriminative framing) may train on all-zero targets,
#: i.e. questions none of whose answers is in ``task.answer_list``; more is refused with a ConfigError.
MAX_UNANSWERABLE_TRAIN_SHARE = 0.10


def _records_of(dataset: Any) -> list[Any]:
    """A dataset's records, only the kept ones for a truncated (``Subset``) dataset."""
    if isinstance(dataset, torch.utils.data.Subset):
        records = dataset.dataset.records
        return [records[i] for i in dataset.indices]
    return list(getattr(dataset, "records", []))


@dataclass
class AnswerCoverage:
    """How many questions of each split have none of their answers among the candidate answers.

    Attributes:
        num_answers: size of the candidate list / classifier vocabulary.
        splits: ``{split: (unanswerable, questions with answers)}`` for the splits that were counted.
        source: where the list came from (``task.answer_list`` path, or the training answers).
    """

    num_answers: int
    splits: dict[str, tuple[int, int]]
    source: str

    def share(self, split: str) -> float:
        missing, total = self.splits.get(split, (0, 0))
        return missing / total if total else 0.0

    def line(self) -> str:
        """One line with the counts per split."""
        parts = [f"{split} {missing} of {total} ({100.0 * self.share(split):.1f}%)"
                 for split, (missing, total) in self.splits.items()]
        return (f"answer list ({self.num_answers} answers, {self.source}): questions with none of their answers in "
                f"it: {', '.join(parts) if parts else 'none counted'}")


def answer_coverage(config: TrainConfig, datasets: Sequence[Any], answers: Sequence[str],
                    splits: Sequence[str] = ("train", "eval", "test")) -> AnswerCoverage:
    """Count, per split in ``splits``, the questions with answers none of which is in ``answers``."""
    candidates = set(answers)
    counted = {}
    for split, dataset in zip(("train", "eval", "test"), datasets, strict=True):
        if dataset is None or split not in splits:
            continue
        missing, total = _unanswerable_count(_records_of(dataset), candidates)
        if total:
            counted[split] = (missing, total)
    path = config.resolve_path(config.task.answer_list)
    return AnswerCoverage(len(candidates), counted, f"task.answer_list {str(path)!r}" if path is not None
                          else "built from the training answers")


def check_answer_coverage(config: TrainConfig, datasets: Sequence[Any], answers: Sequence[str] | None, *,
                          training: bool = True) -> AnswerCoverage | None:
    """Count the VQA questions that the candidate list cannot answer (``None`` for other tasks).

    For the classifier (discriminative framing) such a training question trains on an all-zero target; when
    ``training`` and more than :data:`MAX_UNANSWERABLE_TRAIN_SHARE` of the training questions are such, this
    raises :class:`ConfigError` naming ``task.answer_list``. Ranking and classification cannot answer them either:
    evaluation reports them as ``unanswerable``.
    """
    if config.task.type != "vqa" or not answers:
        return None
    splits = ("train", "eval", "test") if training else ("eval", "test")
    coverage = answer_coverage(config, datasets, answers, splits)
    if training and config.task.framing == "discriminative":
        missing, total = coverage.splits.get("train", (0, 0))
        if total and missing / total > MAX_UNANSWERABLE_TRAIN_SHARE:
            raise ConfigError(
                f"task.answer_list: {missing} of {total} training questions ({100.0 * missing / total:.1f}%) have "
                f"none of their answers among the {coverage.num_answers} answers of {coverage.source}, so the VQA "
                f"classifier would train them on all-zero targets; at most {100 * MAX_UNANSWERABLE_TRAIN_SHARE:.0f}% "
                "is allowed (MAX_UNANSWERABLE_TRAIN_SHARE in vlpeft.training.answer_coverage). Add the missing answers "
                "to the list, or leave task.answer_list unset to build the vocabulary from the training answers"
            )
    return coverage
