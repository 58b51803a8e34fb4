"""The demo's results log (``runs.jsonl``) and its parallel execution of independent runs.

Every finished run (one (method, task, seed) fine-tuning, or one reference evaluation of the base) is appended
to ``OUT/runs.jsonl`` as one JSON line the moment it finishes, so a long ``vlpeft demo --full`` that is stopped
loses at most the runs in flight: started again with the same output folder it reads the log and skips every
run whose *fingerprint* is there. A fingerprint is a digest of everything that decides the run's result
(method options and learning rate, task, seed, data and training sizes, the base's digest, the benchmark
preset); a record with another fingerprint (other settings) is ignored, never reused.

Appends are atomic in practice: only the parent process writes, one ``os.write`` of one complete line on a
file opened with ``O_APPEND``, followed by ``fsync``. A truncated last line (the machine died mid-write) is
skipped when reading.

:func:`execute_plan` runs the plan either in this process (``jobs=1``) or in ``jobs`` worker processes
(``spawn`` start method), each limited to ``max(1, cores // jobs)`` torch threads, so runs measured in parallel
each have their own core(s).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vlpeft.report.demo_results import DemoRunResult

RUNS_FILE = "runs.jsonl"
LOG_FORMAT = 1


@dataclass(frozen=True)
class PlanItem:
    """One unit of work: ``fn(*args)`` returns a :class:`DemoRunResult`; ``fingerprint`` identifies its result and
    ``title`` is what the progress log shows."""

    fingerprint: str
    title: str
    fn: Callable[..., DemoRunResult]
    args: tuple[Any, ...]


def fingerprint(settings: dict[str, Any]) -> str:
    """A short digest of a JSON-serialisable ``settings`` dict (key order does not matter)."""
    payload = json.dumps({"format": LOG_FORMAT, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Torch threads each of ``jobs`` parallel workers gets: ``max(1, cores // jobs)``."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    return max(1, (cores if cores is not None else usable_cores()) // jobs)


def read_runs(path: str | os.PathLike) -> dict[str, DemoRunResult]:
    """Finished runs recorded in ``path`` by fingerprint (empty when the file does not exist). Lines that are not
    complete JSON records (an interrupted write) are skipped; a later record of a fingerprint wins."""
    path = Path(path)
    if not path.is_file():
        return {}
    runs: dict[str, DemoRunResult] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            runs[record["fingerprint"]] = DemoRunResult(**record["result"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return runs


def append_run(path: str | os.PathLike, key: str, result: DemoRunResult, extra: dict[str, Any] | None = None) -> None:
    """Append one finished run to ``path`` as a single JSON line (one ``write`` with ``O_APPEND``, then fsync).
    A file whose last line was cut off gets a newline first so the new record stays parseable."""
    path = Path(path)
    line = json.dumps({"fingerprint": key, "result": result.to_json(), **(extra or {})}, sort_keys=True) + "\n"
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = "\n" + line
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def _call(fn: Callable[..., DemoRunResult], args: tuple[Any, ...]) -> DemoRunResult:
    return _with_threads(fn(*args), torch.get_num_threads())


def _with_threads(result: DemoRunResult, threads: int) -> DemoRunResult:
    return replace(result, threads=threads)


def execute_plan(plan: Sequence[PlanItem], runs_path: str | os.PathLike, *, jobs: int = 1,
                 log: Callable[[str], None] = print,
                 on_result: Callable[[PlanItem, DemoRunResult], None] | None = None) -> dict[str, DemoRunResult]:
    """Run every item of ``plan`` whose fingerprint is not yet in ``runs_path``; append each result there as it
    finishes. Returns the results of the whole plan (earlier and new) by fingerprint.

    With ``jobs > 1`` the items run in that many ``spawn``-ed worker processes of
    :func:`threads_per_job` torch threads each. The first failure stops the remaining items (runs already
    finished stay in the log) and is re-raised.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    keys = [item.fingerprint for item in plan]
    if len(set(keys)) != len(keys):
        raise ValueError("the plan has duplicate fingerprints")
    done = read_runs(runs_path)
    todo = [item for item in plan if item.fingerprint not in done]
    if len(todo) < len(plan):
        log(f"resuming: {len(plan) - len(todo)} of {len(plan)} runs already in {runs_path}, {len(todo)} to go")
    results = {key: done[key] for key in keys if key in done}
    numbered = {item.fingerprint: n for n, item in enumerate(plan, start=1)}

    def finish(item: PlanItem, result: DemoRunResult, threads: int) -> None:
        append_run(runs_path, item.fingerprint, result, {"jobs": jobs, "threads": threads})
        results[item.fingerprint] = result
        if on_result is not None:
            on_result(item, result)

    if jobs == 1:
        for item in todo:
            log(f"[{numbered[item.fingerprint]}/{len(plan)}] {item.title}")
            finish(item, _call(item.fn, item.args), torch.get_num_threads())
        return results

    threads = threads_per_job(jobs)
    log(f"running {len(todo)} runs in {jobs} worker processes, {threads} torch thread(s) each")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        pending: dict[Future, PlanItem] = {}
        queue = list(todo)

        def submit_next() -> None:
            item = queue.pop(0)
            log(f"[{numbered[item.fingerprint]}/{len(plan)}] {item.title}")
            pending[pool.submit(_call, item.fn, item.args)] = item

        # keep exactly ``jobs`` items in flight, so the log shows what is running and a failure stops early
        for _ in range(min(jobs, len(queue))):
            submit_next()
        while pending:
            finished, _ = wait(list(pending), return_when=FIRST_EXCEPTION)
            for future in finished:
                item = pending.pop(future)
                error = future.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise RuntimeError(f"{item.title} failed: {error}") from error
                finish(item, future.result(), threads)
                if queue:
                    submit_next()
    return results


def in_plan_order(plan: Iterable[PlanItem], results: dict[str, DemoRunResult]) -> list[DemoRunResult]:
    """The results of ``plan`` in its order (items without a result are left out)."""
    return [results[item.fingerprint] for item in plan if item.fingerprint in results]
