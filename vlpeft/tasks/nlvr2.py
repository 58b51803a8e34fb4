"""NLVR2: a sentence about a pair of images, labelled True or False (official JSON Lines of lil-lab/nlvr).

Image naming (the official repository's README): for an identifier ``split-set_id-pair_id-sentence_id`` (e.g.
``dev-850-0-0``) the left and right images are ``split-set_id-pair_id-img0.png`` and ``...-img1.png``
(``dev-850-0-img0.png``); some of those files are JPEGs despite the suffix, which PIL reads by header. The released
image archives put ``train`` images in numbered sub-folders (the record's ``directory`` field, ``train/58/...``)
and ``dev`` / ``test1`` images in one folder each; :meth:`NLVR2Dataset.from_jsonl` looks for each file in
``images/``, ``images/<directory>/``, ``images/<split>/`` and ``images/<split>/<directory>/``.

Two images per sample: items carry ``images`` = ``[left, right]`` (and ``image`` = the left one); the families whose
layout has ``two_images`` take both (chat models in one user turn; BLIP, BLIP-2 and CLIP-BART as ``pixel_values``
(batch, 2, 3, H, W), the two images' visual tokens concatenated: :mod:`vlpeft.tasks.layouts`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpeft.tasks._io import RecordError, iter_jsonl
from vlpeft.tasks._io import field as get_field
from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy
from vlpeft.tasks.framing import TextExample, format_prompt
from vlpeft.tasks.images import load_image, validate_image_check
from vlpeft.tasks.record_dataset import RecordDataset

#: Labels as written in the files (compared case-insensitively), in label-id order.
NLVR2_LABELS: tuple[str, ...] = ("False", "True")
#: Default prompt: the sentence, then the question the target answers.
DEFAULT_NLVR2_PROMPT = "{sentence} Is this statement true or false about the two images?"
#: Default target words per label (ranked against each other at inference).
DEFAULT_NLVR2_WORDS: Mapping[str, str] = {"True": "True", "False": "False"}


@dataclass(frozen=True)
class NLVR2Record:
    """One (image pair, sentence) example.

    Attributes:
        identifier: ``split-set_id-pair_id-sentence_id``; sentence: ``sentence``; label: ``"True"`` / ``"False"``.
        image_paths: (left, right) resolved files; source: "file, line, identifier" for error messages.
    """

    identifier: str
    sentence: str
    label: str
    image_paths: tuple[Path, Path]
    source: str

    @property
    def label_id(self) -> int:
        return NLVR2_LABELS.index(self.label)


def image_names(identifier: str) -> tuple[str, str]:
    """``("split-set_id-pair_id-img0.png", "...-img1.png")`` of an identifier (official naming).

    Raises:
        ValueError: the identifier is not ``split-set_id-pair_id-sentence_id``.
    """
    parts = identifier.split("-")
    if len(parts) != 4 or not all(parts):
        raise ValueError(f"identifier {identifier!r} is not split-set_id-pair_id-sentence_id")
    stem = "-".join(parts[:3])
    return f"{stem}-img0.png", f"{stem}-img1.png"


class NLVR2Dataset(RecordDataset[NLVR2Record]):
    """NLVR2 examples with lazily loaded image pairs.

    ``dataset[i]``: ``images`` ([left, right] PIL RGB, or ``image_transform`` outputs), ``image`` (the left one),
    ``identifier``, ``sentence``, ``label`` (``"True"``/``"False"``) and ``label_id`` (0 False, 1 True).
    """

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        images = [load_image(p, r.source) for p in r.image_paths]
        if self.image_transform is not None:
            images = [self.image_transform(image) for image in images]
        return {"images": images, "image": images[0], "identifier": r.identifier, "sentence": r.sentence,
                "label": r.label, "label_id": r.label_id}

    @classmethod
    def from_jsonl(
        cls,
        path: str | os.PathLike,
        image_dir: str | os.PathLike,
        *,
        policy: BadInputPolicy | None = None,
        image_check: str = "exists",
        image_transform: Callable[[Any], Any] | None = None,
    ) -> NLVR2Dataset:
        """Load an official NLVR2 file (``train.json``, ``dev.json``, ``test1.json``: JSON Lines despite the suffix).

        Format: one JSON object per line with ``"identifier"`` (``split-set_id-pair_id-sentence_id``),
        ``"sentence"`` and ``"label"`` (``"True"`` / ``"False"``, any case); ``"directory"`` (train only) is used
        to find the images; ``left_url`` / ``right_url``, ``writer``, ``validation``, ``synset``, ``query`` and
        other fields are ignored. Blank lines are ignored.

        Bad input: a line that is not a JSON object, lacks a field, or has an identifier not of the four-field
        form -> ``malformed_record``; a label other than True/False -> ``unknown_label``; a missing image file
        -> ``missing_image`` (a file that cannot be decoded under ``image_check="decode"`` -> ``corrupt_image``);
        no records -> ``empty_split``. Messages name the file, the line and the identifier.
        """
        policy = policy or BadInputPolicy()
        decode = validate_image_check(image_check)
        root = Path(image_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
        file = str(path)
        records: list[NLVR2Record] = []
        skipped_before = policy.total
        for line_number, obj in iter_jsonl(path, policy):
            where = f"NLVR2 file {file!r} line {line_number}"
            try:
                identifier = get_field(obj, "identifier", str).strip()
                where += f" (identifier {identifier!r})"
                sentence = get_field(obj, "sentence", str)
                raw_label = get_field(obj, "label", (str, bool))
                directory = get_field(obj, "directory", (str, int), optional=True)
                names = image_names(identifier)
            except (RecordError, ValueError) as err:
                policy.handle("malformed_record", f"{where}: {err}")
                continue
            label = {"true": "True", "false": "False"}.get(str(raw_label).strip().lower())
            if label is None:
                policy.handle("unknown_label", f"{where}: label {raw_label!r} is not one of {list(NLVR2_LABELS)}")
                continue
            split = identifier.split("-")[0]
            paths = [_find(root, name, split, directory) for name in names]
            if not _check(paths, names, root, where, policy, decode):
                continue
            records.append(NLVR2Record(identifier, sentence, label, (paths[0], paths[1]), where))
        if not records and policy.total == skipped_before:
            policy.handle("empty_split", f"NLVR2 file {file!r} holds no records (empty split)")
        elif not records:
            policy.handle("empty_split", f"NLVR2 file {file!r}: every record was skipped as bad input")
        policy.log_report()
        return cls(records, policy, image_transform)


def _find(root: Path, name: str, split: str, directory: str | int | None) -> Path | None:
    folders = [root]
    if directory is not None:
        folders.append(root / str(directory))
    folders.append(root / split)
    if directory is not None:
        folders.append(root / split / str(directory))
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    return None


def _check(paths: list[Path | None], names: tuple[str, str], root: Path, where: str, policy: BadInputPolicy,
           decode: bool) -> bool:
    for path, name in zip(paths, names, strict=True):
        if path is None:
            policy.handle("missing_image", f"no image file {name!r} for {where} under {str(root)!r} (looked in "
                          "it, its <directory>/, <split>/ and <split>/<directory>/ sub-folders)")
            return False
        if decode:
            try:
                load_image(path, where)
            except BadInputError as err:
                policy.handle(err.reason, str(err))
                return False
    return True


def nlvr2_examples(items: Sequence[Mapping[str, Any]], template: str,
                   label_words: Mapping[str, str] = DEFAULT_NLVR2_WORDS) -> list[TextExample]:
    """NLVR2 training sequences: the sentence in ``template`` (``{sentence}``), the label's word as the target."""
    return [TextExample(format_prompt(template, sentence=item["sentence"].strip()), label_words[item["label"]], 1.0, i)
            for i, item in enumerate(items)]
