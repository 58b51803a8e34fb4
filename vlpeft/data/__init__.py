"""Built-in data: a procedurally generated vision-language benchmark written in the standard formats.

``vlpeft data synth --out DIR`` (or :func:`generate_benchmark`) draws scenes of coloured shapes and writes VQAv2,
SNLI-VE and COCO Karpathy files that the loaders of :mod:`vlpeft.tasks` read like the real data sets.
"""

from vlpeft.data.synth import (
    PRESETS,
    BenchmarkFiles,
    SynthConfig,
    benchmark_files,
    ensure_benchmark,
    generate_benchmark,
    load_meta,
)

__all__ = [
    "PRESETS",
    "BenchmarkFiles",
    "SynthConfig",
    "benchmark_files",
    "ensure_benchmark",
    "generate_benchmark",
    "load_meta",
]
