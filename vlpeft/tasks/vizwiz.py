"""VizWiz data: VizWiz-VQA annotation files and VizWiz-Captions annotation files (both as released on the VizWiz
site, vizwiz.org, with the ``train/``, ``val/`` and ``test/`` image folders).

VizWiz-VQA (``train.json``, ``val.json``, ``test.json``): a JSON list of ``{"image": "VizWiz_train_00000000.jpg",
"question": str, "answers": [{"answer": str, "answer_confidence": "yes" | "maybe" | "no"}, ... 10],
"answer_type": "other" | "yes/no" | "number" | "unanswerable", "answerable": 0 | 1}``; the test split has only
``image`` and ``question``. One question per image, so the image file name is the question id (as in the official
results files ``[{"image", "answer"}]``). Unanswerable questions are kept: their answers are mostly
``"unanswerable"``, which the model learns and is scored on like any answer. The accuracy is the official VizWiz
evaluation's (:func:`vlpeft.metrics.vizwiz.vizwiz_accuracy`), not VQAv2's.

VizWiz-Captions (``annotations/train.json``, ``val.json``, ``test.json``): COCO-like ``{"images": [{"file_name":
"VizWiz_train_00000000.jpg", "vizwiz_url": str, "id": int, "text_detected": bool}], "annotations": [{"image_id":
int, "id": int, "caption": str, "is_precanned": bool, "is_rejected": bool, "text_detected": bool}]}``. Captions
marked ``is_rejected`` or ``is_precanned`` (the canned "Quality issues are too severe to recognize visual
content." answers) are dropped, as the official VizWiz-Captions evaluation drops them from the references; they
are not bad input. An image whose captions are all dropped is left out and counted as ``malformed_record``. The
captions test file lists only images (its captions are held by the evaluation server), so it cannot be scored or
loaded here: loading it stops with an error naming the file and the missing ``annotations`` key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vlpeft.tasks._io import RecordError, read_json
from vlpeft.tasks._io import field as get_field
from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy
from vlpeft.tasks.captions import CaptionDataset, CaptionView
from vlpeft.tasks.images import ImageFolderIndex, as_image_index, numeric_image_id, validate_image_check
from vlpeft.tasks.vqa import (
    AnswerNormalizer,
    AnswerVocab,
    VQADataset,
    VQARecord,
    _Build,
    _official_answers,
    basic_answer_normalizer,
    vqa_soft_scores,
)

__all__ = ["VizWizVQADataset", "is_vizwiz_vqa", "is_vizwiz_captions", "load_vizwiz_captions"]

VIZWIZ_ANSWER_TYPES: tuple[str, ...] = ("other", "yes/no", "number", "unanswerable")


def is_vizwiz_vqa(data: Any) -> bool:
    """Whether parsed JSON looks like a VizWiz-VQA annotation file (a list of records keyed by ``image``)."""
    return (isinstance(data, list) and bool(data) and isinstance(data[0], dict) and "image" in data[0]
            and "question" in data[0] and "img_id" not in data[0])


def is_vizwiz_captions(data: Any) -> bool:
    """Whether parsed JSON looks like a VizWiz-Captions file (COCO-like, annotations flagged ``is_rejected``)."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return False
    annotations = data.get("annotations")
    if isinstance(annotations, list) and annotations and isinstance(annotations[0], dict):
        return "is_rejected" in annotations[0] or "is_precanned" in annotations[0]
    images = data["images"]
    return bool(images) and isinstance(images[0], dict) and "vizwiz_url" in images[0]


class VizWizVQADataset(VQADataset):
    """A :class:`~vlpeft.tasks.vqa.VQADataset` of VizWiz-VQA questions; ``question_id`` is the image file name.

    ``official_metric = "vizwiz"`` tells scoring to use the VizWiz evaluation. :attr:`answerable` maps each
    question id to its ``answerable`` flag (``None`` for the test split).
    """

    official_metric = "vizwiz"

    def __init__(self, records: Sequence[VQARecord], policy: BadInputPolicy,
                 image_transform: Callable[[Any], Any] | None = None, out_of_vocab_answer_entries: int = 0,
                 answerable: dict[str, int | None] | None = None) -> None:
        super().__init__(records, policy, image_transform, out_of_vocab_answer_entries)
        self.answerable: dict[str, int | None] = dict(answerable or {})

    @classmethod
    def from_vizwiz(
        cls,
        annotations_json: str | os.PathLike,
        image_dir: str | os.PathLike | Sequence[str | os.PathLike] | ImageFolderIndex,
        *,
        policy: BadInputPolicy | None = None,
        image_check: str = "exists",
        answer_vocab: AnswerVocab | None = None,
        answer_normalizer: AnswerNormalizer = basic_answer_normalizer,
        image_transform: Callable[[Any], Any] | None = None,
    ) -> VizWizVQADataset:
        """Load one VizWiz-VQA split (module docstring for the format).

        ``image_dir``: the split's image folder (``val/``), or a folder holding ``train/``, ``val/``, ``test/``;
        images are found by file name (VizWiz numbers restart at 0 in every split, so numbers alone are ambiguous).
        Training targets: official leave-one-out soft scores over the answers after ``answer_normalizer``.

        Bad input: a record that is not an object, a missing/empty ``image`` or ``question``, ``answers`` that are
        empty or hold a non-string answer (any number of answers is accepted; the official files have 10), an
        ``answer_type`` outside :data:`VIZWIZ_ANSWER_TYPES`, an ``answerable`` other than 0/1, a duplicate image
        -> ``malformed_record``; no image file -> ``missing_image``; no records -> ``empty_split``. Answers must be
        present in every record or in none (the test split).
        """
        policy = policy or BadInputPolicy()
        decode = validate_image_check(image_check)
        index = as_image_index(image_dir)
        file = str(annotations_json)
        data = read_json(annotations_json)
        if not isinstance(data, list):
            raise BadInputError(f"VizWiz-VQA file {file!r}: expected a JSON list of questions, got "
                                f"{type(data).__name__}", "malformed_record")
        if not data:
            policy.handle("empty_split", f"VizWiz-VQA file {file!r} holds no questions (empty split)")
            return cls([], policy, image_transform)
        with_answers = isinstance(data[0], dict) and data[0].get("answers") is not None
        build = _Build(policy, index, decode, answer_vocab)
        answerable: dict[str, int | None] = {}
        for i, d in enumerate(data):
            where = f"VizWiz-VQA file {file!r}, record #{i}"
            try:
                if not isinstance(d, dict):
                    raise RecordError(f"expected an object, got {type(d).__name__}")
                image = get_field(d, "image", str)
                where = f"VizWiz-VQA file {file!r}, record #{i} ({image})"
                if image in answerable:
                    raise RecordError(f"image {image!r} occurs twice")
                question = get_field(d, "question", str)
                answers: tuple[str, ...] = ()
                scores: dict[str, float] = {}
                if with_answers:
                    answers = _official_answers(d)
                    scores = vqa_soft_scores([answer_normalizer(a) for a in answers])
                elif d.get("answers") is not None:
                    raise RecordError("has 'answers' but record #0 has none (answers in every record or in none)")
                answer_type = get_field(d, "answer_type", str, optional=True)
                if answer_type is not None and answer_type not in VIZWIZ_ANSWER_TYPES:
                    raise RecordError(f"answer_type {answer_type!r} is not one of {VIZWIZ_ANSWER_TYPES}")
                flag = d.get("answerable")
                if flag is not None and (isinstance(flag, bool) or flag not in (0, 1)):
                    raise RecordError(f"answerable is {flag!r}, expected 0 or 1")
                try:
                    image_id = numeric_image_id(image)
                except ValueError:
                    image_id = -1
                found = index.find(image, file_name=image)
                # by name only: a number alone would find another split's image
                path = found if found is not None and found.name == image else Path()
                record = VQARecord(image, image_id, question, answers, scores, answer_type, None, None, path, where)
            except (RecordError, ValueError) as err:
                policy.handle("malformed_record", f"{where}: {err}")
                continue
            answerable[image] = flag
            build.add(record)
        if not build.records:
            policy.handle("empty_split", f"{file!r}: every question was skipped as bad input; nothing left")
        policy.log_report()
        kept = {r.question_id for r in build.records}
        return cls(build.records, policy, image_transform, build.out_of_vocab_answer_entries,
                   {k: v for k, v in answerable.items() if k in kept})


def load_vizwiz_captions(
    annotations_json: str | os.PathLike,
    image_dir: str | os.PathLike | Sequence[str | os.PathLike] | ImageFolderIndex,
    *,
    view: CaptionView = "pairs",
    policy: BadInputPolicy | None = None,
    image_check: str = "exists",
    image_transform: Callable[[Any], Any] | None = None,
) -> CaptionDataset:
    """Load a VizWiz-Captions split into a :class:`~vlpeft.tasks.captions.CaptionDataset` (module docstring).

    Images are found by ``file_name`` (VizWiz numbers restart in every split). The same bad-input rules as
    :meth:`CaptionDataset.from_coco` apply, with ``VizWiz-Captions file`` in the messages.
    """
    def keep(annotation: dict) -> bool:
        for flag in ("is_rejected", "is_precanned"):
            value = annotation.get(flag, False)
            if not isinstance(value, bool):
                raise RecordError(f"field {flag!r} is {value!r}, expected true or false")
        return not annotation.get("is_rejected", False) and not annotation.get("is_precanned", False)

    return CaptionDataset.from_coco(annotations_json, image_dir, view=view, policy=policy, image_check=image_check,
                                    image_transform=image_transform, keep=keep, label="VizWiz-Captions file")


