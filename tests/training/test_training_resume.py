"""Kill-and-resume reliability: SIGKILL mid-training, rerun the same command, same final result; a corrupt last
checkpoint falls back to the previous one with a warning."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _training_data import tiny_caption_config, write_caption_data, write_config
from safetensors.torch import load_file

from vlpeft.cli import main as cli_main
from vlpeft.training import CorruptCheckpointWarning, load_config, run_training
from vlpeft.training.checkpoints import COMPLETION_MARKER, checkpoint_problem

REPO = Path(__file__).resolve().parents[2]

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from transformers import TrainerCallback
    from vlpeft.training import load_config, run_training

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)

    run_training(load_config(sys.argv[1]), callbacks=[KillAfterSave()])
    """
)


def _config(tmp_path: Path, name: str, data: dict) -> Path:
    config = tiny_caption_config(data, tmp_path / name, optim={"max_steps": 6, "batch_size": 2},
                                 eval={"steps": 2, "load_best_at_end": False})
    return write_config(tmp_path / f"{name}.yaml", config)


def _final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], list[float], dict]:
    weights = load_file(str(run_dir / "adapter_model.safetensors"))
    state = json.loads((run_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return weights, losses, metrics


def _kill_at(config_path: Path, step: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(config_path), str(step)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _assert_same_run(resumed: Path, reference: Path, resumed_losses_from: int) -> None:
    w_res, loss_res, m_res = _final_state(resumed)
    w_ref, loss_ref, m_ref = _final_state(reference)
    assert w_res.keys() == w_ref.keys() and w_res
    for key in w_ref:
        torch.testing.assert_close(w_res[key], w_ref[key], rtol=0, atol=0, msg=key)
    # the resumed run's log only holds the steps it trained itself; they must match the reference exactly
    assert loss_res[-(len(loss_ref) - resumed_losses_from):] == loss_ref[resumed_losses_from:]
    assert m_res["metrics"]["eval"] == pytest.approx({**m_ref["metrics"]["eval"], "runtime": m_res["metrics"]["eval"]["runtime"]})
    assert m_res["global_step"] == m_ref["global_step"] == 6
    # train_loss covers the whole run (the steps before the resume come from the restored log history)
    train_res, train_ref = m_res["metrics"]["train"], m_ref["metrics"]["train"]
    assert train_res["train_loss"] == pytest.approx(train_ref["train_loss"], rel=1e-5)
    assert (train_res["train_loss_first_step"], train_res["train_loss_last_step"]) == (1, 6)
    assert train_ref["train_loss_first_step"] == 1 and "train_loss_since_resume" not in train_ref
    assert train_res["train_loss_since_resume"] == pytest.approx(
        sum(loss_ref[resumed_losses_from:]) / (6 - resumed_losses_from), rel=1e-5)


def test_sigkill_then_rerun_matches_uninterrupted_run(tmp_path, capsys):
    data = write_caption_data(tmp_path / "data")
    reference = run_training(load_config(_config(tmp_path, "reference", data)))
    assert reference.global_step == 6

    killed = _config(tmp_path, "killed", data)
    _kill_at(killed, step=4)
    run_dir = tmp_path / "killed"
    assert not (run_dir / "metrics.json").exists()
    assert checkpoint_problem(run_dir / "checkpoint-4") is None
    backup = tmp_path / "killed-copy"
    shutil.copytree(run_dir, backup)

    # the same command again resumes from checkpoint-4 and ends where the uninterrupted run ended
    assert cli_main(["train", str(killed)]) == 0
    assert "vlpeft train: resuming from checkpoint 4 (" in capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-4")
    _assert_same_run(run_dir, reference.output_dir, resumed_losses_from=4)

    # a truncated (corrupt) last checkpoint: warn, fall back to checkpoint-2, same final result
    shutil.rmtree(run_dir)
    shutil.move(backup, run_dir)
    weights = run_dir / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "bytes" in checkpoint_problem(run_dir / "checkpoint-4")
    with pytest.warns(CorruptCheckpointWarning, match="checkpoint-4"):
        result = run_training(load_config(killed))
    assert result.resumed_from.endswith("checkpoint-2")
    assert any(p.name.startswith("corrupt-checkpoint-4") for p in run_dir.iterdir())
    _assert_same_run(run_dir, reference.output_dir, resumed_losses_from=2)


def test_checkpoint_without_marker_is_not_resumed(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    assert COMPLETION_MARKER in checkpoint_problem(folder)
