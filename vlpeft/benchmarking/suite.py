"""``vlpeft bench``: run the benchmark suites, write a markdown report and a JSON file, compare with a previous run.

Suites:

- ``p_laplacian``: the p-Laplacian block, efficient vs equation-level vs released-code formulation
  (:mod:`vlpeft.benchmarking.p_laplacian`).
- ``training``: one training step per method on the BLIP-size and LLaVA-style models
  (:mod:`vlpeft.benchmarking.training_step`).
- ``long``: peak memory vs sequence length with and without chunking (:mod:`vlpeft.benchmarking.long_sequence`).

Every ratio is taken between measurements of the same run. ``--compare PREVIOUS.json`` puts the ratios of a
previous run (e.g. the JSON recorded with ``docs/performance.md``) next to the new ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vlpeft.benchmarking import long_sequence, p_laplacian, training_step
from vlpeft.benchmarking.measure import TIMERS
from vlpeft.functional.p_laplacian import cpu_kernels as p_laplacian_cpu

SUITES: tuple[str, ...] = ("p_laplacian", "training", "long")

_LLAVA_METHODS = ("frozen", "lora", "routed_lora_mul", "routed_lora_matmul", "adapter", "adapter_eager",
                  "routed_adapter_mul", "routed_adapter_matmul", "p_adapter_paper", "p_adapter_release",
                  "p_adapter_release_torch", "p_adapter_release_compiled")

#: Sizes of the default run, of ``--full`` (adds the n = 1024 reference formulations of the block, which take
#: most of its time) and of ``--quick`` (smoke-test sizes, seconds; without the compiled row, which compiles for
#: about a minute). Training steps: 16 round-robin rounds (the minimum over 8 moved the p-adapter ratios by up to
#: 0.05 between runs of the same code on the 2-core VMs; the step suite takes about 2 minutes).
PROFILES: dict[str, dict[str, Any]] = {
    "default": {
        "p_laplacian": {"ns": (64, 256, 1024), "dims": (8, 64), "repeats": 3, "max_pair_mib": 256.0,
                        "reference_max_n": 256},
        "training": [
            {"models": ("blip",), "methods": None, "extra_methods": ("p_adapter_release_compiled",), "repeats": 16},
            {"models": ("llava",), "methods": _LLAVA_METHODS, "repeats": 16},
        ],
        "long": {"image_sizes": (400, 512, 736), "chunk_size": 64, "memory_budget_mib": 64.0},
    },
    "full": {
        "p_laplacian": {"ns": (64, 256, 1024), "dims": (8, 64), "repeats": 3, "max_pair_mib": 256.0},
        "training": [
            {"models": ("blip",), "methods": None, "extra_methods": ("p_adapter_release_compiled",), "repeats": 16},
            {"models": ("llava",), "methods": _LLAVA_METHODS, "repeats": 16},
        ],
        "long": {"image_sizes": (400, 512, 736), "chunk_size": 64, "memory_budget_mib": 64.0},
    },
    "quick": {
        "p_laplacian": {"ns": (16,), "dims": (4,), "repeats": 1, "max_pair_mib": 64.0, "heads": 2},
        "training": [{"models": ("blip", "llava"), "repeats": 1, "warmup": 0, "tiny": True,
                      "methods": ("frozen", "lora", "routed_lora_mul", "adapter", "adapter_eager", "routed_adapter_matmul",
                                  "p_adapter_paper", "p_adapter_release")}],
        "long": {"image_sizes": (32,), "chunk_size": 8, "memory_budget_mib": 64.0, "tiny": True},
    },
}


def machine_info() -> dict[str, Any]:
    """Where the run happened: CPU, core count, torch version and threads, load average."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": _cpu_model(),
        "fused_cpu_kernels": p_laplacian_cpu.kernel_available(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = list(os.getloadavg())
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_suites(suites: Sequence[str] = SUITES, *, profile: str = "default", device: str = "cpu",
               timer: str = "wall", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the suites at the sizes of ``profile``; ratios use the minimum on ``timer`` ("wall" or "cpu").

    Returns the JSON-ready result.
    """
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suites {unknown}; expected names from {SUITES}")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    if timer not in TIMERS:
        raise ValueError(f"unknown timer {timer!r}; expected one of {TIMERS}")
    sizes = PROFILES[profile]
    result: dict[str, Any] = {"profile": profile, "timer": timer, "machine": machine_info(), "suites": {}}
    started = time.perf_counter()
    if "p_laplacian" in suites:
        options = sizes["p_laplacian"]
        rows = p_laplacian.run(options["ns"], options["dims"], repeats=options["repeats"],
                               max_pair_mib=options["max_pair_mib"], heads=options.get("heads", 4), device=device,
                               reference_max_n=options.get("reference_max_n"), timer=timer)
        result["suites"]["p_laplacian"] = rows
        if log:
            log(f"p_laplacian: {len(rows)} rows")
    if "training" in suites:
        rows = []
        for options in sizes["training"]:
            specs = training_step.tiny_model_specs() if options.get("tiny") else None
            # methods None: the default methods; extra_methods: opt-in rows added to them (the compiled block).
            methods = (*(options["methods"] or training_step.DEFAULT_METHODS), *options.get("extra_methods", ()))
            rows += training_step.run(options["models"], methods, repeats=options["repeats"],
                                      warmup=options.get("warmup", 2), model_specs=specs, timer=timer, log=log)
        result["suites"]["training"] = rows
    if "long" in suites:
        options = sizes["long"]
        base_spec = training_step.tiny_model_specs()["llava"] if options.get("tiny") else None
        rows = long_sequence.run(options["image_sizes"], chunk_size=options["chunk_size"],
                                 memory_budget_mib=options["memory_budget_mib"], base_spec=base_spec, log=log)
        result["suites"]["long"] = rows
    result["elapsed_s"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_end"] = list(os.getloadavg())
    return result


# ------------------------------------------------------------------------------------------------ reporting
def _row_key(suite: str, row: dict) -> tuple:
    if suite == "p_laplacian":
        return (row["workload"], row["impl"], row["n"], row["d"])
    if suite == "training":
        return (row["model"], row["method"])
    return (row["n"], row["method"])


_COMPARED = {"p_laplacian": ("time_ratio", "mem_ratio"),
             "training": ("x_frozen", "x_adapter", "x_lora", "x_adapter_eager", "peak_mib"),
             "long": ("extra_mib", "peak_mib")}


def compare(result: dict[str, Any], previous: dict[str, Any]) -> list[dict]:
    """Rows present in both runs with the compared ratios of each (same keys, same sizes)."""
    rows = []
    for suite, fields in _COMPARED.items():
        old = {_row_key(suite, r): r for r in previous.get("suites", {}).get(suite, []) if "skipped" not in r}
        for row in result["suites"].get(suite, []):
            if "skipped" in row:
                continue
            before = old.get(_row_key(suite, row))
            if before is None:
                continue
            for field in fields:
                if field in row and field in before:
                    rows.append({"suite": suite, "key": " / ".join(map(str, _row_key(suite, row))), "field": field,
                                 "previous": before[field], "current": row[field]})
    return rows


def markdown_report(result: dict[str, Any], comparison: list[dict] | None = None) -> str:
    """The tables of a :func:`run_suites` result as markdown."""
    machine = result["machine"]
    lines = [
        f"Machine: {machine['processor']}, {machine['cpu_count']} CPUs, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), Python {machine['python']}; load average at start "
        f"{machine.get('load_average_start')}, at end {machine.get('load_average_end')}; "
        f"profile `{result['profile']}`, timer `{result.get('timer', 'wall')}`, {result['elapsed_s']:.0f} s; "
        f"fused CPU kernels of the p-Laplacian block: {'on' if machine.get('fused_cpu_kernels') else 'off'}.",
        "",
    ]
    suites = result["suites"]
    if "p_laplacian" in suites:
        lines += ["### p-Laplacian block (forward + backward)", "", "```",
                  p_laplacian.format_table(suites["p_laplacian"]), "```", ""]
    if "training" in suites:
        lines += ["### Training step", "", training_step.format_table(suites["training"]), ""]
    if "long" in suites:
        lines += ["### Long sequences (LLaVA-style): peak memory vs n", "", long_sequence.format_table(suites["long"]),
                  ""]
    if comparison:
        lines += ["### Against the previous run", "", "| suite | row | ratio | previous | current |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['suite']} | {c['key']} | {c['field']} | {c['previous']:.2f} | {c['current']:.2f} |"
                  for c in comparison]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers: Any) -> None:
    """Register ``vlpeft bench``."""
    parser = subparsers.add_parser(
        "bench",
        help="measure the cost of every method (time ratios, peak memory) and write a markdown + JSON report",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES, help="suites to run")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="smoke-test sizes (seconds; numbers not meaningful)")
    sizes.add_argument("--full", action="store_true",
                       help="also time the block's naive/released formulations at n = 1024 (slow)")
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                        help="clock of the ratios: wall-clock, or process CPU time (steadier on a loaded machine, "
                             "with --threads 1)")
    parser.add_argument("--out", default="bench_results", help="folder for bench.md and bench.json")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="device of the p-Laplacian block suite")
    parser.add_argument("--compare", default=None, help="JSON of a previous run to compare the ratios with")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            print(f"vlpeft bench: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    previous = None
    if args.compare is not None:
        path = Path(args.compare)
        if not path.is_file():
            print(f"vlpeft bench: --compare file {path} does not exist", file=sys.stderr)
            return 2
        previous = json.loads(path.read_text())
    profile = "quick" if args.quick else "full" if args.full else "default"
    result = run_suites(args.suites, profile=profile, device=args.device, timer=args.timer,
                        log=lambda message: print(message, file=sys.stderr, flush=True))
    comparison = compare(result, previous) if previous is not None else None
    if comparison is not None:
        result["comparison"] = comparison
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = markdown_report(result, comparison)
    (out / "bench.md").write_text(report + "\n")
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(report)
    print(f"wrote {out / 'bench.md'} and {out / 'bench.json'}")
    return 0
