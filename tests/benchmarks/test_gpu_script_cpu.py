"""The GPU device checks of issue #20 (benchmarks/gpu/), exercised on the CPU: the end-to-end training-step
benchmark on its tiny config (the real-size run's code path, float32), its real-size inputs and parameter count
(meta device, nothing allocated), and the stage runner's time budget."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GPU_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def e2e():
    return _load("e2e_step")


@pytest.fixture(scope="module")
def checks():
    return _load("device_checks")


def test_tiny_training_step_benchmark_runs_every_method_on_both_samples(e2e, tmp_path: Path) -> None:
    out, md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    assert e2e.main(["--tiny", "--device", "cpu", "--out", str(out), "--md", str(md),
                     "--repeats", "1", "--warmup", "0"]) == 0
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32" and report["activation_checkpointing"] is True
    rows = {(row["sample"], row["method"]): row for row in report["rows"]}
    assert set(rows) == {(sample, method) for sample in e2e.SAMPLES for method in e2e.METHODS}
    # 56 px: 4 x 4 patches -> 4 image tokens; 112 px: 16; plus the two vision markers and the text.
    assert {sample: report["samples"][sample]["tokens"] for sample in e2e.SAMPLES} == {
        "image_448": 4 + 2 + 8, "tokens_2048": 16 + 2 + 14}
    for (sample, method), row in rows.items():
        assert row["tokens"] == report["samples"][sample]["tokens"]
        assert row["trainable_params"] > 0 and math.isfinite(row["first_loss"])
        assert row["step_ms"] > 0 and row["peak_mib"] > 0
        assert math.isclose(row["x_adapter"], row["step_ms"] / rows[(sample, "adapter")]["step_ms"])
        assert ("target_met" in row) == method.startswith("p_adapter")
    # Each method adapts something different from the others (placement and shapes differ).
    assert len({rows[("image_448", m)]["trainable_params"] for m in ("adapter", "lora", "p_adapter_paper")}) == 3
    table = md.read_text()
    assert table.count("\n| image_448 |") == len(e2e.METHODS) and "<= 1.3x adapter" in table


def test_real_size_model_and_inputs(e2e) -> None:
    """The Qwen2.5-VL-3B config builds a 3.75 B-parameter model (on the meta device), and the two samples have
    the sizes of the issue: a 448 px image + 64 text tokens, and 2,048 tokens."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = e2e.build_config(e2e.QWEN2_5_VL_3B)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    assert 3.7e9 < parameters < 3.8e9, parameters
    assert model.config.text_config.num_hidden_layers == 36 and model.config.vision_config.depth == 32
    for name, tokens, patches in (("image_448", 322, 32 * 32), ("tokens_2048", 2048, 64 * 64)):
        inputs = e2e.make_inputs(config, e2e.SAMPLES[name], device="cpu", dtype=torch.bfloat16)
        assert inputs["input_ids"].shape == (1, tokens)
        assert inputs["pixel_values"].shape == (patches, 3 * 2 * 14 * 14)
        assert int(inputs["image_grid_thw"].prod()) == patches
        # one placeholder per 2 x 2 merged patches, the loss on the text tokens only
        assert int((inputs["input_ids"] == config.image_token_id).sum()) == patches // 4
        assert int((inputs["labels"] != -100).sum()) == e2e.SAMPLES[name].text_tokens


def test_stage_runner_keeps_to_its_budget(checks, tmp_path: Path) -> None:
    python = sys.executable
    stages = [
        checks.Stage("ok", [python, "-c", "print('3 passed, 1 skipped in 0.1s')"], 30, min_s=1),
        checks.Stage("slow", [python, "-c", "import time; print('started', flush=True); time.sleep(30)"], 2, min_s=1),
        checks.Stage("late", [python, "-c", "print('never')"], 30, min_s=60),
    ]
    summary = checks.run_stages(stages, tmp_path, budget_s=20)
    ok, slow, late = summary["stages"]
    assert ok["rc"] == 0 and not ok["timed_out"] and ok["pytest"] == {"passed": 3, "skipped": 1}
    assert slow["timed_out"] and slow["rc"] is None and 1.5 < slow["seconds"] < 15
    assert "started" in (tmp_path / "device_checks.log").read_text()
    assert "skipped" in late and "rc" not in late
    assert json.loads((tmp_path / "summary.json").read_text())["stages"][2]["name"] == "late"
    default = checks.default_stages(tmp_path)
    assert [stage.name for stage in default] == ["env", "kernel_tests", "four_bit", "fused_bench", "e2e"]
    # every test file and script the stages name is there (a moved file would make the GPU run check nothing)
    files = [arg for stage in default for arg in stage.command if arg.endswith(".py")]
    assert len(files) == 5 and all((GPU_DIR.parents[1] / path).is_file() for path in files), files


def test_device_script_is_valid_bash() -> None:
    for script in ("device_checks.sh", "prepare_wheels.sh"):
        done = subprocess.run(["bash", "-n", str(GPU_DIR / script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
