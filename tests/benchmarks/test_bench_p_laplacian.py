"""Smoke test of benchmarks/bench_p_laplacian.py: every formulation computes the same aggregation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_p_laplacian.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_p_laplacian", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_rows_agree_and_are_measured(bench):
    rows = bench.run([12], [4], batch=1, heads=2, repeats=1)
    assert {(row["workload"], row["impl"]) for row in rows} == {
        (workload, impl) for workload, impls in bench.IMPLEMENTATIONS.items() for impl in impls
    }
    for row in rows:
        assert row["rel_diff"] < 1e-5, row
        assert row["time_ms"] > 0 and row["peak_mib"] > 0
    efficient = [row for row in rows if row["impl"] == "efficient"]
    assert all(row["time_ratio"] == 1.0 and row["mem_ratio"] == 1.0 for row in efficient)
    assert "efficient" in bench.format_table(rows)


def test_oversized_formulations_are_skipped(bench):
    rows = bench.run([16], [8], workloads=["paper_cross"], batch=1, heads=1, repeats=1, max_pair_mib=0.01)
    by_impl = {row["impl"]: row for row in rows}
    assert "skipped" in by_impl["naive"] and "skipped" not in by_impl["efficient"]
