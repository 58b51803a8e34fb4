"""The demo's BLIP setting (``vlpeft demo``, the default): every method fine-tuned on the pretrained BLIP base
(:mod:`vlpeft.demo.base`) on VQA, visual entailment and captioning; the base without fine-tuning is scored as a
reference row."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlpeft.demo.runlog import PlanItem, fingerprint
from vlpeft.demo.scoring import run_folder, train_and_score
from vlpeft.demo.sections import schedule_sections, task_section
from vlpeft.demo.setting import DemoSetting, PlanContext, fine_tuning_items
from vlpeft.demo.specs import FULL_LEARNING_RATE, DemoSize, MethodSpec, lora_and_adapter_specs
from vlpeft.report.demo_results import BASE_LABEL, DemoRunResult
from vlpeft.training import TrainConfig, config_from_dict, evaluate
from vlpeft.tuners.p_adapter.config import TASK_DEFAULTS

__all__ = ["DEFAULT_METHODS", "SIZES", "TASK_METRICS", "BlipSetting", "evaluate_base", "method_specs", "run_config", "train_one"]

SIZES: dict[str, DemoSize] = {
    "smoke": DemoSize("tiny", "smoke", 48, 32, 48, 24, 24, 12, 2, 2, 2, 8),
    # captioning: 100 steps, since its inventory-style targets differ from the pretraining captions (40 steps were
    # enough when they did not)
    "default": DemoSize("default", "default", 9000, 6000, 9000, 300, 300, 100, 400, 400, 100, 32),
    # --full: 3 seeds x every routing kind (117 fine-tuning runs), sized for about an hour with ``--jobs 2`` on a
    # shared 2-core machine (58 min measured, docs/results.md): 25 % more steps than the default, twice its test sets
    "full": DemoSize("default", "default", 9000, 6000, 9000, 600, 600, 200, 500, 500, 100, 32),
}

#: The methods of the default demo (``vlpeft demo`` without ``--full`` or ``--methods``): the two baselines, both
#: p-adapter variants and the routing paper's released function, so that two seeds of each fit the demo's ten
#: minutes on two cores (full fine-tuning and the other routed variants are in ``--full``; ``--methods`` adds them).
DEFAULT_METHODS: tuple[str, ...] = ("LoRA", "Adapter", "p-adapter (paper)", "p-adapter (release)",
                                    "routed LoRA (matmul)")

#: The metric of the base's reference evaluation per task.
TASK_METRICS: dict[str, str] = {"vqa": "vqa_accuracy", "snli_ve": "accuracy", "caption": "CIDEr"}


def method_specs(routing_kinds: Sequence[str]) -> list[MethodSpec]:
    """The compared methods; routed LoRA / Adapter once per routing kind."""
    plain, routed = lora_and_adapter_specs(routing_kinds)
    return [
        MethodSpec("full fine-tuning", "full", {}, FULL_LEARNING_RATE),
        *plain,
        MethodSpec("p-adapter (paper)", "p_adapter", {"variant": "paper"}),
        MethodSpec("p-adapter (release)", "p_adapter", {"variant": "release"}),
        *routed,
    ]


def image_tokens(base_dir: Path) -> int:
    """Number of vision-encoder tokens (patches + CLS) of the saved BLIP base."""
    vision = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2 + 1


def method_options(method: MethodSpec, task: str, base_dir: Path) -> dict[str, Any]:
    """The method's options for this task and base. p-adapter keeps its released per-task constants, except that
    its cross-attention key pooling k (16 / 24 for 197 ViT-B tokens) is capped at the base's image tokens."""
    options = dict(method.options)
    if method.type == "p_adapter" and "key_pool_size" not in options:
        default_k = TASK_DEFAULTS[task]["key_pool_size"]
        n_tokens = image_tokens(base_dir)
        if default_k is not None and default_k > n_tokens:
            options["key_pool_size"] = n_tokens
    return options


def run_config(method: MethodSpec, task: str, seed: int, base_dir: Path, data_root: Path, size: DemoSize,
               output_dir: Path, progress: bool, *, with_eval: bool = False) -> TrainConfig:
    """The training config of one run on the BLIP base (``with_eval``: with the eval split, for selection)."""
    return config_from_dict({
        "model": {"name": str(base_dir)},
        "method": {"type": method.type, **method_options(method, task, base_dir)},
        "task": task_section(task, data_root, size, with_eval=with_eval),
        **schedule_sections(method, task, seed, size, output_dir, progress),
    })


def train_one(method: MethodSpec, task: str, seed: int, base_dir: Path, data_root: Path, size: DemoSize,
              work_dir: Path, progress: bool) -> DemoRunResult:
    """Fine-tune the BLIP base with ``method`` on ``task`` and score it on the test split."""
    output_dir = run_folder(work_dir, task, method.label, seed)
    config = run_config(method, task, seed, base_dir, data_root, size, output_dir, progress)
    return train_and_score(config, method.label, task, seed)


def evaluate_base(task: str, base_dir: Path, data_root: Path, size: DemoSize, work_dir: Path) -> DemoRunResult:
    """The base model without any fine-tuning on ``task``, evaluated like the fine-tuned ones (reference row)."""
    config = config_from_dict({
        "model": {"name": str(base_dir)},
        "method": {"type": "full"},
        "task": task_section(task, data_root, size),
        "eval": {"strategy": "no", "num_beams": 1, "max_new_tokens": 40, "rank_top_k": 4},
        "optim": {"eval_batch_size": 64},
        "run": {"output_dir": str(work_dir / f"base-{task}"), "report_to": [], "progress_bar": False},
    })
    metrics = evaluate(config, checkpoint=base_dir, split="test")
    return DemoRunResult(BASE_LABEL, task, 0, float(metrics[TASK_METRICS[task]]))


class BlipSetting(DemoSetting):
    """The pretrained BLIP base, fine-tuned whole or with each method, on every task."""

    name = "blip"
    sizes = SIZES
    results_stem = "results"
    plot_title = "vlpeft demo on the built-in benchmark"

    def __init__(self, text_model: object = None) -> None:
        if text_model is not None:
            raise ValueError("text_model is an option of the composite setting only")

    def method_specs(self, routing_kinds: Sequence[str]) -> list[MethodSpec]:
        return method_specs(routing_kinds)

    def selection_config(self, spec: MethodSpec, task: str, context: PlanContext, output_dir: Path) -> TrainConfig:
        c = context
        return run_config(spec, task, 0, c.base_path, c.data_root, c.size, output_dir, False, with_eval=True)

    def build_plan(self, specs: Sequence[MethodSpec], tasks: Sequence[str], seeds: Sequence[int],
                   context: PlanContext) -> list[PlanItem]:
        """The base's reference evaluation per task, then every (seed, task, method) fine-tuning."""
        common = self.run_settings(context)
        c = context
        plan = [PlanItem(fingerprint({"kind": "base", "task": task, **common}), f"{BASE_LABEL} on {task}",
                         evaluate_base, (task, c.base_path, c.data_root, c.size, c.work_dir)) for task in tasks]
        return plan + fine_tuning_items(
            specs, tasks, seeds, size=c.size, common=common, title_prefix="", run=train_one,
            learning_rates=c.learning_rates,
            method_settings=lambda spec, task: self.method_settings(spec, task, c),
            run_args=lambda spec, task, seed: (spec, task, seed, c.base_path, c.data_root, c.size, c.work_dir,
                                               c.progress))
