"""The protocol of a demo setting, and the fine-tuning plan items every setting builds the same way.

A setting decides what the demo compares and on which model: its sizes, its method specs, its tasks, what it
prepares from the pretrained BLIP base, and the training config of each run. Two settings implement it:
:class:`vlpeft.demo.blip.BlipSetting` (the BLIP base itself) and :class:`vlpeft.demo.composite.CompositeSetting`
(the routing paper's frozen ViT + text model). The runner, :func:`vlpeft.demo.run.run_demo`, calls a setting's
methods in this order: :meth:`~DemoSetting.default_tasks`, :meth:`~DemoSetting.check_inputs`,
:meth:`~DemoSetting.method_specs`, (benchmark and base are made ready), :meth:`~DemoSetting.prepare`,
(with learning-rate selection: :meth:`~DemoSetting.selection_config` per method and task, and the selections run),
:meth:`~DemoSetting.build_plan`, (the plan runs), :meth:`~DemoSetting.payload_extras` and
:meth:`~DemoSetting.markdown_lines`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from vlpeft.data.synth import FORMAT_VERSION as BENCHMARK_FORMAT
from vlpeft.demo.runlog import PlanItem, fingerprint
from vlpeft.demo.specs import DemoSize, MethodSpec
from vlpeft.training import TrainConfig
from vlpeft.training.validation import resolved_method_settings

__all__ = ["DemoSetting", "PlanContext", "fine_tuning_items"]


@dataclass(frozen=True)
class PlanContext:
    """What every run of one demo invocation shares: the base model, the benchmark, the sizes and the learning
    rates.

    ``base_digest`` and ``synth_settings`` (the benchmark preset) enter every run's fingerprint; ``progress`` is
    whether runs show progress bars (only when they run one at a time); ``learning_rates``: each (method label,
    task)'s learning rate before the size's ``lr_scale`` (:mod:`vlpeft.demo.learning_rates`; a pair that is not
    there trains at the method's shared rate)."""

    base_path: Path
    base_digest: str
    data_root: Path
    synth_settings: dict[str, Any]
    size: DemoSize
    work_dir: Path
    progress: bool
    learning_rates: Mapping[tuple[str, str], float] = field(default_factory=dict)

    def fingerprint_settings(self) -> dict[str, Any]:
        """The settings of this context that decide a run's result (the benchmark's file format version too: a
        changed generator gives other data from the same preset)."""
        return {"size": dataclasses.asdict(self.size), "base": self.base_digest, "benchmark": self.synth_settings,
                "benchmark_format": BENCHMARK_FORMAT}


class DemoSetting(ABC):
    """One way to run the demo (see the module docstring for the order of the calls)."""

    #: ``--setting`` value
    name: ClassVar[str]
    #: the ``--size`` presets of this setting
    sizes: ClassVar[dict[str, DemoSize]]
    #: file stem of the results (``<stem>.json``, ``.md``, ``.png``)
    results_stem: ClassVar[str]
    #: title of the results plot
    plot_title: ClassVar[str]

    def default_tasks(self, tasks: Sequence[str]) -> Sequence[str]:
        """The tasks to run when the caller asked for ``tasks`` (a setting may narrow the default list)."""
        return tasks

    def check_inputs(self) -> None:  # noqa: B027  (an optional step: nothing to check by default)
        """Check the setting's own inputs before any data or base model is built."""

    @abstractmethod
    def method_specs(self, routing_kinds: Sequence[str]) -> list[MethodSpec]:
        """The compared methods, routed ones once per routing kind."""

    def prepare(self, base_path: Path, log: Callable[[str], None]) -> None:  # noqa: B027  (optional step)
        """Derive what the runs need from the pretrained base in ``base_path`` (nothing by default)."""

    def run_settings(self, context: PlanContext) -> dict[str, Any]:
        """The settings of this invocation that decide every run's result (they enter the fingerprints)."""
        return context.fingerprint_settings()

    @abstractmethod
    def selection_config(self, spec: MethodSpec, task: str, context: PlanContext, output_dir: Path) -> TrainConfig:
        """The training config of ``spec`` on ``task`` with the eval split, for learning-rate selection
        (:mod:`vlpeft.demo.selection`; the sweep sets the learning rate, seed and output folder of each run)."""

    def method_settings(self, spec: MethodSpec, task: str, context: PlanContext) -> dict[str, Any]:
        """The method's config on ``task`` with every library default resolved
        (:func:`~vlpeft.training.validation.resolved_method_settings`); it enters the fingerprints."""
        return resolved_method_settings(self.selection_config(spec, task, context, context.work_dir / "unused"))

    @abstractmethod
    def build_plan(self, specs: Sequence[MethodSpec], tasks: Sequence[str], seeds: Sequence[int],
                   context: PlanContext) -> list[PlanItem]:
        """Every run of the demo, reference evaluations included, in the order they run and are reported."""

    def payload_extras(self) -> dict[str, Any]:
        """Entries the setting adds to ``results.json``."""
        return {}

    def markdown_lines(self) -> list[str]:
        """Lines describing the setting at the top of ``results.md``."""
        return []


def fine_tuning_items(specs: Sequence[MethodSpec], tasks: Sequence[str], seeds: Sequence[int], *, size: DemoSize,
                      common: dict[str, Any], title_prefix: str, run: Callable[..., Any],
                      run_args: Callable[[MethodSpec, str, int], tuple[Any, ...]],
                      method_settings: Callable[[MethodSpec, str], dict[str, Any]],
                      learning_rates: Mapping[tuple[str, str], float] | None = None) -> list[PlanItem]:
    """One plan item per (seed, task, method), in that nesting order: ``run(*run_args(spec, task, seed))``, where
    ``spec`` carries the task's learning rate from ``learning_rates`` (:attr:`PlanContext.learning_rates`).

    The fingerprint covers the method spec, its resolved config (``method_settings(spec, task)``,
    :meth:`DemoSetting.method_settings`), task, seed, effective learning rate and ``common`` (the settings of the
    invocation that decide a result, :meth:`PlanContext.fingerprint_settings` and the setting's own).
    ``run`` must be a module-level function: with ``--jobs N`` items are sent to worker processes."""
    plan = []
    rates = learning_rates or {}
    resolved = {(spec.label, task): method_settings(spec, task) for task in tasks for spec in specs}
    for seed in seeds:
        for task in tasks:
            for listed in specs:
                rate = rates.get((listed.label, task))
                spec = listed if rate is None else dataclasses.replace(listed, learning_rate=rate)
                settings = {"kind": "train", "method": dataclasses.asdict(spec), "task": task, "seed": seed,
                            "resolved_method": resolved[(listed.label, task)],
                            "learning_rate": size.learning_rate(spec), **common}
                plan.append(PlanItem(fingerprint(settings), f"{title_prefix}{spec.label} on {task} (seed {seed})",
                                     run, run_args(spec, task, seed)))
    return plan
