"""Conversation datasets read into normalised chat records (:mod:`vlpeft.tasks.chat_records`).

Formats (found from the path, then from the content where the extension says nothing):

- LLaVA / ShareGPT JSON: a list of ``{"id", "image", "conversations": [{"from", "value"}]}``;
- JSON (a list of records), JSON Lines or Parquet with a ``messages`` column and an ``images`` column, read with
  Hugging Face ``datasets`` (files whose records ``datasets`` cannot put in one table, e.g. an ``image`` field
  that is a string in one record and a list in another, are read with :mod:`json` instead);
- a ``datasets`` ``save_to_disk`` folder with the same columns (a ``DatasetDict`` folder needs ``split``).

Each record is checked (:func:`~vlpeft.tasks.chat_records.normalise_chat_record`; image files exist, or decode with
``image_check="decode"``) and bad ones follow the :class:`~vlpeft.tasks.bad_input.BadInputPolicy`: a missing image
file -> ``missing_image``; an undecodable one -> ``corrupt_image``; anything else (wrong types, unknown role, empty
assistant turn, image count mismatch, no assistant turn, ...) -> ``malformed_record``; no record left ->
``empty_split``. Messages name the file, the record (index and id), the field and what was expected.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import datasets

from vlpeft.tasks._io import iter_jsonl, read_json
from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy
from vlpeft.tasks.chat_records import (
    ChatRecord,
    RecordProblem,
    image_field,
    normalise_chat_record,
    raw_record_id,
    record_label,
)
from vlpeft.tasks.images import load_image, validate_image_check

logger = logging.getLogger(__name__)

ChatFormat = Literal["json", "jsonl", "parquet", "arrow"]
CHAT_FORMATS: tuple[str, ...] = ("json", "jsonl", "parquet", "arrow")
_SUFFIXES: dict[str, ChatFormat] = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
                                    ".pq": "parquet"}
_EXPECTED = ("expected a LLaVA JSON list (conversations + image), a JSON / JSON Lines / Parquet file with "
             "'messages' and 'images' columns, or a datasets save_to_disk folder")


def detect_chat_format(path: str | os.PathLike) -> ChatFormat:
    """The container format of ``path``: ``"arrow"`` for a ``save_to_disk`` folder, else from the extension
    (``.json``, ``.jsonl`` / ``.ndjson``, ``.parquet`` / ``.pq``), else from the first bytes.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: it is none of these (the message names it).
    """
    path = Path(path)
    if path.is_dir():
        if any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
            return "arrow"
        raise ValueError(f"{str(path)!r} is a folder without state.json or dataset_dict.json, so not a datasets "
                         f"save_to_disk folder; {_EXPECTED}")
    if not path.is_file():
        raise FileNotFoundError(f"chat data {str(path)!r} does not exist")
    if path.suffix.lower() in _SUFFIXES:
        return _SUFFIXES[path.suffix.lower()]
    with path.open("rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.decode("utf-8", errors="ignore").lstrip()
    if text.startswith("["):
        return "json"
    if text.startswith("{"):
        first = text.splitlines()[0]
        try:
            json.loads(first)
        except json.JSONDecodeError:
            return "json"  # an object spread over several lines
        return "jsonl"
    raise ValueError(f"cannot tell the format of {str(path)!r} (extension {path.suffix!r}, content starting "
                     f"{head[:16]!r}); {_EXPECTED}")


def read_chat_records(
    path: str | os.PathLike,
    *,
    images_root: str | os.PathLike | None = None,
    policy: BadInputPolicy | None = None,
    image_check: str = "exists",
    split: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[ChatRecord]:
    """Read a conversation dataset into checked, normalised records.

    Args:
        path: a ``.json`` / ``.jsonl`` / ``.parquet`` file or a ``save_to_disk`` folder (see module docs).
        images_root: folder that relative image paths are resolved against (default: the folder holding ``path``).
        policy: bad-input policy (default: raise).
        image_check: ``"exists"`` (image files must exist) or ``"decode"`` (and decode as images).
        split: the split of a ``DatasetDict`` folder (needed when it holds more than one).
        cache_dir: ``datasets`` cache folder for JSON / JSON Lines / Parquet (default: the ``datasets`` default).

    Returns:
        ``N`` records ``{"id", "images", "messages"}`` (bad ones skipped and counted under ``policy``).

    Raises:
        FileNotFoundError / ValueError: the path is missing or of no known format, or its records have neither
            ``messages`` nor ``conversations`` (whole-file errors; never skipped).
        BadInputError: a bad record under a raising policy (the message names file, record, field and expectation).
    """
    path = Path(path)
    policy = policy or BadInputPolicy()
    decode = validate_image_check(image_check)
    fmt = detect_chat_format(path)
    root = Path(images_root) if images_root is not None else path.absolute().parent
    rows = _read_rows(path, fmt, policy, split, cache_dir)
    skipped_before = policy.total
    records: list[ChatRecord] = []
    for index, raw in rows:
        record = _checked_record(raw, index, str(path), root, decode, policy)
        if record is not None:
            records.append(record)
    if not records:
        reason = "holds no records" if policy.total == skipped_before else "every record was skipped as bad input"
        policy.handle("empty_split", f"chat data {str(path)!r} {reason}")
    policy.log_report()
    return records


def load_chat_dataset(path: str | os.PathLike, **kwargs: Any) -> datasets.Dataset:
    """:func:`read_chat_records` as a ``datasets.Dataset`` with :func:`chat_features` (same arguments).

    Arrow gives image parts a ``text`` of ``None``; :class:`~vlpeft.tasks.chat_collator.ChatCollator` accepts
    such rows as they are.
    """
    return datasets.Dataset.from_list(list(read_chat_records(path, **kwargs)), features=chat_features())


def chat_features() -> datasets.Features:
    """The ``datasets`` schema of normalised records: ``id`` string, ``images`` list of strings, ``messages`` list
    of ``{role, content: list of {type, text}}``."""
    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    message = {"role": datasets.Value("string"), "content": datasets.List(part)}
    return datasets.Features({
        "id": datasets.Value("string"),
        "images": datasets.List(datasets.Value("string")),
        "messages": datasets.List(message),
    })


def _checked_record(raw: Any, index: int, source: str, root: Path, decode: bool,
                    policy: BadInputPolicy) -> ChatRecord | None:
    where = record_label(source, index, raw_record_id(raw))
    try:
        record = normalise_chat_record(raw, index=index, images_root=root)
    except RecordProblem as problem:
        policy.handle(problem.reason, f"{where}: {problem}")
        return None
    field = image_field(raw)
    for k, image in enumerate(record["images"]):
        if not os.path.isfile(image):
            policy.handle("missing_image", f"{where}: field '{field}[{k}]': image file {image!r} does not "
                                           f"exist; expected an existing file (relative paths are resolved "
                                           f"against the images root {str(root)!r})")
            return None
        if decode:
            try:
                load_image(image, f"{where} field '{field}[{k}]'")
            except BadInputError as err:
                policy.handle(err.reason, str(err))
                return None
    return record


def _read_rows(path: Path, fmt: ChatFormat, policy: BadInputPolicy, split: str | None,
               cache_dir: str | os.PathLike | None) -> Iterator[tuple[int, Any]]:
    """``(index, raw record)`` pairs; checks first that the records are conversations at all."""
    if fmt == "arrow":
        return _rows_of(_load_folder(path, split), path)
    if fmt == "parquet":
        return _rows_of(_load_with_datasets(path, "parquet", cache_dir), path)
    try:
        table = _load_with_datasets(path, "json", cache_dir)
    except Exception as err:  # datasets / Arrow errors vary; the json module reads what Arrow cannot
        logger.info("datasets could not read %s (%s: %s); reading it with the json module", path,
                    type(err).__name__, err)
        return _rows_from_json(path, fmt, policy)
    return _rows_of(table, path)


def _load_with_datasets(path: Path, builder: str, cache_dir: str | os.PathLike | None) -> datasets.Dataset:
    kwargs: dict[str, Any] = {"cache_dir": os.fspath(cache_dir)} if cache_dir is not None else {}
    if builder == "parquet":
        try:
            return datasets.Dataset.from_parquet(str(path), **kwargs)
        except Exception as err:
            raise ValueError(f"cannot read {str(path)!r} as Parquet: {type(err).__name__}: {err}") from err
    return datasets.Dataset.from_json(str(path), **kwargs)


def _load_folder(path: Path, split: str | None) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise ValueError(f"cannot load the save_to_disk folder {str(path)!r}: {type(err).__name__}: {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split is None and len(loaded) == 1:
            split = next(iter(loaded))
        if split not in loaded:
            raise ValueError(f"{str(path)!r} is a DatasetDict with splits {sorted(loaded)}; pass split= one of them"
                             + (f" (got {split!r})" if split is not None else ""))
        loaded = loaded[split]
    return loaded


def _rows_of(table: datasets.Dataset, path: Path) -> Iterator[tuple[int, Any]]:
    _check_columns(table.column_names, path)
    return enumerate(table)


def _rows_from_json(path: Path, fmt: ChatFormat, policy: BadInputPolicy) -> Iterator[tuple[int, Any]]:
    if fmt == "jsonl":
        rows: list[Any] = [obj for _, obj in iter_jsonl(path, policy)]
    else:
        rows = read_json(path)
        if not isinstance(rows, list):
            raise ValueError(f"{str(path)!r} holds a JSON {type(rows).__name__}; {_EXPECTED}")
    _check_columns(sorted({str(k) for row in rows if isinstance(row, dict) for k in row}), path)
    return enumerate(rows)


def _check_columns(columns: Iterable[str], path: Path) -> None:
    columns = list(columns)
    if columns and not {"messages", "conversations"} & set(columns):
        raise ValueError(f"{str(path)!r} has no 'messages' or 'conversations' field (fields: {columns}); "
                         f"{_EXPECTED}")
