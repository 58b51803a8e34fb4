"""Checkpoint safety: completion markers, validation, and choice of the checkpoint to resume from.

Hugging Face Trainer writes ``checkpoint-<step>/`` file by file, so a process killed mid-save leaves a partial
folder. :class:`CheckpointCompletionCallback` runs after the Trainer has written everything and atomically
writes ``vlpeft_complete.json`` (temp file + ``os.replace``) listing every file with its size. A checkpoint is
*valid* only if that marker exists, every listed file still has its recorded size, every safetensors file opens,
and ``trainer_state.json`` parses. :func:`find_resume_checkpoint` returns the newest valid checkpoint and warns
about every newer one it skipped.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
from safetensors import safe_open
from transformers import TrainerCallback

__all__ = [
    "COMPLETION_MARKER",
    "CheckpointCompletionCallback",
    "CorruptCheckpointWarning",
    "atomic_write_text",
    "checkpoint_problem",
    "find_resume_checkpoint",
    "list_checkpoints",
    "safetensors_problem",
    "weights_problem",
    "write_completion_marker",
]

COMPLETION_MARKER = "vlpeft_complete.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is incomplete or corrupt."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def write_completion_marker(folder: str | os.PathLike, step: int) -> None:
    """Flush every file of ``folder`` to disk, then atomically write the marker listing them with sizes."""
    folder = Path(folder)
    _fsync_tree(folder)
    files = {
        str(f.relative_to(folder)): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != COMPLETION_MARKER and not f.name.endswith(".tmp")
    }
    atomic_write_text(folder / COMPLETION_MARKER, json.dumps({"step": step, "files": files}, indent=1))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-<step>`` folders of ``output_dir``, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot be resumed from, or ``None`` if it is a complete, readable checkpoint."""
    folder = Path(folder)
    marker = folder / COMPLETION_MARKER
    if not marker.is_file():
        return f"no completion marker {COMPLETION_MARKER} (the save was interrupted)"
    try:
        listing: dict[str, Any] = json.loads(marker.read_text())
        files: dict[str, int] = listing["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        return f"unreadable completion marker ({error})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != size:
            return f"file {name} has {path.stat().st_size} bytes, {size} were written"
    if "trainer_state.json" not in files:
        return "no trainer_state.json"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except json.JSONDecodeError as error:
        return f"trainer_state.json is not valid JSON ({error})"
    for name in files:
        if name.endswith(".safetensors") and (problem := safetensors_problem(folder / name)) is not None:
            return f"{name} {problem}"
    return None


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why the safetensors file ``path`` cannot be read (truncated, corrupt header), or ``None`` if every tensor's
    header and data range are in the file. Reads the header only, not the tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                handle.get_slice(key)
    except Exception as error:  # safetensors raises several error types for corrupt files
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        return f"cannot be read ({size} bytes; truncated or corrupt: {error})"
    return None


def weights_problem(folder: str | os.PathLike) -> str | None:
    """Why trained weights cannot be loaded from ``folder`` (a run folder or a checkpoint), or ``None``.

    A folder with a completion marker (a ``checkpoint-<step>``) is validated as resuming does
    (:func:`checkpoint_problem`); every ``*.safetensors`` file is opened and its header checked against its size.
    The problem names the file.
    """
    folder = Path(folder)
    if (folder / COMPLETION_MARKER).is_file() and (problem := checkpoint_problem(folder)) is not None:
        return problem
    for path in sorted(folder.glob("*.safetensors")):
        if (problem := safetensors_problem(path)) is not None:
            return f"{path} {problem}"
    return None


def find_resume_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest valid checkpoint in ``output_dir`` (``None`` if there is none).

    Every newer checkpoint that is skipped is reported with a :class:`CorruptCheckpointWarning` naming the
    folder and the problem.
    """
    for folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        warnings.warn(
            f"skipping checkpoint {folder}: {problem}; falling back to the previous checkpoint",
            CorruptCheckpointWarning,
            stacklevel=2,
        )
    return None


class CheckpointCompletionCallback(TrainerCallback):
    """Mark each checkpoint complete once the Trainer has written all of it (main process only)."""

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every process has written its part (e.g. its RNG state)
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_completion_marker(folder, state.global_step)
        return control
