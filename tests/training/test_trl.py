"""TRL's ``SFTTrainer`` with vlpeft's PEFT configs on chat-VLM twins (spec modern-vlms §3 item 7).

The dataset is what TRL documents for vision SFT: ``messages`` (a user turn of image parts and text, an assistant
turn) with an ``images`` column of PIL images of different sizes. TRL builds the batches itself
(``DataCollatorForVisionLanguageModeling`` through the processor's chat template), wraps the model with
``peft.get_peft_model`` and trains through its fused LM head; its defaults stay on (gradient checkpointing with
``enable_input_require_grads``), except bf16, off on CPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import peft
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlpeft
from vlpeft.testing.twins import Sample, Twin, build_twin

trl = pytest.importorskip("trl")

README = Path(__file__).resolve().parents[2] / "README.md"

FAMILIES = ("qwen2_5_vl", "smolvlm")
CONFIGS: dict[str, Callable[[], peft.PeftConfig]] = {
    "padapter_paper": lambda: vlpeft.PAdapterConfig(variant="paper"),
    "routed_lora_mul": lambda: vlpeft.RoutedLoraConfig(routing="mul"),
    "adapter": lambda: vlpeft.AdapterConfig(),
}


def _messages(sample: Sample) -> list[dict[str, Any]]:
    user = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sample.prompt}]
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": sample.answer}]},
    ]


def _dataset(samples: list[Sample]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"messages": [_messages(s) for s in samples], "images": [list(s.images) for s in samples]}
    )


def _samples(twin: Twin) -> list[Sample]:
    samples = twin.samples((1, 2, 1, 1))
    sizes = {image.size for sample in samples for image in sample.images}
    assert len(sizes) > 1, "the images should differ in size"
    return samples


def _args(output_dir: Path, **overrides: Any) -> trl.SFTConfig:
    options: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,
        "disable_tqdm": True,
        **overrides,
    }
    return trl.SFTConfig(**options)


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_trainer_trains_saves_and_reloads(family: str, method: str, tmp_path: Path) -> None:
    twin = build_twin(family)
    samples = _samples(twin)
    base = {name: (p, p.detach().clone()) for name, p in twin.model.named_parameters()}
    config = CONFIGS[method]()

    trainer = trl.SFTTrainer(
        model=twin.model,
        args=_args(tmp_path / "run"),
        train_dataset=_dataset(samples),
        processing_class=twin.processor,
        peft_config=config,
    )
    assert isinstance(trainer.model, peft.PeftModel)
    assert trainer.model.peft_config["default"] is config
    adapter = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapter, "the config adapted nothing"
    base_ids = {id(p) for p, _ in base.values()}
    assert not base_ids & {id(p) for p in adapter.values()}, "a base weight is trainable"
    initial = {name: p.detach().clone() for name, p in adapter.items()}

    trainer.train()

    assert trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    # Only the adapter moved: every base weight is frozen and unchanged, every adapter tensor changed.
    for name, (parameter, before) in base.items():
        assert not parameter.requires_grad, name
        assert torch.equal(parameter, before), f"base weight {name} changed"
    unchanged = [name for name, p in adapter.items() if torch.equal(p, initial[name])]
    assert not unchanged, f"adapter tensors not trained: {unchanged}"

    # PEFT-format round trip into a fresh twin (same base weights) gives the trained model's logits.
    batch = twin.batch(samples[:2], with_labels=False)
    trained_logits = _logits(trainer.model, batch)
    trainer.model.save_pretrained(tmp_path / "adapter")
    fresh = build_twin(family).model
    base_logits = _logits(fresh, batch)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert type(loaded.peft_config["default"]) is type(config)
    torch.testing.assert_close(_logits(loaded, batch), trained_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-6), "the trained adapter changes nothing"


@pytest.mark.parametrize("family", FAMILIES)
def test_assistant_only_loss_labels_only_the_assistant_turn(family: str, tmp_path: Path) -> None:
    twin = build_twin(family)
    samples = _samples(twin)
    dataset = _dataset(samples)

    def collate(assistant_only_loss: bool) -> tuple[trl.SFTTrainer, dict[str, torch.Tensor]]:
        trainer = trl.SFTTrainer(
            model=build_twin(family).model,
            args=_args(tmp_path / str(assistant_only_loss), assistant_only_loss=assistant_only_loss),
            train_dataset=dataset,
            processing_class=twin.processor,
            peft_config=vlpeft.PAdapterConfig(variant="paper"),
        )
        return trainer, trainer.data_collator([dict(dataset[i]) for i in range(2)])

    trainer, batch = collate(True)
    # The twin's own batch labels the assistant answer and its end-of-turn token only (prompt, image
    # placeholders and padding are -100); TRL's assistant masks from the {% generation %} markers agree.
    expected = twin.batch(samples[:2])
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["labels"], expected["labels"])
    end_of_turn = twin.tokenizer.convert_ids_to_tokens(int(batch["labels"][0][batch["labels"][0] != -100][-1]))
    assert end_of_turn in {"<|im_end|>", "<end_of_utterance>"}
    # Without it, TRL trains on the whole conversation.
    _, full = collate(False)
    assert int((full["labels"] != -100).sum()) > int((batch["labels"] != -100).sum())

    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses


def test_readme_trl_example_runs_on_the_twin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The README's "Training with TRL" example as written, with the hub checkpoint it names replaced by its twin."""
    section = README.read_text().split("## Training with TRL", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the TRL section should have one python example"
    twin = build_twin("qwen2_5_vl")

    def from_hub(made: Any) -> Callable[..., Any]:
        def load(name: str, *args: Any, **kwargs: Any) -> Any:
            assert name == twin.spec.hub_name
            return made
        return load

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", from_hub(twin.model))
    monkeypatch.setattr(AutoProcessor, "from_pretrained", from_hub(twin.processor))
    # The example is written for a GPU (TRL's bf16 default); here the same config on the CPU.
    gpu_config = trl.SFTConfig

    def cpu_config(**kwargs: Any) -> trl.SFTConfig:
        return gpu_config(**kwargs, use_cpu=True, bf16=False, report_to=[], disable_tqdm=True)

    monkeypatch.setattr(trl, "SFTConfig", cpu_config)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], f"{README}:Training with TRL", "exec"), namespace)  # noqa: S102

    trainer = namespace["trainer"]
    assert trainer.state.global_step > 0
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    saved = Path(trainer.args.output_dir)
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()
    loaded = peft.PeftModel.from_pretrained(build_twin("qwen2_5_vl").model, saved)
    assert isinstance(loaded.peft_config["default"], vlpeft.PAdapterConfig)
