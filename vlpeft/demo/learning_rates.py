"""How the demo chooses each method's learning rate per task: from the committed table, by selection on the eval
split, or the old shared rate.

Policies (``vlpeft demo --lr``):

- ``table`` (the default demo): the value of :data:`TABLE_FILE` (``vlpeft/demo/learning_rates.json``) for the
  (setting, method label, task), when the entry was selected on the same base preset as the run's; otherwise the
  shared rate, and the report says so ("shared: not in the table");
- ``select`` (``--full``): each (method, task) is swept over a grid on the eval split with
  :func:`vlpeft.training.sweep.run_sweep` (:mod:`vlpeft.demo.selection`), and the seeds then train at the selected
  value;
- ``shared``: the old protocol, one rate for every parameter-efficient method
  (:data:`~vlpeft.demo.specs.PEFT_LEARNING_RATE`) and 10x lower for full fine-tuning.

The grid (:data:`PEFT_GRID`) is for the parameter-efficient methods; a method with its own shared rate (full
fine-tuning: 10x lower) gets the grid scaled by the same factor (:func:`grid_for`). The papers sweep
{1e-4, 2e-4, 5e-4, 1e-3} for PETL methods on real models; the demo's 1.5 M-parameter base, trained for a few hundred
steps, needs larger steps: in side runs before the table was made (docs/results.md), LoRA on VQA trained best at
5e-3, routed ``matmul`` collapsed at 5e-3 and trained at 1e-3, and the inventory-style captions were learned in
100 steps at 2e-2 but barely at 5e-3. {1e-3, 3e-3, 1e-2, 3e-2} brackets all of these in half-decade steps.

Every table entry records what selected it: the command and git commit, the base and size it was selected at, the
selection seeds, and the eval score of every grid value (:func:`table_entry`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vlpeft.demo.specs import PEFT_LEARNING_RATE, DemoSize, MethodSpec

__all__ = [
    "PEFT_GRID",
    "POLICIES",
    "TABLE_FILE",
    "LearningRateChoice",
    "grid_for",
    "learning_rate_lines",
    "learning_rate_record",
    "load_table",
    "merge_entries",
    "provenance_lines",
    "resolve_learning_rates",
    "selection_markdown",
    "table_entry",
    "write_table",
]

TABLE_FILE = Path(__file__).with_name("learning_rates.json")
TABLE_FORMAT = 1
#: The selection grid of the parameter-efficient methods (see the module docstring for why these values).
PEFT_GRID: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
POLICIES: tuple[str, ...] = ("table", "select", "shared")
SHARED = "shared"
NOT_IN_TABLE = "shared, not in the table"
TABLE = "table"
SELECTED = "selected on eval"
#: What a choice's ``selected_by`` repeats from its table entry.
PROVENANCE_KEYS = ("command", "git", "size", "steps", "base_digest", "selection_seeds", "metric", "eval_scores")


@dataclass(frozen=True)
class LearningRateChoice:
    """One method's learning rate on one task, before the size's ``lr_scale``, and where it came from (``entry``:
    the table entry or the selection that chose it)."""

    label: str
    task: str
    learning_rate: float
    source: str
    entry: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The choice, with the entry's provenance (command, git, size, seeds, eval scores) when there is one."""
        data = asdict(self)
        entry = data.pop("entry")
        if entry is not None:
            data["selected_by"] = {key: entry.get(key) for key in PROVENANCE_KEYS}
        return data


def grid_for(spec: MethodSpec, grid: Sequence[float] = PEFT_GRID) -> tuple[float, ...]:
    """The grid of ``spec``: ``grid`` times the ratio of the method's shared rate to the parameter-efficient one
    (1 for every parameter-efficient method, 0.1 for full fine-tuning), to 6 significant digits, in ascending order
    (the sweep breaks ties in grid order: the smaller rate wins)."""
    scale = spec.base_learning_rate() / PEFT_LEARNING_RATE
    return tuple(sorted(float(f"{value * scale:.6g}") for value in grid))


# ---------------------------------------------------------------------------------------------------- the table
def _check_entry(entry: Any, where: str) -> None:
    required = ("setting", "label", "task", "learning_rate", "base_preset", "eval_scores", "command", "git")
    if not isinstance(entry, dict) or any(key not in entry for key in required):
        raise ValueError(f"{where}: every entry needs the keys {list(required)}, got {entry!r}")
    if not isinstance(entry["learning_rate"], int | float) or entry["learning_rate"] <= 0:
        raise ValueError(f"{where}: learning_rate must be a positive number, got {entry['learning_rate']!r}")


def load_table(path: str | os.PathLike = TABLE_FILE) -> list[dict[str, Any]]:
    """The entries of a learning-rate table (``[]`` when the file does not exist). Raises ``ValueError`` for a file
    that is not a table of this format."""
    path = Path(path)
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format_version") != TABLE_FORMAT or not isinstance(
            data.get("entries"), list):
        raise ValueError(f"{path}: not a learning-rate table of format {TABLE_FORMAT}")
    for n, entry in enumerate(data["entries"]):
        _check_entry(entry, f"{path} entry {n}")
    return data["entries"]


def _key(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    return entry["setting"], entry["label"], entry["task"]


def merge_entries(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with every entry of the same (setting, label, task) as one of ``new`` replaced, new ones appended."""
    replaced = {_key(entry): entry for entry in new}
    merged = [replaced.pop(_key(entry), entry) for entry in old]
    return merged + [entry for entry in new if _key(entry) in replaced]


def write_table(path: str | os.PathLike, entries: Sequence[dict[str, Any]]) -> Path:
    """Write a table (atomically: a temporary file, then renamed)."""
    path = Path(path)
    for n, entry in enumerate(entries):
        _check_entry(entry, f"entry {n}")
    payload = {
        "format_version": TABLE_FORMAT,
        "about": "Per-method, per-task learning rates of vlpeft demo (vlpeft/demo/learning_rates.py). Each entry: "
                 "the selected learning_rate (before the size's lr_scale), the eval-split score of every grid value "
                 "(eval_scores; null: diverged), and what selected it (command, git, size, base, seeds).",
        "entries": list(entries),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def table_entry(*, setting: str, spec: MethodSpec, task: str, size_name: str, size: DemoSize, base_digest: str,
                sweep: Mapping[str, Any]) -> dict[str, Any]:
    """A table entry from the ``sweep.json`` record of one (method, task) selection (its grid values are the
    effective rates, i.e. after ``size.lr_scale``; the entry's ``learning_rate`` is before it)."""
    per_value = sweep["per_value"]
    grid = [entry["learning_rate"] for entry in per_value]
    selected = sweep["selected"]["learning_rate"]
    test = sweep["selected"].get("test")
    return {
        "setting": setting,
        "label": spec.label,
        "task": task,
        "method": asdict(spec),
        "learning_rate": float(f"{selected / size.lr_scale:.6g}"),
        "lr_scale": size.lr_scale,
        "metric": sweep["metric"],
        "split": "eval",
        "grid": grid,
        "eval_scores": {f"{entry['learning_rate']:g}": None if entry["eval"] is None else entry["eval"]["mean"]
                        for entry in per_value},
        "at_grid_edge": selected in (min(grid), max(grid)) and len(grid) > 1,
        "selection_seeds": sweep["grid"]["seeds"],
        "test_of_selected": None if test is None else test["scores"],
        "size": size_name,
        "steps": size.steps(task),
        "base_preset": size.base_preset,
        "base_digest": base_digest,
        "benchmark_preset": size.synth_preset,
        "command": sweep["command"],
        "git": sweep["git"],
        "selected_at": sweep.get("written_at") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ------------------------------------------------------------------------------------------------ the choice
def resolve_learning_rates(policy: str, specs: Sequence[MethodSpec], tasks: Sequence[str], *, setting: str,
                           size: DemoSize, table: Sequence[dict[str, Any]] = (),
                           selected: Sequence[dict[str, Any]] = ()) -> dict[tuple[str, str], LearningRateChoice]:
    """The learning rate (before ``size.lr_scale``) of every (method label, task) under ``policy``.

    ``table``: the entries of :func:`load_table` (policy ``table``); ``selected``: the table entries of this
    invocation's selections (policy ``select``, every pair needed)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown learning-rate policy {policy!r}; expected one of {POLICIES}")
    usable = {_key(e): e for e in table if e["base_preset"] == size.base_preset}
    fresh = {_key(e): e for e in selected}
    choices = {}
    for task in tasks:
        for spec in specs:
            key = (setting, spec.label, task)
            entry = None
            if policy == "select":
                if key not in fresh:
                    raise ValueError(f"no selected learning rate for {spec.label} on {task}")
                entry, source = fresh[key], SELECTED
            elif policy == "table" and key in usable:
                entry, source = usable[key], TABLE
            else:
                source = SHARED if policy == "shared" else NOT_IN_TABLE
            value = spec.base_learning_rate() if entry is None else float(entry["learning_rate"])
            choices[(spec.label, task)] = LearningRateChoice(spec.label, task, value, source, entry)
    return choices


def selection_markdown(entries: Sequence[dict[str, Any]]) -> str:
    """The eval score of every grid value per (method, task) as a markdown table; the selected value in bold,
    diverged values as "diverged", "(edge)" when the selected value is an end of the grid (the grid values are the
    rates as trained, the selected one is shown before the size's ``lr_scale`` too when that is not 1)."""
    lines = ["| Method | Task | Metric (eval) | Eval score per learning rate | Selected |", "|---|---|---|---|---:|"]
    for entry in entries:
        scale = entry.get("lr_scale", 1.0)
        chosen = float(entry["learning_rate"]) * scale  # the grid holds the rates as trained (after lr_scale)
        cells = []
        for value, score in entry["eval_scores"].items():
            shown = "diverged" if score is None else f"{score:.3f}"
            cells.append(f"**{value}: {shown}**" if math.isclose(float(value), chosen, rel_tol=1e-5)
                         else f"{value}: {shown}")
        edge = " (edge)" if entry.get("at_grid_edge") else ""
        scaled = "" if scale == 1.0 else f" (x lr_scale {scale:g} = {chosen:g})"
        lines.append(f"| {entry['label']} | {entry['task']} | {entry.get('metric', '')} | {', '.join(cells)} | "
                     f"{entry['learning_rate']:g}{scaled}{edge} |")
    return "\n".join(lines)


def provenance_lines(entries: Sequence[dict[str, Any]]) -> list[str]:
    """One line per distinct (command, commit, size, seeds) the ``entries`` were selected with."""
    seen: dict[tuple[Any, ...], int] = {}
    for entry in entries:
        git = entry.get("git") or {}
        key = (entry["command"].split("  # ")[0], git.get("commit"), bool(git.get("dirty")), entry.get("size"),
               tuple(entry.get("selection_seeds") or ()))
        seen[key] = seen.get(key, 0) + 1
    lines = []
    for (command, commit, dirty, size, seeds), count in seen.items():
        lines.append(f"- {count} value(s) selected by `{command}` at commit {commit or 'unknown'}"
                     f"{' (with uncommitted changes)' if dirty else ''}, size {size}, selection seed(s) "
                     f"{list(seeds)}")
    return lines


def learning_rate_record(policy: str, choices: dict[tuple[str, str], LearningRateChoice], size: DemoSize,
                          lr_table: str | os.PathLike, lr_grid: Sequence[float], selection_seeds: Sequence[int],
                          entries: list[dict[str, Any]], selections_reused: int) -> dict[str, Any]:
    """The ``learning_rates`` record of ``results.json``: the policy, every (method, task)'s choice (before and
    after the size's ``lr_scale``), the table file or the grid, seeds and selected entries."""
    record: dict[str, Any] = {
        "policy": policy,
        "lr_scale": size.lr_scale,
        "choices": [{**choice.to_json(), "effective": choice.learning_rate * size.lr_scale}
                    for choice in choices.values()],
    }
    if policy == "table":
        record["table"] = str(lr_table)
    if policy == "select":
        record.update(grid=list(lr_grid), selection_seeds=list(selection_seeds), selection=entries,
                      selections_reused=selections_reused)
    return record


def learning_rate_lines(record: dict[str, Any], choices: dict[tuple[str, str], LearningRateChoice],
                        base_digest: str | None = None) -> list[str]:
    """How the learning rates were chosen, for ``results.md`` (``base_digest``: this run's base, to say when table
    values were selected on another build of the base preset)."""
    policy = record["policy"]
    if policy == "shared":
        return ["Old protocol (`--lr shared`): one learning rate for every parameter-efficient method and a 10x "
                "lower one for full fine-tuning, nothing selected per method or task."]
    if policy == "select":
        return [f"Selected in this invocation on the eval split (validation split of the benchmark) from the grid "
                f"{record['grid']} (full fine-tuning: 10x lower), selection seed(s) {record['selection_seeds']}; "
                "the seeds then trained at the selected value and the table reports their test scores. Eval score "
                "of every grid value:", "", selection_markdown(record["selection"])]
    used = [c.entry for c in choices.values() if c.source == TABLE and c.entry is not None]
    lines = [f"From the committed table `{Path(record['table']).name}` (`--lr table`), values selected on the eval "
             "split; each entry records the command and commit that selected it and the eval score of every grid "
             "value:", *provenance_lines(used)]
    other_base = sorted({e.get("base_digest") for e in used if e.get("base_digest") not in (None, base_digest)})
    if base_digest is not None and other_base:
        lines.append(f"- Note: values selected on another build of this base preset (digest {', '.join(other_base)}; "
                     f"this run's base: {base_digest}): select again to be sure they still hold")
    missing = [f"{c.label} on {c.task}" for c in choices.values() if c.source == NOT_IN_TABLE]
    if missing:
        lines.append(f"- No table entry for this base, trained at the shared rate: {', '.join(missing)}")
    return lines
