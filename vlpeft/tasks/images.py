"""Lazy image loading with PIL (no torchvision).

- :class:`ImageFolderIndex` maps image ids to files. It scans a folder and its immediate sub-folders once, so COCO
  images are found by id whether they sit in ``train2014/``, ``val2014/`` or one flat folder (the Karpathy
  "restval" images live in ``val2014`` but belong to the Karpathy train split; routing.md Q15). Flickr30k images
  (``<id>.jpg``) are found the same way.
- :func:`load_image` opens one file and converts it to RGB, raising :class:`BadInputError` naming the path and
  the record when the file is missing or cannot be decoded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_TRAILING_DIGITS = re.compile(r"(\d+)$")


def numeric_image_id(value: int | str) -> int:
    """The integer id of an image given as an int, a digit string, or a COCO-style name.

    ``393225``, ``"393225"``, ``"COCO_val2014_000000393225"`` and ``"COCO_val2014_000000393225.jpg"`` all give
    ``393225``. Raises ``ValueError`` when ``value`` holds no trailing number.
    """
    if isinstance(value, bool):
        raise ValueError(f"image id must be an int or a string ending in digits, got {value!r}")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise ValueError(f"image id must be an int or a string ending in digits, got {type(value).__name__}")
    match = _TRAILING_DIGITS.search(Path(value).stem if Path(value).suffix.lower() in IMAGE_SUFFIXES else value)
    if match is None:
        raise ValueError(f"image id {value!r} does not end in digits")
    return int(match.group(1))


class ImageFolderIndex:
    """Index of the image files under one or more folders, by numeric id and by file name.

    Every folder in ``roots`` and each of its immediate sub-folders are scanned once (``os.scandir``; no image
    is opened). A file whose stem ends in digits (``COCO_train2014_000000000009.jpg``, ``000000000009.jpg``,
    ``1000092795.jpg``) is indexed under that number. When the same id occurs twice (e.g. a restval image copied
    into ``train2014`` and kept in ``val2014``) the first in sorted path order wins; both are the same COCO image.

    Args:
        roots: a folder or several folders.
    """

    def __init__(self, roots: str | os.PathLike | Iterable[str | os.PathLike]) -> None:
        if isinstance(roots, (str, os.PathLike)):
            roots = [roots]
        self.roots: list[Path] = [Path(r) for r in roots]
        if not self.roots:
            raise ValueError("ImageFolderIndex needs at least one folder")
        for root in self.roots:
            if not root.is_dir():
                raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
        self._by_id: dict[int, Path] = {}
        self._by_name: dict[str, Path] = {}
        for folder in self._folders():
            for path in sorted(_image_files(folder)):
                self._by_name.setdefault(path.name, path)
                match = _TRAILING_DIGITS.search(path.stem)
                if match is not None:
                    self._by_id.setdefault(int(match.group(1)), path)

    def _folders(self) -> list[Path]:
        folders: list[Path] = []
        for root in self.roots:
            folders.append(root)
            folders.extend(sorted(p for p in root.iterdir() if p.is_dir()))
        return folders

    def __len__(self) -> int:
        return len(self._by_name)

    def describe(self) -> str:
        return ", ".join(repr(str(r)) for r in self.roots) + " (and their immediate sub-folders)"

    def find(self, image_id: int | str, file_name: str | None = None) -> Path | None:
        """Path of the image with this id (or, failing that, this file name); ``None`` when absent."""
        if file_name is not None and file_name in self._by_name:
            return self._by_name[file_name]
        try:
            key = numeric_image_id(image_id)
        except ValueError:
            key = None
        if key is not None and key in self._by_id:
            return self._by_id[key]
        if isinstance(image_id, str) and image_id in self._by_name:
            return self._by_name[image_id]
        return None


def _image_files(folder: Path) -> Iterable[Path]:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                yield Path(entry.path)


def as_image_index(image_dir: str | os.PathLike | Iterable[str | os.PathLike] | ImageFolderIndex) -> ImageFolderIndex:
    """Return ``image_dir`` when it already is an :class:`ImageFolderIndex`, else index it."""
    return image_dir if isinstance(image_dir, ImageFolderIndex) else ImageFolderIndex(image_dir)


def load_image(path: str | os.PathLike, record: str) -> Image.Image:
    """Open ``path`` fully (decoding every pixel) and return an RGB copy.

    Raises:
        BadInputError: reason ``missing_image`` or ``corrupt_image``; the message names the path and ``record``.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise BadInputError(f"missing image file {str(path)!r} for {record}", "missing_image") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadInputError(
            f"corrupt image file {str(path)!r} for {record}: {type(err).__name__}: {err}", "corrupt_image"
        ) from err


def load_record_image(record: Any, image_transform: Callable[[Any], Any] | None = None) -> Any:
    """The image of a dataset record (with ``image_path`` and ``source``), through ``image_transform`` if given."""
    image = load_image(record.image_path, record.source)
    return image if image_transform is None else image_transform(image)

def check_image(
    path: Path | None, record: str, index: ImageFolderIndex, policy: BadInputPolicy, decode: bool
) -> bool:
    """Construction-time check of one record's image. Returns False when the record must be skipped.

    ``path is None`` means the index has no such image (reason ``missing_image``). With ``decode`` the file is
    decoded fully, so corrupt files are found up front (reason ``corrupt_image``) instead of at ``__getitem__``.
    """
    if path is None:
        policy.handle("missing_image", f"no image file for {record} under {index.describe()}")
        return False
    if decode:
        try:
            load_image(path, record)
        except BadInputError as err:
            policy.handle(err.reason, str(err))
            return False
    return True


IMAGE_CHECKS: tuple[str, ...] = ("exists", "decode")


def validate_image_check(image_check: str) -> bool:
    """Validate ``image_check`` and return whether images are decoded at construction."""
    if image_check not in IMAGE_CHECKS:
        raise ValueError(f"image_check must be one of {IMAGE_CHECKS}, got {image_check!r}")
    return image_check == "decode"
