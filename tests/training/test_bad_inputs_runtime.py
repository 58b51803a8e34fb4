"""Bad inputs and faults found at run time (issue #18): each gets a clear error naming the culprit, the CLI exits
with status 2, and nothing already written is lost."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from _training_data import tiny_caption_config, write_caption_data, write_config
from transformers import TrainerCallback

from vlpeft.cli import main as cli_main
from vlpeft.tasks.bad_input import BadInputError
from vlpeft.training import ConfigError, TrainingDivergedError, evaluate, load_config, run_training
from vlpeft.training.checkpoints import checkpoint_problem, list_checkpoints
from vlpeft.training.run import _load_trained


def _config(tmp_path: Path, name: str, data: dict[str, str], **optim: object) -> Path:
    config = tiny_caption_config(data, tmp_path / name, optim={"max_steps": 6, "batch_size": 2, **optim},
                                 eval={"steps": 2, "load_best_at_end": False})
    return write_config(tmp_path / f"{name}.yaml", config)


def _digests(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


# ---------------------------------------------------------------------------------------------- 9: divergence
class _AbsurdLearningRateFrom(TrainerCallback):
    """From optimiser step ``first`` on, every update uses learning rate 1e30 (the scheduler resets it after)."""

    def __init__(self, first: int) -> None:
        self.first = first

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step + 1 >= self.first:
            for group in optimizer.param_groups:
                group["lr"] = 1e30
        return control


def test_absurd_learning_rate_stops_at_first_non_finite_step_with_exit_2(tmp_path, capsys):
    data = write_caption_data(tmp_path / "data")
    config = _config(tmp_path, "diverge", data, learning_rate=1e30)
    with pytest.raises(TrainingDivergedError, match=r"training diverged at step 2: the (loss|gradient norm)") as info:
        run_training(load_config(config))
    assert info.value.step == 2
    run_dir = tmp_path / "diverge"
    assert not list_checkpoints(run_dir) and not (run_dir / "metrics.json").exists()

    assert cli_main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "vlpeft train: error: training diverged at step 2" in err and "learning_rate" in err


def test_divergence_after_a_checkpoint_keeps_it_intact(tmp_path):
    data = write_caption_data(tmp_path / "data")
    config = load_config(_config(tmp_path, "late", data))
    run_dir = tmp_path / "late"

    class Snapshot(TrainerCallback):
        digests: dict[str, str] = {}

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                Snapshot.digests = _digests(run_dir / "checkpoint-2")
            return control

    # step 3 updates with lr 1e30 (finite but absurd weights), step 4's loss/gradient is no longer finite
    with pytest.raises(TrainingDivergedError, match=r"training diverged at step [34]") as info:
        run_training(config, callbacks=[_AbsurdLearningRateFrom(3), Snapshot()])
    assert info.value.step in (3, 4)
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-2"]
    assert checkpoint_problem(run_dir / "checkpoint-2") is None
    # marker is written after on_save's other callbacks: compare the files the Trainer wrote
    after = _digests(run_dir / "checkpoint-2")
    assert {k: v for k, v in after.items() if k in Snapshot.digests} == Snapshot.digests
    assert not (run_dir / "metrics.json").exists()
    state = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


# --------------------------------------------------------------------------------- 12: train_loss after resume
def test_train_loss_names_its_window_when_the_log_does_not_reach_the_resumed_step():
    from vlpeft.training.run import _whole_run_train_metrics

    history = [{"step": 1, "loss": 4.0}, {"step": 3, "loss": 2.0}, {"step": 4, "eval_x": 1.0}]
    # logged windows reach the resumed step 3: 4 + 2*2 over steps 1-3, 1.0 over steps 4-6
    whole = _whole_run_train_metrics({"train_loss": 1.0}, history, resumed_step=3, global_step=6)
    assert whole["train_loss"] == pytest.approx((4.0 + 4.0 + 3.0) / 6)
    assert (whole["train_loss_first_step"], whole["train_loss_last_step"], whole["train_loss_since_resume"]) == (1, 6, 1)
    # resumed at step 4, last logged step 3: step 4's loss is unknown, so train_loss covers steps 5-6 and says so
    part = _whole_run_train_metrics({"train_loss": 1.0}, history, resumed_step=4, global_step=6)
    assert (part["train_loss"], part["train_loss_first_step"], part["train_loss_last_step"]) == (1.0, 5, 6)


# ------------------------------------------------------------------------------ 7: truncated adapter weights
def test_truncated_adapter_is_refused_by_eval_naming_the_file(tmp_path, capsys):
    data = write_caption_data(tmp_path / "data")
    config_path = write_config(tmp_path / "short.yaml", tiny_caption_config(
        data, tmp_path / "short", optim={"max_steps": 2, "batch_size": 2}, eval={"steps": 2, "load_best_at_end": False}))
    run_training(load_config(config_path))
    run_dir = tmp_path / "short"
    assert cli_main(["eval", str(config_path), "--checkpoint", str(run_dir)]) == 0
    capsys.readouterr()

    for folder in (run_dir, run_dir / "checkpoint-2"):
        weights = folder / "adapter_model.safetensors"
        intact = weights.read_bytes()
        weights.write_bytes(intact[: len(intact) // 2])
        others = {k: v for k, v in _digests(folder).items() if k != weights.name}
        assert cli_main(["eval", str(config_path), "--checkpoint", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vlpeft eval: error: --checkpoint:") and "adapter_model.safetensors" in err, err
        assert "truncated" in err or "bytes" in err
        with pytest.raises(ConfigError, match="adapter_model.safetensors"):
            evaluate(load_config(config_path), folder)
        # the Python API's loader (used by eval and predict) names the file as well
        with pytest.raises(ConfigError, match=r"adapter_model\.safetensors"):
            _load_trained(None, load_config(config_path), folder)
        assert {k: v for k, v in _digests(folder).items() if k != weights.name} == others  # nothing else touched
        weights.write_bytes(intact)


# ----------------------------------------------------------------------------------------- 1: corrupt image
def _corrupt_first_train_image(data: dict[str, str]) -> Path:
    image = sorted((Path(data["images"]) / "train2014").iterdir())[0]
    image.write_bytes(image.read_bytes()[:60])  # a truncated PNG: the header opens, the pixels do not decode
    return image


def test_corrupt_image_is_skipped_and_counted_under_skip(tmp_path, caplog):
    data = write_caption_data(tmp_path / "data")
    image = _corrupt_first_train_image(data)
    config = tiny_caption_config(data, tmp_path / "skip", optim={"max_steps": 3, "batch_size": 2},
                                 eval={"steps": 3, "load_best_at_end": False})
    config["task"]["bad_input"] = "skip"
    with caplog.at_level("WARNING", logger="vlpeft.tasks.bad_input"):
        result = run_training(load_config(write_config(tmp_path / "skip.yaml", config)))
    assert result.global_step == 3 and (tmp_path / "skip" / "metrics.json").is_file()
    report = "\n".join(r.getMessage() for r in caplog.records)
    assert "corrupt_image: 1" in report and image.name in report


def test_corrupt_image_under_raise_fails_before_the_model_is_loaded(tmp_path, monkeypatch, capsys):
    import vlpeft.training.run as run_module

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(run_module, "load_model", no_model)
    data = write_caption_data(tmp_path / "data")
    image = _corrupt_first_train_image(data)
    config_path = write_config(tmp_path / "raise.yaml", tiny_caption_config(data, tmp_path / "raise"))
    with pytest.raises(BadInputError, match="corrupt image file") as info:
        run_training(load_config(config_path))
    assert info.value.reason == "corrupt_image" and image.name in str(info.value)
    assert cli_main(["train", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert "vlpeft train: error: corrupt image file" in err and image.name in err
    assert not list_checkpoints(tmp_path / "raise")


# ------------------------------------------------------------------------- 10: autocast with chunked p-adapter
def _autocast_loss_and_grads(chunk_size: int | None) -> tuple[torch.Tensor, dict]:
    import peft

    from vlpeft.testing import build_tiny_model
    from vlpeft.tuners.p_adapter import PAdapterConfig

    torch.manual_seed(0)
    tiny = build_tiny_model("llava", seed=0)
    model = peft.get_peft_model(tiny.model, PAdapterConfig(variant="release", p_init=1.25, key_pool_size=3,
                                                           chunk_size=chunk_size))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**tiny.inputs).loss
    loss.backward()  # outside autocast, as the Trainer does
    return loss.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_bf16_autocast_with_chunked_release_recomputes_rows_in_the_forward_dtype(monkeypatch, torch_block_path):
    import vlpeft.glue.attention as attention_module

    dtypes: list[torch.dtype] = []
    original = attention_module.recompute_attention_rows

    def spying(*args: object, **kwargs: object):
        rows_of = original(*args, **kwargs)

        def counted(rows: slice) -> torch.Tensor:
            block = rows_of(rows)
            dtypes.append(block.dtype)
            return block

        return counted

    monkeypatch.setattr(attention_module, "recompute_attention_rows", spying)
    chunked_loss, chunked = _autocast_loss_and_grads(2)
    assert dtypes, "the chunked backward did not recompute attention rows"
    loss, grads = _autocast_loss_and_grads(None)
    torch.testing.assert_close(chunked_loss, loss)
    assert chunked.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.isfinite(chunked[name]).all(), name
        torch.testing.assert_close(chunked[name].float(), grad.float(), rtol=5e-2, atol=5e-3, msg=name)


# ------------------------------------------------------------------- 8: adapter of a deeper model, shallow base
def test_adapter_with_weights_the_base_has_no_place_for_is_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    data = write_caption_data(tmp_path / "data")
    config_path = write_config(tmp_path / "deep.yaml", tiny_caption_config(
        data, tmp_path / "deep", optim={"max_steps": 1, "batch_size": 2}, eval={"strategy": "no"}))
    run_training(load_config(config_path))
    run_dir = tmp_path / "deep"
    assert cli_main(["eval", str(config_path), "--checkpoint", str(run_dir)]) == 0
    capsys.readouterr()

    # what an adapter trained on a model with more layers holds: the same weights for a layer this base lacks
    weights_file = run_dir / "adapter_model.safetensors"
    weights = load_file(str(weights_file))
    layer_keys = [k for k in weights if ".layers.0." in k or ".layer.0." in k]
    assert layer_keys
    extra = {k.replace(".layers.0.", ".layers.97.").replace(".layer.0.", ".layer.97."): v.clone()
             for k, v in weights.items() if k in layer_keys}
    save_file({**weights, **extra}, str(weights_file))
    before = _digests(run_dir)

    with pytest.raises(ConfigError, match=r"has no place for") as info:
        _load_trained_on_tiny_base(config_path, run_dir)
    assert sorted(extra)[0] in str(info.value) and f"{len(extra)} weight(s)" in str(info.value)
    assert cli_main(["eval", str(config_path), "--checkpoint", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "vlpeft eval: error: --checkpoint:" in err and ".97." in err
    assert _digests(run_dir) == before  # nothing was rewritten


def _load_trained_on_tiny_base(config_path: Path, folder: Path) -> object:
    from vlpeft.training.run import _assemble
    from vlpeft.training.validation import validate_config

    config = load_config(config_path)
    return _assemble(config, validate_config(config, for_training=False), checkpoint=folder)


# --------------------------------------------------------------------------------------- 11: NaN pixel values
def test_nan_pixel_values_name_the_batch(tmp_path, monkeypatch):
    import dataclasses

    import vlpeft.training.run as run_module

    original_build_task = run_module.build_task
    calls = {"n": 0}

    def poisoning_build_task(*args: object, **kwargs: object):
        task = original_build_task(*args, **kwargs)

        def collate(items):
            batch = task.collate(items)
            calls["n"] += 1
            if calls["n"] == 3:  # the batch of optimiser step 3
                batch["pixel_values"][1, 0, :2, :2] = float("nan")
            return batch

        return dataclasses.replace(task, collate=collate)

    monkeypatch.setattr(run_module, "build_task", poisoning_build_task)
    data = write_caption_data(tmp_path / "data")
    config = load_config(_config(tmp_path, "nan", data))
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingDivergedError, match=r"non-finite input values in the batch of step 3 ") as info:
        run_training(config)
    message = str(info.value)
    assert "pixel_values holds NaN in 4 of" in message and "(rows [1])" in message and "micro-batch 1 of 1" in message
    assert info.value.step == 3
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-2"]
    assert checkpoint_problem(run_dir / "checkpoint-2") is None
