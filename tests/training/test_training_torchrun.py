"""``torchrun --nproc_per_node=2`` (gloo, CPU) trains the same tiny recipe as one process with the same global
batch, to float tolerance."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _training_data import tiny_caption_config, write_caption_data, write_config
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def _train(config_path: Path, nproc: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "vlpeft.cli", "train", str(config_path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "vlpeft.cli", "train", str(config_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


METHODS = {
    "lora": {"type": "lora", "r": 4, "lora_alpha": 8},
    # DDP with per-forward visual features: each process routes its own shard's images.
    "routed_lora": {"type": "routed_lora", "r": 4, "lora_alpha": 8, "routing": "matmul"},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_equal_one_process_with_same_global_batch(tmp_path, method):
    data = write_caption_data(tmp_path / "data", n_train=8, n_eval=2)
    common = {"method": METHODS[method], "optim": {"max_steps": 3, "learning_rate": 1e-2}, "eval": {"strategy": "no"}}
    single = tiny_caption_config(data, tmp_path / "single", **common)
    single["optim"]["batch_size"] = 4
    double = tiny_caption_config(data, tmp_path / "double", **common)
    double["optim"]["batch_size"] = 2
    _train(write_config(tmp_path / "single.yaml", single), 1)
    _train(write_config(tmp_path / "double.yaml", double), 2)
    one = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "double" / "adapter_model.safetensors"))
    assert one.keys() == two.keys() and one
    moved = 0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
        moved += int(one[key].abs().sum() > 0)
    assert moved > 0  # training changed the (zero-initialised) LoRA B matrices
