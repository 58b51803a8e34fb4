"""The ``vlpeft`` command: train --check errors, eval, predict in the official submission formats, report (markdown
table + PNG), clean errors (exit code 2, no traceback), and TensorBoard being optional."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from _training_data import tiny_caption_config, write_caption_data, write_config, write_vqa_data

from vlpeft.cli import main
from vlpeft.tasks.processors import ImageTextProcessor
from vlpeft.training import run as run_module


def _short(config: dict) -> dict:
    config["optim"].update({"max_steps": 2, "batch_size": 2})
    config["eval"].update({"strategy": "no", "load_best_at_end": False})
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A caption run (BLIP, LoRA) and a VQA run (ViT + RoBERTa classifier, routed LoRA), trained via the CLI."""
    root = tmp_path_factory.mktemp("cli")
    torch.set_num_threads(1)
    caption_data = write_caption_data(root / "cap", 4, 2)
    caption = write_config(root / "caption.yaml", _short(tiny_caption_config(caption_data, root / "caption-run")))
    vqa_data = write_vqa_data(root / "vqa", 4, 2)
    vqa_config = _short(tiny_caption_config(caption_data, root / "vqa-run"))
    vqa_config["model"] = {"tiny": "vit_roberta"}
    vqa_config["method"] = {"type": "routed_lora", "r": 4, "lora_alpha": 4, "routing": "matmul"}
    vqa_config["task"] = {"type": "vqa", "train": vqa_data["train"], "train_annotations": vqa_data["train_annotations"],
                          "test": vqa_data["val"], "test_annotations": vqa_data["val_annotations"],
                          "images": vqa_data["images"], "answer_list": vqa_data["answer_list"], "max_length": 12}
    vqa = write_config(root / "vqa.yaml", vqa_config)
    assert main(["train", str(caption)]) == 0
    assert main(["train", str(vqa)]) == 0
    return {"caption": (caption, root / "caption-run"), "vqa": (vqa, root / "vqa-run"), "root": root}


def test_train_check_reports_bad_key_without_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    data = write_caption_data(tmp_path / "d", 2, 2)
    path = write_config(tmp_path / "c.yaml", tiny_caption_config(data, tmp_path / "run"))
    assert main(["train", str(path), "--check", "--set", "optim.learnig_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key optim.learnig_rate" in err and "learning_rate" in err and "Traceback" not in err
    assert main(["train", str(path), "--check", "--set", "task.framing=discriminative"]) == 2
    assert "discriminative framing needs a classifier model family" in capsys.readouterr().err
    assert main(["train", str(path), "--check"]) == 0
    assert "config OK: family=blip_caption" in capsys.readouterr().out


def test_run_folder_contents(runs):
    _, caption_dir = runs["caption"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.yaml", "metrics.json",
                 "trainer_state.json", "logs.csv", "tokenizer.json"):
        assert (caption_dir / name).is_file(), name
    _, vqa_dir = runs["vqa"]
    assert ImageTextProcessor.is_saved_in(vqa_dir)  # the composite's processor is saved with the run
    processor = ImageTextProcessor.from_pretrained(vqa_dir)
    assert processor.tokenizer("red").input_ids[1:-1] != []
    metrics = json.loads((vqa_dir / "metrics.json").read_text())
    assert metrics["metric"] == "vqa_accuracy" and metrics["trainable_params"] > 0
    # the classifier head is trained and saved with the adapter
    from safetensors.torch import load_file

    assert any("classifier" in k for k in load_file(str(vqa_dir / "adapter_model.safetensors")))


def test_eval_prints_task_metrics(runs, capsys):
    config, run_dir = runs["caption"]
    assert main(["eval", str(config), "--checkpoint", str(run_dir)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[out.rindex("{\n"):])  # the metrics JSON comes last
    assert {"CIDEr", "Bleu_4", "samples"} <= set(metrics) and metrics["samples"] == 2


def test_predict_writes_official_submission_formats(runs, tmp_path):
    config, run_dir = runs["caption"]
    out = tmp_path / "captions.json"
    assert main(["predict", str(config), "--checkpoint", str(run_dir), "--split", "eval", "--output", str(out)]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 2 and all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str)
                                     for r in records)
    config, run_dir = runs["vqa"]
    out = tmp_path / "vqa.json"
    assert main(["predict", str(config), "--checkpoint", str(run_dir), "--output", str(out)]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 2
    assert all(set(r) == {"question_id", "answer"} and r["answer"] in ("blue", "green", "red", "yellow")
               for r in records)


def test_report_writes_markdown_table_and_png(runs, tmp_path, capsys):
    table, plot = tmp_path / "report.md", tmp_path / "report.png"
    dirs = [str(runs["caption"][1]), str(runs["vqa"][1])]
    assert main(["report", *dirs, "--output", str(table), "--plot", str(plot)]) == 0
    text = table.read_text()
    assert text.startswith("| Run | Model | Method |") and "caption-run" in text and "vqa-run" in text
    assert "routed_lora" in text and "tiny:vit_roberta" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_report_on_missing_run_is_a_clean_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "--plot", ""]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    (tmp_path / "half").mkdir()
    assert main(["report", str(tmp_path / "half"), "--plot", ""]) == 2
    assert "metrics.json is missing" in capsys.readouterr().err


def test_tensorboard_missing_is_skipped_with_a_warning(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_module._tensorboard_available() is False
    assert any("TensorBoard is not installed" in str(w.message) for w in caught)


def test_tiny_twin_flag_swaps_the_model(tmp_path, capsys):
    recipe = Path(__file__).resolve().parents[2] / "configs" / "blip_padapter_vqav2.yaml"
    data = write_vqa_data(tmp_path / "d", 2, 2)
    sets = [f"task.train={data['train']}", f"task.train_annotations={data['train_annotations']}",
            f"task.eval={data['val']}", f"task.eval_annotations={data['val_annotations']}",
            f"task.test={data['val']}", f"task.test_annotations={data['val_annotations']}",
            f"task.images={data['images']}", f"task.answer_list={data['answer_list']}"]
    args = ["train", str(recipe), "--check", *[x for s in sets for x in ("--set", s)]]
    assert main([*args, "--tiny-twin"]) == 0
    assert "family=blip_caption method=p_adapter metric=vqa_accuracy" in capsys.readouterr().out
