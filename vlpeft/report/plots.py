"""The report plots: task metric against trainable parameters (log scale), for ``vlpeft report`` run folders
(:func:`plot_runs`) and for the demo's results (:func:`plot_metric_vs_params`). Written as PNG with matplotlib's
Agg backend."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlpeft.metrics.intervals import mean_ci95
from vlpeft.report.demo_results import (
    REFERENCE_LABELS,
    TASK_ORDER,
    TASK_TITLES,
    DemoRunResult,
    row_order,
)
from vlpeft.report.run_folders import RunRow

__all__ = ["plot_metric_vs_params", "plot_runs"]


def _pyplot() -> Any:
    # lazy: matplotlib is slow to import and only the plots need it; the backend must be chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(rows: Sequence[RunRow], path: str | os.PathLike) -> None:
    """Scatter of the task metric against trainable parameters (log x), one panel per (task, metric), one marker
    style per method, each point labelled with its run name."""
    plt = _pyplot()

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


def plot_metric_vs_params(results: Sequence[DemoRunResult], path: str | Path, title: str = "") -> Path:
    """One panel per task: the main metric (mean over seeds, with the 95 % confidence half-width as error bar; none
    for one seed) against trainable parameters (log scale); reference scores as dashed horizontal lines. Written as
    PNG (matplotlib, Agg backend)."""
    plt = _pyplot()

    tasks = [t for t in TASK_ORDER if any(r.task == t for r in results)]
    if not tasks:
        raise ValueError("no results to plot")
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    labels = [label for label in row_order(results) if label not in REFERENCE_LABELS]
    cmap = plt.get_cmap("tab10")
    colours = {label: cmap(i % 10) for i, label in enumerate(labels)}
    for ax, task in zip(axes[0], tasks):
        for label in labels:
            runs = [r for r in results if r.label == label and r.task == task and r.trainable]
            if not runs:
                continue
            interval = mean_ci95([r.metric for r in runs])
            x = statistics.median(r.trainable for r in runs)
            ax.errorbar([x], [interval.mean], yerr=[interval.ci95 or 0.0], fmt="o", color=colours[label], label=label, capsize=3)
        for style, ref in zip(("--", ":"), REFERENCE_LABELS):
            values = [r.metric for r in results if r.label == ref and r.task == task]
            if values:
                ax.axhline(statistics.fmean(values), linestyle=style, color="grey", label=ref)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(TASK_TITLES[task])
        ax.set_title(task)
        ax.grid(True, alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    legend_rows = math.ceil(len(names) / 4)
    fig.legend(handles, names, loc="lower center", ncol=min(4, max(1, len(names))), fontsize="small",
               bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.03 + 0.055 * legend_rows, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
