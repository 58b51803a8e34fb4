"""Writers for the standard file formats that :mod:`vlpeft.tasks` reads.

- VQAv2 (official): ``v2_OpenEnded_mscoco_<tag>_questions.json`` ``{"questions": [{"image_id", "question",
  "question_id"}]}`` and ``v2_mscoco_<tag>_annotations.json`` ``{"annotations": [{"question_id", "image_id",
  "question_type", "answer_type", "multiple_choice_answer", "answers": [{"answer", "answer_confidence",
  "answer_id"}] * 10}]}``; images ``<tag>/COCO_<tag>_<12-digit id>.jpg``.
- COCO Karpathy captions: ``dataset_coco.json`` ``{"images": [{"filepath", "filename", "imgid", "split",
  "sentences": [{"raw", "tokens", "imgid", "sentid"}], "sentids", "cocoid"}], "dataset": "coco"}``.
- SNLI-VE: JSON Lines with ``Flickr30K_ID``, ``sentence1``, ``sentence2``, ``gold_label``, ``pairID`` (plus the
  ``annotator_labels``, ``captionID`` and parse-free fields real files carry); images ``<Flickr30K_ID>.jpg``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpeft.data.language import Hypothesis, Question, answer_alternatives

_WORD = re.compile(r"[a-z0-9]+")


def coco_file_name(tag: str, image_id: int) -> str:
    """``COCO_<tag>_<12-digit id>.jpg``, e.g. ``COCO_train2014_000000000009.jpg``."""
    return f"COCO_{tag}_{image_id:012d}.jpg"


def vqa_question_file(tag: str) -> str:
    return f"v2_OpenEnded_mscoco_{tag}_questions.json"


def vqa_annotation_file(tag: str) -> str:
    return f"v2_mscoco_{tag}_annotations.json"


def caption_tokens(raw: str) -> list[str]:
    """Karpathy-style tokens: lower case words, punctuation dropped."""
    return _WORD.findall(raw.lower())


def _dump(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, separators=(",", ":"))
    os.replace(tmp, path)


def human_answers(question: Question, rng: np.random.Generator, noise: float) -> list[dict[str, Any]]:
    """Ten simulated annotator answers: the true answer, each replaced with probability ``noise`` by another
    answer of the same kind (so the VQA soft score is informative, as with real annotators)."""
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"annotator noise must be in [0, 0.5), got {noise}")
    alternatives = answer_alternatives(question.answer)
    answers = []
    for answer_id in range(1, 11):
        if rng.random() < noise:
            answer, confidence = alternatives[int(rng.integers(len(alternatives)))], "maybe"
        else:
            answer, confidence = question.answer, "yes"
        answers.append({"answer": answer, "answer_confidence": confidence, "answer_id": answer_id})
    return answers


def write_vqa_split(
    out_dir: Path, tag: str, items: Iterable[tuple[int, int, Question, list[dict[str, Any]]]]
) -> tuple[Path, Path]:
    """Write the official question and annotation files of one split.

    Args:
        items: ``(question_id, image_id, question, ten answer dicts)``.

    Returns: (questions path, annotations path).
    """
    questions, annotations = [], []
    for question_id, image_id, question, answers in items:
        questions.append({"image_id": image_id, "question": question.text, "question_id": question_id})
        counts = Counter(a["answer"] for a in answers)
        annotations.append({
            "question_id": question_id,
            "image_id": image_id,
            "question_type": question.question_type,
            "answer_type": question.answer_type,
            "multiple_choice_answer": counts.most_common(1)[0][0],
            "answers": answers,
        })
    info = {"description": "vlpeft synthetic scenes (procedurally generated)", "version": "2.0"}
    q_path = out_dir / vqa_question_file(tag)
    a_path = out_dir / vqa_annotation_file(tag)
    _dump(q_path, {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": tag,
                   "license": {"name": "CC0"}, "questions": questions})
    _dump(a_path, {"info": info, "data_type": "mscoco", "data_subtype": tag, "license": {"name": "CC0"},
                   "annotations": annotations})
    return q_path, a_path


def write_karpathy_captions(path: Path, images: Sequence[tuple[str, str, int, Sequence[str]]]) -> Path:
    """Write ``dataset_coco.json``.

    Args:
        images: ``(karpathy split, image tag, coco id, raw captions)`` in order; the file name is
            ``COCO_<tag>_<id>.jpg`` under ``filepath = tag``.
    """
    records = []
    sentence_id = 0
    for img_index, (split, tag, coco_id, captions) in enumerate(images):
        sentences = []
        for raw in captions:
            sentences.append({"tokens": caption_tokens(raw), "raw": raw, "imgid": img_index, "sentid": sentence_id})
            sentence_id += 1
        records.append({
            "filepath": tag,
            "sentids": [s["sentid"] for s in sentences],
            "filename": coco_file_name(tag, coco_id),
            "imgid": img_index,
            "split": split,
            "sentences": sentences,
            "cocoid": coco_id,
        })
    _dump(path, {"images": records, "dataset": "coco"})
    return path


def write_snli_ve_split(path: Path, items: Iterable[tuple[int, str, int, Hypothesis]]) -> Path:
    """Write one SNLI-VE JSON Lines file.

    Args:
        items: ``(flickr30k id, premise caption, index of the hypothesis for this image, hypothesis)``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for flickr_id, premise, k, hypothesis in items:
            record = {
                "annotator_labels": [hypothesis.label],
                "captionID": f"{flickr_id}.jpg#0",
                "gold_label": hypothesis.label,
                "pairID": f"{flickr_id}.jpg#0r{k}",
                "sentence1": premise,
                "sentence2": hypothesis.text,
                "Flickr30K_ID": str(flickr_id),
            }
            handle.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path
