"""Benchmark of one training step per fine-tuning method on the same model, inputs and placement.

A step is ``loss = model(**inputs).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()`` (AdamW over
the trainable parameters), in train mode, float32.

Models (random weights, built in code with :func:`vlpeft.models.tiny.build_tiny_model`):

- ``blip``: a small BLIP-size captioning model (``BlipForConditionalGeneration``): hidden 256, 4 layers, 4 heads
  of dim 64, FFN 1024, 224 px images in 16 px patches (197 image tokens, as BLIP ViT-B/16), text decoder with
  cross-attention, 32 text tokens, batch 2.
- ``llava``: a LLaVA-style model (CLIP vision tower + Llama LM, ``LlavaForConditionalGeneration``): hidden 256,
  4 layers, 4 heads of dim 64 (2 key/value heads), 400 px images in 16 px patches, i.e. 625 image tokens in the
  LM sequence (n = 643 with the text), batch 1.

Methods (every adapter method is placed in the language tower(s) only, at the same positions as p-adapter):

- ``frozen``: no trainable parameter; the output of the input embeddings is made to require grad so that the
  backward pass runs through the whole language model. This is the lower bound of any method that adapts every
  layer (its backward has to reach the first layer).
- ``lora``: PEFT ``LoraConfig`` (r = 8, alpha = 8) on the query and value projections of the self- and cross-
  attention blocks; ``lora_vlpeft``: the same through vlpeft's ``RoutedLoraConfig(routing=None)``.
- ``routed_lora_<kind>``: ``RoutedLoraConfig(routing=kind)``, same targets, mean-pooled visual features.
- ``adapter``: ``AdapterConfig(style="houlsby")`` at the p-adapter positions (after self-/cross-attention output
  projections and after the FFN), bottleneck = hidden / 8; ``routed_adapter_<kind>``: the same with routing;
  ``adapter_eager``: the adapter with eager attention on exactly the towers whose attention p-adapter switches
  to its (eager) ``"padapter"`` implementation (the LLaVA LM; BLIP's text decoder computes attention inline
  and is unchanged). Eager attention materialises the attention probabilities as p-adapter must (hazard H1);
  the ratio ``x_adapter_eager`` separates that cost from p-adapter's own.
- ``p_adapter_paper`` / ``p_adapter_release``: ``PAdapterConfig`` with the family preset (BLIP: text decoder
  self-attention, cross-attention, FFN; LLaVA: LM self-attention, FFN), bottleneck = hidden / 8; ``release``
  pools cross-attention keys to k = 16 (the VQA constants of the released code).
- ``p_adapter_paper_chunked`` / ``p_adapter_release_chunked`` (optional): the same with ``chunk_size``.
- ``p_adapter_release_compiled`` (optional): ``release`` with ``compile_block=True``; its first step (which compiles)
  is run and timed (``first_step_s``, wall-clock) before the round-robin timing.
- ``p_adapter_release_torch``: ``release`` with the fused CPU kernels switched off (the torch path of the block,
  as before the kernels; on CUDA the same as ``p_adapter_release``).

Reported per method: step time (minimum on the chosen clock, ``timer="wall"`` or ``"cpu"``, and the wall-clock
median over the round-robin runs), the ratio to ``frozen``, ``lora``, ``adapter`` and ``adapter_eager``
(minimum times on the chosen clock, same run), the peak memory allocated during one step and the number of
trainable parameters. See :mod:`vlpeft.benchmarking.measure` for how time and memory are measured.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from vlpeft import AdapterConfig, PAdapterConfig, RoutedLoraConfig  # registers the methods with PEFT
from vlpeft.benchmarking.measure import TIMERS, peak_memory_bytes, time_round_robin
from vlpeft.functional import ROUTING_KINDS
from vlpeft.functional.p_laplacian.cpu_kernels import cpu_kernels_disabled
from vlpeft.glue.attention import PADAPTER_ATTENTION
from vlpeft.glue.families import detect_family
from vlpeft.models.tiny import build_tiny_model
from vlpeft.tuners.routed_lora.routing_support import target_regex

__all__ = [
    "MODELS",
    "ModelSpec",
    "METHOD_NAMES",
    "DEFAULT_METHODS",
    "build_model",
    "build_method",
    "run",
    "format_table",
    "TARGETS",
]


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: tiny-factory family, size overrides, batch and text length."""

    name: str
    family: str
    overrides: dict[str, Any]
    batch_size: int
    seq_len: int
    description: str
    key_pool_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_BLIP_SIZES = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "vocab_size": 1000,
    "image_size": 224,
    "patch_size": 16,
    "max_position_embeddings": 128,
}
_LLAVA_SIZES = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "vocab_size": 1000,
    "image_size": 400,
    "patch_size": 16,
    "max_position_embeddings": 4096,
}

MODELS: dict[str, ModelSpec] = {
    "blip": ModelSpec(
        name="blip",
        family="blip_caption",
        overrides=_BLIP_SIZES,
        batch_size=2,
        seq_len=30,
        description="BLIP captioning, hidden 256, 4+4 layers, 4 heads x 64, 197 image tokens, 32 text tokens, batch 2",
        key_pool_size=16,
    ),
    "llava": ModelSpec(
        name="llava",
        family="llava",
        overrides=_LLAVA_SIZES,
        batch_size=1,
        seq_len=16,
        description="LLaVA-style (CLIP + Llama), hidden 256, 4+4 layers, 4 heads x 64, 625 image tokens, n = 643, batch 1",
    ),
}

#: The ratio targets of the performance issue: method -> (reference method, maximum ratio of minimum step times).
TARGETS: dict[str, tuple[str, float]] = {
    "p_adapter_paper": ("adapter", 1.3),
    "p_adapter_release": ("adapter", 1.3),
    "p_adapter_release_compiled": ("adapter", 1.3),
    **{f"routed_lora_{kind}": ("lora", 1.05) for kind in ROUTING_KINDS},
    **{f"routed_adapter_{kind}": ("adapter", 1.05) for kind in ROUTING_KINDS},
}

METHOD_NAMES: tuple[str, ...] = (
    "frozen",
    "lora",
    "lora_vlpeft",
    *(f"routed_lora_{kind}" for kind in ROUTING_KINDS),
    "adapter",
    "adapter_eager",
    *(f"routed_adapter_{kind}" for kind in ROUTING_KINDS),
    "p_adapter_paper",
    "p_adapter_release",
    "p_adapter_paper_chunked",
    "p_adapter_release_chunked",
    "p_adapter_release_compiled",
    "p_adapter_release_torch",
)
#: Without the chunked, eager and compiled rows (the compiled row compiles for about a minute: opt-in).
DEFAULT_METHODS: tuple[str, ...] = tuple(m for m in METHOD_NAMES if not m.endswith(("_chunked", "_eager", "_compiled")))

LORA_RANK = 8
REDUCTION_FACTOR = 8
DEFAULT_CHUNK_SIZE = 64


# ----------------------------------------------------------------------------------------------------- models
def build_model(spec: ModelSpec, *, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model of ``spec`` (train mode, float32) and a batch of inputs with labels."""
    tiny = build_tiny_model(spec.family, seed=seed, **spec.overrides, **spec.extra)
    inputs = tiny.example_inputs(batch_size=spec.batch_size, seq_len=spec.seq_len, seed=seed)
    model = tiny.model.float().train()
    return model, inputs


def _language_qv_regex(model: nn.Module) -> str:
    return target_regex(detect_family(model), None, ("self_attn", "cross_attn"), ("query", "value"))


def _p_adapter_positions(model: nn.Module) -> list[str]:
    family = detect_family(model)
    positions: list[str] = []
    for tower_positions in family.default_placement().values():
        positions.extend(p for p in tower_positions if p not in positions)
    return positions


def method_config(name: str, model: nn.Module, spec: ModelSpec, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Any:
    """The PEFT config of method ``name`` for ``model`` (``None`` for ``frozen``).

    Raises:
        ValueError: an unknown method name.
    """
    if name not in METHOD_NAMES:
        raise ValueError(f"unknown benchmark method {name!r}; expected one of {METHOD_NAMES}")
    if name == "frozen":
        return None
    if name == "lora":
        return LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=_language_qv_regex(model))
    if name == "lora_vlpeft":
        return RoutedLoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK)
    if name.startswith("routed_lora_"):
        return RoutedLoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, routing=name.removeprefix("routed_lora_"))
    positions = _p_adapter_positions(model)
    adapter_positions = [p for p in positions if p != "ffn"] + ["ffn"]
    if name in ("adapter", "adapter_eager"):
        return AdapterConfig(style="houlsby", positions=adapter_positions, reduction_factor=REDUCTION_FACTOR)
    if name.startswith("routed_adapter_"):
        return AdapterConfig(
            style="houlsby",
            positions=adapter_positions,
            reduction_factor=REDUCTION_FACTOR,
            routing=name.removeprefix("routed_adapter_"),
        )
    variant = "paper" if name.startswith("p_adapter_paper") else "release"
    options: dict[str, Any] = {"variant": variant, "reduction_factor": REDUCTION_FACTOR}
    if variant == "release" and spec.key_pool_size is not None:
        options["key_pool_size"] = spec.key_pool_size
    if name.endswith("_chunked"):
        options["chunk_size"] = chunk_size
    if name.endswith("_compiled"):
        options["compile_block"] = True
    return PAdapterConfig(**options)


class _GradientEntry:
    """Forward hook making a frozen module's output part of the autograd graph (times a unit scalar leaf)."""

    def __init__(self) -> None:
        self.unit = torch.ones((), requires_grad=True)

    def __call__(self, _module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * self.unit


def build_method(name: str, base: nn.Module, spec: ModelSpec, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> nn.Module:
    """A copy of ``base`` with method ``name`` applied (train mode); ``frozen`` freezes every parameter."""
    model = copy.deepcopy(base)
    if name == "adapter_eager":
        request = padapter_attention_request(base, spec)
        if request:
            model.set_attn_implementation(request)
    config = method_config(name, model, spec, chunk_size=chunk_size)
    if config is None:
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(_GradientEntry())
        return model.train()
    return get_peft_model(model, config).train()


def padapter_attention_request(base: nn.Module, spec: ModelSpec) -> dict[str, Any]:
    """``set_attn_implementation`` request switching to eager the sub-configs p-adapter runs on its eager
    ``"padapter"`` attention (found by applying p-adapter to a copy of ``base``); empty when there are none."""
    adapted = get_peft_model(copy.deepcopy(base), method_config("p_adapter_paper", base, spec))
    request: dict[str, Any] = {}

    def visit(config: Any, node: dict[str, Any], seen: set[int]) -> None:
        if id(config) in seen:
            return
        seen.add(id(config))
        if getattr(config, "_attn_implementation", None) == PADAPTER_ATTENTION:
            node[""] = "eager"
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None:
                child: dict[str, Any] = {}
                visit(sub, child, seen)
                if child:
                    node[key] = child

    visit(adapted.base_model.model.config, request, set())
    return request


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class TrainingStep:
    """One optimisation step of a model on fixed inputs (AdamW over its trainable parameters)."""

    def __init__(self, model: nn.Module, inputs: dict[str, torch.Tensor], *, cpu_kernels: bool = True) -> None:
        self.model = model
        self.inputs = inputs
        self.cpu_kernels = cpu_kernels
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def __call__(self) -> float:
        with contextlib.nullcontext() if self.cpu_kernels else cpu_kernels_disabled():
            loss = self.model(**self.inputs).loss
            loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


# ----------------------------------------------------------------------------------------------------- running
def run(
    models: Sequence[str] = ("blip", "llava"),
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    repeats: int = 5,
    warmup: int = 2,
    settle: int = 1,
    measure_memory: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    model_specs: dict[str, ModelSpec] | None = None,
    timer: str = "wall",
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Measure one training step of every method on every model; one dict per (model, method).

    Steps run round-robin over the methods; with ``settle`` (default 1) each timed step follows an untimed step of
    the same method, so that it runs in the memory state of its own training loop (see
    :mod:`vlpeft.benchmarking.measure`).

    Row keys: ``model``, ``method``, ``trainable_params``, ``timer``, ``step_ms`` (minimum on ``timer``),
    ``step_wall_ms`` / ``step_cpu_ms`` (minimum wall-clock / process CPU time), ``step_median_ms`` (wall),
    ``peak_mib`` (when measured), ``x_frozen`` / ``x_lora`` / ``x_adapter`` / ``x_adapter_eager`` (ratios of
    ``step_ms`` against those methods in the same run, when they were measured), and ``target`` / ``target_met``
    for the methods with a target in :data:`TARGETS` whose reference was measured.
    """
    if timer not in TIMERS:
        raise ValueError(f"timer must be one of {TIMERS}, got {timer!r}")
    specs = model_specs if model_specs is not None else MODELS
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown benchmark methods {unknown}; expected names from {METHOD_NAMES}")
    rows: list[dict] = []
    for model_name in models:
        if model_name not in specs:
            raise ValueError(f"unknown benchmark model {model_name!r}; expected one of {sorted(specs)}")
        spec = specs[model_name]
        base, inputs = build_model(spec)
        steps: dict[str, TrainingStep] = {}
        model_rows: dict[str, dict] = {}
        for method in methods:
            model = build_method(method, base, spec, chunk_size=chunk_size)
            steps[method] = TrainingStep(model, inputs, cpu_kernels=not method.endswith("_torch"))
            model_rows[method] = {
                "model": model_name,
                "method": method,
                "trainable_params": trainable_parameters(model),
            }
            if log:
                log(f"[{model_name}] built {method}: {model_rows[method]['trainable_params']} trainable parameters")
        for method, step in steps.items():
            if method.endswith("_compiled"):
                # The first step compiles (wall-clock, reported: not part of the timed steps).
                started = time.perf_counter()
                step()
                model_rows[method]["first_step_s"] = time.perf_counter() - started
        timings = time_round_robin(list(steps.values()), repeats=repeats, warmup=warmup, settle=settle)
        for method, timing in zip(steps, timings):
            model_rows[method].update(timer=timer, step_ms=1e3 * timing.best_s(timer), step_wall_ms=1e3 * timing.min_s,
                                      step_cpu_ms=1e3 * timing.cpu_min_s, step_median_ms=1e3 * timing.median_s)
        if measure_memory:
            for method, step in steps.items():
                model_rows[method]["peak_mib"] = peak_memory_bytes(step) / 2**20
        for row in model_rows.values():
            _add_ratios(row, model_rows)
        rows.extend(model_rows.values())
        if log:
            log(f"[{model_name}] measured {len(steps)} methods")
        del steps, base
    return rows


def _add_ratios(row: dict, by_method: dict[str, dict]) -> None:
    for reference in ("frozen", "lora", "adapter", "adapter_eager"):
        if reference in by_method:
            row[f"x_{reference}"] = row["step_ms"] / by_method[reference]["step_ms"]
    target = TARGETS.get(row["method"])
    if target is not None and target[0] in by_method:
        reference, limit = target
        ratio = row["step_ms"] / by_method[reference]["step_ms"]
        row["target"] = f"<= {limit:g}x {reference}"
        row["target_ratio"] = ratio
        row["target_met"] = bool(ratio <= limit)


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of :func:`run` rows."""
    timer = rows[0].get("timer", "wall") if rows else "wall"
    header = (
        f"| model | method | trainable | step ms (min, {timer}) | step ms (median, wall) | x frozen | x LoRA "
        "| x Adapter | x Adapter eager | peak MiB | target |"
    )
    lines = [header, "|" + "---|" * 11]
    for row in rows:
        ratios = [f"{row[k]:.2f}" if k in row else ""
                  for k in ("x_frozen", "x_lora", "x_adapter", "x_adapter_eager")]
        peak = f"{row['peak_mib']:.1f}" if "peak_mib" in row else ""
        target = ""
        if "target" in row:
            target = f"{row['target']}: {row['target_ratio']:.2f} {'met' if row['target_met'] else 'MISSED'}"
        method = row["method"]
        if "first_step_s" in row:
            method += f" (first step {row['first_step_s']:.0f} s: compiles)"
        lines.append(
            f"| {row['model']} | {method} | {row['trainable_params']:,} | {row['step_ms']:.1f} "
            f"| {row['step_median_ms']:.1f} | {' | '.join(ratios)} | {peak} | {target} |"
        )
    return "\n".join(lines)


def tiny_model_specs() -> dict[str, ModelSpec]:
    """Minimum-size stand-ins of :data:`MODELS` (for smoke tests): same families, 2 layers of width 32."""
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 99, "image_size": 32, "patch_size": 8, "max_position_embeddings": 128}
    return {
        name: ModelSpec(name=name, family=spec.family, overrides=small, batch_size=2, seq_len=4,
                        description=f"tiny {spec.family}", key_pool_size=spec.key_pool_size and 4)
        for name, spec in MODELS.items()
    }

