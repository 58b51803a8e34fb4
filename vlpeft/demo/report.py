"""The demo's results table (terminal + markdown) and plot (metric vs trainable parameters).

Input: one :class:`RunResult` per (method, task, seed). Rows are methods; for each task the main metric is shown
(mean ± standard deviation over seeds when there are several), then the trainable parameters (count and percent
of the whole model) and the training step time relative to LoRA (mean over tasks of the per-task ratio of the
median step times). Reference rows (the text-only baselines and the base model without fine-tuning) carry a
metric only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TASK_TITLES: dict[str, str] = {"vqa": "VQA acc. (%)", "snli_ve": "SNLI-VE acc. (%)", "caption": "Caption CIDEr-D"}
TASK_ORDER: tuple[str, ...] = ("vqa", "snli_ve", "caption")
REFERENCE_LABELS: tuple[str, ...] = ("text-only baseline", "base, no fine-tuning")


@dataclass(frozen=True)
class RunResult:
    """One fine-tuning run (or a reference score when ``trainable`` is ``None``).

    Attributes:
        label: row name, e.g. ``"LoRA"`` or ``"routed LoRA (matmul)"``.
        task: ``vqa``, ``snli_ve`` or ``caption``.
        seed: run seed.
        metric: the task's main metric on the test split (VQA / SNLI-VE accuracy in percent, CIDEr-D on
            pycocoevalcap's scale).
        trainable / total: parameter counts of the adapted model.
        step_seconds: median wall time of one training step.
        train_seconds: wall time of the whole training run.
        threads: torch threads the run had (with ``--jobs N`` each parallel run gets ``cores // N``).
    """

    label: str
    task: str
    seed: int
    metric: float
    trainable: int | None = None
    total: int | None = None
    step_seconds: float | None = None
    train_seconds: float | None = None
    threads: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _format_metric(task: str, values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    digits = 3 if task == "caption" else 2
    text = f"{mean:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def _format_count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _row_order(results: Sequence[RunResult]) -> list[str]:
    labels: list[str] = []
    for r in results:
        if r.label not in labels:
            labels.append(r.label)
    refs = [label for label in REFERENCE_LABELS if label in labels]
    return refs + [label for label in labels if label not in REFERENCE_LABELS]


def relative_step_times(results: Sequence[RunResult], reference: str = "LoRA") -> dict[str, float | None]:
    """Per method: the mean over tasks of (median step time / the reference method's median step time)."""
    by: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if r.step_seconds is not None:
            by.setdefault((r.label, r.task), []).append(r.step_seconds)
    out: dict[str, float | None] = {}
    for label in {r.label for r in results}:
        ratios = []
        for task in TASK_ORDER:
            own, ref = by.get((label, task)), by.get((reference, task))
            if own and ref:
                ratios.append(statistics.median(own) / statistics.median(ref))
        out[label] = statistics.fmean(ratios) if ratios else None
    return out


def table_rows(results: Sequence[RunResult]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the results table; see the module docstring."""
    if not results:
        raise ValueError("no results to tabulate")
    tasks = [t for t in TASK_ORDER if any(r.task == t for r in results)]
    header = ["Method", *(TASK_TITLES[t] for t in tasks), "Trainable params", "% of model", "Step time vs LoRA"]
    relative = relative_step_times(results)
    rows = []
    for label in _row_order(results):
        mine = [r for r in results if r.label == label]
        row = [label]
        for task in tasks:
            values = [r.metric for r in mine if r.task == task]
            row.append(_format_metric(task, values) if values else "–")
        counted = [r for r in mine if r.trainable is not None and r.total]
        if counted:
            trainable = sorted({r.trainable for r in counted})
            share = [100.0 * r.trainable / r.total for r in counted]
            row.append(_format_count(trainable[0]) if len(trainable) == 1 else
                       f"{_format_count(trainable[0])}–{_format_count(trainable[-1])}")
            row.append(f"{min(share):.2f}" if max(share) - min(share) < 0.005 else f"{min(share):.2f}–{max(share):.2f}")
        else:
            row.extend(["–", "–"])
        ratio = relative.get(label)
        row.append("–" if ratio is None else f"{ratio:.2f}×")
        rows.append(row)
    return header, rows


def markdown_table(results: Sequence[RunResult]) -> str:
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(results: Sequence[RunResult]) -> str:
    """The table as aligned plain text for the terminal."""
    header, rows = table_rows(results)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows)])


def plot_metric_vs_params(results: Sequence[RunResult], path: str | Path, title: str = "") -> Path:
    """One panel per task: the main metric (mean, with a std error bar) against trainable parameters (log
    scale); reference scores as dashed horizontal lines. Written as PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASK_ORDER if any(r.task == t for r in results)]
    if not tasks:
        raise ValueError("no results to plot")
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    labels = [label for label in _row_order(results) if label not in REFERENCE_LABELS]
    cmap = plt.get_cmap("tab10")
    colours = {label: cmap(i % 10) for i, label in enumerate(labels)}
    for ax, task in zip(axes[0], tasks):
        for label in labels:
            runs = [r for r in results if r.label == label and r.task == task and r.trainable]
            if not runs:
                continue
            mean, std = _mean_std([r.metric for r in runs])
            x = statistics.median(r.trainable for r in runs)
            ax.errorbar([x], [mean], yerr=[std or 0.0], fmt="o", color=colours[label], label=label, capsize=3)
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


def reference_results(baselines: Mapping[str, Any]) -> list[RunResult]:
    """Text-only baseline rows from a benchmark meta's ``text_only_baselines``."""
    return [
        RunResult("text-only baseline", "vqa", 0, float(baselines["vqa"]["accuracy"])),
        RunResult("text-only baseline", "snli_ve", 0, float(baselines["snli_ve"]["accuracy"])),
        RunResult("text-only baseline", "caption", 0, float(baselines["caption"]["CIDEr"])),
    ]
