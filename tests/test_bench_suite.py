"""Smoke tests of ``vlpeft bench`` at minimum sizes: every suite runs and the markdown/JSON report is written.

No timing assertions: the numbers at these sizes are meaningless; only the structure is checked.
"""

from __future__ import annotations

import argparse
import json

import pytest

from vlpeft.benchmarking import long_sequence, suite, training_step


@pytest.fixture(scope="module")
def quick_result():
    return suite.run_suites(profile="quick")


def test_quick_run_measures_every_suite(quick_result):
    suites = quick_result["suites"]
    assert set(suites) == set(suite.SUITES)
    methods = {(row["model"], row["method"]) for row in suites["training"]}
    quick_methods = suite.PROFILES["quick"]["training"][0]["methods"]
    assert methods == {(m, method) for m in ("blip", "llava") for method in quick_methods}
    for row in suites["training"]:
        assert row["step_ms"] > 0 and row["peak_mib"] >= 0
        assert row["x_frozen"] > 0 and row["x_adapter"] > 0 and row["x_lora"] > 0
        if row["method"] == "frozen":
            assert row["trainable_params"] == 0
        else:
            assert row["trainable_params"] > 0
    targets = [row for row in suites["training"] if row["method"] in training_step.TARGETS]
    assert targets and all("target_met" in row for row in targets)
    long_rows = suites["long"]
    assert {row["method"] for row in long_rows} == set(long_sequence.DEFAULT_METHODS)
    assert all("within_budget" in row for row in long_rows if row["method"].endswith("_chunked"))
    assert all(row["n"] > row["image_tokens"] == 16 for row in long_rows)  # 32 px images in 8 px patches


def test_markdown_and_comparison(quick_result):
    report = suite.markdown_report(quick_result)
    for title in ("p-Laplacian block", "Training step", "Long sequences"):
        assert title in report
    assert "p_adapter_release" in report and "routed_adapter_matmul" in report
    rows = suite.compare(quick_result, quick_result)
    assert rows and all(row["previous"] == row["current"] for row in rows)


def test_command_writes_report_and_json(tmp_path):
    parser = argparse.ArgumentParser()
    suite.add_parser(parser.add_subparsers(dest="command"))
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps({"suites": {}}))
    args = parser.parse_args(["bench", "--quick", "--suites", "p_laplacian", "--out", str(tmp_path / "out"),
                              "--compare", str(previous)])
    assert args.handler(args) == 0
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert set(data["suites"]) == {"p_laplacian"} and data["comparison"] == []
    assert "machine" in data and data["machine"]["cpu_count"] >= 1
    assert "p-Laplacian block" in (tmp_path / "out" / "bench.md").read_text()


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown suites"):
        suite.run_suites(["nope"])
    with pytest.raises(ValueError, match="unknown benchmark methods"):
        training_step.run(["blip"], ["nope"])
    with pytest.raises(ValueError, match="adapter_eager"):
        long_sequence.run([32], ["adapter"])
    parser = argparse.ArgumentParser()
    suite.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--compare", str(tmp_path / "missing.json")])
    assert args.handler(args) == 2
