"""``accelerate launch`` with FSDP2 (``configs/accelerate/fsdp2_cpu.yaml``, 2 CPU processes, gloo) trains the chat
recipes' tiny twins (p-adapter on SmolVLM, routed LoRA on Qwen2.5-VL) exactly like one process with the same global
batch: equal logged losses, a complete adapter (every tensor of the single-process adapter, none empty) that loads
back with ``PeftModel.from_pretrained`` to the same logits."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _training_data import write_chat_data
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIG = REPO / "configs" / "accelerate" / "fsdp2_cpu.yaml"
# recipe -> its tiny twin (model.tiny_twin)
RECIPES = {"smolvlm_256m_padapter_chat": "smolvlm", "qwen2_5_vl_7b_routed_lora_chat": "qwen2_5_vl"}
# dropout masks depend on how many samples each process draws them for: switched off to compare runs
NO_DROPOUT = {"qwen2_5_vl_7b_routed_lora_chat": ["--set", "method.lora_dropout=0"]}
STEPS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(recipe: str, data: dict[str, str], output: Path, batch_size: int, fsdp: bool) -> str:
    """Train ``recipe`` on its twin for :data:`STEPS` steps (fp32, constant learning rate, every step logged); with
    ``fsdp`` through ``accelerate launch`` on 2 processes. Returns the combined output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    train = ["-m", "vlpeft.cli", "train", str(REPO / "configs" / f"{recipe}.yaml"), "--tiny-twin",
             "--set", f"task.train={data['messages_train']}", "--set", "task.eval=null", "--set", "task.test=null",
             "--set", f"task.images={data['images']}", "--set", f"run.output_dir={output}",
             "--set", f"optim.max_steps={STEPS}", "--set", f"optim.batch_size={batch_size}",
             "--set", "optim.gradient_accumulation_steps=1", "--set", "optim.learning_rate=1e-2",
             "--set", "optim.lr_scheduler=constant", "--set", "optim.warmup_ratio=0", "--set", "eval.strategy=no",
             "--set", "run.precision=fp32", "--set", "run.logging_steps=1", "--set", "run.report_to=[csv]",
             "--set", "run.progress_bar=false", *NO_DROPOUT.get(recipe, [])]
    if fsdp:
        launcher = str(Path(sys.executable).with_name("accelerate"))
        cmd = [launcher, "launch", "--config_file", str(ACCELERATE_CONFIG), "--num_processes", "2",
               "--main_process_port", str(_free_port()), *train]
    else:
        cmd = [sys.executable, *train]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _losses(run: Path) -> dict[int, float]:
    with open(run / "logs.csv") as handle:
        return {int(row["step"]): float(row["value"]) for row in csv.DictReader(handle) if row["key"] == "loss"}


def _logits(twin_name: str, adapter: Path) -> torch.Tensor:
    """Logits of a fixed one- and two-image batch from a fresh twin with ``adapter`` loaded."""
    from peft import PeftModel

    import vlpeft  # noqa: F401  (registers vlpeft's methods with PEFT)
    from vlpeft.testing.twins import build_twin

    twin = build_twin(twin_name)
    model = PeftModel.from_pretrained(twin.model, str(adapter)).eval()
    with torch.no_grad():
        return model(**twin.batch(twin.samples((1, 2)), with_labels=False)).logits


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_chat_data(tmp_path_factory.mktemp("chat"), n_train=2 * STEPS, n_eval=1)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_fsdp2_two_cpu_processes_equal_one_process(recipe: str, chat_data: dict[str, str], tmp_path: Path) -> None:
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    _train(recipe, chat_data, single, batch_size=2, fsdp=False)
    _train(recipe, chat_data, sharded, batch_size=1, fsdp=True)

    # FSDP really ran (accelerate alone would have fallen back to DDP on CPU): FSDP's own checkpoint files
    checkpoint = sharded / f"checkpoint-{STEPS}"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file() and (checkpoint / "optimizer.bin").is_file()

    one, two = _losses(single), _losses(sharded)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step

    expected = load_file(str(single / "adapter_model.safetensors"))
    saved = load_file(str(sharded / "adapter_model.safetensors"))
    assert expected and saved.keys() == expected.keys()
    for key, tensor in expected.items():
        assert saved[key].numel() > 0 and saved[key].shape == tensor.shape, key
        torch.testing.assert_close(saved[key], tensor, rtol=1e-4, atol=1e-5, msg=key)
    assert any(bool(t.abs().sum() > 0) for t in expected.values())

    # the adapters agree to float rounding (<= 1e-5); routed LoRA's matmul routing over the visual tokens amplifies
    # that in the logits (measured: 2.6e-3 on logits up to 5.3), so the tolerance scales with the logits
    reference = _logits(RECIPES[recipe], single)
    torch.testing.assert_close(_logits(RECIPES[recipe], sharded), reference, rtol=1e-3,
                               atol=2e-3 * float(reference.abs().max()))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_configs_parse_and_keep_the_adapter(stage: int) -> None:
    """configs/accelerate/zero{2,3}.yaml parse as accelerate configs and their DeepSpeed JSON as accelerate's
    DeepSpeedPlugin (no DeepSpeed needed for that; ZeRO training itself needs GPUs); ZeRO-3 gathers the 16-bit
    weights on save, without which vlpeft refuses to train (the adapter would be saved empty)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    from vlpeft.training.trainer import check_deepspeed_saves_adapter

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"zero{stage}.yaml"))
    assert config.distributed_type == "DEEPSPEED"
    options = config.deepspeed_config
    plugin = DeepSpeedPlugin(hf_ds_config=str(REPO / options["deepspeed_config_file"]),
                             zero3_init_flag=options.get("zero3_init_flag", False))
    assert plugin.zero_stage == stage and plugin.hf_ds_config.is_zero3() == (stage == 3)
    check_deepspeed_saves_adapter(plugin.deepspeed_config)
    if stage == 3:
        broken = {"zero_optimization": {**plugin.deepspeed_config["zero_optimization"],
                                        "stage3_gather_16bit_weights_on_model_save": False}}
        with pytest.raises(ValueError, match="empty adapter"):
            check_deepspeed_saves_adapter(broken)
