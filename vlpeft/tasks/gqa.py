"""GQA (balanced question files) as a VQA-like task: one short answer per question, scored by exact match.

Items are VQA-compatible (``question``, ``question_id``, ``answers`` = ``[answer]``, ``answer_scores`` =
``{answer: 1.0}``, ``multiple_choice_answer``), so the VQA collators, prompts and inference serve GQA unchanged;
only the metric differs (:func:`vlpeft.metrics.exact_match.gqa_accuracy`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpeft.tasks._io import RecordError, read_json
from vlpeft.tasks._io import field as get_field
from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy
from vlpeft.tasks.images import (
    ImageFolderIndex,
    as_image_index,
    check_image,
    load_record_image,
    validate_image_check,
)
from vlpeft.tasks.record_dataset import RecordDataset
from vlpeft.tasks.vqa import basic_answer_normalizer

#: Image file suffixes tried for an ``imageId`` (the release ships ``images/<imageId>.jpg``).
GQA_IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class GQARecord:
    """One GQA question.

    Attributes:
        question_id: the key of the question in the file (a string such as ``"20968379"``).
        image_id: ``imageId`` (e.g. ``"n161313"`` or ``"2354786"``).
        question: ``question``.
        answer: ``answer`` (the short answer; ``None`` in the submission files, which have none).
        full_answer: ``fullAnswer`` (``None`` when absent).
        structural_type: ``types["structural"]`` (verify, query, choose, logical, compare), ``None`` when absent.
        image_path: resolved ``<imageId>.jpg``; source: "file, question id" for error messages.
    """

    question_id: str
    image_id: str
    question: str
    answer: str | None
    full_answer: str | None
    structural_type: str | None
    image_path: Path
    source: str

    @property
    def answers(self) -> tuple[str, ...]:
        return () if self.answer is None else (basic_answer_normalizer(self.answer),)

    @property
    def answer_scores(self) -> dict[str, float]:
        return {a: 1.0 for a in self.answers}


class GQADataset(RecordDataset[GQARecord]):
    """GQA questions with lazily loaded images.

    ``dataset[i]`` is a VQA-compatible dict: ``image``, ``image_id``, ``question_id``, ``question``, ``answer``,
    ``answers`` (``[answer]``, lower-cased; empty without an answer), ``answer_scores``, ``multiple_choice_answer``,
    ``full_answer``, ``structural_type``.
    """

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        answers = list(r.answers)
        return {"image": load_record_image(r, self.image_transform), "image_id": r.image_id,
                "question_id": r.question_id, "question": r.question, "answer": r.answer, "answers": answers,
                "answer_scores": dict(r.answer_scores), "multiple_choice_answer": answers[0] if answers else None,
                "answer_type": None, "question_type": None, "full_answer": r.full_answer,
                "structural_type": r.structural_type}

    @classmethod
    def from_balanced(
        cls,
        path: str | os.PathLike,
        image_dir: str | os.PathLike | Sequence[str | os.PathLike] | ImageFolderIndex,
        *,
        policy: BadInputPolicy | None = None,
        image_check: str = "exists",
        image_transform: Callable[[Any], Any] | None = None,
    ) -> GQADataset:
        """Load a GQA question file (``{train,val,testdev}_balanced_questions.json``, or the submission files).

        Format: one JSON object keyed by question id, each value ``{"imageId": str, "question": str,
        "answer": str, "fullAnswer": str, "types": {"structural", "semantic", "detailed"}, "isBalanced", "groups",
        "semantic", "semanticStr", "annotations", "equivalent", ...}``; ``answer`` may be absent (the submission
        files ``test_balanced_questions.json`` / ``submission_all_questions.json`` have none). Other fields are
        ignored. ``image_dir``: the ``images/`` folder of the release (``<imageId>.jpg``; ``.png`` also found).

        Bad input: a value that is not an object or lacks ``imageId`` / ``question``, or an ``answer`` that is not
        a non-empty string -> ``malformed_record``; no image file -> ``missing_image``; no records ->
        ``empty_split``. Messages name the file and the question id.
        """
        policy = policy or BadInputPolicy()
        decode = validate_image_check(image_check)
        index = as_image_index(image_dir)
        file = str(path)
        data = read_json(path)
        if not isinstance(data, dict):
            raise BadInputError(f"GQA question file {file!r}: expected a JSON object keyed by question id, got "
                                f"{type(data).__name__}", "malformed_record")
        records: list[GQARecord] = []
        skipped_before = policy.total
        for qid, obj in data.items():
            where = f"GQA question file {file!r} question {qid!r}"
            try:
                if not isinstance(obj, dict):
                    raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
                image_id = str(get_field(obj, "imageId", (str, int))).strip()
                question = get_field(obj, "question", str)
                answer = get_field(obj, "answer", str, optional=True)
                if answer is not None and not answer.strip():
                    raise RecordError("field 'answer' is empty")
                full_answer = get_field(obj, "fullAnswer", str, optional=True)
                types = obj.get("types")
                structural = types.get("structural") if isinstance(types, dict) else None
            except RecordError as err:
                policy.handle("malformed_record", f"{where}: {err}")
                continue
            image_path = _find_image(index, image_id)
            if not check_image(image_path, f"{where} (imageId {image_id!r})", index, policy, decode):
                continue
            records.append(GQARecord(str(qid), image_id, question, answer, full_answer,
                                     structural if isinstance(structural, str) else None, image_path, where))
        if not records and policy.total == skipped_before:
            policy.handle("empty_split", f"GQA question file {file!r} holds no questions (empty split)")
        elif not records:
            policy.handle("empty_split", f"GQA question file {file!r}: every question was skipped as bad input")
        policy.log_report()
        return cls(records, policy, image_transform)


def _find_image(index: ImageFolderIndex, image_id: str) -> Path | None:
    """``<imageId>.jpg`` (or ``.jpeg`` / ``.png``) by file name only: GQA ids such as ``n161313`` and ``161313``
    are different images, so the index's numeric-id fallback must not be used."""
    for suffix in GQA_IMAGE_SUFFIXES:
        name = f"{image_id}{suffix}"
        found = index.find(name, file_name=name)
        if found is not None and found.name == name:
            return found
    return None
