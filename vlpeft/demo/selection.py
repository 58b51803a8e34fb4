"""Learning-rate selection in the demo: one ``vlpeft sweep`` per (method, task), run as demo plan items.

Each (method, task) is a :func:`vlpeft.training.sweep.run_sweep` of the run's training config with the eval split
added (:meth:`~vlpeft.demo.setting.DemoSetting.selection_config`) over the method's grid
(:func:`~vlpeft.demo.learning_rates.grid_for`, times the size's ``lr_scale``): every value trains without the test
split, the sweep selects on the eval split by the task's metric (mean over the selection seeds; diverged values are
never selected; ties go to the smaller rate, the first in the grid), and evaluates the selected value on the test
split. The sweep writes ``OUT/selection/<task>-<method>/sweep.json``; its run folders are removed afterwards (the
record keeps every eval score).

The selections are plan items like the fine-tuning runs (:mod:`vlpeft.demo.runlog`): they run side by side with
``--jobs N``, each finished one is appended to ``runs.jsonl`` and an interrupted invocation resumes. A selection's
result is a :class:`~vlpeft.report.demo_results.DemoRunResult` whose ``metric`` is the selected value's eval score,
``learning_rate`` the selected value and ``details["sweep"]`` the sweep record without its per-run metrics.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpeft.demo.learning_rates import grid_for, table_entry
from vlpeft.demo.runlog import PlanItem, execute_plan, fingerprint, in_plan_order, read_runs
from vlpeft.demo.scoring import folder_name
from vlpeft.demo.specs import MethodSpec
from vlpeft.report.demo_results import DemoRunResult
from vlpeft.training import TrainConfig
from vlpeft.training.sweep import SweepGrid, run_folder_name, run_sweep

if TYPE_CHECKING:
    from vlpeft.demo.setting import DemoSetting, PlanContext

__all__ = ["SELECTION_DIR", "run_selection", "select_learning_rate", "selection_items"]

SELECTION_DIR = "selection"


def _progress_line(line: str) -> bool:
    return any(part in line for part in (": eval ", ": test ", "diverged"))


def select_learning_rate(config: TrainConfig, label: str, task: str, grid: tuple[float, ...], seeds: tuple[int, ...],
                         out_dir: Path, command: str) -> DemoRunResult:
    """Sweep ``config`` over ``grid`` x ``seeds`` in ``out_dir`` (resuming what is there), select on the eval split,
    remove the run folders and return the outcome (see the module docstring)."""
    prefix = f"    [{label} on {task}] "
    record = run_sweep(config, SweepGrid(grid, seeds), out_dir, command=command,
                       log=lambda line: print(prefix + line, flush=True) if _progress_line(line) else None)
    for value in grid:
        for seed in seeds:
            shutil.rmtree(Path(out_dir) / run_folder_name(value, seed), ignore_errors=True)
    selected = record["selected"]
    runs = [{k: v for k, v in run.items() if k not in ("eval_metrics", "output_dir")} for run in record["runs"]]
    trainable = next((run.get("trainable_params") for run in runs if run.get("trainable_params")), None)
    return DemoRunResult(label, task, seeds[0], float(selected["eval"]["mean"]), trainable,
                         learning_rate=selected["learning_rate"], details={"sweep": {**record, "runs": runs}})


def selection_items(demo: DemoSetting, specs: Sequence[MethodSpec], tasks: Sequence[str], context: PlanContext, *,
                    grid: Sequence[float], seeds: Sequence[int], command: str,
                    common: dict[str, Any]) -> list[PlanItem]:
    """One selection per (task, method), in that nesting order. The fingerprint covers the method, its resolved
    config (:meth:`DemoSetting.method_settings`), task, grid, seeds and ``common`` (the invocation's settings that
    decide a result)."""
    items = []
    for task in tasks:
        for spec in specs:
            values = tuple(float(f"{v * context.size.lr_scale:.6g}") for v in grid_for(spec, grid))
            settings = {"kind": "select", "method": dataclasses.asdict(spec), "task": task, "grid": list(values),
                        "resolved_method": demo.method_settings(spec, task, context), "seeds": list(seeds),
                        **common}
            out_dir = context.work_dir.parent / SELECTION_DIR / folder_name(task, spec.label)
            config = demo.selection_config(spec, task, context, out_dir)
            items.append(PlanItem(fingerprint(settings), f"learning rate of {spec.label} on {task}",
                                  select_learning_rate,
                                  (config, spec.label, task, values, tuple(seeds), out_dir,
                                   f"{command}  # {spec.label} on {task}")))
    return items


def run_selection(demo: DemoSetting, specs: Sequence[MethodSpec], tasks: Sequence[str], context: PlanContext, *,
                  grid: Sequence[float], seeds: Sequence[int], command: str, common: dict[str, Any],
                  runs_path: Path, jobs: int, size_name: str,
                  log: Callable[[str], None]) -> tuple[list[dict[str, Any]], int]:
    """Select every (method, task)'s learning rate: ``(table entries (the selected rate before lr_scale, the eval
    score of every grid value, what selected it; :func:`~vlpeft.demo.learning_rates.table_entry`), number of
    selections reused from runs_path)``."""
    items = selection_items(demo, specs, tasks, context, grid=grid, seeds=seeds, command=command, common=common)
    log(f"selecting the learning rates of {len(specs)} method(s) x {len(tasks)} task(s) on the eval split "
        f"(grid {list(grid)}, seeds {list(seeds)})")

    def report(item: PlanItem, result: DemoRunResult) -> None:
        log(f"    done: {item.title}: {result.learning_rate:g} (eval {result.metric:.3f})")

    reused = len({item.fingerprint for item in items} & set(read_runs(runs_path)))
    finished = execute_plan(items, runs_path, jobs=jobs, log=log, on_result=report)
    by_key = {(r.label, r.task): r for r in in_plan_order(items, finished)}
    entries = [table_entry(setting=demo.name, spec=spec, task=task, size_name=size_name, size=context.size,
                           base_digest=context.base_digest, sweep=by_key[(spec.label, task)].details["sweep"])
               for task in tasks for spec in specs]
    return entries, reused
