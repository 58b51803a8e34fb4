"""GPU benchmark of the fused attention + release p-Laplacian kernels (vlpeft.functional.p_laplacian_triton).

For each sequence length n, one causal self-attention layer's worth of work, forward + backward, in one run:

- ``sdpa``: ``F.scaled_dot_product_attention`` alone (the model's own O(n)-memory attention; the lower bound);
- ``eager+torch``: eager attention (the (batch, heads, n, n) probabilities materialised, as p-adapter's torch path
  needs them) + ``p_laplacian_aggregate`` (``release``, self graph);
- ``fused``: :func:`attention_p_laplacian` with the Triton kernels (attention output and aggregation together).

Time: CUDA events around forward + backward (gradients of q, k, v, the features, p and mu), median of the timed
repeats after warm-up; peak memory: ``max_memory_allocated`` above the level before the forward pass (inputs
excluded, the gradients produced included). Ratios are taken against ``sdpa`` of the same n in the same run. Before
the table, ``fused`` is checked against ``eager+torch`` at the smallest n (relative max errors printed).

Usage: ``python benchmarks/bench_fused_p_laplacian.py --out DIR`` (writes ``fused_kernel.json`` and
``fused_kernel.md``); needs a CUDA GPU and Triton.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from vlpeft.functional import p_laplacian_aggregate
from vlpeft.functional import p_laplacian_triton as fused_module

METHODS = ("sdpa", "eager+torch", "fused")


def make_inputs(n: int, batch: int, heads: int, head_dim: int, d_f: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def leaf(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dt).requires_grad_()

    return {
        "q": leaf(batch, heads, n, head_dim), "k": leaf(batch, heads, n, head_dim), "v": leaf(batch, heads, n, head_dim),
        "f": leaf(batch, heads, n, d_f, dt=torch.float32),
        "p": torch.tensor(1.5, device="cuda", requires_grad=True),
        "mu": torch.tensor(0.2, device="cuda", requires_grad=True),
    }


def step(method: str, x: dict) -> tuple[torch.Tensor, ...]:
    """Forward + backward of one method; returns the outputs and gradients."""
    q, k, v, f, p, mu = x["q"], x["k"], x["v"], x["f"], x["p"], x["mu"]
    if method == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        return (out, *grads)
    if method == "eager+torch":
        n = q.shape[-2]
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        causal = torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1)
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        out = torch.matmul(probs.to(v.dtype), v)
        agg = p_laplacian_aggregate(f, f, probs, p, mu, variant="release", graph="self")
    else:
        out, agg = fused_module.attention_p_laplacian(q, k, v, f, p, mu, causal=True, backend="triton")
    grads = torch.autograd.grad(out.float().sum() + agg.square().sum(), (q, k, v, f, p, mu))
    return (out, agg, *grads)


def timed(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - base


def forward_only(method: str, x: dict) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            if method == "sdpa":
                return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
            if method == "fused":
                return fused_module.attention_p_laplacian(x["q"], x["k"], x["v"], x["f"], x["p"], x["mu"],
                                                          causal=True, backend="triton")
            return step_forward_eager(x)
    return run


def step_forward_eager(x: dict):
    q, k, v, f = x["q"], x["k"], x["v"], x["f"]
    n = q.shape[-2]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    causal = torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1)
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    return torch.matmul(probs.to(v.dtype), v), p_laplacian_aggregate(f, f, probs, x["p"], x["mu"], variant="release",
                                                                      graph="self")


def check_agreement(n: int, args) -> dict[str, float]:
    x = make_inputs(n, args.batch, args.heads, args.head_dim, args.d_f, getattr(torch, args.dtype))
    want = step("eager+torch", x)
    got = step("fused", x)
    names = ("out", "aggregated", "dq", "dk", "dv", "df", "dp", "dmu")
    return {name: ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
            for name, a, b in zip(names, got, want, strict=True)}


SWEEP: tuple[tuple[str, dict, dict], ...] = (
    ("default", {}, {}),
    ("ieee products", {"PLAP_PRECISION": "ieee"}, {"PLAP_PRECISION": "ieee"}),
    ("exact distances", {"EXACT_DISTANCES": True}, {"EXACT_DISTANCES": True}),
    ("bwd 64x32", {}, {"BLOCK_M": 64, "BLOCK_N": 32}),
    ("bwd 32x64", {}, {"BLOCK_M": 32, "BLOCK_N": 64}),
    ("bwd 1 stage", {}, {"num_stages": 1}),
    ("bwd 3 stages", {}, {"num_stages": 3}),
    ("bwd 8 warps", {}, {"num_warps": 8}),
    ("fwd 128x64 8 warps", {"BLOCK_M": 128, "num_warps": 8}, {}),
    ("fwd 64x32", {"BLOCK_N": 32}, {}),
    ("fwd 2 stages", {"num_stages": 2}, {}),
)
"""Launch settings tried by :func:`sweep_configs`: (name, forward overrides, backward overrides)."""


def sweep_configs(n: int, args) -> list[dict]:
    """Fused forward+backward and forward-only time for the launch settings of :data:`SWEEP` (each a change of
    the defaults of ``_launch_config``)."""
    x = make_inputs(n, args.batch, args.heads, args.head_dim, args.d_f, getattr(torch, args.dtype))
    original = fused_module._launch_config
    rows = []
    try:
        for name, forward_changes, backward_changes in SWEEP:
            def config(head_dim, d_f, dtype, backward=False, fw=forward_changes, bw=backward_changes):
                return original(head_dim, d_f, dtype, backward) | (bw if backward else fw)
            fused_module._launch_config = config
            row = {"name": name, "forward": forward_changes, "backward": backward_changes}
            try:
                row["ms"] = statistics.median(timed(lambda: step("fused", x), 2, args.repeats))
                row["fwd_ms"] = statistics.median(timed(forward_only("fused", x), 2, args.repeats))
            except Exception as err:  # a configuration the compiler rejects (e.g. out of shared memory)
                row["error"] = f"{type(err).__name__}: {str(err)[:160]}"
            rows.append(row)
            print("config", row, flush=True)
    finally:
        fused_module._launch_config = original
    return rows


def profile_kernels(n: int, args, host: bool = False) -> str:
    """torch.profiler table of the fused step at one n: its GPU kernels, or (``host``) the host-side operations
    sorted by their own CPU time."""
    x = make_inputs(n, args.batch, args.heads, args.head_dim, args.d_f, getattr(torch, args.dtype))
    step("fused", x)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    if host:
        activities.append(torch.profiler.ProfilerActivity.CPU)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3 if host else 1):
            step("fused", x)
        torch.cuda.synchronize()
    sort = "self_cpu_time_total" if host else "cuda_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25 if host else 12)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--d-f", type=int, default=8, help="per-head feature width (release: head_dim / 8)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--eager-max-n", type=int, default=8192, help="skip eager+torch above this n")
    parser.add_argument("--sweep-n", type=int, default=4096, help="n of the launch-configuration sweep (0: none)")
    parser.add_argument("--sweep-only", action="store_true", help="stop after the profile and the sweep")
    parser.add_argument("--host-profile", type=int, default=0, help="also profile host-side time at this n")
    args = parser.parse_args(argv)
    if not fused_module.triton_available() or not torch.cuda.is_available():
        print("needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; triton {fused_module.triton.__version__}")
    started = time.perf_counter()
    agreement = check_agreement(min(args.lengths), args)
    print("fused vs eager+torch at n =", min(args.lengths), {k: f"{v:.2e}" for k, v in agreement.items()})
    if args.host_profile:
        print(profile_kernels(args.host_profile, args, host=True))
        wall = statistics.median(timed(lambda: step("fused", make_inputs(args.host_profile, args.batch, args.heads,
                                                                           args.head_dim, args.d_f,
                                                                           getattr(torch, args.dtype))), 2, 5))
        print(f"fused step incl. input creation at n={args.host_profile}: {wall:.3f} ms")
    profile = profile_kernels(args.sweep_n or max(args.lengths), args)
    print(profile)
    (args.out / "fused_kernel_profile.txt").write_text(profile)
    sweep = sweep_configs(args.sweep_n, args) if args.sweep_n else []
    if args.sweep_only:
        (args.out / "fused_kernel_sweep.json").write_text(json.dumps(sweep, indent=2))
        return 0
    rows = []
    for n in args.lengths:
        x = make_inputs(n, args.batch, args.heads, args.head_dim, args.d_f, getattr(torch, args.dtype))
        base: dict[str, float] = {}
        for method in METHODS:
            if method == "eager+torch" and n > args.eager_max_n:
                continue
            try:
                memory = peak_extra_bytes(lambda m=method, x=x: step(m, x))
                ms = statistics.median(timed(lambda m=method, x=x: step(m, x), 2, args.repeats))
                fwd_ms = statistics.median(timed(forward_only(method, x), 2, args.repeats))
            except torch.cuda.OutOfMemoryError:
                rows.append({"n": n, "method": method, "error": "out of memory"})
                torch.cuda.empty_cache()
                continue
            if method == "sdpa":
                base = {"ms": ms, "fwd_ms": fwd_ms, "mib": memory / 2**20}
            row = {"n": n, "method": method, "fwd_bwd_ms": ms, "fwd_ms": fwd_ms, "peak_extra_mib": memory / 2**20,
                   "time_vs_sdpa": ms / base["ms"], "fwd_vs_sdpa": fwd_ms / base["fwd_ms"],
                   "memory_vs_sdpa": (memory / 2**20) / base["mib"]}
            rows.append(row)
            print(f"n={n:5d} {method:12s} fwd+bwd {ms:8.3f} ms ({row['time_vs_sdpa']:5.2f}x sdpa)  fwd {fwd_ms:7.3f} ms "
                  f"({row['fwd_vs_sdpa']:5.2f}x)  peak +{row['peak_extra_mib']:9.1f} MiB ({row['memory_vs_sdpa']:6.2f}x)",
                  flush=True)
        del x
        torch.cuda.empty_cache()
    payload = {"device": device, "torch": torch.__version__, "triton": fused_module.triton.__version__,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "agreement_at_min_n": agreement, "config_sweep": sweep, "rows": rows,
               "seconds": round(time.perf_counter() - started, 1)}
    (args.out / "fused_kernel.json").write_text(json.dumps(payload, indent=2))
    lines = ["| n | method | fwd+bwd ms | x sdpa | fwd ms | x sdpa | peak extra MiB | x sdpa |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['method']} | {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['n']} | {r['method']} | {r['fwd_bwd_ms']:.3f} | {r['time_vs_sdpa']:.2f} | "
                     f"{r['fwd_ms']:.3f} | {r['fwd_vs_sdpa']:.2f} | {r['peak_extra_mib']:.1f} | "
                     f"{r['memory_vs_sdpa']:.2f} |")
    (args.out / "fused_kernel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
