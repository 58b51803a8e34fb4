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
        assert row["x_frozen"] > 0 and row["x_adapter"] > 0 and row["x_lora"] > 0 and row["x_adapter_eager"] > 0
        assert row["timer"] == "wall" and row["step_ms"] == row["step_wall_ms"] and row["step_cpu_ms"] > 0
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


def test_adapter_eager_switches_only_the_towers_p_adapter_makes_eager():
    specs = training_step.tiny_model_specs()
    llava, _ = training_step.build_model(specs["llava"])
    request = training_step.padapter_attention_request(llava, specs["llava"])
    assert request == {"text_config": {"": "eager"}}
    model = training_step.build_method("adapter_eager", llava, specs["llava"])
    config = model.base_model.model.config
    assert config.text_config._attn_implementation == "eager"
    assert config.vision_config._attn_implementation == llava.config.vision_config._attn_implementation != "eager"


def test_cpu_timer_and_trimmed_reference_rows():
    from vlpeft.benchmarking import p_laplacian

    rows = p_laplacian.run([8, 12], [4], workloads=["release_self"], heads=1, repeats=1, reference_max_n=8,
                           timer="cpu")
    skipped = {(row["n"], row["impl"]) for row in rows if "skipped" in row}
    assert skipped == {(12, "naive"), (12, "released")}
    assert all(row["time_best_ms"] == row["time_cpu_min_ms"] for row in rows if "skipped" not in row)
    with pytest.raises(ValueError, match="timer"):
        suite.run_suites(["p_laplacian"], profile="quick", timer="gpu")


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


def test_time_round_robin_settles_each_timed_run_on_its_own_callable():
    """settle=1: every timed run of a callable directly follows an untimed run of the same callable."""
    from vlpeft.benchmarking.measure import time_round_robin

    calls: list[str] = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    timings = time_round_robin(fns, repeats=2, warmup=1, settle=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
    assert [len(t.seconds) for t in timings] == [2, 2] and [len(t.cpu_seconds) for t in timings] == [2, 2]
    calls.clear()
    time_round_robin(fns, repeats=2, warmup=0)
    assert calls == ["a", "b", "a", "b"]
    with pytest.raises(ValueError, match="settle must be >= 0, got -1"):
        time_round_robin(fns, repeats=1, settle=-1)
