"""TextCaps caption files (``TextCaps_0.1_train.json``, ``TextCaps_0.1_val.json``, ``TextCaps_0.1_test.json``,
released by the TextCaps authors with the images of TextVQA / Open Images: ``train_images/`` for train and val,
``test_images/`` for test).

Format: ``{"dataset_type": "train", "dataset_name": "textcaps", "dataset_version": "0.1", "data": [{"image_id":
"011e7e629fb9ae7b", "image_name": "011e7e629fb9ae7b", "image_path": "train/011e7e629fb9ae7b.jpg", "image_width":
int, "image_height": int, "caption_id": int, "caption_str": str, "caption_tokens": [...], "reference_strs": [str,
... 5], "reference_tokens": [...], ...}, ...]}``: one entry per caption, each repeating its image's five
``reference_strs``. The test file has no captions; it cannot be scored here (the TextCaps evaluation server holds
them), so a file without any caption is ``empty_split``.

An image's references are the ``reference_strs`` of its first entry (the official evaluation scores against these
five), else its entries' ``caption_str`` in file order; the training pairs are those references. Scores: BLEU-4,
METEOR, ROUGE-L, CIDEr (and SPICE) with pycocoevalcap, as the TextCaps evaluation computes them
(:mod:`vlpeft.metrics.captioning`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vlpeft.tasks._io import RecordError, read_json, require_key
from vlpeft.tasks._io import field as get_field
from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy
from vlpeft.tasks.captions import CaptionDataset, CaptionImage, CaptionView, _check_nonempty
from vlpeft.tasks.images import ImageFolderIndex, as_image_index, check_image, validate_image_check

__all__ = ["is_textcaps", "load_textcaps"]


def is_textcaps(data: Any) -> bool:
    """Whether parsed JSON looks like a TextCaps file (an object whose ``data`` list holds TextCaps entries)."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return False
    if data.get("dataset_name") == "textcaps":
        return True
    first = data["data"][0] if data["data"] else None
    return isinstance(first, dict) and "image_id" in first and ("caption_str" in first or "reference_strs" in first
                                                                 or "image_path" in first)


def load_textcaps(
    json_path: str | os.PathLike,
    image_dir: str | os.PathLike | Sequence[str | os.PathLike] | ImageFolderIndex,
    *,
    view: CaptionView = "pairs",
    policy: BadInputPolicy | None = None,
    image_check: str = "exists",
    image_transform: Callable[[Any], Any] | None = None,
) -> CaptionDataset:
    """Load a TextCaps split into a :class:`~vlpeft.tasks.captions.CaptionDataset` (module docstring).

    Images are found by the file name of ``image_path`` (``011e7e629fb9ae7b.jpg``), else ``image_name`` + ``.jpg``,
    under ``image_dir`` and its immediate sub-folders.

    Bad input: an entry that is not an object, a missing/empty ``image_id``, a ``caption_str`` or
    ``reference_strs`` of the wrong type, an entry without ``image_path``/``image_name``, entries of one image
    naming different files -> ``malformed_record``; no image file -> ``missing_image``; no captioned image ->
    ``empty_split``.
    """
    policy = policy or BadInputPolicy()
    decode = validate_image_check(image_check)
    index = as_image_index(image_dir)
    file = str(json_path)
    entries = require_key(read_json(json_path), "data", f"TextCaps file {file!r}")
    if not isinstance(entries, list):
        raise BadInputError(f"TextCaps file {file!r}: 'data' must be a list", "malformed_record")
    skipped_before = policy.total
    # image_id -> [file name, first entry index, references from reference_strs, caption_strs, caption ids]
    grouped: dict[str, dict[str, Any]] = {}
    for i, e in enumerate(entries):
        where = f"TextCaps file {file!r}, data[{i}]"
        try:
            if not isinstance(e, dict):
                raise RecordError(f"expected an object, got {type(e).__name__}")
            image_id = get_field(e, "image_id", str)
            where = f"TextCaps file {file!r}, data[{i}] (image_id {image_id!r})"
            image_path = get_field(e, "image_path", str, optional=True)
            image_name = get_field(e, "image_name", str, optional=True)
            if image_path is None and image_name is None:
                raise RecordError("needs 'image_path' or 'image_name'")
            file_name = Path(image_path).name if image_path is not None else f"{image_name}.jpg"
            caption = get_field(e, "caption_str", str, optional=True)
            references = get_field(e, "reference_strs", list, optional=True)
            if references is not None and not all(isinstance(r, str) and r.strip() for r in references):
                raise RecordError("'reference_strs' must be a list of non-empty strings")
            group = grouped.setdefault(image_id, {"file_name": file_name, "where": where, "references": None,
                                                  "captions": [], "ids": []})
            if group["file_name"] != file_name:
                raise RecordError(f"names image file {file_name!r} but an earlier entry of this image names "
                                  f"{group['file_name']!r}")
        except RecordError as err:
            policy.handle("malformed_record", f"{where}: {err}")
            continue
        if references and group["references"] is None:
            group["references"] = [r.strip() for r in references]
        if caption is not None:
            group["captions"].append(caption.strip())
            group["ids"].append(e.get("caption_id", i))
    images: list[CaptionImage] = []
    for image_id, group in grouped.items():
        if group["references"] is not None:
            refs = group["references"]
            ids: list[int | str] = list(range(len(refs)))
        else:
            refs, ids = group["captions"], group["ids"]
        if not refs:
            continue  # an uncaptioned (test) image; a file of them only is reported as empty_split below
        where = f"TextCaps file {file!r}, image {image_id!r} ({group['file_name']})"
        path = index.find(image_id, file_name=group["file_name"])
        if path is not None and path.name != group["file_name"]:
            path = None  # found by a number inside the hexadecimal id: not this image
        if not check_image(path, where, index, policy, decode):
            continue
        images.append(CaptionImage(image_id, group["file_name"], tuple(refs), tuple(ids), None, path, where))
    _check_nonempty(images, policy, skipped_before, f"TextCaps file {file!r}")
    return CaptionDataset(images, policy, view, image_transform)
