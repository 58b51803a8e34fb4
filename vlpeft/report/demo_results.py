"""The demo's results: one :class:`DemoRunResult` per run, the results tables (terminal + markdown) and the
``results.md`` page (:func:`results_markdown`); the plot is :func:`vlpeft.report.plots.plot_metric_vs_params`.

Input: one :class:`DemoRunResult` per (method, task, seed), summarised per (method, task) by
:func:`vlpeft.report.demo_summary.summarise`. Rows are methods; for each task the main metric is shown as the mean
± the 95 % confidence half-width over seeds (Student t; the mean alone for one seed: "1 seed, no interval"),
marked ``↓base`` when the mean is below the base without fine-tuning and ``↓text`` when it is below the text-only
baseline; then the trainable parameters (count and percent of the whole model) and the training step time
relative to LoRA (mean over tasks of the per-task ratio of the median step times). Reference rows (the text-only
baselines and the base model without fine-tuning) carry a metric only. The page adds the learning rate of every
method and task with its source, and each method's difference from the Adapter and LoRA baselines, saying which
differences the seeds do not resolve.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vlpeft.report.demo_summary import BASELINES, ScoreSummary, summarise

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
            pycocoevalcap's scale); for a learning-rate selection, the selected value's eval-split score.
        trainable / total: parameter counts of the adapted model.
        step_seconds: median wall time of one training step.
        train_seconds: wall time of the whole training run.
        threads: torch threads the run had (with ``--jobs N`` each parallel run gets ``cores // N``).
        learning_rate: the learning rate the run trained with (for a selection: the selected one).
        details: what else the run recorded (a learning-rate selection: its sweep record), JSON-serialisable.
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
    learning_rate: float | None = None
    details: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _digits(task: str) -> int:
    return 3 if task == "caption" else 2


def format_score(summary: ScoreSummary) -> str:
    """``"52.70 ± 1.04"`` (the mean alone for one value), with ``↓base`` / ``↓text`` when the mean is below the base
    without fine-tuning / the text-only baseline."""
    digits = _digits(summary.task)
    text = f"{summary.mean:.{digits}f}" + ("" if summary.ci95 is None else f" ± {summary.ci95:.{digits}f}")
    marks = [mark for mark, flag in (("↓base", summary.below_base), ("↓text", summary.below_text_only)) if flag]
    return " ".join([text, *marks])


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


def summaries_of(results: Sequence[DemoRunResult],
                 learning_rate_sources: Mapping[tuple[str, str], str] | None = None) -> list[ScoreSummary]:
    """:func:`~vlpeft.report.demo_summary.summarise` with the demo's reference labels and task order."""
    return summarise(results, references=REFERENCE_LABELS, base_label=BASE_LABEL, text_only_label=TEXT_ONLY_LABEL,
                     task_order=TASK_ORDER, learning_rate_sources=learning_rate_sources)


def _tasks(results: Sequence[DemoRunResult]) -> list[str]:
    return [t for t in TASK_ORDER if any(r.task == t for r in results)]


def table_rows(results: Sequence[DemoRunResult]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the results table; see the module docstring."""
    if not results:
        raise ValueError("no results to tabulate")
    tasks = _tasks(results)
    header = ["Method", *(TASK_TITLES[t] for t in tasks), "Trainable params", "% of model", "Step time vs LoRA"]
    relative = relative_step_times(results)
    summaries = {(s.label, s.task): s for s in summaries_of(results)}
    rows = []
    for label in row_order(results):
        row = [label]
        for task in tasks:
            summary = summaries.get((label, task))
            row.append("–" if summary is None else format_score(summary))
        counted = [r for r in results if r.label == label and r.trainable is not None and r.total]
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


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def demo_markdown_table(results: Sequence[DemoRunResult]) -> str:
    return _markdown(*table_rows(results))


def text_table(results: Sequence[DemoRunResult]) -> str:
    """The table as aligned plain text for the terminal, with the notes on the markers and the seeds."""
    header, rows = table_rows(results)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows), "", *score_notes(results)])


def seed_counts(results: Sequence[DemoRunResult]) -> list[int]:
    """The distinct numbers of seeds of the fine-tuned (method, task) pairs."""
    return sorted({s.n for s in summaries_of(results) if not s.reference})


def score_notes(results: Sequence[DemoRunResult]) -> list[str]:
    """What the ``±`` and the markers of the table mean, for these results."""
    counts = seed_counts(results)
    if counts == [1]:
        spread = "1 seed, no interval: each score is one run's."
    else:
        spread = (f"Scores are the mean ± the 95 % confidence half-width over seeds (Student t, n - 1 degrees of "
                  f"freedom; seeds per score: {', '.join(map(str, counts))}"
                  + ("; a score of 1 seed has no interval" if 1 in counts else "") + ").")
    notes = [spread]
    summaries = summaries_of(results)
    if any(s.below_base for s in summaries):
        notes.append(f"↓base: the mean is below the {BASE_LABEL!r} score on that task (the method made the base worse).")
    if any(s.below_text_only for s in summaries):
        notes.append(f"↓text: the mean is below the {TEXT_ONLY_LABEL!r} on that task.")
    return notes


def _format_difference(summary: ScoreSummary, baseline: str) -> str:
    comparison = summary.versus.get(baseline)
    if comparison is None:
        return "–"
    digits = _digits(summary.task)
    text = f"{comparison.diff:+.{digits}f}"
    if comparison.ci95 is not None:
        text += f" ± {comparison.ci95:.{digits}f}"
    return text if comparison.resolved else f"{text} (not resolved)"


def comparison_rows(results: Sequence[DemoRunResult]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each fine-tuned method's difference from each baseline per task (mean difference ± Welch
    95 % half-width), marked "not resolved" when the interval contains 0 or a side has one seed."""
    tasks = _tasks(results)
    summaries = {(s.label, s.task): s for s in summaries_of(results) if not s.reference}
    header = ["Method"] + [f"{TASK_TITLES[t].split(' ')[0]} vs {b}" for t in tasks for b in BASELINES]
    rows = []
    for label in row_order(results):
        if label in REFERENCE_LABELS:
            continue
        row = [label]
        for task in tasks:
            summary = summaries.get((label, task))
            row += ["–" if summary is None else _format_difference(summary, b) for b in BASELINES]
        rows.append(row)
    return header, rows


def unresolved_pairs(results: Sequence[DemoRunResult]) -> list[str]:
    """``"LoRA vs Adapter on vqa"`` for every comparison with a baseline that the seeds do not resolve (the two
    baselines' comparison once)."""
    pairs: list[tuple[str, str, str]] = []
    for s in summaries_of(results):
        for baseline, comparison in s.versus.items():
            if not s.reference and not comparison.resolved and (baseline, s.label, s.task) not in pairs:
                pairs.append((s.label, baseline, s.task))
    return [f"{label} vs {baseline} on {task}" for label, baseline, task in pairs]


def learning_rate_rows(results: Sequence[DemoRunResult],
                       sources: Mapping[tuple[str, str], str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): the learning rate every method trained with per task, and where it came from."""
    tasks = _tasks(results)
    summaries = {(s.label, s.task): s for s in summaries_of(results, sources) if not s.reference}
    header = ["Method", *(f"{TASK_TITLES[t].split(' ')[0]} learning rate" for t in tasks)]
    rows = []
    for label in row_order(results):
        if label in REFERENCE_LABELS:
            continue
        row = [label]
        for task in tasks:
            summary = summaries.get((label, task))
            if summary is None or summary.learning_rate is None:
                row.append("–")
            else:
                source = f" ({summary.learning_rate_source})" if summary.learning_rate_source else ""
                row.append(f"{summary.learning_rate:g}{source}")
        rows.append(row)
    return header, rows


def reference_results(baselines: Mapping[str, Any]) -> list[DemoRunResult]:
    """Text-only baseline rows from a benchmark meta's ``text_only_baselines``."""
    return [
        DemoRunResult(TEXT_ONLY_LABEL, "vqa", 0, float(baselines["vqa"]["accuracy"])),
        DemoRunResult(TEXT_ONLY_LABEL, "snli_ve", 0, float(baselines["snli_ve"]["accuracy"])),
        DemoRunResult(TEXT_ONLY_LABEL, "caption", 0, float(baselines["caption"]["CIDEr"])),
    ]


def _seeds_line(payload: dict[str, Any]) -> str:
    seeds = payload["seeds"]
    if len(seeds) == 1:
        return f"- Seeds: {seeds} (1 seed, no interval)"
    return f"- Seeds: {seeds}; every score is the mean ± 95 % confidence half-width over them"


def results_markdown(payload: dict[str, Any], results: Sequence[DemoRunResult], *, stem: str = "results",
                     setting_lines: Sequence[str] = (), learning_rate_lines: Sequence[str] = (),
                     learning_rate_sources: Mapping[tuple[str, str], str] | None = None) -> str:
    """The markdown report of one demo run (``payload`` is the ``results.json`` content): the setting's own
    description lines (``setting_lines``), command, machine, base, the results table with its notes, the
    learning rates (``learning_rate_lines`` say how they were chosen), the differences from the baselines, and the
    plot ``<stem>.png``."""
    base = payload["base"]
    unresolved = unresolved_pairs(results)
    lines = [
        "# vlpeft demo results",
        "",
        *setting_lines,
        f"- Command: `{payload['command']}`",
        f"- Machine: {payload['machine']}",
        f"- Total time: {payload['total_seconds'] / 60:.1f} min (data + base: {payload['setup_seconds']:.0f} s)",
        _seeds_line(payload),
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
        *(f"{note}  " for note in score_notes(results)),
        "",
        "## Learning rates",
        "",
        *learning_rate_lines,
        *([""] if learning_rate_lines else []),
        _markdown(*learning_rate_rows(results, learning_rate_sources or {})),
        "",
        "## Differences from the baselines",
        "",
        "Mean difference from Adapter and from LoRA ± the Welch 95 % half-width over seeds; *not resolved*: the "
        "interval contains 0 (or a side has one seed), i.e. these seeds cannot tell the two methods apart on that "
        "task (vlpeft.metrics.intervals.compare, one comparison at a time).",
        "",
        _markdown(*comparison_rows(results)),
        "",
        (f"Not resolved by the seeds ({len(unresolved)}): " + "; ".join(unresolved) + "." if unresolved
         else "Every difference from the baselines is resolved by the seeds."),
        "",
        f"![metric vs trainable parameters]({stem}.png)",
        "",
    ]
    return "\n".join(lines)
