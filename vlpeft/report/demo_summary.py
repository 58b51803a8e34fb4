"""One summary per (method, task) of the demo's runs: mean ± 95 % confidence interval over seeds, the comparisons
with the Adapter and LoRA baselines, and whether the method ends below the base without fine-tuning.

Input: the demo's :class:`~vlpeft.report.demo_results.DemoRunResult` rows (one per method, task and seed; the
reference rows, text-only baseline and base without fine-tuning, one per task). Definitions
(:mod:`vlpeft.metrics.intervals`):

- ``mean`` / ``std`` / ``ci95``: over the seeds of one method on one task; ``ci95`` is the half-width of the
  Student-t 95 % interval of the mean (n - 1 degrees of freedom), ``None`` for one seed;
- ``versus[B]``: mean(method) - mean(B) for the baselines B = Adapter and LoRA, with the Welch 95 % half-width;
  ``resolved`` when that interval excludes 0 (Welch's two-sided t-test at 5 %, one comparison at a time). With one
  seed on either side nothing is resolved;
- ``below_base`` / ``below_text_only``: the mean is below the score of the base without fine-tuning / the text-only
  baseline on the same task (``None`` when that reference was not scored). The references are deterministic
  (no training, no seed): one value each, no interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from vlpeft.metrics.intervals import compare, mean_ci95

if TYPE_CHECKING:
    from vlpeft.report.demo_results import DemoRunResult

__all__ = ["BASELINES", "Comparison", "ScoreSummary", "summarise"]

#: The methods every other method is compared with.
BASELINES: tuple[str, ...] = ("Adapter", "LoRA")


@dataclass(frozen=True)
class Comparison:
    """mean(method) - mean(baseline) with its Welch 95 % half-width (``None`` with one seed on a side)."""

    baseline: str
    diff: float
    ci95: float | None
    resolved: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoreSummary:
    """The scores of one method (or reference) on one task over its seeds; see the module docstring.

    ``seeds`` is ``None`` for the references; ``learning_rate`` is the rate the runs trained with (after the size's
    ``lr_scale``) and ``learning_rate_source`` where it came from (``None`` for references)."""

    label: str
    task: str
    reference: bool
    seeds: list[int] | None
    values: list[float]
    mean: float
    std: float | None
    ci95: float | None
    trainable: int | None = None
    total: int | None = None
    learning_rate: float | None = None
    learning_rate_source: str | None = None
    below_base: bool | None = None
    below_text_only: bool | None = None
    versus: dict[str, Comparison] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.values)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["n"] = self.n
        data["percent_of_model"] = (round(100.0 * self.trainable / self.total, 4)
                                    if self.trainable is not None and self.total else None)
        data["versus"] = {name: comparison.to_json() for name, comparison in self.versus.items()}
        return data


def _labels_in_order(results: Sequence[DemoRunResult]) -> list[str]:
    labels: list[str] = []
    for r in results:
        if r.label not in labels:
            labels.append(r.label)
    return labels


def _one_value(values: set[Any], what: str) -> Any:
    if len(values) > 1:
        raise ValueError(f"{what}: the seeds disagree ({sorted(values)})")
    return next(iter(values)) if values else None


def summarise(results: Sequence[DemoRunResult], *, references: Sequence[str], base_label: str,
              text_only_label: str, task_order: Sequence[str],
              learning_rate_sources: Mapping[tuple[str, str], str] | None = None) -> list[ScoreSummary]:
    """One :class:`ScoreSummary` per (label, task) present in ``results``: references first (in ``references``
    order), then the methods in order of appearance; tasks in ``task_order``.

    Raises ``ValueError`` when a label has two runs of one task with the same seed, or when its seeds trained
    with different parameter counts or learning rates."""
    sources = learning_rate_sources or {}
    labels = _labels_in_order(results)
    labels = [label for label in references if label in labels] + [label for label in labels
                                                                   if label not in references]
    by_key: dict[tuple[str, str], list[DemoRunResult]] = {}
    for r in results:
        by_key.setdefault((r.label, r.task), []).append(r)
    reference_scores = {(label, task): mean_ci95([r.metric for r in runs]).mean
                        for (label, task), runs in by_key.items() if label in references}
    summaries = []
    for label in labels:
        for task in task_order:
            runs = by_key.get((label, task))
            if not runs:
                continue
            summaries.append(_summary(label, task, runs, label in references, by_key, reference_scores,
                                      base_label, text_only_label, sources.get((label, task))))
    return summaries


def _summary(label: str, task: str, runs: list[DemoRunResult], reference: bool,
             by_key: dict[tuple[str, str], list[DemoRunResult]], reference_scores: dict[tuple[str, str], float],
             base_label: str, text_only_label: str, source: str | None) -> ScoreSummary:
    values = [r.metric for r in sorted(runs, key=lambda r: r.seed)]
    interval = mean_ci95(values)
    if reference:
        return ScoreSummary(label, task, True, None, values, interval.mean, interval.std, interval.ci95)
    seeds = sorted(r.seed for r in runs)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{label} on {task}: two runs with the same seed ({seeds})")
    base = reference_scores.get((base_label, task))
    text_only = reference_scores.get((text_only_label, task))
    versus = {}
    for baseline in BASELINES:
        other = by_key.get((baseline, task))
        if baseline != label and other:
            difference = compare(values, [r.metric for r in other])
            versus[baseline] = Comparison(baseline, difference.diff, difference.ci95, difference.resolved)
    return ScoreSummary(
        label, task, False, seeds, values, interval.mean, interval.std, interval.ci95,
        trainable=_one_value({r.trainable for r in runs}, f"{label} on {task}: trainable parameters"),
        total=_one_value({r.total for r in runs}, f"{label} on {task}: total parameters"),
        learning_rate=_one_value({r.learning_rate for r in runs}, f"{label} on {task}: learning rate"),
        learning_rate_source=source,
        below_base=None if base is None else interval.mean < base,
        below_text_only=None if text_only is None else interval.mean < text_only,
        versus=versus,
    )
