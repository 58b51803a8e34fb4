"""The demo's results: one :class:`DemoRunResult` per run, the results table (terminal + markdown) and the
``results.md`` page (:func:`results_markdown`); the plot is :func:`vlpeft.report.plots.plot_metric_vs_params`.

Input: one :class:`DemoRunResult` per (method, task, seed). Rows are methods; for each task the main metric is shown
(mean ± standard deviation over seeds when there are several), then the trainable parameters (count and percent
of the whole model) and the training step time relative to LoRA (mean over tasks of the per-task ratio of the
median step times). Reference rows (the text-only baselines and the base model without fine-tuning) carry a
metric only.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

TASK_TITLES: dict[str, str] = {"vqa": "VQA acc. (%)", "snli_ve": "SNLI-VE acc. (%)", "caption": "Caption CIDEr-D"}
TASK_ORDER: tuple[str, ...] = ("vqa", "snli_ve", "caption")
TEXT_ONLY_LABEL = "text-only baseline"
BASE_LABEL = "base, no fine-tuning"
#: Rows that carry a metric only: the benchmark's text-only baselines and the base model without fine-tuning.
REFERENCE_LABELS: tuple[str, ...] = (TEXT_ONLY_LABEL, BASE_LABEL)


@dataclass(frozen=True)
class DemoRunResult:
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


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _format_metric(task: str, values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    digits = 3 if task == "caption" else 2
    text = f"{mean:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def _format_count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def row_order(results: Sequence[DemoRunResult]) -> list[str]:
    labels: list[str] = []
    for r in results:
        if r.label not in labels:
            labels.append(r.label)
    refs = [label for label in REFERENCE_LABELS if label in labels]
    return refs + [label for label in labels if label not in REFERENCE_LABELS]


def relative_step_times(results: Sequence[DemoRunResult], reference: str = "LoRA") -> dict[str, float | None]:
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


def table_rows(results: Sequence[DemoRunResult]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the results table; see the module docstring."""
    if not results:
        raise ValueError("no results to tabulate")
    tasks = [t for t in TASK_ORDER if any(r.task == t for r in results)]
    header = ["Method", *(TASK_TITLES[t] for t in tasks), "Trainable params", "% of model", "Step time vs LoRA"]
    relative = relative_step_times(results)
    rows = []
    for label in row_order(results):
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


def demo_markdown_table(results: Sequence[DemoRunResult]) -> str:
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(results: Sequence[DemoRunResult]) -> str:
    """The table as aligned plain text for the terminal."""
    header, rows = table_rows(results)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows)])


def reference_results(baselines: Mapping[str, Any]) -> list[DemoRunResult]:
    """Text-only baseline rows from a benchmark meta's ``text_only_baselines``."""
    return [
        DemoRunResult(TEXT_ONLY_LABEL, "vqa", 0, float(baselines["vqa"]["accuracy"])),
        DemoRunResult(TEXT_ONLY_LABEL, "snli_ve", 0, float(baselines["snli_ve"]["accuracy"])),
        DemoRunResult(TEXT_ONLY_LABEL, "caption", 0, float(baselines["caption"]["CIDEr"])),
    ]


def results_markdown(payload: dict[str, Any], results: Sequence[DemoRunResult], *, stem: str = "results",
                     setting_lines: Sequence[str] = ()) -> str:
    """The markdown report of one demo run (``payload`` is the ``results.json`` content): the setting's own
    description lines (``setting_lines``), command, machine, base, table, and the plot ``<stem>.png``."""
    base = payload["base"]
    lines = [
        "# vlpeft demo results",
        "",
        *setting_lines,
        f"- Command: `{payload['command']}`",
        f"- Machine: {payload['machine']}",
        f"- Total time: {payload['total_seconds'] / 60:.1f} min (data + base: {payload['setup_seconds']:.0f} s)",
        f"- Seeds: {payload['seeds']}",
        f"- Runs: {payload['runs_total']}"
        + (f" ({payload['runs_reused']} reused from an earlier, interrupted invocation; the total time is this "
           "invocation's)" if payload["runs_reused"] else ""),
        f"- Parallelism: {payload['jobs']} job(s), torch threads per run: {payload['threads_per_run']}"
        + (" (runs execute side by side, each on its own core(s); step times are per run)"
           if payload["jobs"] > 1 else ""),
        f"- Base: BLIP pretrained here on procedural captions, {base['parameters']:,} parameters, "
        f"caption CIDEr-D {base['caption_scores']['CIDEr']:.3f} on held-out procedural scenes "
        f"(trained in {base['train_seconds']:.0f} s)",
        "- Held-out (colour, shape) pairs, seen only in test: "
        + ", ".join(f"{c} {s}" for c, s in payload["benchmark"]["heldout_combinations"]),
        "",
        "Metrics are on the test splits: VQA accuracy (official, %), SNLI-VE accuracy (%), caption CIDEr-D "
        "(pycocoevalcap scale). Step time is the median training step relative to LoRA on the same task.",
        "",
        demo_markdown_table(results),
        "",
        f"![metric vs trainable parameters]({stem}.png)",
        "",
    ]
    return "\n".join(lines)
