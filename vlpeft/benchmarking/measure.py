"""Measurement primitives shared by the benchmarks: round-robin timing and peak memory of a callable.

Timing. The callables of one comparison are run round-robin (one run of each per round) after warm-up runs, so
that load from other processes on a shared machine affects all of them alike; the minimum over the rounds is the
estimate least affected by that load and is what the ratios use. The median is reported alongside. Every run's
process CPU time (``time.process_time``: all threads of this process, not other processes) is recorded too; with
one intra-op thread (``vlpeft bench --threads 1 --timer cpu``) its minimum is the steadiest estimate on a machine
shared with other jobs, because time spent waiting for a core is not counted. With ``settle``, each timed run is
preceded by untimed runs of the same callable, so that it starts from the memory state its own runs leave rather
than the one the previous callable left: glibc trims the heap after a callable with a small working set, and the
next callable with a larger one then pays page faults to grow it again (measured: about 7,000 minor faults, ~4 % of
a LLaVA p-adapter step, for whichever large-footprint method followed a small one in the round; about none in a
process running one method, as training does).

Peak memory. On CUDA, ``torch.cuda.max_memory_allocated`` minus the allocation before the call. On CPU, torch
keeps no allocator statistics, so the allocation and free records of ``torch.profiler`` (``profile_memory=True``)
are replayed in time order and the running sum's maximum is taken: the peak of tensor storage allocated *during*
the call above what was live before it (exact for tensor storage; allocator caching and fragmentation are
ignored). Memory is measured in a run of its own, never in a timed run (the profiler slows the call down).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["TIMERS", "Timing", "peak_memory_bytes", "time_round_robin", "synchronize"]

#: Which clock the ratios use: ``"wall"`` (perf_counter) or ``"cpu"`` (process CPU time).
TIMERS: tuple[str, ...] = ("wall", "cpu")


@dataclass(frozen=True)
class Timing:
    """Seconds per run of one callable: wall-clock and process CPU time of every run."""

    seconds: tuple[float, ...]
    cpu_seconds: tuple[float, ...] = ()

    @property
    def min_s(self) -> float:
        return min(self.seconds)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_min_s(self) -> float:
        """Minimum process CPU time (all threads) of a run; less sensitive than wall-clock to other processes."""
        return min(self.cpu_seconds)

    def best_s(self, timer: str) -> float:
        """Minimum seconds per run on ``timer`` ("wall" or "cpu")."""
        if timer not in TIMERS:
            raise ValueError(f"timer must be one of {TIMERS}, got {timer!r}")
        return self.min_s if timer == "wall" else self.cpu_min_s


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels on CUDA devices (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_round_robin(
    fns: Sequence[Callable[[], object]], *, repeats: int, warmup: int = 2, settle: int = 0,
    device: str | torch.device = "cpu",
) -> list[Timing]:
    """Time each of ``fns`` ``repeats`` times, one run of each per round, after ``warmup`` runs of each;
    ``settle`` untimed runs of a callable precede each of its timed runs (see the module docstring).

    Raises:
        ValueError: ``repeats < 1``, ``warmup < 0`` or ``settle < 0``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if settle < 0:
        raise ValueError(f"settle must be >= 0, got {settle}")
    for fn in fns:
        for _ in range(warmup):
            fn()
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for index, fn in enumerate(fns):
            for _ in range(settle):
                fn()
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            wall[index].append(time.perf_counter() - start)
            cpu[index].append(time.process_time() - start_cpu)
    return [Timing(tuple(w), tuple(c)) for w, c in zip(wall, cpu)]


def peak_memory_bytes(fn: Callable[[], object], *, device: str | torch.device = "cpu") -> int:
    """Peak bytes of tensor storage allocated during one call of ``fn``, above the level before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [event for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"]
    records.sort(key=lambda event: event.start_ns())
    live = peak = 0
    for record in records:
        if record.device_type() != torch.autograd.DeviceType.CPU:
            continue
        live += record.nbytes()
        peak = max(peak, live)
    return int(peak)
