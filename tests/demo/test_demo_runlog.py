"""The demo's results log (runs.jsonl): atomic appends, resuming an interrupted demo without redoing finished runs,
and parallel execution in worker processes with one share of the cores each."""

from __future__ import annotations

import json

import pytest

from vlpeft.data import PRESETS, ensure_benchmark
from vlpeft.demo.base import BASE_PRESETS, ensure_base
from vlpeft.demo.run import add_parser, default_jobs, run_demo
from vlpeft.demo.runlog import (
    RUNS_FILE,
    PlanItem,
    append_run,
    execute_plan,
    fingerprint,
    read_runs,
    threads_per_job,
    usable_cores,
)
from vlpeft.report.demo_results import DemoRunResult

FAIL_MARKER = "fail"


def scored_run(label: str, seed: int) -> DemoRunResult:
    """A stand-in for a fine-tuning run (module level so that spawned workers can unpickle it)."""
    if label == FAIL_MARKER:
        raise ValueError("this run was made to fail")
    import torch

    return DemoRunResult(label, "vqa", seed, float(seed), trainable=10, total=100, step_seconds=0.01,
                     train_seconds=float(torch.get_num_threads()))


def make_plan(labels: list[str], seed: int = 0) -> list[PlanItem]:
    return [PlanItem(fingerprint({"label": label, "seed": seed}), f"{label} s{seed}", scored_run, (label, seed))
            for label in labels]


def test_fingerprint_depends_on_settings_not_on_key_order():
    assert fingerprint({"a": 1, "b": [2, 3]}) == fingerprint({"b": [2, 3], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_append_and_read_survive_a_cut_off_line(tmp_path):
    path = tmp_path / RUNS_FILE
    first = DemoRunResult("LoRA", "vqa", 0, 51.5, 10, 100, 0.05, 3.0, 1)
    append_run(path, "k1", first, {"jobs": 1})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"fingerprint": "k2", "result": {"label": "Ada')  # the machine died mid-write
    second = DemoRunResult("Adapter", "vqa", 0, 49.0)
    append_run(path, "k3", second)
    assert read_runs(path) == {"k1": first, "k3": second}
    assert all(json.loads(line)["fingerprint"] in {"k1", "k3"}
               for line in path.read_text().splitlines() if line.endswith("}"))
    assert read_runs(tmp_path / "absent.jsonl") == {}


def test_an_interrupted_plan_resumes_without_redoing_finished_runs(tmp_path):
    path = tmp_path / RUNS_FILE
    with pytest.raises(ValueError, match="made to fail"):
        execute_plan(make_plan(["a", "b", FAIL_MARKER, "c"]), path, log=lambda _: None)
    assert sorted(r.label for r in read_runs(path).values()) == ["a", "b"]
    logs: list[str] = []
    results = execute_plan(make_plan(["a", "b", "c"]), path, log=logs.append)
    assert sorted(r.label for r in results.values()) == ["a", "b", "c"]
    assert logs[0].startswith("resuming: 2 of 3 runs")
    assert [line for line in logs if line.startswith("[")] == ["[3/3] c s0"]
    assert len(path.read_text().splitlines()) == 3


def test_parallel_workers_each_get_their_share_of_the_cores(tmp_path):
    assert threads_per_job(2, cores=2) == 1 and threads_per_job(1, cores=2) == 2 and threads_per_job(4, cores=2) == 1
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        threads_per_job(0)
    path = tmp_path / RUNS_FILE
    plan = make_plan(["a", "b", "c"], seed=3)
    results = execute_plan(plan, path, jobs=2, log=lambda _: None)
    expected = threads_per_job(2)
    assert {r.label for r in results.values()} == {"a", "b", "c"}
    assert {r.threads for r in results.values()} == {expected}
    assert {r.train_seconds for r in results.values()} == {float(expected)}  # the worker's torch thread count
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert {(r["jobs"], r["threads"]) for r in records} == {(2, expected)}
    with pytest.raises(RuntimeError, match="fail s0 failed"):
        execute_plan(make_plan([FAIL_MARKER]), path, jobs=2, log=lambda _: None)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-runlog")
    ensure_benchmark(root / "data", PRESETS["tiny"], progress=False, log=lambda _: None)
    base_path, _ = ensure_base(BASE_PRESETS["smoke"], root / "base", progress=False, log=lambda _: None)
    return root, base_path


def test_demo_resumes_from_its_runs_file_and_runs_in_parallel(assets):
    root, base_path = assets
    out = root / "out"
    common = dict(data_dir=root / "data", base_dir=base_path, size_name="smoke", tasks=["snli_ve"], progress=False)
    first = run_demo(out, methods=["LoRA"], seeds=[0], log=lambda _: None, **common)
    assert first["runs_total"] == 2 and first["runs_reused"] == 0  # base reference + LoRA
    logs: list[str] = []
    second = run_demo(out, methods=["LoRA", "Adapter"], seeds=[0], jobs=2, log=logs.append, **common)
    assert second["runs_total"] == 3 and second["runs_reused"] == 2
    assert [line for line in logs if line.startswith("[")] == ["[3/3] Adapter on snli_ve (seed 0)"]
    assert any(line.startswith("resuming: 2 of 3 runs") for line in logs)
    runs = {r["label"]: r for r in second["runs"] if r["trainable"] is not None}
    assert runs["LoRA"] == next(r for r in first["runs"] if r["label"] == "LoRA")  # reused, not retrained
    assert runs["Adapter"]["threads"] == threads_per_job(2)
    markdown = (out / "results.md").read_text()
    assert "| Adapter |" in markdown and "2 reused from an earlier" in markdown and "2 job(s)" in markdown
    # other settings (here: another seed) give other fingerprints: nothing is reused by mistake
    third = run_demo(out, methods=["LoRA"], seeds=[1], log=lambda _: None, **common)
    assert third["runs_reused"] == 1  # only the base reference, whose settings did not change
    assert len((out / RUNS_FILE).read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        run_demo(out, jobs=0, **common)


def test_selection_sweeps_on_eval_trains_the_seeds_at_the_choice_and_resumes(assets):
    root, base_path = assets
    out = root / "out-select"
    common = dict(data_dir=root / "data", base_dir=base_path, size_name="smoke", tasks=["snli_ve"], progress=False,
                  methods=["LoRA"], seeds=[0, 1], learning_rates="select", lr_grid=(0.001, 0.02))
    first = run_demo(out, log=lambda _: None, **common)
    record = first["learning_rates"]
    assert record["policy"] == "select" and record["grid"] == [0.001, 0.02] and record["selections_reused"] == 0
    [entry] = record["selection"]
    assert (entry["label"], entry["task"], entry["split"], entry["metric"]) == ("LoRA", "snli_ve", "eval", "accuracy")
    assert entry["grid"] == [0.001, 0.02] and set(entry["eval_scores"]) == {"0.001", "0.02"}
    best = max(entry["eval_scores"].values())
    assert entry["eval_scores"][f"{entry['learning_rate']:g}"] == best
    assert entry["learning_rate"] == 0.001 or entry["eval_scores"]["0.001"] < best  # ties go to the first value
    assert entry["git"]["commit"] and entry["command"].endswith("# LoRA on snli_ve")
    sweep = json.loads((out / "selection" / "snli_ve-LoRA" / "sweep.json").read_text())
    assert sweep["selected"]["learning_rate"] == entry["learning_rate"]
    assert sorted(p.name for p in (out / "selection" / "snli_ve-LoRA").iterdir()) == ["sweep.json"]  # runs removed
    [result] = [r for r in first["results"] if r["label"] == "LoRA"]
    assert result["learning_rate"] == entry["learning_rate"] and result["learning_rate_source"] == "selected on eval"
    assert result["seeds"] == [0, 1] and len(result["values"]) == 2
    assert json.loads((out / "learning_rates.json").read_text())["entries"] == [entry]
    logs: list[str] = []
    second = run_demo(out, log=logs.append, **common)
    assert second["learning_rates"]["selections_reused"] == 1 and second["runs_reused"] == second["runs_total"]
    assert not [line for line in logs if line.startswith("[")]  # nothing trained again


def test_cli_takes_jobs():
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["demo", "--jobs", "2"]).jobs == 2
    assert parser.parse_args(["demo"]).jobs is None  # resolved by default_jobs(): 2, 1 on a single core
    assert default_jobs() == min(2, usable_cores())
