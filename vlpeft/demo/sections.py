"""The training-config sections every demo run shares, whatever the setting: the ``task`` section on the built-in
benchmark and the ``optim`` / ``eval`` / ``run`` sections (one schedule for every method)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlpeft.data.synth import benchmark_files
from vlpeft.demo.specs import TASKS, DemoSize, MethodSpec

__all__ = ["schedule_sections", "task_section"]


def task_section(task: str, data_root: Path, size: DemoSize, *, with_eval: bool = False) -> dict[str, Any]:
    """The ``task:`` section of a training config for ``task`` on the benchmark in ``data_root``; ``with_eval``
    adds the benchmark's validation split as the eval split (learning-rate selection), evaluated on as many
    items as the test split (``max_eval_samples`` caps both)."""
    files = benchmark_files(data_root)
    if task == "vqa":
        section = {"type": "vqa", "train": str(files.vqa_questions("train")),
                   "train_annotations": str(files.vqa_annotations("train")),
                   "test": str(files.vqa_questions("test")), "test_annotations": str(files.vqa_annotations("test")),
                   "images": str(files.coco_images), "inference": "rank", "max_length": 32,
                   "max_train_samples": size.train_vqa, "max_eval_samples": size.test_vqa}
        evaluation = {"eval": str(files.vqa_questions("val")), "eval_annotations": str(files.vqa_annotations("val"))}
    elif task == "snli_ve":
        section = {"type": "snli_ve", "train": str(files.ve_jsonl["train"]), "test": str(files.ve_jsonl["test"]),
                   "images": str(files.ve_images), "inference": "rank", "max_length": 32,
                   "max_train_samples": size.train_ve, "max_eval_samples": size.test_ve}
        evaluation = {"eval": str(files.ve_jsonl["val"])}
    elif task == "caption":
        # one Karpathy file: train / val / test are its splits
        section = {"type": "caption", "train": str(files.karpathy_json), "test": str(files.karpathy_json),
                   "images": str(files.coco_images), "max_length": 48,
                   "max_train_samples": size.train_caption, "max_eval_samples": size.test_caption}
        evaluation = {"eval": str(files.karpathy_json)}
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return {**section, **evaluation} if with_eval else section


def schedule_sections(method: MethodSpec, task: str, seed: int, size: DemoSize, output_dir: Path,
                      progress: bool) -> dict[str, Any]:
    """The ``optim``, ``eval`` and ``run`` sections of a run of ``method`` (linear schedule, 5 % warm-up, no
    weight decay, greedy decoding, the test split scored once at the end)."""
    return {
        "optim": {"learning_rate": size.learning_rate(method), "max_steps": size.steps(task),
                  "batch_size": size.batch_size, "eval_batch_size": 64, "warmup_ratio": 0.05,
                  "lr_scheduler": "linear", "weight_decay": 0.0},
        "eval": {"strategy": "no", "num_beams": 1, "max_new_tokens": 40, "rank_top_k": 4, "load_best_at_end": False},
        "run": {"output_dir": str(output_dir), "seed": seed, "report_to": [], "resume": "never",
                "logging_steps": max(1, size.steps(task) // 4), "progress_bar": progress, "save_total_limit": 2},
    }
