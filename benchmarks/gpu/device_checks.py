"""The GPU checks of issue #20 as one run with a time budget (called by ``device_checks.sh``).

Stages (:func:`default_stages`), each a subprocess with its own time limit, cut to what is left of the budget:

1. ``env``: versions (torch, CUDA, Triton, transformers, PEFT, bitsandbytes), the GPU, ``import vlpeft``;
2. ``kernel_tests``: ``tests/functional/test_p_laplacian_triton.py`` (the fused Triton kernels against the torch
   implementation) and ``tests/glue/test_attention_fused_path.py`` (p-adapter ``release`` on a model takes them, same
   loss and gradients as the torch path); their kernel tests skip without CUDA;
3. ``four_bit``: ``tests/quantization/test_four_bit_base.py -k cuda`` (routed LoRA, Adapter and p-adapter over an
   NF4 base with bfloat16 compute: train, save, load);
4. ``fused_bench``: ``benchmarks/bench_fused_p_laplacian.py`` at n = 512 and 4096 (fused kernels vs SDPA, forward +
   backward time and peak memory; writes ``fused/fused_kernel.{json,md}`` and the kernel profile);
5. ``e2e``: ``benchmarks/gpu/e2e_step.py``: one training step of the Qwen2.5-VL-3B-config model per method
   (writes ``e2e.json`` and ``e2e.md``), with the rest of the budget.

Everything goes under ``--out``: ``summary.json`` (per stage: exit status, seconds, whether it timed out, the
pytest counts or the last lines of its output; the environment), ``device_checks.log`` (all output), and the
files the stages write: 7 files in all, two folders deep at most.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ENV_SNIPPET = r"""
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for name in ("triton", "transformers", "peft", "bitsandbytes"):
    try:
        info[name] = __import__(name).__version__
    except Exception as error:
        info[name] = f"missing: {type(error).__name__}: {error}"[:200]
import vlpeft
info["vlpeft"] = vlpeft.__file__
print("ENV " + json.dumps(info))
"""


#: The test files with GPU kernel tests (the only ones besides the 4-bit file that look for CUDA or Triton).
KERNEL_TESTS: tuple[str, ...] = ("tests/functional/test_p_laplacian_triton.py", "tests/glue/test_attention_fused_path.py")


@dataclass
class Stage:
    """One check: ``command`` run from the repository root, stopped after ``limit_s`` seconds."""

    name: str
    command: list[str]
    limit_s: float
    min_s: float = 20.0
    env: dict[str, str] = field(default_factory=dict)


def default_stages(out: Path, *, python: str = sys.executable) -> list[Stage]:
    """The stages of the module docstring; ``e2e`` runs last and gets whatever is left of the budget (it rewrites
    its JSON and table after each sample, so a run stopped at the limit keeps what it measured)."""
    pytest = [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:warnings"]
    return [
        Stage("env", [python, "-c", ENV_SNIPPET], 30, min_s=5),
        Stage("kernel_tests", [*pytest, *KERNEL_TESTS], 75),
        Stage("four_bit", [*pytest, "tests/quantization/test_four_bit_base.py", "-k", "cuda"], 45),
        Stage("fused_bench", [python, "benchmarks/bench_fused_p_laplacian.py", "--out", str(out / "fused"),
                              "--lengths", "512", "4096", "--sweep-n", "0", "--repeats", "10"], 45),
        Stage("e2e", [python, "benchmarks/gpu/e2e_step.py", "--out", str(out / "e2e.json"), "--md",
                      str(out / "e2e.md"), "--repeats", "5", "--warmup", "1"], float("inf"), min_s=60),
    ]


_PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|deselected)")


def summarize_output(text: str) -> dict:
    """Pytest counts (from its last summary line) and the last lines of ``text``."""
    summary: dict = {"tail": text.strip().splitlines()[-15:]}
    lines = [line for line in text.splitlines() if _PYTEST_COUNTS.search(line) and " in " in line]
    if lines:
        summary["pytest"] = {kind: int(count) for count, kind in _PYTEST_COUNTS.findall(lines[-1])}
    return summary


def run_stages(stages: list[Stage], out: Path, *, budget_s: float, cwd: Path = REPO) -> dict:
    """Run ``stages`` in order within ``budget_s`` seconds in all; write and return ``summary.json``."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "device_checks.log"
    summary: dict = {"budget_s": budget_s, "stages": []}
    started = time.monotonic()
    with log_path.open("a") as log:
        for stage in stages:
            left = budget_s - (time.monotonic() - started)
            limit = min(stage.limit_s, left)
            record: dict = {"name": stage.name, "limit_s": round(limit, 1)}
            if limit < stage.min_s:
                record["skipped"] = f"{left:.0f} s of the budget left, the stage needs {stage.min_s:.0f} s"
                summary["stages"].append(record)
                print(f"== {stage.name}: skipped ({record['skipped']})", file=log, flush=True)
                continue
            print(f"== {stage.name} (limit {limit:.0f} s): {' '.join(stage.command)}", file=log, flush=True)
            stage_start = time.monotonic()
            try:
                done = subprocess.run(stage.command, cwd=cwd, env={**os.environ, **stage.env}, timeout=limit,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                output, record["rc"], record["timed_out"] = done.stdout, done.returncode, False
            except subprocess.TimeoutExpired as expired:
                output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
                record["rc"], record["timed_out"] = None, True
            record["seconds"] = round(time.monotonic() - stage_start, 1)
            log.write(output)
            print(f"== {stage.name}: rc {record['rc']}, {record['seconds']} s"
                  f"{' (timed out)' if record['timed_out'] else ''}", file=log, flush=True)
            record.update(summarize_output(output))
            env_lines = [line for line in output.splitlines() if line.startswith("ENV ")]
            if env_lines:
                summary["env"] = json.loads(env_lines[-1][4:])
            summary["stages"].append(record)
            summary["seconds"] = round(time.monotonic() - started, 1)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["seconds"] = round(time.monotonic() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=330.0, help="seconds for all stages together")
    parser.add_argument("--stages", nargs="+", help="run only these stages (names of the module docstring)")
    args = parser.parse_args(argv)
    stages = default_stages(args.out)
    if args.stages:
        stages = [stage for stage in stages if stage.name in args.stages]
    summary = run_stages(stages, args.out, budget_s=args.budget_s)
    for record in summary["stages"]:
        state = record.get("skipped") or ("timed out" if record["timed_out"] else f"rc {record['rc']}")
        print(f"{record['name']:13s} {state}  {record.get('seconds', 0):6.1f} s  {record.get('pytest', '')}")
    failed = [r for r in summary["stages"] if r.get("skipped") or r.get("timed_out") or r.get("rc")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
