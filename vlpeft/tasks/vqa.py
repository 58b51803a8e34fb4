"""VQAv2 data: official question/annotation files, the Karpathy-split JSON of VL-T5 / VL-Adapter / the routing
paper, answer vocabularies and soft scores.

Soft scores. The official VQA accuracy of a prediction equal to ``c`` of the ``n`` human answers is the mean, over
the ``n`` leave-one-out subsets of ``n - 1`` answers, of ``min(1, matches / 3)``. For ``n = 10`` this is exactly
``min(1, 0.3 * c)`` (0, 0.3, 0.6, 0.9, 1.0 for c = 0, 1, 2, 3, >= 4), the values stored in VL-T5's ``label`` field.
The simpler ``min(1, c / 3)`` is *not* the official value (0.33 / 0.67 for c = 1 / 2); :func:`vqa_soft_scores`
implements the official leave-one-out average. Answers are compared after ``answer_normalizer`` (default
:func:`basic_answer_normalizer`; pass the official VQA normaliser from ``vlpeft.metrics`` to reproduce the
``trainval_ans2label.json`` answer strings exactly).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vlpeft.tasks._io import RecordError, read_json, require_key
from vlpeft.tasks._io import field as get_field
from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy
from vlpeft.tasks.images import (
    ImageFolderIndex,
    as_image_index,
    check_image,
    load_record_image,
    numeric_image_id,
    validate_image_check,
)

AnswerNormalizer = Callable[[str], str]


def basic_answer_normalizer(answer: str) -> str:
    """Replace newlines/tabs by spaces, lowercase, collapse runs of spaces, strip."""
    return " ".join(answer.replace("\n", " ").replace("\t", " ").lower().split())


def vqa_soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """Official VQA soft score of every distinct answer among ``answers`` (already normalised).

    ``score(a) = mean_i min(1, #{j != i : answers[j] == a} / 3)`` over the ``n`` annotators i; for n = 10 this
    equals ``min(1, 0.3 * count(a))``. Raises ``ValueError`` for an empty list.
    """
    if not answers:
        raise ValueError("vqa_soft_scores needs at least one answer")
    n = len(answers)
    counts = Counter(answers)
    scores: dict[str, float] = {}
    for answer, c in counts.items():
        # the c annotators who gave `answer` see c - 1 matches among the others; the n - c others see c.
        total = c * min(1.0, (c - 1) / 3.0) + (n - c) * min(1.0, c / 3.0)
        scores[answer] = total / n
    return scores


@dataclass(frozen=True)
class VQARecord:
    """One question.

    Attributes:
        question_id: official question id.
        image_id: numeric COCO image id.
        question: question text.
        answers: the raw human answers (10 in VQAv2), in file order; empty when the source has none.
        answer_scores: training target ``{normalised answer: soft score}`` (official leave-one-out scores when
            ``answers`` came from the annotations; the ``label`` field as given for the Karpathy JSON).
        answer_type / question_type / multiple_choice_answer: official annotation fields (``None`` if absent).
        image_path: resolved image file.
        source: "file, record" description used in error messages.
    """

    question_id: int | str
    image_id: int
    question: str
    answers: tuple[str, ...]
    answer_scores: Mapping[str, float]
    answer_type: str | None
    question_type: str | None
    multiple_choice_answer: str | None
    image_path: Path
    source: str

    def answer_counts(self, normalizer: AnswerNormalizer = basic_answer_normalizer) -> dict[str, int]:
        """``{normalised answer: number of annotators}`` over :attr:`answers`."""
        return dict(Counter(normalizer(a) for a in self.answers))


class AnswerVocab:
    """Answer vocabulary for classifier heads: ``ans2label`` (dict) and ``label2ans`` (list).

    The JSON written by :meth:`save` is a plain ``{answer: label}`` object, the layout of VL-T5 / LXMERT's
    ``trainval_ans2label.json``; :meth:`save_label2ans` writes the ``trainval_label2ans.json`` list. :meth:`load`
    reads either.
    """

    def __init__(self, label2ans: Sequence[str]) -> None:
        self.label2ans: list[str] = list(label2ans)
        if not self.label2ans:
            raise ValueError("an answer vocabulary needs at least one answer")
        self.ans2label: dict[str, int] = {}
        for label, answer in enumerate(self.label2ans):
            if not isinstance(answer, str):
                raise ValueError(f"answer at label {label} is {answer!r}, expected a string")
            if answer in self.ans2label:
                raise ValueError(f"answer {answer!r} occurs twice (labels {self.ans2label[answer]} and {label})")
            self.ans2label[answer] = label

    def __len__(self) -> int:
        return len(self.label2ans)

    def __contains__(self, answer: object) -> bool:
        return answer in self.ans2label

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnswerVocab) and other.label2ans == self.label2ans

    def __repr__(self) -> str:
        return f"AnswerVocab({len(self)} answers)"

    @classmethod
    def build(cls, records: Iterable[VQARecord], top_k: int = 3129, min_count: int = 1) -> AnswerVocab:
        """The ``top_k`` most frequent answers.

        Frequency of an answer = number of questions whose :attr:`VQARecord.answer_scores` give it a positive
        score (each question counts once per distinct answer). Ties are broken by the answer string, so the
        result is deterministic. Fewer than ``top_k`` distinct answers is fine; ``min_count`` drops rarer ones.
        """
        if top_k < 1 or min_count < 1:
            raise ValueError(f"top_k and min_count must be >= 1, got {top_k} and {min_count}")
        counts: Counter[str] = Counter()
        for record in records:
            counts.update(a for a, s in record.answer_scores.items() if s > 0)
        ranked = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
        if not ranked:
            raise ValueError(f"no answer occurs at least {min_count} time(s); cannot build a vocabulary")
        return cls(ranked[:top_k])

    def save(self, path: str | os.PathLike) -> None:
        """Write ``{answer: label}`` (``trainval_ans2label.json`` layout)."""
        Path(path).write_text(json.dumps(self.ans2label, ensure_ascii=False), encoding="utf-8")

    def save_label2ans(self, path: str | os.PathLike) -> None:
        """Write ``[answer, ...]`` indexed by label (``trainval_label2ans.json`` layout)."""
        Path(path).write_text(json.dumps(self.label2ans, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnswerVocab:
        """Read an ``ans2label`` object or a ``label2ans`` list. Labels must be exactly 0 .. n-1."""
        data = read_json(path)
        if isinstance(data, list):
            return cls(data)
        if isinstance(data, dict):
            labels = sorted(data.values()) if all(isinstance(v, int) and not isinstance(v, bool)
                                                  for v in data.values()) else None
            if labels != list(range(len(data))):
                raise ValueError(f"{str(path)!r}: ans2label labels must be the integers 0..{len(data) - 1}, each once")
            label2ans = [""] * len(data)
            for answer, label in data.items():
                label2ans[label] = answer
            return cls(label2ans)
        raise ValueError(f"{str(path)!r}: expected an ans2label object or a label2ans list, got {type(data).__name__}")

    def soft_target(self, answer_scores: Mapping[str, float]) -> torch.Tensor:
        """Target vector (num_answers,) float32: each in-vocabulary answer's score; others contribute nothing."""
        target = torch.zeros(len(self), dtype=torch.float32)
        for answer, score in answer_scores.items():
            label = self.ans2label.get(answer)
            if label is not None:
                target[label] = float(score)
        return target

    def soft_targets(self, batch_scores: Sequence[Mapping[str, float]]) -> torch.Tensor:
        """Targets (batch, num_answers) float32."""
        return torch.stack([self.soft_target(s) for s in batch_scores]) if batch_scores else torch.zeros(0, len(self))


@dataclass
class _Build:
    """Book-keeping while loading one split."""

    policy: BadInputPolicy
    index: ImageFolderIndex
    decode: bool
    vocab: AnswerVocab | None
    records: list[VQARecord] = field(default_factory=list)
    out_of_vocab_answer_entries: int = 0

    def add(self, record: VQARecord) -> None:
        if not check_image(record.image_path if record.image_path.name else None, record.source, self.index,
                           self.policy, self.decode):
            return
        if self.vocab is not None:
            in_vocab = [a for a in record.answer_scores if a in self.vocab]
            if not in_vocab:
                self.policy.handle("answer_not_in_vocab",
                                   f"{record.source}: none of the answers {sorted(record.answer_scores)} is in the "
                                   f"answer vocabulary ({len(self.vocab)} answers)")
                return
            self.out_of_vocab_answer_entries += len(record.answer_scores) - len(in_vocab)
        self.records.append(record)


class VQADataset(Dataset):
    """VQA questions with lazily loaded images.

    ``dataset[i]`` is a dict: ``image`` (PIL RGB, or the output of ``image_transform``), ``image_id``,
    ``question_id``, ``question``, ``answers`` (list of raw answers), ``answer_scores`` (dict), ``answer_type``,
    ``question_type``, ``multiple_choice_answer``.

    Use :meth:`from_official` or :meth:`from_karpathy`. Passing ``answer_vocab`` marks a question whose answers
    are all outside the vocabulary as bad input (reason ``answer_not_in_vocab``): do this for classifier
    *training* splits only; evaluation splits must keep every question, or accuracy is overstated. Answers
    outside the vocabulary in otherwise valid questions are counted in :attr:`out_of_vocab_answer_entries`.

    Image files are checked at construction (``image_check="exists"``: the file is present;
    ``"decode"``: the file is decoded, so a corrupt image is skipped/raised up front). With ``"exists"`` a
    corrupt image found later by ``__getitem__`` raises :class:`~vlpeft.tasks.bad_input.BadInputError`.
    """

    def __init__(
        self,
        records: Sequence[VQARecord],
        policy: BadInputPolicy,
        image_transform: Callable[[Any], Any] | None = None,
        out_of_vocab_answer_entries: int = 0,
    ) -> None:
        self.records: list[VQARecord] = list(records)
        self.policy = policy
        self.image_transform = image_transform
        self.out_of_vocab_answer_entries = out_of_vocab_answer_entries

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        image = load_record_image(r, self.image_transform)
        return {
            "image": image,
            "image_id": r.image_id,
            "question_id": r.question_id,
            "question": r.question,
            "answers": list(r.answers),
            "answer_scores": dict(r.answer_scores),
            "answer_type": r.answer_type,
            "question_type": r.question_type,
            "multiple_choice_answer": r.multiple_choice_answer,
        }

    def question_ids(self) -> list[int | str]:
        return [r.question_id for r in self.records]

    @classmethod
    def from_official(
        cls,
        questions_json: str | os.PathLike,
        annotations_json: str | os.PathLike | None,
        image_dir: str | os.PathLike | Sequence[str | os.PathLike] | ImageFolderIndex,
        *,
        policy: BadInputPolicy | None = None,
        image_check: str = "exists",
        answer_vocab: AnswerVocab | None = None,
        answer_normalizer: AnswerNormalizer = basic_answer_normalizer,
        image_transform: Callable[[Any], Any] | None = None,
    ) -> VQADataset:
        """Load an official VQAv2 split.

        Format of ``questions_json`` (e.g. ``v2_OpenEnded_mscoco_val2014_questions.json``): a JSON object whose
        ``"questions"`` list holds ``{"image_id": int, "question": str, "question_id": int}``.

        Format of ``annotations_json`` (e.g. ``v2_mscoco_val2014_annotations.json``; ``None`` for test splits,
        which then have no answers): a JSON object whose ``"annotations"`` list holds
        ``{"question_id": int, "image_id": int, "question_type": str, "answer_type": str,
        "multiple_choice_answer": str, "answers": [{"answer": str, "answer_confidence": str, "answer_id": int},
        ... 10 entries]}``.

        ``image_dir``: a COCO image folder, a folder holding ``train2014/`` and ``val2014/``, several folders, or a
        prebuilt :class:`ImageFolderIndex`; images are found by numeric id (``COCO_val2014_000000393225.jpg``).

        Bad input: a question without an annotation (when annotations are given), an annotation without a
        question, mismatched image ids, missing fields or wrong types, an empty answer list -> ``malformed_record``;
        no image file -> ``missing_image``; an empty ``questions`` list -> ``empty_split``.
        """
        policy = policy or BadInputPolicy()
        decode = validate_image_check(image_check)
        index = as_image_index(image_dir)
        qfile = str(questions_json)
        questions = require_key(read_json(questions_json), "questions", f"questions file {qfile!r}")
        if not isinstance(questions, list):
            raise BadInputError(f"questions file {qfile!r}: 'questions' must be a list", "malformed_record")
        annotations_by_qid: dict[Any, tuple[int, dict]] | None = None
        afile = str(annotations_json) if annotations_json is not None else None
        if annotations_json is not None:
            annotations = require_key(read_json(annotations_json), "annotations", f"annotations file {afile!r}")
            if not isinstance(annotations, list):
                raise BadInputError(f"annotations file {afile!r}: 'annotations' must be a list", "malformed_record")
            annotations_by_qid = {}
            for i, ann in enumerate(annotations):
                qid = ann.get("question_id") if isinstance(ann, dict) else None
                if qid is None or isinstance(qid, (bool, float, list, dict)):
                    policy.handle("malformed_record",
                                  f"annotations file {afile!r}, annotation #{i}: missing or invalid 'question_id'")
                    continue
                if qid in annotations_by_qid:
                    policy.handle("malformed_record",
                                  f"annotations file {afile!r}, annotation #{i}: duplicate question_id {qid!r}")
                    continue
                annotations_by_qid[qid] = (i, ann)
        if not questions:
            policy.handle("empty_split", f"questions file {qfile!r} holds no questions (empty split)")
            return cls([], policy, image_transform)

        build = _Build(policy, index, decode, answer_vocab)
        seen_qids: set[Any] = set()
        for i, q in enumerate(questions):
            where = f"questions file {qfile!r}, question #{i}"
            try:
                if not isinstance(q, dict):
                    raise RecordError(f"expected an object, got {type(q).__name__}")
                qid = get_field(q, "question_id", (int, str))
                where = f"questions file {qfile!r}, question_id {qid!r}"
                image_id = get_field(q, "image_id", (int, str))
                question = get_field(q, "question", str)
                answers: tuple[str, ...] = ()
                scores: dict[str, float] = {}
                answer_type = question_type = mc_answer = None
                if annotations_by_qid is not None:
                    seen_qids.add(qid)
                    if qid not in annotations_by_qid:
                        raise RecordError(f"no annotation in {afile!r}")
                    ai, ann = annotations_by_qid[qid]
                    where += f" (annotation #{ai} in {afile!r})"
                    ann_image = get_field(ann, "image_id", (int, str))
                    if numeric_image_id(ann_image) != numeric_image_id(image_id):
                        raise RecordError(f"image_id {image_id!r} in questions but {ann_image!r} in annotations")
                    answers = _official_answers(ann)
                    scores = vqa_soft_scores([answer_normalizer(a) for a in answers])
                    answer_type = get_field(ann, "answer_type", str, optional=True)
                    question_type = get_field(ann, "question_type", str, optional=True)
                    mc_answer = get_field(ann, "multiple_choice_answer", str, optional=True)
                record = VQARecord(qid, numeric_image_id(image_id), question, answers, scores, answer_type,
                                   question_type, mc_answer, _resolve(index, image_id), where)
            except (RecordError, ValueError) as err:
                policy.handle("malformed_record", f"{where}: {err}")
                continue
            build.add(record)
        if annotations_by_qid is not None:
            for qid in annotations_by_qid.keys() - seen_qids:
                ai, _ = annotations_by_qid[qid]
                policy.handle("malformed_record",
                              f"annotations file {afile!r}, annotation #{ai}: question_id {qid!r} has no question "
                              f"in {qfile!r}")
        return cls._finish(build, image_transform, qfile)

    @classmethod
    def from_karpathy(
        cls,
        json_path: str | os.PathLike,
        image_dir: str | os.PathLike | Sequence[str | os.PathLike] | ImageFolderIndex,
        *,
        annotations_json: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        policy: BadInputPolicy | None = None,
        image_check: str = "exists",
        answer_vocab: AnswerVocab | None = None,
        answer_normalizer: AnswerNormalizer = basic_answer_normalizer,
        image_transform: Callable[[Any], Any] | None = None,
    ) -> VQADataset:
        """Load a Karpathy-split VQA file (``karpathy_{train,val,test}.json`` of VL-T5 / VL-Adapter / routing).

        Format: a JSON list of objects ``{"img_id": "COCO_val2014_000000393225", "sent": str,
        "question_id": int, "label": {answer: score, ...}}``; optional ``"answer_type"``, ``"question_type"``
        and ``"answers"`` (list of strings or of ``{"answer": str}`` objects). ``label`` holds the soft scores
        (official leave-one-out values, ``min(1, 0.3 * count)``) and is used as given; it may be empty for test
        questions.

        The file has no human answers; pass the official ``annotations_json`` file(s) (train2014 and val2014,
        since Karpathy train draws from both) to attach the 10 answers, ``answer_type`` and ``question_type``
        for the official metric; a question missing from them is then ``malformed_record``.
        Images are resolved by the number in ``img_id`` across every folder of ``image_dir`` (routing.md Q15).
        """
        policy = policy or BadInputPolicy()
        decode = validate_image_check(image_check)
        index = as_image_index(image_dir)
        kfile = str(json_path)
        data = read_json(json_path)
        if not isinstance(data, list):
            raise BadInputError(f"Karpathy VQA file {kfile!r}: expected a JSON list of questions", "malformed_record")
        annotations = _load_annotation_index(annotations_json, policy)
        if not data:
            policy.handle("empty_split", f"Karpathy VQA file {kfile!r} holds no questions (empty split)")
            return cls([], policy, image_transform)
        build = _Build(policy, index, decode, answer_vocab)
        for i, d in enumerate(data):
            where = f"Karpathy VQA file {kfile!r}, record #{i}"
            try:
                if not isinstance(d, dict):
                    raise RecordError(f"expected an object, got {type(d).__name__}")
                qid = get_field(d, "question_id", (int, str))
                where = f"Karpathy VQA file {kfile!r}, question_id {qid!r}"
                img_id = get_field(d, "img_id", (str, int))
                question = get_field(d, "sent", str)
                label = get_field(d, "label", dict)
                scores = {}
                for answer, score in label.items():
                    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
                        raise RecordError(f"label score for {answer!r} is {score!r}, expected a number in [0, 1]")
                    scores[answer] = float(score)
                answer_type = get_field(d, "answer_type", str, optional=True)
                question_type = get_field(d, "question_type", str, optional=True)
                mc_answer = None
                answers = _official_answers(d) if d.get("answers") is not None else ()
                if annotations is not None:
                    if qid not in annotations:
                        raise RecordError(f"question_id not found in the annotation files {annotations.files}")
                    ann = annotations[qid]
                    answers = _official_answers(ann)
                    answer_type = answer_type or get_field(ann, "answer_type", str, optional=True)
                    question_type = question_type or get_field(ann, "question_type", str, optional=True)
                    mc_answer = get_field(ann, "multiple_choice_answer", str, optional=True)
                record = VQARecord(qid, numeric_image_id(img_id), question, answers, scores, answer_type,
                                   question_type, mc_answer, _resolve(index, img_id), where)
            except (RecordError, ValueError) as err:
                policy.handle("malformed_record", f"{where}: {err}")
                continue
            build.add(record)
        return cls._finish(build, image_transform, kfile)

    @classmethod
    def _finish(cls, build: _Build, image_transform: Callable[[Any], Any] | None, source: str) -> VQADataset:
        if not build.records:
            build.policy.handle("empty_split", f"{source!r}: every question was skipped as bad input; nothing left")
        build.policy.log_report()
        return cls(build.records, build.policy, image_transform, build.out_of_vocab_answer_entries)


def _resolve(index: ImageFolderIndex, image_id: int | str) -> Path:
    """The image path, or an empty ``Path()`` marker that :class:`_Build` reports as ``missing_image``."""
    return index.find(image_id) or Path()


def _official_answers(ann: dict) -> tuple[str, ...]:
    raw = get_field(ann, "answers", list)
    if not raw:
        raise RecordError("'answers' is empty")
    answers = []
    for j, a in enumerate(raw):
        text = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(text, str):
            raise RecordError(f"answers[{j}] is {a!r}, expected a string or an object with a string 'answer'")
        answers.append(text)
    return tuple(answers)


class _AnnotationIndex(dict):
    files: list[str]


def _load_annotation_index(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None, policy: BadInputPolicy
) -> _AnnotationIndex | None:
    if paths is None:
        return None
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    index = _AnnotationIndex()
    index.files = [str(p) for p in paths]
    for path in paths:
        anns = require_key(read_json(path), "annotations", f"annotations file {str(path)!r}")
        if not isinstance(anns, list):
            raise BadInputError(f"annotations file {str(path)!r}: 'annotations' must be a list", "malformed_record")
        for i, ann in enumerate(anns):
            qid = ann.get("question_id") if isinstance(ann, dict) else None
            if qid is None or isinstance(qid, (bool, float, list, dict)):
                policy.handle("malformed_record",
                              f"annotations file {str(path)!r}, annotation #{i}: missing or invalid 'question_id'")
                continue
            index[qid] = ann
    return index
