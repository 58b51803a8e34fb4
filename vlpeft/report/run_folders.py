"""Finished ``vlpeft train`` run folders as report rows, and their markdown table (``vlpeft report``).

Each run folder must hold the ``metrics.json`` and ``config.yaml`` written by ``vlpeft train``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from vlpeft.training.config import ConfigError

__all__ = ["RunFolderError", "RunRow", "read_run", "markdown_table"]


class RunFolderError(ConfigError):
    """A folder given to ``vlpeft report`` is not a finished run (the CLI exits with status 2)."""


@dataclass
class RunRow:
    """One run as shown in the report."""

    name: str
    model: str
    method: str
    task: str
    metric: str
    value: float | None
    trainable_params: int
    trainable_percent: float
    wall_time_s: float
    peak_memory_gib: float


def read_run(folder: str | os.PathLike) -> RunRow:
    """Read ``metrics.json`` + ``config.yaml`` of a run folder (:class:`RunFolderError` naming the problem)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"run folder {str(folder)!r} does not exist")
    metrics_file, config_file = folder / "metrics.json", folder / "config.yaml"
    for file in (metrics_file, config_file):
        if not file.is_file():
            raise RunFolderError(f"{folder} is not a finished vlpeft run: {file.name} is missing")
    try:
        metrics = json.loads(metrics_file.read_text())
        config = yaml.safe_load(config_file.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise RunFolderError(f"{folder}: unreadable run files ({error})") from error
    model = config["model"].get("name") or f"tiny:{config['model'].get('tiny')}"
    return RunRow(
        name=folder.name,
        model=model,
        method=config["method"]["type"],
        task=config["task"]["type"],
        metric=metrics["metric"],
        value=metrics["metric_value"],
        trainable_params=int(metrics["trainable_params"]),
        trainable_percent=float(metrics["trainable_percent"]),
        wall_time_s=float(metrics["wall_time_s"]),
        peak_memory_gib=float(metrics["peak_memory_bytes"]) / 2**30,
    )


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def markdown_table(rows: Sequence[RunRow]) -> str:
    """A GitHub-markdown table, one line per run, sorted by task then trainable parameters."""
    header = "| Run | Model | Method | Task | Metric | Value | Trainable params | Trainable % | Wall time | Peak memory |"
    lines = [header, "|" + "---|" * 10]
    for r in sorted(rows, key=lambda r: (r.task, r.trainable_params, r.name)):
        value = "n/a" if r.value is None else f"{r.value:.2f}"
        lines.append(
            f"| {r.name} | {r.model} | {r.method} | {r.task} | {r.metric} | {value} | {_params(r.trainable_params)} "
            f"| {r.trainable_percent:.3f} | {r.wall_time_s / 60:.1f} min | {r.peak_memory_gib:.2f} GiB |"
        )
    return "\n".join(lines) + "\n"
