"""Benchmark of the p-Laplacian aggregation: efficient form vs equation-level and released-code formulations.

Workloads (batch B, heads H, n tokens, head dim d; p = 1.5, mu = 0.2):

- ``release_self``   self-attention graph of the ``release`` variant (n x n, self loops, beta term).
- ``release_cross``  bipartite graph of the ``release`` variant (n queries, n keys, no beta term).
- ``paper_cross``    bipartite [Q; V] graph of the ``paper`` variant (n queries, n values).

Implementations:

- ``efficient``  :func:`vlpeft.functional.p_laplacian_aggregate` as called by default: for ``release`` in float32 on
                 the CPU the fused CPU kernels (:mod:`vlpeft.functional.p_laplacian.cpu_kernels`), otherwise the torch path
                 (Gram-form distances, log-space weights).
- ``torch``      (``release`` workloads) the torch path, with the fused CPU kernels switched off.
- ``chunked``    ``efficient`` with ``chunk_size=32`` (query blocks recomputed in backward; the fused CPU kernels
                 keep nothing of size n^2 either way, so for ``release`` on the CPU this equals ``efficient``).
- ``naive``      equation-level: pairwise difference tensors (n_q, n_k, d) built by broadcasting; for
                 ``paper`` the full (2n x 2n) augmented graph of Eq. 9 with the dense diag matrices of Eq. 16;
                 for ``release`` the query-to-key block with alpha/beta applied by broadcasting.
- ``released``   the released code's formulation (``release`` workloads only): node features copied with
                 ``repeat`` into (n, n, d) tensors, eps added to every component, the full augmented graph with
                 freshly allocated zero blocks for cross-attention, and ``diag_embed`` + dense matmuls for
                 alpha and beta.

Measurements, per (workload, implementation, n, d), forward + backward w.r.t. features, attention, p, mu:

- time: wall-clock over ``repeats`` runs after two warm-up runs (CUDA: synchronised), implementations
  interleaved round-robin (:func:`vlpeft.benchmarking.measure.time_round_robin`); median and minimum are
  reported, and the time ratio uses the minimum, the estimate least affected by other processes on a shared
  machine.
- peak memory: peak of the bytes allocated *inside* the measured forward + backward, above what was live
  before it (inputs and the output gradient are excluded), from
  :func:`vlpeft.benchmarking.measure.peak_memory_bytes`, in a run of its own after the timed runs.
- agreement: max |output - efficient output| / max |efficient output|.

Ratios are against ``efficient`` in the same run. Formulations whose largest pairwise tensor would exceed
``max_pair_mib`` are skipped and reported as such.

Used by ``vlpeft bench`` (suite ``p_laplacian``) and by the script ``benchmarks/bench_p_laplacian.py``.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from vlpeft.benchmarking.measure import TIMERS, peak_memory_bytes, time_round_robin
from vlpeft.functional import p_laplacian_aggregate
from vlpeft.functional.p_laplacian.cpu_kernels import cpu_kernels_disabled

EPS = 1e-8
WORKLOADS: tuple[str, ...] = ("release_self", "release_cross", "paper_cross")
CHUNK_SIZE = 32
#: Token counts of the default run (``vlpeft bench``).
DEFAULT_NS: tuple[int, ...] = (64, 256, 1024)
IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {
    "release_self": ("efficient", "torch", "chunked", "naive", "released"),
    "release_cross": ("efficient", "torch", "chunked", "naive", "released"),
    "paper_cross": ("efficient", "chunked", "naive"),
}

Inputs = dict[str, Tensor]


# ----------------------------------------------------------------------------------------------------------
# Reference formulations
# ----------------------------------------------------------------------------------------------------------


def naive_release_self(f: Tensor, a: Tensor, p: Tensor, mu: Tensor) -> Tensor:
    """Equation-level ``release`` self graph: broadcast pairwise differences (B, H, n, n, d)."""
    diff = f.unsqueeze(-3) - f.unsqueeze(-2)
    s = torch.clamp((torch.sqrt(a + EPS).unsqueeze(-1) * diff).norm(dim=-1), min=EPS * math.sqrt(f.shape[-1]))
    w = a * s ** (p - 2)
    c = 2 * mu / p
    alpha = 1.0 / (w.sum(dim=-1, keepdim=True) + c)
    return alpha * (w @ f) + c * alpha * f


def naive_release_cross(f_q: Tensor, f_k: Tensor, a: Tensor, p: Tensor, mu: Tensor) -> Tensor:
    """Equation-level ``release`` bipartite graph on the query-to-key block (B, H, n_q, n_k, d)."""
    diff = f_k.unsqueeze(-3) - f_q.unsqueeze(-2)
    s = torch.clamp((torch.sqrt(a + EPS).unsqueeze(-1) * diff).norm(dim=-1), min=EPS * math.sqrt(f_q.shape[-1]))
    w = a * s ** (p - 2)
    alpha = 1.0 / (w.sum(dim=-1, keepdim=True) + 2 * mu / p)
    return alpha * (w @ f_k)


def _released_graph_update(nodes: Tensor, adj: Tensor, p: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """Released renormalisation on a square graph: repeat copies, eps shift, diag_embed alpha/beta."""
    n = nodes.shape[-2]
    x_i = nodes.unsqueeze(-2).repeat(1, 1, 1, n, 1)  # (B, H, n, n, d): node i along axis -3
    x_j = nodes.unsqueeze(-3).repeat(1, 1, n, 1, 1)  # node j along axis -2
    g = torch.sqrt(adj + EPS).unsqueeze(-1) * (x_j - x_i) + EPS
    w = adj * g.norm(dim=-1) ** (p - 2)
    c = 2 * mu / p
    alpha = 1.0 / (w.sum(dim=-1) + c)
    update = torch.diag_embed(alpha) @ w @ nodes
    return update, torch.diag_embed(c * alpha)


def released_release_self(f: Tensor, a: Tensor, p: Tensor, mu: Tensor) -> Tensor:
    update, beta = _released_graph_update(f, a, p, mu)
    return update + beta @ f


def released_release_cross(f_q: Tensor, f_k: Tensor, a: Tensor, p: Tensor, mu: Tensor) -> Tensor:
    n_q, n_k = a.shape[-2:]
    batch, heads = a.shape[:2]
    nodes = torch.cat([f_q, f_k], dim=-2)
    top = torch.cat([torch.zeros(batch, heads, n_q, n_q, dtype=a.dtype, device=a.device), a], dim=-1)
    bottom = torch.cat([a.transpose(-1, -2), torch.zeros(batch, heads, n_k, n_k, dtype=a.dtype, device=a.device)],
                       dim=-1)
    update, beta = _released_graph_update(nodes, torch.cat([top, bottom], dim=-2), p, mu)
    return update[..., :n_q, :] + beta[..., :n_q, n_q:] @ nodes[..., n_q:, :]


def naive_paper_cross(v_q: Tensor, v_k: Tensor, m: Tensor, p: Tensor, mu: Tensor, floor: float = 1e-12) -> Tensor:
    """Equation-level ``paper``: Eqs. 9, 14-16 on the (n_q + n_k) augmented graph; query rows returned."""
    n_q, n_k = m.shape[-2:]
    batch, heads = m.shape[:2]
    nodes = torch.cat([v_q, v_k], dim=-2)
    adj = torch.cat([
        torch.cat([m.new_zeros(batch, heads, n_q, n_q), m], dim=-1),
        torch.cat([m.transpose(-1, -2), m.new_zeros(batch, heads, n_k, n_k)], dim=-1),
    ], dim=-2)
    deg = adj.sum(dim=-1)
    inv_deg = torch.where(deg > 0, 1.0 / torch.where(deg > 0, deg, 1.0), 0.0)
    left = torch.sqrt(adj * inv_deg.unsqueeze(-1)).unsqueeze(-1) * nodes.unsqueeze(-2)
    right = torch.sqrt(adj * inv_deg.unsqueeze(-2)).unsqueeze(-1) * nodes.unsqueeze(-3)
    norm_sq = torch.maximum(((left - right) ** 2).sum(dim=-1), adj * floor)
    m_bar = torch.where(adj > 0, adj * torch.where(adj > 0, norm_sq, 1.0) ** ((p - 2) / 2), 0.0)
    c = 2 * mu / p
    alpha = 1.0 / (m_bar.sum(dim=-1) * inv_deg + c)
    d_half = torch.diag_embed(torch.sqrt(inv_deg))
    update = torch.diag_embed(alpha) @ d_half @ m_bar @ d_half @ nodes + torch.diag_embed(c * alpha) @ nodes
    return update[..., :n_q, :]


def implementation(workload: str, name: str) -> Callable[[Inputs], Tensor]:
    """The callable computing ``workload`` with implementation ``name`` from an inputs dict."""
    if name not in IMPLEMENTATIONS[workload]:
        raise ValueError(f"implementation {name!r} is not available for workload {workload!r}")
    if name == "chunked":
        efficient = implementation(workload, "efficient")
        return lambda t: efficient({**t, "chunk_size": CHUNK_SIZE})
    if name == "torch":
        efficient = implementation(workload, "efficient")

        def torch_path(t: Inputs) -> Tensor:
            with cpu_kernels_disabled():
                return efficient(t)

        return torch_path
    if workload == "release_self":
        table = {
            "efficient": lambda t: p_laplacian_aggregate(t["x"], t["x"], t["attn"], t["p"], t["mu"],
                                                         variant="release", graph="self",
                                                         chunk_size=t.get("chunk_size")),
            "naive": lambda t: naive_release_self(t["x"], t["attn"], t["p"], t["mu"]),
            "released": lambda t: released_release_self(t["x"], t["attn"], t["p"], t["mu"]),
        }
    elif workload == "release_cross":
        table = {
            "efficient": lambda t: p_laplacian_aggregate(t["x_q"], t["x_kv"], t["attn"], t["p"], t["mu"],
                                                         variant="release", chunk_size=t.get("chunk_size")),
            "naive": lambda t: naive_release_cross(t["x_q"], t["x_kv"], t["attn"], t["p"], t["mu"]),
            "released": lambda t: released_release_cross(t["x_q"], t["x_kv"], t["attn"], t["p"], t["mu"]),
        }
    else:
        table = {
            "efficient": lambda t: p_laplacian_aggregate(t["x_q"], t["x_kv"], t["attn"], t["p"], t["mu"],
                                                         chunk_size=t.get("chunk_size")),
            "naive": lambda t: naive_paper_cross(t["x_q"], t["x_kv"], t["attn"], t["p"], t["mu"]),
        }
    return table[name]


def largest_pair_tensor_bytes(workload: str, name: str, batch: int, heads: int, n: int, d: int) -> int:
    """Bytes of the largest (.., n_i, n_j, d) float32 tensor the implementation materialises."""
    if name in ("efficient", "torch"):
        return 4 * batch * heads * n * n
    if name == "chunked":
        return 4 * batch * heads * min(n, CHUNK_SIZE) * n
    nodes = 2 * n if (workload == "paper_cross" or (workload == "release_cross" and name == "released")) else n
    return 4 * batch * heads * nodes * nodes * d


# ----------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------


def make_inputs(workload: str, batch: int, heads: int, n: int, d: int, *, p: float = 1.5, mu: float = 0.2,
                device: str = "cpu", seed: int = 0) -> Inputs:
    """Random features and attention (causal softmax for ``release_self``), all leaves requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, n, n, generator=gen)
    if workload == "release_self":
        logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    tensors = {"attn": torch.softmax(logits, dim=-1), "p": torch.tensor(p), "mu": torch.tensor(mu)}
    if workload == "release_self":
        tensors["x"] = torch.randn(batch, heads, n, d, generator=gen)
    else:
        tensors["x_q"] = torch.randn(batch, heads, n, d, generator=gen)
        tensors["x_kv"] = torch.randn(batch, heads, n, d, generator=gen)
    return {k: v.to(device).requires_grad_(True) for k, v in tensors.items()}


def _clear_grads(inputs: Inputs) -> None:
    for tensor in inputs.values():
        tensor.grad = None


def _forward_backward(fn: Callable[[Inputs], Tensor], inputs: Inputs, grad_out: Tensor) -> Tensor:
    _clear_grads(inputs)
    out = fn(inputs)
    out.backward(grad_out)
    return out.detach()


def time_forward_backward(fns: Sequence[Callable[[Inputs], Tensor]], inputs: Inputs, grad_out: Tensor, *,
                          repeats: int, device: str) -> list[list[float]]:
    """Seconds of forward + backward per run, for each of ``fns``, after two warm-up runs each (round-robin)."""
    timings = time_round_robin([functools.partial(_forward_backward, fn, inputs, grad_out) for fn in fns],
                               repeats=repeats, warmup=2, device=device)
    return [list(timing.seconds) for timing in timings]


def peak_memory_forward_backward(fn: Callable[[Inputs], Tensor], inputs: Inputs, grad_out: Tensor, *,
                                 device: str) -> int:
    """Peak bytes allocated during one forward + backward above the starting level (see module doc)."""
    _clear_grads(inputs)
    return peak_memory_bytes(lambda: _forward_backward(fn, inputs, grad_out), device=device)


def run(ns: Sequence[int] = DEFAULT_NS, dims: Sequence[int] = (8, 64), *, workloads: Sequence[str] = WORKLOADS,
        batch: int = 1, heads: int = 4, repeats: int = 5, device: str = "cpu",
        max_pair_mib: float = 512.0, p: float = 1.5, mu: float = 0.2, reference_max_n: int | None = None,
        timer: str = "wall") -> list[dict]:
    """Measure every (workload, n, d, implementation); returns one dict per row (see module doc).

    ``reference_max_n``: the ``naive`` and ``released`` formulations are measured only up to this n (``None``:
    all n; they dominate the run time at large n). ``timer``: the clock of ``time_ratio`` ("wall" or "cpu").
    """
    if timer not in TIMERS:
        raise ValueError(f"timer must be one of {TIMERS}, got {timer!r}")
    rows: list[dict] = []
    for workload in workloads:
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}; expected one of {WORKLOADS}")
        for n in ns:
            for d in dims:
                inputs = make_inputs(workload, batch, heads, n, d, p=p, mu=mu, device=device)
                grad_out = torch.randn(batch, heads, n, d, generator=torch.Generator().manual_seed(1)).to(device)
                measured: list[tuple[dict, Callable[[Inputs], Tensor]]] = []
                for name in IMPLEMENTATIONS[workload]:
                    row = {"workload": workload, "impl": name, "n": n, "d": d, "batch": batch, "heads": heads,
                           "device": device}
                    rows.append(row)
                    pair_bytes = largest_pair_tensor_bytes(workload, name, batch, heads, n, d)
                    if pair_bytes > max_pair_mib * 2**20:
                        row["skipped"] = f"largest pairwise tensor {pair_bytes / 2**20:.0f} MiB > cap"
                    elif name in ("naive", "released") and reference_max_n is not None and n > reference_max_n:
                        row["skipped"] = f"reference formulations measured up to n = {reference_max_n} (--full)"
                    else:
                        measured.append((row, implementation(workload, name)))
                fns = [fn for _, fn in measured]
                reference = _forward_backward(fns[0], inputs, grad_out)
                timings = time_round_robin(
                    [functools.partial(_forward_backward, fn, inputs, grad_out) for fn in fns],
                    repeats=repeats, warmup=2, device=device)
                for (row, fn), timing in zip(measured, timings):
                    out = _forward_backward(fn, inputs, grad_out)
                    row.update(
                        time_ms=1e3 * timing.median_s,
                        time_min_ms=1e3 * timing.min_s,
                        time_cpu_min_ms=1e3 * timing.cpu_min_s,
                        time_best_ms=1e3 * timing.best_s(timer),
                        timer=timer,
                        peak_mib=peak_memory_forward_backward(fn, inputs, grad_out, device=device) / 2**20,
                        rel_diff=((out - reference).abs().max() / reference.abs().max()).item(),
                    )
                base = measured[0][0]
                for row, _ in measured:
                    row.update(time_ratio=row["time_best_ms"] / base["time_best_ms"],
                               mem_ratio=row["peak_mib"] / max(base["peak_mib"], 1e-9))
    return rows


def format_table(rows: Sequence[dict]) -> str:
    timer = next((row.get("timer", "wall") for row in rows if "skipped" not in row), "wall")
    header = (f"{'workload':<14} {'n':>5} {'d':>3} {'impl':<9} {'median ms':>10} {'min ms':>9} {'min ' + timer:>9} "
              f"{'x eff':>7} {'peak MiB':>10} {'x eff':>7} {'rel diff':>9}")
    lines = [header, "-" * len(header)]
    for row in rows:
        prefix = f"{row['workload']:<14} {row['n']:>5} {row['d']:>3} {row['impl']:<9}"
        if "skipped" in row:
            lines.append(f"{prefix} skipped: {row['skipped']}")
            continue
        best = row.get("time_best_ms", row["time_min_ms"])
        lines.append(f"{prefix} {row['time_ms']:>10.2f} {row['time_min_ms']:>9.2f} {best:>9.2f} {row['time_ratio']:>7.1f} "
                     f"{row['peak_mib']:>10.2f} {row['mem_ratio']:>7.1f} {row['rel_diff']:>9.1e}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=list(DEFAULT_NS))
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--large", action="store_true", help="add n = 1024 to an explicit --ns list")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-pair-mib", type=float, default=512.0,
                        help="skip formulations whose largest pairwise tensor exceeds this size")
    args = parser.parse_args(argv)
    ns = list(args.ns) + ([1024] if args.large and 1024 not in args.ns else [])
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, heads {args.heads}, repeats {args.repeats}")
    rows = run(ns, args.dims, workloads=args.workloads, batch=args.batch, heads=args.heads, repeats=args.repeats,
               device=args.device, max_pair_mib=args.max_pair_mib)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
