"""Two probes of the routed methods that do not train in the demo.

``--part gradient``: why routed Adapter with ``add`` does not train on the demo's VQA: the visual term's gradient
into the shared down-projection.

The routed adapter computes z = phi(R(y W_d^T + b_d, x_R W_d^T + b_d)) W_u^T + b_u (routing.md §4): text and
vision share W_d and b_d. This script measures, on the demo's base, benchmark and ``--full`` size:

1. for ``add`` and ``mul``, per routed module and one batch of 16 VQA training questions: the norm of W_d's
   gradient through the text term and through the visual term (the difference between the gradients with and
   without ``visual_projection_grad``), at initialisation but with W_u drawn from N(0, 0.02) as after the first
   steps (at W_u = 0, W_d receives no gradient);
2. the test VQA accuracy of routed Adapter (``add``) after the demo's training at each learning rate, with the
   released gradient (``visual_projection_grad=True``) and with W_d / b_d learning from the text term only
   (``False``; same forward values).

``--part rank``: routed LoRA with ``matmul`` (and ``matmul_expand``) applies a per-sample rank-1 update
B v v^T A (B v 1^T A), routing.md §3. Does plain LoRA of rank 1 train the demo's captioning? Test CIDEr-D of LoRA
r = 1 and r = 8 (alpha = 2 r, as the demo's LoRA) at each learning rate.

Run from the repository root (the base and benchmark are those of ``vlpeft demo``; built when missing)::

    python -m benchmarks.experiments.routed_visual_gradient --part gradient|rank --out <folder> \
        [--data <benchmark>] [--learning-rates 0.003 0.01] [--seeds 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from vlpeft.data.synth import PRESETS, ensure_benchmark
from vlpeft.demo.base import BASE_PRESETS, ensure_base
from vlpeft.demo.blip import SIZES, run_config, train_one
from vlpeft.demo.specs import MethodSpec
from vlpeft.training.run import _assemble
from vlpeft.training.validation import validate_config


def _routed_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "bottleneck_adapter_down") and m.routing.get("default")]


def gradient_split(kind: str, base: Path, data: Path, out: Path) -> list[dict[str, float]]:
    """Per routed module: |grad W_d| through the text term and through the visual term."""
    spec = MethodSpec(f"routed Adapter ({kind})", "routed_adapter", {"reduction_factor": 8, "routing": kind})
    config = run_config(spec, "vqa", 0, base, data, SIZES["full"], out / f"probe-{kind}", False)
    assembled = _assemble(config, validate_config(config, for_training=False))
    model, task = assembled.model, assembled.task
    batch = task.collate([task.train_dataset[i] for i in range(16)])
    modules = _routed_modules(model)
    torch.manual_seed(0)
    for module in modules:
        torch.nn.init.normal_(module.bottleneck_adapter_up["default"].weight, std=0.02)

    def grads(text_only: bool) -> list[torch.Tensor]:
        for module in modules:
            module.visual_projection_grad["default"] = not text_only
        model.zero_grad()
        model(**batch).loss.backward()
        return [m.bottleneck_adapter_down["default"].weight.grad.clone() for m in modules]

    both, text = grads(text_only=False), grads(text_only=True)
    rows = [{"module": index, "grad_text": float(t.norm()), "grad_visual": float((b - t).norm())}
            for index, (b, t) in enumerate(zip(both, text, strict=True))]
    return rows


def rank_part(args: argparse.Namespace, base: Path, data: Path) -> int:
    """Test CIDEr-D of plain LoRA with r = 1 and r = 8 on captioning at each learning rate and seed."""
    runs = []
    for r in (1, 8):
        for lr in args.learning_rates:
            for seed in args.seeds:
                spec = MethodSpec(f"LoRA r{r}", "lora", {"r": r, "lora_alpha": 2 * r}, lr)
                result = train_one(spec, "caption", seed, base, data, SIZES["full"], args.out / "runs", False)
                runs.append({"r": r, "learning_rate": lr, "seed": seed, "test_cider": result.metric})
                print(f"LoRA r={r}, lr {lr:g}, seed {seed}: test caption CIDEr-D {result.metric:.3f}")
    (args.out / "lora_rank_caption.json").write_text(json.dumps({"runs": runs}, indent=1), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("gradient", "rank"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="benchmark folder (default: OUT/data, generated when absent)")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[0.003, 0.01])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size = SIZES["full"]
    data = args.data or args.out / "data"
    ensure_benchmark(data, PRESETS[size.synth_preset])
    base, _ = ensure_base(BASE_PRESETS[size.base_preset])
    if args.part == "rank":
        return rank_part(args, base, data)
    report: dict[str, Any] = {"gradient_split": {k: gradient_split(k, base, data, args.out) for k in ("add", "mul")}}
    for kind, rows in report["gradient_split"].items():
        print(f"{kind}: per routed module |grad W_d| through the text term / the visual term: "
              + ", ".join(f"{r['grad_text']:.2e} / {r['grad_visual']:.2e}" for r in rows))
    runs = []
    spec = MethodSpec("routed Adapter (add)", "routed_adapter", {"reduction_factor": 8, "routing": "add"})
    for flag in (True, False):
        for lr in args.learning_rates:
            for seed in args.seeds:
                run_spec = dataclasses.replace(spec, options={**spec.options, "visual_projection_grad": flag},
                                               learning_rate=lr)
                result = train_one(run_spec, "vqa", seed, base, data, size, args.out / "runs", False)
                runs.append({"visual_projection_grad": flag, "learning_rate": lr, "seed": seed,
                             "test_vqa_accuracy": result.metric})
                print(f"routed Adapter (add), visual_projection_grad={flag}, lr {lr:g}, seed {seed}: "
                      f"test VQA accuracy {result.metric:.2f}")
    report["runs"] = runs
    (args.out / "routed_visual_gradient.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
