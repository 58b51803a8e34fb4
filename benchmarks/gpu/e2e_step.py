"""End-to-end training step of a model built from the Qwen2.5-VL-3B config, per method (issue #20 item 4).

The model is ``Qwen2_5_VLForConditionalGeneration`` with the values of the published ``config.json`` of
``Qwen/Qwen2.5-VL-3B-Instruct`` (:data:`QWEN2_5_VL_3B`; random weights, nothing is downloaded), in bfloat16, with
non-reentrant activation (gradient) checkpointing, batch 1. Two samples (:data:`SAMPLES`):

- ``image_448``: one 448 x 448 image (32 x 32 patches of 14 px, 256 image tokens after the 2 x 2 merge) and
  64 text tokens: 322 tokens with the vision start/end markers; the loss is on the text tokens;
- ``tokens_2048``: a 2,048-token sample: one 896 x 896 image (1,024 image tokens) and 1,022 text tokens, so that
  the routed methods have visual features as in every chat-VLM sample; the loss is on the text tokens.

Pixels are random values in the layout the Qwen2-VL image processor produces (one row of
3 x 2 x 14 x 14 values per patch), token ids random below the special tokens.

Methods (:data:`METHODS`, each with vlpeft's defaults: the language model's default placement):
``adapter`` (``AdapterConfig()``), ``lora`` (``RoutedLoraConfig()``, plain LoRA), ``routed_lora``
(``RoutedLoraConfig(routing="mul")``), ``p_adapter_release`` and ``p_adapter_paper`` (``PAdapterConfig``; on CUDA
with Triton the release variant takes the fused kernels). A step is ``loss.backward()`` and an AdamW step
(:class:`vlpeft.benchmarking.training_step.TrainingStep`); the steps of all methods run round-robin
(:func:`vlpeft.benchmarking.measure.time_round_robin`), and ratios are taken against ``adapter`` in the same run.
Target of the issue: p-adapter <= 1.3x Adapter.

Usage (GPU, real size): ``python benchmarks/gpu/e2e_step.py --out e2e.json [--md e2e.md] [--budget-s 240]``.
``--tiny`` runs the same code on a tiny config (CPU, float32) as ``tests/benchmarks/test_gpu_script_cpu.py``
does. The JSON is rewritten after each sample, so a run stopped by its time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: Published config of Qwen/Qwen2.5-VL-3B-Instruct (config.json), in transformers 5 field names
#: (``rope_scaling`` {"type": "mrope", "mrope_section": [16, 24, 24]} -> ``rope_parameters``, ``in_chans`` ->
#: ``in_channels``).
QWEN2_5_VL_3B: dict[str, Any] = {
    "text": {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "sliding_window": 32768,
        "use_sliding_window": False, "max_window_layers": 70, "attention_dropout": 0.0, "initializer_range": 0.02,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    },
    "vision": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_channels": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
    "token_ids": {
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "image_token_id": 151655, "video_token_id": 151656,
    },
}

#: The same structure at test size: 2 + 2 layers of width 32 (head_dim 8: M-RoPE over 2 + 1 + 1 frequencies),
#: windows of 2 x 2 merged patches, the last vision block full attention; the real vocabulary and token ids.
TINY: dict[str, Any] = {
    "text": {
        **QWEN2_5_VL_3B["text"], "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 1, 1]},
    },
    "vision": {
        **QWEN2_5_VL_3B["vision"], "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
        "out_hidden_size": 32, "window_size": 56, "fullatt_block_indexes": [1],
    },
    "token_ids": QWEN2_5_VL_3B["token_ids"],
}


@dataclass(frozen=True)
class Sample:
    """One training sample: an image of ``image_px`` x ``image_px`` pixels and ``text_tokens`` text tokens."""

    name: str
    image_px: int
    text_tokens: int
    description: str


SAMPLES: dict[str, Sample] = {
    "image_448": Sample("image_448", 448, 64, "one 448 px image (256 image tokens) + 64 text tokens = 322 tokens"),
    "tokens_2048": Sample("tokens_2048", 896, 1022,
                          "one 896 px image (1,024 image tokens) + 1,022 text tokens = 2,048 tokens"),
}
#: Test-size samples with the same structure (56 px: 4 x 4 patches, 4 image tokens).
TINY_SAMPLES: dict[str, Sample] = {
    "image_448": Sample("image_448", 56, 8, "tiny: one 56 px image (4 image tokens) + 8 text tokens"),
    "tokens_2048": Sample("tokens_2048", 112, 14, "tiny: one 112 px image (16 image tokens) + 14 text tokens = 32"),
}


def _methods() -> dict[str, Callable[[], Any]]:
    import vlpeft

    return {
        "adapter": lambda: vlpeft.AdapterConfig(),
        "lora": lambda: vlpeft.RoutedLoraConfig(),
        "routed_lora": lambda: vlpeft.RoutedLoraConfig(routing="mul"),
        "p_adapter_release": lambda: vlpeft.PAdapterConfig(variant="release"),
        "p_adapter_paper": lambda: vlpeft.PAdapterConfig(variant="paper"),
    }


METHODS: tuple[str, ...] = ("adapter", "lora", "routed_lora", "p_adapter_release", "p_adapter_paper")
#: Issue #20's target: method -> (reference, maximum ratio of step times).
TARGETS: dict[str, tuple[str, float]] = {"p_adapter_release": ("adapter", 1.3), "p_adapter_paper": ("adapter", 1.3)}


def build_config(sizes: dict[str, Any]):
    """A ``Qwen2_5_VLConfig`` from :data:`QWEN2_5_VL_3B` (or :data:`TINY`), tied embeddings."""
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(
        text_config={**sizes["text"], "bos_token_id": sizes["token_ids"]["bos_token_id"],
                     "eos_token_id": sizes["token_ids"]["eos_token_id"], "tie_word_embeddings": True},
        vision_config=dict(sizes["vision"]),
        tie_word_embeddings=True,
        **{k: v for k, v in sizes["token_ids"].items() if k not in ("bos_token_id", "eos_token_id")},
    )
    return config


def build_model(config, *, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The model with random weights (``seed``), on ``device`` in ``dtype``, SDPA attention, train mode,
    checkpointing on."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlpeft._transformers_compat import enable_activation_checkpointing

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    enable_activation_checkpointing(model)
    return model.train()


def make_inputs(config, sample: Sample, *, device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of one sample: ``<|vision_start|>`` + image placeholders + ``<|vision_end|>`` + text, the pixels as
    the image processor lays them out, labels on the text tokens."""
    vision = config.vision_config
    patch, merge, frames = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    if sample.image_px % (patch * merge):
        raise ValueError(f"image side {sample.image_px} is not a multiple of {patch * merge} px")
    grid = sample.image_px // patch
    image_tokens = grid * grid // (merge * merge)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(grid * grid, vision.in_channels * frames * patch * patch, generator=generator)
    text = torch.randint(0, config.text_config.bos_token_id, (sample.text_tokens,), generator=generator)
    ids = torch.cat([
        torch.tensor([config.vision_start_token_id]),
        torch.full((image_tokens,), config.image_token_id),
        torch.tensor([config.vision_end_token_id]),
        text,
    ]).unsqueeze(0)
    labels = ids.clone()
    labels[:, : image_tokens + 2] = -100
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids, device=device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
        "image_grid_thw": torch.tensor([[1, grid, grid]], device=device),
        "labels": labels.to(device),
    }


def _step_rows(sample: Sample, inputs: dict, models: dict[str, torch.nn.Module], *, device: str, repeats: int,
               warmup: int, memory: bool) -> list[dict]:
    from vlpeft.benchmarking.measure import peak_memory_bytes, time_round_robin
    from vlpeft.benchmarking.training_step import TrainingStep

    steps = {name: TrainingStep(model, inputs) for name, model in models.items()}
    losses = {name: step() for name, step in steps.items()}  # the first step of each (allocations, autotuning)
    timings = time_round_robin(list(steps.values()), repeats=repeats, warmup=warmup, settle=0, device=device)
    rows = []
    for (name, step), timing in zip(steps.items(), timings):
        row = {
            "sample": sample.name, "method": name, "tokens": int(inputs["input_ids"].shape[1]),
            "trainable_params": sum(p.numel() for p in models[name].parameters() if p.requires_grad),
            "first_loss": losses[name], "step_ms": 1e3 * timing.min_s, "step_median_ms": 1e3 * timing.median_s,
        }
        if memory:
            row["peak_mib"] = peak_memory_bytes(step, device=device) / 2**20
        rows.append(row)
    by_method = {row["method"]: row for row in rows}
    for row in rows:
        if "adapter" in by_method:
            row["x_adapter"] = row["step_ms"] / by_method["adapter"]["step_ms"]
            if "peak_mib" in row and by_method["adapter"].get("peak_mib"):
                row["memory_x_adapter"] = row["peak_mib"] / by_method["adapter"]["peak_mib"]
        target = TARGETS.get(row["method"])
        if target is not None and target[0] in by_method:
            row["target"] = f"<= {target[1]:g}x {target[0]}"
            row["target_met"] = bool(row["step_ms"] / by_method[target[0]]["step_ms"] <= target[1])
    return rows


def run(*, tiny: bool = False, device: str | None = None, samples: tuple[str, ...] = tuple(SAMPLES),
        methods: tuple[str, ...] = METHODS, repeats: int = 5, warmup: int = 2, memory: bool = True,
        budget_s: float | None = None, out: Path | None = None, md: Path | None = None,
        log: Callable[[str], None] = print) -> dict:
    """Measure every method on every sample; returns the report dict, and writes it to ``out`` (JSON) and
    ``md`` (:func:`format_table`) after each sample."""
    import peft
    import transformers

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if tiny else torch.bfloat16
    started = time.perf_counter()
    sizes, sample_set = (TINY, TINY_SAMPLES) if tiny else (QWEN2_5_VL_3B, SAMPLES)
    config = build_config(sizes)
    report: dict[str, Any] = {
        "model": "Qwen2.5-VL-3B config (random weights)" if not tiny else "tiny Qwen2.5-VL config",
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "dtype": str(dtype).removeprefix("torch."), "activation_checkpointing": True, "batch": 1,
        "repeats": repeats, "warmup": warmup, "samples": {}, "rows": [], "skipped": [],
    }
    base = build_model(config, device=device, dtype=dtype)
    report["parameters"] = sum(p.numel() for p in base.parameters())
    log(f"built {report['model']}: {report['parameters'] / 1e9:.2f} B parameters on {device} "
        f"({time.perf_counter() - started:.0f} s)")
    factories = _methods()
    models = {}
    for name in methods:
        models[name] = peft.get_peft_model(copy.deepcopy(base), factories[name]()).train()
    del base
    for sample_name in samples:
        elapsed = time.perf_counter() - started
        if budget_s is not None and models and elapsed > budget_s:
            report["skipped"].append({"sample": sample_name, "reason": f"time budget {budget_s:.0f} s spent"})
            continue
        sample = sample_set[sample_name]
        inputs = make_inputs(config, sample, device=device, dtype=dtype)
        report["samples"][sample_name] = {"description": sample.description,
                                          "tokens": int(inputs["input_ids"].shape[1])}
        rows = _step_rows(sample, inputs, models, device=device, repeats=repeats, warmup=warmup, memory=memory)
        report["rows"].extend(rows)
        for row in rows:
            log(f"[{sample_name}] {row['method']:18s} {row['step_ms']:9.1f} ms  x adapter "
                f"{row.get('x_adapter', float('nan')):5.2f}  peak {row.get('peak_mib', float('nan')):9.1f} MiB")
        _write(report, started, out, md)
    _write(report, started, out, md)
    return report


def _write(report: dict, started: float, out: Path | None, md: Path | None) -> None:
    report["seconds"] = round(time.perf_counter() - started, 1)
    if out is not None:
        out.write_text(json.dumps(report, indent=2))
    if md is not None:
        md.write_text(format_table(report))


def format_table(report: dict) -> str:
    """A markdown table of a :func:`run` report."""
    lines = [f"{report['model']} on {report['device']} ({report['dtype']}, checkpointing, batch 1; torch "
             f"{report['torch']}, transformers {report['transformers']}, peft {report['peft']})", "",
             "| sample | tokens | method | trainable | step ms (min) | step ms (median) | x Adapter | peak MiB "
             "| memory x Adapter | target |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in report["rows"]:
        target = ""
        if "target" in row:
            target = f"{row['target']}: {'met' if row['target_met'] else 'MISSED'}"
        lines.append(
            f"| {row['sample']} | {row['tokens']} | {row['method']} | {row['trainable_params']:,} "
            f"| {row['step_ms']:.1f} | {row['step_median_ms']:.1f} | {row.get('x_adapter', float('nan')):.2f} "
            f"| {row.get('peak_mib', float('nan')):.0f} | {row.get('memory_x_adapter', float('nan')):.2f} | {target} |")
    for skipped in report["skipped"]:
        lines.append(f"\nnot measured: {skipped['sample']} ({skipped['reason']})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON report")
    parser.add_argument("--md", type=Path, help="markdown table")
    parser.add_argument("--tiny", action="store_true", help="tiny config, float32 (the CPU test)")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--samples", nargs="+", default=list(SAMPLES), choices=list(SAMPLES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    parser.add_argument("--budget-s", type=float, help="measure no further sample after this many seconds")
    args = parser.parse_args(argv)
    if not args.tiny and (args.device or "cuda") == "cuda" and not torch.cuda.is_available():
        print("the real-size run needs a CUDA GPU (use --tiny on the CPU)")
        return 2
    report = run(tiny=args.tiny, device=args.device, samples=tuple(args.samples), methods=tuple(args.methods),
                 repeats=args.repeats, warmup=args.warmup, memory=not args.no_memory, budget_s=args.budget_s,
                 out=args.out, md=args.md)
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
