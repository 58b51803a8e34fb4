"""``vlpeft sweep``: learning-rate selection for any recipe, on the eval split, with the test score of the choice.

Given a config and a grid of learning rates (``--learning-rates 1e-4,2e-4,5e-4,1e-3`` or a ``sweep:`` section of
the config) and optionally several seeds, the sweep

1. trains every (learning rate, seed) with :func:`vlpeft.training.run_training`, each in its own folder
   ``OUT/lr-<value>-seed-<seed>/`` (``OUT``: ``--out``, default the config's ``run.output_dir``), with the test split
   left out of training-time evaluation;
2. scores each learning rate on the **eval split** by the task's selection metric (the mean over seeds; higher is
   better except for ``loss``), and selects the best one (ties: the first in grid order). A learning rate with a
   seed that diverged (:class:`~vlpeft.training.TrainingDivergedError`) is recorded and never selected;
3. evaluates the selected learning rate's runs on the **test split** (:func:`vlpeft.training.evaluate`), and only
   those: the test split plays no part in the choice. A task without a separate test split (no ``task.test``) gets
   no test score; the output and the record say so;
4. writes ``OUT/sweep.json`` atomically (see :func:`run_sweep` for its fields).

Resumable: every run folder holds ``sweep_run.json`` (learning rate, seed, config digest, status, eval metrics) and,
for the selected value, ``sweep_test.json``. A finished (or diverged) run with the same config digest is not
trained again, its test evaluation is not repeated, and an interrupted run resumes from its last checkpoint
(``run.resume`` is set to ``auto`` for every run). A run folder left by a different config is an error.

Config section (optional; the command-line options take precedence)::

    sweep:
      learning_rates: [1.0e-4, 2.0e-4, 5.0e-4, 1.0e-3]
      seeds: [0, 1, 2]          # default: the config's run.seed

A config with a ``sweep:`` section is read by ``vlpeft sweep`` only (``vlpeft train`` does not know the section).
Runs execute one after the other in this process (no torchrun).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from vlpeft.training.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    use_tiny_twin,
)

__all__ = [
    "RUN_RECORD",
    "SWEEP_FILE",
    "TEST_RECORD",
    "SweepGrid",
    "add_parser",
    "config_digest",
    "git_commit",
    "load_sweep_config",
    "parse_learning_rates",
    "parse_seeds",
    "run_folder_name",
    "run_sweep",
]

SWEEP_FILE = "sweep.json"
RUN_RECORD = "sweep_run.json"
TEST_RECORD = "sweep_test.json"
FORMAT_VERSION = 1
SWEEP_KEYS = ("learning_rates", "seeds")
_PATH_KEYS = ("train", "eval", "test", "train_annotations", "eval_annotations", "test_annotations", "images",
              "answer_list")
NO_TEST_NOTE = ("task.test is not configured: this task has no separate test split, so the sweep reports no test "
                "score (the selected value's eval score was used to select it and is an optimistic estimate)")


# ---------------------------------------------------------------------------------------------------- the grid
@dataclasses.dataclass(frozen=True)
class SweepGrid:
    """Learning rates (positive, distinct) and seeds (non-negative, distinct), in the order given."""

    learning_rates: tuple[float, ...]
    seeds: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"learning_rates": list(self.learning_rates), "seeds": list(self.seeds)}


def _items(value: Any, source: str) -> list[Any]:
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
        return [] if items == [""] else items
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [value]
    raise ConfigError(f"{source}: expected a comma-separated list or a YAML list, got {value!r}")


def parse_learning_rates(value: Any, source: str = "--learning-rates") -> tuple[float, ...]:
    """The learning-rate grid from ``"1e-4,2e-4"`` or a list. Raises :class:`ConfigError` for an empty grid, a
    non-numeric, non-finite or non-positive value, or two values that name the same run folder."""
    items = _items(value, source)
    if not items:
        raise ConfigError(f"{source}: the learning-rate grid is empty; give at least one value, e.g. 1e-4,5e-4")
    rates: list[float] = []
    for item in items:
        if isinstance(item, bool) or item is None or item == "":
            raise ConfigError(f"{source}: {item!r} is not a number")
        try:
            rate = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {item!r} is not a number") from None
        if not math.isfinite(rate) or rate <= 0:
            raise ConfigError(f"{source}: learning rates must be finite and positive, got {item!r}")
        if run_folder_name(rate, 0) in {run_folder_name(r, 0) for r in rates}:
            raise ConfigError(f"{source}: {item!r} is given twice")
        rates.append(rate)
    return tuple(rates)


def parse_seeds(value: Any, source: str = "--seeds") -> tuple[int, ...]:
    """Seeds from ``"0,1,2"`` or a list (non-negative integers, distinct)."""
    items = _items(value, source)
    if not items:
        raise ConfigError(f"{source}: the seed list is empty")
    seeds: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise ConfigError(f"{source}: {item!r} is not an integer")
        try:
            seed = int(item) if isinstance(item, int) else int(str(item), 10)
        except ValueError:
            raise ConfigError(f"{source}: {item!r} is not an integer") from None
        if seed < 0:
            raise ConfigError(f"{source}: seeds must be >= 0, got {seed}")
        if seed in seeds:
            raise ConfigError(f"{source}: seed {seed} is given twice")
        seeds.append(seed)
    return tuple(seeds)


def run_folder_name(learning_rate: float, seed: int) -> str:
    """``lr-0.0005-seed-0``: the folder of one run (the learning rate to 6 significant digits)."""
    return f"lr-{learning_rate:.6g}-seed-{seed}"


# ----------------------------------------------------------------------------------------------- the config
def load_sweep_config(path: str | os.PathLike, overrides: Sequence[str] = (), *, tiny_twin: bool = False
                      ) -> tuple[TrainConfig, dict[str, Any]]:
    """Read a run config that may carry a ``sweep:`` section: ``(config, sweep section)``. ``--set`` overrides
    apply to the run config (as for ``vlpeft train``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a YAML mapping of sections, got {type(data).__name__}")
    data = dict(data)
    section = data.pop("sweep", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"sweep: expected a mapping with keys {list(SWEEP_KEYS)}, got {section!r}")
    unknown = sorted(set(section) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"unknown key sweep.{unknown[0]}; allowed keys in sweep: {list(SWEEP_KEYS)}")
    if overrides:
        data = apply_overrides(data, list(overrides))
    config = config_from_dict(data, base_dir=os.getcwd())
    return (use_tiny_twin(config) if tiny_twin else config), section


def _resolved_task_paths(task: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    task = dict(task)
    for key in _PATH_KEYS:
        if isinstance(task.get(key), str):
            task[key] = str(config.resolve_path(task[key]).resolve())
    if task.get("tasks"):
        task["tasks"] = [_resolved_task_paths(t, config) if isinstance(t, dict) else t for t in task["tasks"]]
    return task


def config_digest(config: TrainConfig) -> str:
    """SHA-256 (16 hex digits) of the resolved config without what a sweep varies or what does not change a
    result: ``optim.learning_rate``, ``run.seed``, ``run.output_dir``, ``run.resume``, ``run.progress_bar``. Data
    paths are made absolute first; the method's options enter with the library's defaults resolved
    (:func:`~vlpeft.training.validation.resolved_method_settings`), so a run folder trained under another default
    is refused rather than reused."""
    from vlpeft.training.validation import resolved_method_settings

    data = config_to_dict(config)
    data["method_resolved"] = resolved_method_settings(config)
    data["task"] = _resolved_task_paths(data["task"], config)
    data["optim"] = {k: v for k, v in data["optim"].items() if k != "learning_rate"}
    data["run"] = {k: v for k, v in data["run"].items() if k not in ("seed", "output_dir", "resume", "progress_bar")}
    payload = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def git_commit() -> dict[str, Any]:
    """``{"commit": <sha> | None, "dirty": bool | None}`` of the checkout vlpeft is imported from (``None`` when it
    is not a git checkout or git is missing). ``dirty``: tracked files differ from the commit."""
    where = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(status.strip())}


def _has_split(config: TrainConfig, split: str) -> bool:
    if config.task.type == "multitask":
        return bool(config.task.tasks) and all(isinstance(t, dict) and t.get(split) for t in config.task.tasks)
    return getattr(config.task, split) is not None


def _without_test(task: Any) -> Any:
    tasks = [{**t, "test": None, "test_annotations": None} if isinstance(t, dict) else t for t in task.tasks]
    return dataclasses.replace(task, test=None, test_annotations=None, tasks=tasks)


def _run_config(config: TrainConfig, learning_rate: float, seed: int, folder: Path, *, keep_test: bool) -> TrainConfig:
    optim = dataclasses.replace(config.optim, learning_rate=learning_rate)
    run = dataclasses.replace(config.run, seed=seed, output_dir=str(folder), resume="auto")
    task = config.task if keep_test else _without_test(config.task)
    return dataclasses.replace(config, optim=optim, run=run, task=task)


# ------------------------------------------------------------------------------------------------ the sweep
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_owner(record: dict[str, Any] | None, folder: Path, digest: str, learning_rate: float, seed: int) -> None:
    if record is None:
        return
    if record.get("config_digest") != digest:
        raise ConfigError(
            f"{folder} holds a run of another config (digest {record.get('config_digest')}, this sweep's is {digest}): "
            "use another --out, or remove that folder to train it again")
    if record.get("learning_rate") != learning_rate or record.get("seed") != seed:
        raise ConfigError(f"{folder / RUN_RECORD} records learning rate {record.get('learning_rate')} seed "
                          f"{record.get('seed')}, not {learning_rate} seed {seed}: remove the folder")


def _train_one(config: TrainConfig, learning_rate: float, seed: int, folder: Path, digest: str, metric: str,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Train one (learning rate, seed) unless its folder already holds the finished run; returns its record."""
    from vlpeft.training.checkpoints import atomic_write_text
    from vlpeft.training.run import run_training
    from vlpeft.training.trainer import TrainingDivergedError

    record_path = folder / RUN_RECORD
    record = _read_json(record_path)
    _check_owner(record, folder, digest, learning_rate, seed)
    title = f"lr {learning_rate:g} seed {seed}"
    if record is not None and record.get("status") in ("finished", "diverged"):
        shown = f"eval {metric}={record['eval']:.4g}" if record["status"] == "finished" else "diverged"
        log(f"vlpeft sweep: {title}: {shown} (finished earlier, not re-run; {folder})")
        return {**record, "reused": True}
    folder.mkdir(parents=True, exist_ok=True)
    record = {"learning_rate": learning_rate, "seed": seed, "config_digest": digest, "output_dir": str(folder),
              "status": "started"}
    atomic_write_text(record_path, json.dumps(record, indent=1))
    log(f"vlpeft sweep: {title}: training in {folder}")
    started = time.time()
    try:
        result = run_training(_run_config(config, learning_rate, seed, folder, keep_test=False))
    except TrainingDivergedError as error:
        record.update(status="diverged", error=str(error), diverged_step=error.step,
                      wall_time_s=round(time.time() - started, 2))
        atomic_write_text(record_path, json.dumps(record, indent=1))
        log(f"vlpeft sweep: {title}: diverged at step {error.step} ({error})")
        return {**record, "reused": False}
    metrics = result.metrics.get("eval", {})
    if metric not in metrics:
        raise ConfigError(f"the run {folder} reported no eval {metric!r} (eval metrics: {sorted(metrics)}); the "
                          "sweep selects on the eval split by the selection metric (eval.metric)")
    record.update(status="finished", eval=float(metrics[metric]), eval_metrics=metrics,
                  global_step=result.global_step, trainable_params=result.trainable_params,
                  wall_time_s=round(result.wall_time_s, 2))
    atomic_write_text(record_path, json.dumps(record, indent=1, default=str))
    log(f"vlpeft sweep: {title}: eval {metric}={record['eval']:.4g} ({result.summary_line()})")
    return {**record, "reused": False}


def _test_one(config: TrainConfig, learning_rate: float, seed: int, folder: Path, digest: str, metric: str,
              log: Callable[[str], None]) -> dict[str, Any]:
    """Test-split metrics of one run of the selected learning rate (cached in its folder)."""
    from vlpeft.training.checkpoints import atomic_write_text
    from vlpeft.training.run import evaluate

    path = folder / TEST_RECORD
    cached = _read_json(path)
    if cached is not None and cached.get("config_digest") == digest and metric in cached.get("metrics", {}):
        log(f"vlpeft sweep: lr {learning_rate:g} seed {seed}: test {metric}={cached['metrics'][metric]:.4g} "
            "(evaluated earlier)")
        return {**cached, "reused": True}
    metrics = evaluate(_run_config(config, learning_rate, seed, folder, keep_test=True), folder, split="test")
    if metric not in metrics:
        raise ConfigError(f"the test evaluation of {folder} reported no {metric!r} (got {sorted(metrics)})")
    record = {"config_digest": digest, "learning_rate": learning_rate, "seed": seed, "split": "test",
              "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)}}
    atomic_write_text(path, json.dumps(record, indent=1))
    log(f"vlpeft sweep: lr {learning_rate:g} seed {seed}: test {metric}={metrics[metric]:.4g}")
    return {**record, "reused": False}


def _select(per_value: list[dict[str, Any]], greater_is_better: bool) -> dict[str, Any] | None:
    best = None
    for entry in per_value:
        if entry["status"] != "finished":
            continue
        if best is None or (entry["eval"]["mean"] > best["eval"]["mean"] if greater_is_better
                            else entry["eval"]["mean"] < best["eval"]["mean"]):
            best = entry
    return best


def run_sweep(config: TrainConfig, grid: SweepGrid, out_dir: str | os.PathLike | None = None, *,
              command: str = "vlpeft sweep", config_file: str | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the sweep and return the ``sweep.json`` record, also written to ``OUT/sweep.json``.

    Record fields: ``format_version``, ``command``, ``config_file``, ``config_digest`` (:func:`config_digest`),
    ``git`` (:func:`git_commit`), ``metric``, ``greater_is_better``, ``grid`` (``learning_rates``, ``seeds``),
    ``runs`` (one per learning rate x seed: ``learning_rate``, ``seed``, ``output_dir``, ``status``
    ``finished``/``diverged``, ``eval`` (selection metric), ``eval_metrics``, ``global_step``, ``reused``),
    ``per_value`` (per learning rate: ``eval_scores`` ``{seed: value}``, ``eval`` = mean / ci95 over seeds
    (:func:`vlpeft.metrics.intervals.mean_ci95`; ci95 ``null`` for one seed), ``status``), ``selected``
    (``learning_rate``, ``eval``, ``test``: ``{"split", "scores" {seed: value}, "mean", "ci95", "n", "std",
    "metrics" {seed: all test metrics}}`` or ``null``, and ``test_note`` when there is no test split),
    ``written_at``.

    Raises:
        ConfigError: no eval split, a run folder of another config, every learning rate diverged.
    """
    from vlpeft.metrics.intervals import mean_ci95
    from vlpeft.training.checkpoints import atomic_write_text
    from vlpeft.training.task_binding import LOWER_IS_BETTER
    from vlpeft.training.validation import validate_config

    if not _has_split(config, "eval"):
        raise ConfigError("the sweep selects the learning rate on the eval split, and task.eval is not configured "
                          "(set task.eval, for every sub-task of a multi-task config)")
    plan = validate_config(config, for_training=True)  # everything that can be checked, before any model loads
    metric = plan.metric
    greater = metric not in LOWER_IS_BETTER
    digest = config_digest(config)
    out = config.resolve_path(str(out_dir) if out_dir is not None else config.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    has_test = _has_split(config, "test")
    log(f"vlpeft sweep: {len(grid.learning_rates)} learning rate(s) x {len(grid.seeds)} seed(s), selecting on eval "
        f"{metric} ({'higher' if greater else 'lower'} is better); runs in {out}")

    runs = [_train_one(config, lr, seed, out / run_folder_name(lr, seed), digest, metric, log)
            for lr in grid.learning_rates for seed in grid.seeds]
    per_value = []
    for lr in grid.learning_rates:
        mine = [r for r in runs if r["learning_rate"] == lr]
        finished = all(r["status"] == "finished" for r in mine)
        entry: dict[str, Any] = {"learning_rate": lr, "status": "finished" if finished else "diverged",
                                 "eval_scores": {str(r["seed"]): r.get("eval") for r in mine}}
        entry["eval"] = mean_ci95([r["eval"] for r in mine]).to_json() if finished else None
        per_value.append(entry)
    chosen = _select(per_value, greater)
    if chosen is None:
        raise ConfigError(f"every learning rate of the grid {list(grid.learning_rates)} diverged; try smaller values")
    lr = chosen["learning_rate"]
    selected: dict[str, Any] = {"learning_rate": lr, "eval": chosen["eval"], "test": None}
    if has_test:
        tests = [_test_one(config, lr, seed, out / run_folder_name(lr, seed), digest, metric, log)
                 for seed in grid.seeds]
        interval = mean_ci95([t["metrics"][metric] for t in tests])
        selected["test"] = {"split": "test", "scores": {str(t["seed"]): t["metrics"][metric] for t in tests},
                            **interval.to_json(), "metrics": {str(t["seed"]): t["metrics"] for t in tests}}
    else:
        selected["test_note"] = NO_TEST_NOTE
    record = {
        "format_version": FORMAT_VERSION,
        "command": command,
        "config_file": config_file,
        "config_digest": digest,
        "git": git_commit(),
        "metric": metric,
        "greater_is_better": greater,
        "grid": grid.to_json(),
        "runs": runs,
        "per_value": per_value,
        "selected": selected,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(out / SWEEP_FILE, json.dumps(record, indent=1, default=str))
    for line in summary_lines(record):
        log(line)
    log(f"vlpeft sweep: wrote {out / SWEEP_FILE}")
    return record


def _fmt(interval: dict[str, Any] | None) -> str:
    if interval is None:
        return "diverged"
    if interval.get("ci95") is None:
        return f"{interval['mean']:.4g}"
    return f"{interval['mean']:.4g} ± {interval['ci95']:.2g}"


def summary_lines(record: dict[str, Any]) -> list[str]:
    """The table of a ``sweep.json`` record: eval score per learning rate, the choice and its test score."""
    metric, selected = record["metric"], record["selected"]
    n = len(record["grid"]["seeds"])
    lines = [f"learning rate | eval {metric} (mean{' ± ci95' if n > 1 else ''} over {n} seed(s))"]
    for entry in record["per_value"]:
        mark = "  <- selected" if entry["learning_rate"] == selected["learning_rate"] else ""
        lines.append(f"{entry['learning_rate']:>13g} | {_fmt(entry['eval'])}{mark}")
    if selected["test"] is not None:
        lines.append(f"selected learning rate {selected['learning_rate']:g}: test {metric} {_fmt(selected['test'])}")
    else:
        lines.append(f"selected learning rate {selected['learning_rate']:g}: no test score ({selected['test_note']})")
    return lines


# ------------------------------------------------------------------------------------------------------ CLI
def _command_line(args: argparse.Namespace) -> str:
    parts = ["vlpeft", "sweep", args.config]
    if args.learning_rates is not None:
        parts += ["--learning-rates", args.learning_rates]
    if args.seeds is not None:
        parts += ["--seeds", args.seeds]
    if args.out is not None:
        parts += ["--out", args.out]
    for item in args.overrides:
        parts += ["--set", item]
    if args.tiny_twin:
        parts.append("--tiny-twin")
    return shlex.join(parts)


def _sweep(args: argparse.Namespace) -> int:
    # the grid is checked before the config's data or model is looked at
    grid_lrs = parse_learning_rates(args.learning_rates) if args.learning_rates is not None else None
    grid_seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    config, section = load_sweep_config(args.config, args.overrides, tiny_twin=args.tiny_twin)
    if grid_lrs is None:
        if "learning_rates" not in section:
            raise ConfigError("no learning-rate grid: give --learning-rates (e.g. 1e-4,2e-4,5e-4,1e-3) or a "
                              "sweep.learning_rates list in the config")
        grid_lrs = parse_learning_rates(section["learning_rates"], "sweep.learning_rates")
    if grid_seeds is None:
        grid_seeds = (parse_seeds(section["seeds"], "sweep.seeds") if "seeds" in section
                      else (config.run.seed,))
    run_sweep(config, SweepGrid(grid_lrs, grid_seeds), args.out, command=_command_line(args),
              config_file=str(Path(args.config).resolve()), log=lambda line: print(line, flush=True))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``vlpeft sweep``."""
    parser = subparsers.add_parser(
        "sweep", help="select the learning rate of a config on its eval split and report the test score",
        description="Train a config once per learning rate (and seed) of a grid, select the learning rate on the "
                    "eval split by the task's selection metric, evaluate the selected one on the test split, and "
                    "write OUT/sweep.json. Finished runs are not trained again.",
    )
    parser.add_argument("config", help="run config (YAML), optionally with a sweep: section")
    parser.add_argument("--learning-rates", metavar="LR,LR,...",
                        help="comma-separated learning-rate grid, e.g. 1e-4,2e-4,5e-4,1e-3 (default: the config's "
                             "sweep.learning_rates)")
    parser.add_argument("--seeds", metavar="SEED,SEED,...",
                        help="comma-separated seeds per learning rate (default: sweep.seeds, else run.seed)")
    parser.add_argument("--out", help="sweep folder (default: the config's run.output_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, as for vlpeft train (repeatable)")
    parser.add_argument("--tiny-twin", action="store_true",
                        help="swap the model for the tiny twin the recipe declares (model.tiny_twin)")
    parser.set_defaults(handler=_sweep)
    return parser


if __name__ == "__main__":  # pragma: no cover
    from vlpeft.cli import main

    sys.exit(main(["sweep", *sys.argv[1:]]))
