"""The demo pipeline at its minimum size: data generation, a (barely) pretrained base, fine-tuning through the
shared training API, real evaluation on the test splits, table/markdown/plot; and an image-conditioned model
that beats the text-only baseline."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from transformers import AutoProcessor, BlipForConditionalGeneration

from vlpeft.data import PRESETS, ensure_benchmark
from vlpeft.demo.base import BASE_PRESETS, ensure_base, load_base_report
from vlpeft.demo.blip import SIZES, method_specs
from vlpeft.demo.run import add_parser, run_demo
from vlpeft.metrics.intervals import mean_ci95


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    meta = ensure_benchmark(root / "data", PRESETS["tiny"], progress=False, log=lambda _: None)
    base_path, report = ensure_base(BASE_PRESETS["smoke"], root / "base", progress=False, log=lambda _: None)
    return root, meta, base_path, report


def test_base_is_saved_loadable_and_reused(assets):
    root, _, base_path, report = assets
    assert load_base_report(base_path) == report
    assert report["digest"] == BASE_PRESETS["smoke"].digest()
    assert math.isfinite(report["caption_scores"]["CIDEr"]) and report["caption_scores"]["num_images"] > 0
    model = BlipForConditionalGeneration.from_pretrained(base_path)
    processor = AutoProcessor.from_pretrained(base_path)
    assert model.config.text_config.vocab_size > len(processor.tokenizer)
    logs: list[str] = []
    again, reused = ensure_base(BASE_PRESETS["smoke"], base_path, progress=False, log=logs.append)
    assert again == base_path and reused == report and logs[0].startswith("using the cached demo base")


def test_demo_pipeline_produces_the_table(assets):
    root, meta, base_path, _ = assets
    methods = ["full fine-tuning", "LoRA", "Adapter", "p-adapter (release)", "routed LoRA (matmul)"]
    tasks = ("vqa", "snli_ve", "caption")
    logs: list[str] = []
    payload = run_demo(root / "out", data_dir=root / "data", base_dir=base_path, size_name="smoke",
                       methods=methods, seeds=[0, 1], progress=False, log=logs.append)
    out = root / "out"
    assert (out / "results.md").is_file() and (out / "results.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text()) == payload
    runs = [r for r in payload["runs"] if r["trainable"] is not None]
    assert {(r["label"], r["task"], r["seed"]) for r in runs} == {(m, t, s) for m in methods for t in tasks
                                                                   for s in (0, 1)}
    for r in runs:
        upper = 10.0 if r["task"] == "caption" else 100.0
        assert 0.0 <= r["metric"] <= upper and r["step_seconds"] > 0
    # one record per method x task: the per-seed values, their mean and Student-t 95 % half-width
    records = {(r["label"], r["task"]): r for r in payload["results"]}
    assert len(records) == len(payload["results"]) == (len(methods) + 2) * 3
    for (label, task), record in records.items():
        if record["reference"]:
            assert record["seeds"] is None and record["ci95"] is None and record["below_base"] is None
            continue
        per_seed = {r["seed"]: r["metric"] for r in runs if (r["label"], r["task"]) == (label, task)}
        assert record["seeds"] == [0, 1] and record["values"] == [per_seed[0], per_seed[1]]
        interval = mean_ci95(record["values"])
        assert record["mean"] == pytest.approx(interval.mean) and record["ci95"] == pytest.approx(interval.ci95)
        assert record["learning_rate"] == pytest.approx(0.0005 if label == "full fine-tuning" else 0.005)
        assert record["learning_rate_source"] == "shared, not in the table"  # the table is for the default base
        base = records[("base, no fine-tuning", task)]["mean"]
        assert record["below_base"] == (record["mean"] < base)
        assert set(record["versus"]) == {"Adapter", "LoRA"} - {label}
    vqa = {label: r for (label, task), r in records.items() if task == "vqa"}
    full, lora = vqa["full fine-tuning"], vqa["LoRA"]
    assert full["trainable"] == full["total"]
    assert 0 < lora["trainable"] < full["trainable"]
    assert vqa["routed LoRA (matmul)"]["trainable"] == lora["trainable"]  # routing adds no parameters
    assert vqa["text-only baseline"]["mean"] == meta["text_only_baselines"]["vqa"]["accuracy"]
    markdown = (out / "results.md").read_text()
    for label in [*methods, "text-only baseline", "base, no fine-tuning"]:
        assert f"| {label} |" in markdown
    assert "Step time vs LoRA" in markdown and "95 % confidence half-width" in markdown
    assert "## Differences from the baselines" in markdown and "Not resolved by the seeds" in markdown
    below = [r for r in payload["results"] if r["below_base"]]
    assert markdown.count("↓base") >= len(below) + (1 if below else 0)  # each marked, and the footnote
    assert any("VQA acc." in line for line in logs)  # the table was printed


def test_image_conditioned_model_beats_text_only(assets):
    root, meta, base_path, _ = assets
    # visual entailment needs the image (neutral = an occluder could hide the object); full fine-tuning of the
    # barely pretrained smoke base learns that within a few hundred steps at a large learning rate (2e-3), the
    # text alone stays near the majority class
    size = dataclasses.replace(SIZES["smoke"], train_ve=600, test_ve=120, steps_ve=250, batch_size=16, lr_scale=4.0)
    payload = run_demo(root / "out-ve", data_dir=root / "data", base_dir=base_path, size_name=size,
                       methods=["full fine-tuning"], tasks=["snli_ve"], seeds=[0], progress=False, log=lambda _: None)
    scores = {r["label"]: r["mean"] for r in payload["results"]}
    text_only = meta["text_only_baselines"]["snli_ve"]["accuracy"]
    assert scores["text-only baseline"] == text_only
    assert scores["full fine-tuning"] >= text_only + 15.0, scores


def test_method_specs_and_cli_arguments():
    labels = [s.label for s in method_specs(["mul", "matmul"])]
    assert labels[:5] == ["full fine-tuning", "LoRA", "Adapter", "p-adapter (paper)", "p-adapter (release)"]
    assert "routed LoRA (mul)" in labels and "routed Adapter (matmul)" in labels
    with pytest.raises(ValueError, match="unknown routing kinds"):
        method_specs(["sum"])
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--full", "--out", "x"])
    assert args.full and args.out == "x" and args.handler.__name__ == "run_demo_command"
    with pytest.raises(ValueError, match="unknown demo size"):
        run_demo("unused", size_name="huge")
