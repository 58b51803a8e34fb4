"""Peak memory of a training step vs sequence length on the LLaVA-style model, with and without chunking.

The LLaVA-style model of :mod:`vlpeft.benchmarking.training_step` is rebuilt with larger images so that the
language model sees n = (image_size / 16)^2 image tokens plus the text. For each n, one training step of the
bottleneck adapter (the reference), of p-adapter (``paper`` and ``release``) and of p-adapter with
``chunk_size`` is measured (peak memory allocated during the step, see :mod:`vlpeft.benchmarking.measure`).

Two references: ``adapter`` on the default (sdpa) attention, and ``adapter_eager`` on eager attention, which
materialises the (batch, heads, n, n) attention of every layer as p-adapter must (hazard H1). ``extra_mib`` is
a method's peak minus ``adapter_eager``'s at the same n: p-adapter's own memory. With chunking, the p-Laplacian
block works on (chunk, n) blocks in both passes and keeps nothing of size n x n between them, so that part is
O(chunk x n); the row ``within_budget`` checks ``extra_mib`` against ``memory_budget_mib``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from vlpeft.benchmarking.measure import peak_memory_bytes, time_round_robin
from vlpeft.benchmarking.training_step import MODELS, ModelSpec, TrainingStep, build_method, build_model

__all__ = ["DEFAULT_IMAGE_SIZES", "DEFAULT_METHODS", "run", "format_table"]

#: 400, 512 and 736 px in 16 px patches: 625, 1024 and 2116 image tokens.
DEFAULT_IMAGE_SIZES: tuple[int, ...] = (400, 512, 736)
DEFAULT_METHODS: tuple[str, ...] = (
    "adapter",
    "adapter_eager",
    "p_adapter_paper",
    "p_adapter_paper_chunked",
    "p_adapter_release",
    "p_adapter_release_chunked",
)
DEFAULT_CHUNK_SIZE = 64
DEFAULT_BUDGET_MIB = 64.0


def run(
    image_sizes: Sequence[int] = DEFAULT_IMAGE_SIZES,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    memory_budget_mib: float = DEFAULT_BUDGET_MIB,
    base_spec: ModelSpec | None = None,
    time_steps: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """One row per (n, method): ``n`` (LM sequence length), ``image_tokens``, ``peak_mib``, ``extra_mib`` (vs
    ``adapter_eager``), ``step_ms`` (one timed step after a warm-up, when ``time_steps``), and for chunked methods
    ``budget_mib`` / ``within_budget``.
    """
    if "adapter_eager" not in methods:
        raise ValueError("methods must include 'adapter_eager', the reference of the extra memory")
    spec0 = base_spec if base_spec is not None else MODELS["llava"]
    patch = spec0.overrides["patch_size"]
    rows: list[dict] = []
    for image_size in image_sizes:
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        spec = replace(spec0, overrides={**spec0.overrides, "image_size": image_size})
        base, inputs = build_model(spec)
        n = int(inputs["input_ids"].shape[1])
        by_method: dict[str, dict] = {}
        for method in methods:
            step = TrainingStep(build_method(method, base, spec, chunk_size=chunk_size), inputs)
            row = {"image_size": image_size, "image_tokens": (image_size // patch) ** 2, "n": n, "method": method}
            if time_steps:
                row["step_ms"] = 1e3 * time_round_robin([step], repeats=1, warmup=1)[0].min_s
            else:
                step()  # optimizer state is allocated before the measured step
            row["peak_mib"] = peak_memory_bytes(step) / 2**20
            by_method[method] = row
            if log:
                log(f"[long n={n}] {method}: peak {row['peak_mib']:.1f} MiB")
            del step
        reference = by_method["adapter_eager"]["peak_mib"]
        for method, row in by_method.items():
            row["extra_mib"] = row["peak_mib"] - reference
            if method.endswith("_chunked"):
                row["chunk_size"] = chunk_size
                row["budget_mib"] = memory_budget_mib
                row["within_budget"] = bool(row["extra_mib"] <= memory_budget_mib)
        rows.extend(by_method.values())
        del base
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of :func:`run` rows."""
    lines = [
        "| n (LM tokens) | image tokens | method | peak MiB | extra vs adapter_eager MiB | step ms | budget |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        budget = ""
        if "budget_mib" in row:
            budget = f"<= {row['budget_mib']:g} MiB: {'met' if row['within_budget'] else 'MISSED'}"
        step = f"{row['step_ms']:.0f}" if "step_ms" in row else ""
        lines.append(
            f"| {row['n']} | {row['image_tokens']} | {row['method']} | {row['peak_mib']:.1f} "
            f"| {row['extra_mib']:+.1f} | {step} | {budget} |"
        )
    return "\n".join(lines)
