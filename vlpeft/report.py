"""``vlpeft report RUN_DIR...``: a markdown table across runs and a plot of task metric vs trainable parameters.

Each run folder must hold the ``metrics.json`` and ``config.yaml`` written by ``vlpeft train``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from vlpeft.training.config import ConfigError

__all__ = ["RunFolderError", "RunRow", "read_run", "markdown_table", "plot_runs", "add_parser"]


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


def plot_runs(rows: Sequence[RunRow], path: str | os.PathLike) -> None:
    """Scatter of the task metric against trainable parameters (log x), one panel per (task, metric), one marker
    style per method, each point labelled with its run name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.task, r.metric) for r in rows if r.value is not None})
    if not panels:
        raise ValueError("no run has a metric value to plot")
    methods = sorted({r.method for r in rows})
    markers = dict(zip(methods, "osD^vP*Xh<>"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        for method in methods:
            points = [r for r in rows if r.task == task and r.metric == metric and r.method == method
                      and r.value is not None]
            if not points:
                continue
            ax.scatter([p.trainable_params for p in points], [p.value for p in points], marker=markers[method],
                       s=48, label=method)
            for p in points:
                ax.annotate(p.name, (p.trainable_params, p.value), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(metric)
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=200)
    plt.close(fig)


def _run_report(args: argparse.Namespace) -> int:
    rows = [read_run(folder) for folder in args.runs]
    table = markdown_table(rows)
    if args.output:
        Path(args.output).write_text(table)
    print(table, end="")
    if args.plot:
        if not any(r.value is not None for r in rows):
            raise RunFolderError("no run has a metric value to plot (pass --plot '' to skip the plot)")
        plot_runs(rows, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``report``."""
    parser = subparsers.add_parser("report", help="markdown table + metric-vs-parameters plot across runs")
    parser.add_argument("runs", nargs="+", help="run folders written by `vlpeft train`")
    parser.add_argument("--output", help="also write the markdown table to this file")
    parser.add_argument("--plot", default="report.png", help="PNG plot path (default report.png; '' to skip)")
    parser.set_defaults(handler=_run_report)
