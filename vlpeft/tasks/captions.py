"""COCO captioning data: Karpathy ``dataset_coco.json`` and the COCO captions annotation format.

A :class:`CaptionDataset` has two views over the same images:

- ``view="pairs"`` (training): one item per (image, caption) pair;
- ``view="images"`` (evaluation): one item per image with all its reference captions.

:meth:`CaptionDataset.references` returns ``{image_id: [captions]}`` for scoring; every reference is kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from vlpeft.tasks._io import RecordError, read_json, require_key
from vlpeft.tasks._io import field as get_field
from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy
from vlpeft.tasks.images import (
    ImageFolderIndex,
    as_image_index,
    check_image,
    load_record_image,
    validate_image_check,
)

KARPATHY_SPLITS: tuple[str, ...] = ("train", "restval", "val", "test")
CaptionView = Literal["pairs", "images"]


@dataclass(frozen=True)
class CaptionImage:
    """One image and its references.

    Attributes:
        image_id: COCO image id (``cocoid`` / ``id``); for Karpathy files without ``cocoid`` (Flickr) the
            ``imgid`` field; TextCaps' hexadecimal string id.
        file_name: the file name given by the annotation.
        references: every reference caption, in file order.
        caption_ids: ``sentid`` / annotation ``id`` of each reference (same order).
        split: Karpathy split name, or ``None`` for COCO-format files.
        image_path: resolved image file.
        source: "file, record" description used in error messages.
    """

    image_id: int | str
    file_name: str
    references: tuple[str, ...]
    caption_ids: tuple[int | str, ...]
    split: str | None
    image_path: Path
    source: str


class CaptionDataset(Dataset):
    """Captioned images with lazily loaded pixels.

    Items in the ``"pairs"`` view: ``image``, ``image_id``, ``caption``, ``caption_id``, ``references``
    (all references of that image). Items in the ``"images"`` view: ``image``, ``image_id``, ``references``.
    ``image`` is a PIL RGB image, or the output of ``image_transform``.
    """

    def __init__(self, images: Sequence[CaptionImage], policy: BadInputPolicy, view: CaptionView = "pairs",
                 image_transform: Callable[[Any], Any] | None = None) -> None:
        if view not in ("pairs", "images"):
            raise ValueError(f"view must be 'pairs' or 'images', got {view!r}")
        self.images: list[CaptionImage] = list(images)
        self.policy = policy
        self.view: CaptionView = view
        self.image_transform = image_transform
        self._pairs: list[tuple[int, int]] = [(i, j) for i, im in enumerate(self.images)
                                              for j in range(len(im.references))]

    def with_view(self, view: CaptionView) -> CaptionDataset:
        """The same images in another view (no files are re-read)."""
        return CaptionDataset(self.images, self.policy, view, self.image_transform)

    def __len__(self) -> int:
        return len(self._pairs) if self.view == "pairs" else len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.view == "pairs":
            i, j = self._pairs[index]
        else:
            i, j = index, None
        im = self.images[i]
        image = load_record_image(im, self.image_transform)
        item: dict[str, Any] = {"image": image, "image_id": im.image_id, "references": list(im.references)}
        if j is not None:
            item["caption"] = im.references[j]
            item["caption_id"] = im.caption_ids[j]
        return item

    def references(self) -> dict[int | str, list[str]]:
        """``{image_id: [every reference caption]}``."""
        return {im.image_id: list(im.references) for im in self.images}

    @classmethod
    def from_karpathy(
        cls,
        dataset_coco_json: str | os.PathLike,
        image_dir: str | os.PathLike | Sequence[str | os.PathLike] | ImageFolderIndex,
        split: str | Sequence[str],
        *,
        include_restval: bool = True,
        view: CaptionView = "pairs",
        policy: BadInputPolicy | None = None,
        image_check: str = "exists",
        image_transform: Callable[[Any], Any] | None = None,
    ) -> CaptionDataset:
        """Load one or more splits of Karpathy's ``dataset_coco.json``.

        Format: a JSON object with ``"images"``: a list of ``{"filepath": "val2014", "filename":
        "COCO_val2014_000000391895.jpg", "cocoid": 391895, "imgid": int, "split": "train" | "restval" | "val" |
        "test", "sentids": [int, ...], "sentences": [{"raw": str, "tokens": [str, ...], "sentid": int,
        "imgid": int}, ...]}``. The ``raw`` sentence (stripped) is the caption.

        ``split="train"`` also takes the ``restval`` images unless ``include_restval=False`` (the usual 113k
        Karpathy train set). Images are resolved by ``cocoid`` across every folder of ``image_dir`` (restval
        images live in ``val2014``; routing.md Q15), falling back to ``filename``.

        Bad input: missing fields, an image without sentences, an unknown split name in a record ->
        ``malformed_record``; no image file -> ``missing_image``; no image in the requested split(s) ->
        ``empty_split``. Asking for a split name outside ``train/restval/val/test`` raises ``ValueError``.
        """
        wanted = {split} if isinstance(split, str) else set(split)
        unknown = wanted - set(KARPATHY_SPLITS)
        if unknown or not wanted:
            raise ValueError(f"split must be among {KARPATHY_SPLITS}, got {split!r}")
        if "train" in wanted and include_restval:
            wanted.add("restval")
        policy = policy or BadInputPolicy()
        decode = validate_image_check(image_check)
        index = as_image_index(image_dir)
        file = str(dataset_coco_json)
        entries = require_key(read_json(dataset_coco_json), "images", f"Karpathy caption file {file!r}")
        if not isinstance(entries, list):
            raise BadInputError(f"Karpathy caption file {file!r}: 'images' must be a list", "malformed_record")
        images: list[CaptionImage] = []
        skipped_before = policy.total
        for i, e in enumerate(entries):
            where = f"Karpathy caption file {file!r}, images[{i}]"
            try:
                if not isinstance(e, dict):
                    raise RecordError(f"expected an object, got {type(e).__name__}")
                record_split = get_field(e, "split", str)
                if record_split not in KARPATHY_SPLITS:
                    raise RecordError(f"split {record_split!r} is not one of {KARPATHY_SPLITS}")
                if record_split not in wanted:
                    continue
                filename = get_field(e, "filename", str)
                cocoid = get_field(e, "cocoid", int, optional=True)
                image_id = cocoid if cocoid is not None else get_field(e, "imgid", int)
                where = f"Karpathy caption file {file!r}, image {image_id} ({filename})"
                sentences = get_field(e, "sentences", list)
                if not sentences:
                    raise RecordError("no sentences")
                refs, ids = [], []
                for j, s in enumerate(sentences):
                    if not isinstance(s, dict):
                        raise RecordError(f"sentences[{j}] is not an object")
                    refs.append(get_field(s, "raw", str).strip())
                    ids.append(s.get("sentid", j))
            except RecordError as err:
                policy.handle("malformed_record", f"{where}: {err}")
                continue
            path = index.find(image_id, file_name=filename)
            if not check_image(path, where, index, policy, decode):
                continue
            images.append(CaptionImage(image_id, filename, tuple(refs), tuple(ids), record_split, path, where))
        _check_nonempty(images, policy, skipped_before, f"Karpathy caption file {file!r}, split(s) {sorted(wanted)}")
        return cls(images, policy, view, image_transform)

    @classmethod
    def from_coco(
        cls,
        annotations_json: str | os.PathLike,
        image_dir: str | os.PathLike | Sequence[str | os.PathLike] | ImageFolderIndex,
        *,
        view: CaptionView = "pairs",
        policy: BadInputPolicy | None = None,
        image_check: str = "exists",
        image_transform: Callable[[Any], Any] | None = None,
        keep: Callable[[dict], bool] | None = None,
        label: str = "COCO caption file",
    ) -> CaptionDataset:
        """Load a COCO captions annotation file (``captions_val2014.json``, ``captions_test_karpathy.json``, ...).

        Format: a JSON object with ``"images": [{"id": int, "file_name": str, ...}, ...]`` and
        ``"annotations": [{"image_id": int, "id": int, "caption": str}, ...]``. Captions are stripped and kept in
        file order per image.

        Bad input: an annotation with missing fields or an ``image_id`` absent from ``images``, an image with no
        caption, a duplicate image id -> ``malformed_record``; no image file -> ``missing_image``; no images ->
        ``empty_split``.

        ``keep``: a filter over annotation objects (``False`` drops the caption silently; it may raise
        :class:`~vlpeft.tasks._io.RecordError` for a malformed record); ``label`` names the file kind in messages
        (COCO-like layouts such as VizWiz-Captions, :mod:`vlpeft.tasks.vizwiz`).
        """
        policy = policy or BadInputPolicy()
        decode = validate_image_check(image_check)
        index = as_image_index(image_dir)
        file = str(annotations_json)
        data = read_json(annotations_json)
        image_entries = require_key(data, "images", f"{label} {file!r}")
        annotations = require_key(data, "annotations", f"{label} {file!r}")
        if not isinstance(image_entries, list) or not isinstance(annotations, list):
            raise BadInputError(f"{label} {file!r}: 'images' and 'annotations' must be lists",
                                "malformed_record")
        skipped_before = policy.total
        by_id: dict[int, tuple[int, str]] = {}
        for i, e in enumerate(image_entries):
            where = f"{label} {file!r}, images[{i}]"
            try:
                if not isinstance(e, dict):
                    raise RecordError(f"expected an object, got {type(e).__name__}")
                image_id = get_field(e, "id", int)
                file_name = get_field(e, "file_name", str)
                if image_id in by_id:
                    raise RecordError(f"duplicate image id {image_id}")
            except RecordError as err:
                policy.handle("malformed_record", f"{where}: {err}")
                continue
            by_id[image_id] = (i, file_name)
        refs: dict[int, list[tuple[int | str, str]]] = {image_id: [] for image_id in by_id}
        for k, a in enumerate(annotations):
            where = f"{label} {file!r}, annotations[{k}]"
            try:
                if not isinstance(a, dict):
                    raise RecordError(f"expected an object, got {type(a).__name__}")
                image_id = get_field(a, "image_id", int)
                caption = get_field(a, "caption", str).strip()
                if image_id not in refs:
                    raise RecordError(f"image_id {image_id} is not listed in 'images'")
                if keep is not None and not keep(a):
                    continue
            except RecordError as err:
                policy.handle("malformed_record", f"{where}: {err}")
                continue
            refs[image_id].append((a.get("id", k), caption))
        images: list[CaptionImage] = []
        for image_id, (_entry, file_name) in by_id.items():
            where = f"{label} {file!r}, image {image_id} ({file_name})"
            if not refs[image_id]:
                policy.handle("malformed_record", f"{where}: no caption annotations")
                continue
            path = index.find(image_id, file_name=file_name)
            if not check_image(path, where, index, policy, decode):
                continue
            ids, captions = zip(*refs[image_id], strict=True)
            images.append(CaptionImage(image_id, file_name, tuple(captions), tuple(ids), None, path, where))
        _check_nonempty(images, policy, skipped_before, f"{label} {file!r}")
        return cls(images, policy, view, image_transform)


def _check_nonempty(images: list[CaptionImage], policy: BadInputPolicy, skipped_before: int, where: str) -> None:
    if not images:
        if policy.total == skipped_before:
            policy.handle("empty_split", f"{where} holds no images (empty split)")
        else:
            policy.handle("empty_split", f"{where}: every image was skipped as bad input")
    policy.log_report()
