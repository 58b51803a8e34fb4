"""SNLI-VE (visual entailment): official JSON Lines files with Flickr30k images; 3 labels."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpeft.tasks._io import RecordError, iter_jsonl
from vlpeft.tasks._io import field as get_field
from vlpeft.tasks.bad_input import BadInputPolicy
from vlpeft.tasks.images import (
    ImageFolderIndex,
    as_image_index,
    check_image,
    load_record_image,
    validate_image_check,
)
from vlpeft.tasks.record_dataset import RecordDataset

#: Label set in label-id order.
SNLI_VE_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
SNLI_VE_LABEL2ID: dict[str, int] = {label: i for i, label in enumerate(SNLI_VE_LABELS)}


@dataclass(frozen=True)
class SNLIVERecord:
    """One (image, hypothesis) pair.

    Attributes:
        pair_id: ``pairID`` from the file, or ``"<file>:<line>"`` when absent.
        image_id: ``Flickr30K_ID`` as a string (e.g. ``"3416050480"``).
        hypothesis: ``sentence2``.
        premise: ``sentence1`` (the Flickr30k caption the hypothesis was written for), ``None`` if absent.
        label: one of :data:`SNLI_VE_LABELS`; label_id its index.
        image_path: resolved ``<Flickr30K_ID>.jpg``.
        source: "file, line" description used in error messages.
    """

    pair_id: str
    image_id: str
    hypothesis: str
    premise: str | None
    label: str
    label_id: int
    image_path: Path
    source: str


class SNLIVEDataset(RecordDataset[SNLIVERecord]):
    """SNLI-VE pairs with lazily loaded images.

    ``dataset[i]`` is a dict: ``image`` (PIL RGB, or the output of ``image_transform``), ``image_id``,
    ``pair_id``, ``hypothesis``, ``premise``, ``label`` (str) and ``label_id`` (int, index in
    :data:`SNLI_VE_LABELS`).
    """

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        image = load_record_image(r, self.image_transform)
        return {"image": image, "image_id": r.image_id, "pair_id": r.pair_id, "hypothesis": r.hypothesis,
                "premise": r.premise, "label": r.label, "label_id": r.label_id}

    @classmethod
    def from_jsonl(
        cls,
        path: str | os.PathLike,
        image_dir: str | os.PathLike | Sequence[str | os.PathLike] | ImageFolderIndex,
        *,
        policy: BadInputPolicy | None = None,
        image_check: str = "exists",
        image_transform: Callable[[Any], Any] | None = None,
    ) -> SNLIVEDataset:
        """Load an official SNLI-VE file (``snli_ve_{train,dev,test}.jsonl``).

        Format: one JSON object per line with at least ``"Flickr30K_ID"`` (str or int, e.g. ``"3416050480"``),
        ``"sentence2"`` (the hypothesis) and ``"gold_label"`` (``"entailment"``, ``"neutral"`` or
        ``"contradiction"``); ``"sentence1"`` (premise) and ``"pairID"`` are read when present, other fields
        (parses, ``captionID``, ``annotator_labels``, ...) are ignored. Blank lines are ignored.

        ``image_dir`` holds the Flickr30k images named ``<Flickr30K_ID>.jpg`` (directly or one sub-folder down).

        Bad input: a line that is not a JSON object or lacks a field -> ``malformed_record``; a ``gold_label`` of
        ``"-"`` (no annotator majority) or any value outside the label set -> ``unknown_label``; no image file ->
        ``missing_image``; no records -> ``empty_split``.
        """
        policy = policy or BadInputPolicy()
        decode = validate_image_check(image_check)
        index = as_image_index(image_dir)
        file = str(path)
        records: list[SNLIVERecord] = []
        skipped_before = policy.total
        for line_number, obj in iter_jsonl(path, policy):
            where = f"SNLI-VE file {file!r} line {line_number}"
            try:
                image_id = str(get_field(obj, "Flickr30K_ID", (str, int))).strip()
                hypothesis = get_field(obj, "sentence2", str)
                premise = get_field(obj, "sentence1", str, optional=True)
                pair_id = get_field(obj, "pairID", str, optional=True)
                if "gold_label" not in obj or obj["gold_label"] is None:
                    raise RecordError("missing field 'gold_label'")
                label = obj["gold_label"]
            except RecordError as err:
                policy.handle("malformed_record", f"{where}: {err}")
                continue
            if pair_id is not None:
                where += f" (pairID {pair_id!r})"
            if label not in SNLI_VE_LABEL2ID:
                policy.handle("unknown_label",
                              f"{where}: gold_label {label!r} is not one of {SNLI_VE_LABELS}"
                              + (" ('-' marks pairs without an annotator majority)" if label == "-" else ""))
                continue
            image_path = index.find(image_id, file_name=f"{image_id}.jpg")
            if not check_image(image_path, where, index, policy, decode):
                continue
            records.append(SNLIVERecord(pair_id or f"{file}:{line_number}", image_id, hypothesis, premise, label,
                                        SNLI_VE_LABEL2ID[label], image_path, where))
        if not records and policy.total == skipped_before:
            policy.handle("empty_split", f"SNLI-VE file {file!r} holds no records (empty split)")
        elif not records:
            policy.handle("empty_split", f"SNLI-VE file {file!r}: every record was skipped as bad input")
        policy.log_report()
        return cls(records, policy, image_transform)
