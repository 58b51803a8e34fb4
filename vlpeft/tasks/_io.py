"""Reading annotation files with errors that name the file (and the line, for JSON Lines)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlpeft.tasks.bad_input import BadInputError, BadInputPolicy


def read_json(path: str | os.PathLike) -> Any:
    """Parse a whole JSON file. A missing or unparsable file always raises (it is not a single record)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {str(path)!r} does not exist")
    try:
        with path.open("r", encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(f"annotation file {str(path)!r} is not valid JSON: {err}", "malformed_record") from err


def iter_jsonl(path: str | os.PathLike, policy: BadInputPolicy) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line; an unparsable or non-object line is bad input."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {str(path)!r} does not exist")
    with path.open("r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                policy.handle("malformed_record", f"{str(path)!r} line {line_number}: not valid JSON ({err})")
                continue
            if not isinstance(obj, dict):
                policy.handle("malformed_record",
                              f"{str(path)!r} line {line_number}: expected a JSON object, got {type(obj).__name__}")
                continue
            yield line_number, obj


def require_key(container: Any, key: str, where: str) -> Any:
    """``container[key]`` for a top-level structure; raises naming ``where`` when absent (whole-file error)."""
    if not isinstance(container, dict) or key not in container:
        raise BadInputError(f"{where}: expected a JSON object with key {key!r}", "malformed_record")
    return container[key]


class RecordError(Exception):
    """A field problem inside one record; the loader turns it into a policy decision naming the record."""


def field(record: dict, key: str, types: type | tuple[type, ...], *, optional: bool = False) -> Any:
    """``record[key]`` checked against ``types`` (``bool`` is never accepted as ``int``)."""
    if key not in record or record[key] is None:
        if optional:
            return None
        raise RecordError(f"missing field {key!r}")
    value = record[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RecordError(f"field {key!r} has type bool, expected {_type_names(types)}")
    if not isinstance(value, types):
        raise RecordError(f"field {key!r} has type {type(value).__name__}, expected {_type_names(types)}")
    if isinstance(value, str) and not value.strip() and not optional:
        raise RecordError(f"field {key!r} is empty")
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)
