"""The CLIP-BART composite in the training layer (the ``clip_bart`` layout): each task trains and evaluates on the
tiny CLIP-BART with VL-Adapter's task prompts, generation reads the layout training wrote, the composite is
assembled from ``model.vision`` + ``model.text`` checkpoints, and the multi-task recipe keeps VL-Adapter's setting
with routing reading the pooled visual tokens in every adapted encoder and decoder layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _training_data import write_caption_data, write_vqa_data
from test_tasks_gqa_nlvr2 import write_gqa, write_nlvr2

from vlpeft.glue.visual_features import find_visual_contexts
from vlpeft.models import ClipBartForConditionalGeneration
from vlpeft.training import ConfigError, config_from_dict, evaluate, load_config, run_training
from vlpeft.training.config import use_tiny_twin
from vlpeft.training.methods import apply_method, resolve_method_options
from vlpeft.training.models import load_model, load_processor, resolve_family
from vlpeft.training.validation import validate_config

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "clip_bart_multitask_routed_adapter.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-bart-data")
    return {"vqa": write_vqa_data(root / "vqa", 4, 2), "caption": write_caption_data(root / "caption", 4, 2),
            "gqa": write_gqa(root / "gqa", 4, 2), "nlvr2": write_nlvr2(root / "nlvr2")}


def _task(name: str, files: dict[str, str]) -> dict:
    if name == "vqa":
        return {"type": "vqa", "train": files["train"], "train_annotations": files["train_annotations"],
                "eval": files["val"], "eval_annotations": files["val_annotations"], "images": files["images"],
                "answer_list": files["answer_list"], "prompt": "vqa: {question}"}
    if name == "gqa":
        return {"type": "gqa", "train": files["train"], "eval": files["testdev"], "images": files["images"],
                "prompt": "gqa: {question}"}
    if name == "nlvr2":
        return {"type": "nlvr2", "train": files["train"], "eval": files["dev"], "images": files["images"],
                "prompt": "nlvr: {sentence}"}
    return {"type": "caption", "train": files["train"], "eval": files["val"], "images": files["images"],
            "prompt": "caption:"}


def _config(task: dict, output_dir: Path, model: dict | None = None, method: dict | None = None, **optim):
    return config_from_dict({
        "model": model or {"tiny": "clip_bart"},
        "method": method or {"type": "routed_adapter", "reduction_factor": 8, "routing": "matmul", "pooling": "mean",
                             "modules_to_save": ["visual_embedding"]},
        "task": {"max_length": 40, **task},
        "optim": {"learning_rate": 1e-3, "max_steps": 2, "batch_size": 2, **optim},
        "eval": {"strategy": "steps", "steps": 2, "max_new_tokens": 4, "num_beams": 2, "java": "no"},
        "run": {"output_dir": str(output_dir), "seed": 3, "logging_steps": 1, "progress_bar": False,
                "report_to": ["csv"]},
    })


@pytest.mark.parametrize(("name", "metric", "key"), [("vqa", "vqa_accuracy", "question_id"),
                                                     ("gqa", "accuracy", "question_id"),
                                                     ("nlvr2", "accuracy", "identifier"),
                                                     ("caption", "CIDEr", "image_id")])
def test_each_task_trains_two_steps_and_evaluates(name, metric, key, data, tmp_path):
    config = _config(_task(name, data[name]), tmp_path / "run")
    plan = validate_config(config)
    assert plan.family == "clip_bart" and config.task.framing == "generative"
    result = run_training(config)
    assert result.global_step == 2 and result.metric == metric and metric in result.metrics["eval"]
    predictions = json.loads((tmp_path / "run" / "predictions_eval.json").read_text())
    assert predictions and all(key in p for p in predictions)
    if name == "nlvr2":  # generated true/false: words outside them are counted wrong, and reported
        assert "invalid" in result.metrics["eval"]
        again = evaluate(config, tmp_path / "run")  # the saved adapter (+ the visual embedding) reloads
        assert again["accuracy"] == pytest.approx(result.metrics["eval"]["accuracy"])


def test_generation_reads_the_layout_training_wrote(data, tmp_path):
    """Trained to fit NLVR2's training pairs, the generated words are exactly the trained ``true``/``false``
    (a decoder start, ``<s>`` or end token out of place would leave invalid or wrong answers)."""
    files = data["nlvr2"]
    task = {**_task("nlvr2", files), "eval": files["train"]}
    config = _config(task, tmp_path / "run", method={"type": "full"}, max_steps=60, batch_size=4,
                     learning_rate=3e-3, warmup_steps=0)
    config.eval.strategy = "no"
    result = run_training(config)
    assert result.metrics["eval"] == {**result.metrics["eval"], "accuracy": 100.0, "invalid": 0.0}


def _save_parts(root: Path) -> tuple[str, str]:
    """A tiny CLIP vision checkpoint with its image processor and a tiny BART checkpoint with a tokenizer, saved
    as the hub parts would be (the folder names carry the model names the family is read from)."""
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
    )

    from vlpeft.tasks.processors import build_tiny_tokenizer

    vision = root / "clip-vit-tiny"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                                     image_size=56, patch_size=8)).save_pretrained(vision)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(vision)
    text = root / "bart-tiny"
    BartForConditionalGeneration(BartConfig(
        vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
        forced_eos_token_id=None)).save_pretrained(text)
    build_tiny_tokenizer(["the left image has a red square", "true false nlvr"]).save_pretrained(text)
    return str(vision), str(text)


def test_the_composite_is_assembled_from_vision_and_text_checkpoints(data, tmp_path):
    """``model.vision`` + ``model.text`` (the recipe's hub-name path, here local folders): the family is read from
    the BART name, ``model.options`` are ClipBartConfig fields, the processor pairs CLIP's image processor with
    BART's tokenizer; NLVR2 trains 2 steps on it."""
    vision, text = _save_parts(tmp_path)
    config = _config(_task("nlvr2", data["nlvr2"]), tmp_path / "run",
                     model={"vision": vision, "text": text, "options": {"num_visual_tokens": 16}})
    assert resolve_family(config) == "clip_bart"
    model = load_model(config, "clip_bart")
    assert isinstance(model, ClipBartForConditionalGeneration) and model.config.num_visual_tokens == 16
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    processor = load_processor(config, "clip_bart", [])
    assert type(processor.image_processor).__name__.startswith("CLIPImageProcessor")
    result = run_training(config)
    assert result.global_step == 2 and "accuracy" in result.metrics["eval"]


@pytest.mark.parametrize(("model", "message"), [
    ({"tiny": "clip_bart", "options": {"prefix_tokens": "pooler"}},
     r"model\.options\.prefix_tokens: not an option of model family 'clip_bart'; allowed: \['downsample_pooling'"),
    ({"tiny": "vit_gpt2", "options": {"num_visual_tokens": 16}},
     r"model\.options\.num_visual_tokens: not an option of model family 'vit_gpt2'"),
    ({"tiny": "blip_caption", "options": {"num_visual_tokens": 16}},
     r"model\.options: \['num_visual_tokens'\] set, but model family 'blip_caption' is not a composite"),
])
def test_model_options_are_checked_against_the_family(model, message, data, tmp_path):
    config = _config(_task("caption", data["caption"]), tmp_path / "run", model=model)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_the_recipe_is_vl_adapters_multitask_setting():
    config = load_config(RECIPE)
    model, method, task, optim = config.model, config.method, config.task, config.optim
    assert (model.vision, model.text, model.tiny_twin) == ("openai/clip-vit-base-patch32", "facebook/bart-base",
                                                           "clip_bart")
    assert resolve_family(config) == "clip_bart"  # known from the names, nothing downloaded
    assert method.type == "routed_adapter" and method.options["reduction_factor"] == 8
    assert method.options["nonlinearity"] == "gelu_new" and method.options["positions"] == ["self_attn", "ffn"]
    assert "visual_embedding" in method.options["modules_to_save"]
    assert [(t["type"], t["prompt"]) for t in task.tasks] == [
        ("vqa", "vqa: {question}"), ("gqa", "gqa: {question}"), ("nlvr2", "nlvr: {sentence}"),
        ("caption", "caption:")]
    assert (optim.learning_rate, optim.warmup_ratio, optim.max_grad_norm, optim.num_epochs, optim.batch_size) == (
        1e-3, 0.1, 5.0, 20, 500)
    assert config.eval.num_beams == 5 and config.eval.metric == "multitask_average"


def test_the_recipes_routing_reads_pooled_visual_tokens_in_every_adapted_layer(monkeypatch):
    """The recipe's method on its tiny twin: every adapted encoder and decoder module reads x_R (batch, 1, d), the
    mean of that sample's visual tokens (the trained visual embedding's output); another image changes x_R of
    that sample only."""
    config = use_tiny_twin(load_config(RECIPE))
    method = resolve_method_options(config.method.type, config.method.options, "multitask", "clip_bart")
    model = apply_method(load_model(config, "clip_bart"), config.method.type, method, "clip_bart")
    tokens: list[torch.Tensor] = []
    model.get_base_model().visual_embedding.register_forward_hook(lambda m, a, out: tokens.append(out.detach()))
    (context,) = find_visual_contexts(model)
    calls: list[tuple[str, torch.Tensor]] = []
    original = context.visual_input

    def record(source, pooling, text_batch, **kwargs):
        features, mask = original(source, pooling, text_batch, **kwargs)
        calls.append((kwargs["requester"], features.detach()))
        return features, mask

    monkeypatch.setattr(context, "visual_input", record)
    routed = {n.removeprefix("base_model.model.") for n, m in model.named_modules()
              if hasattr(m, "bottleneck_adapter_down")}
    assert any(".encoder.layers." in n for n in routed) and any(".decoder.layers." in n for n in routed)
    from vlpeft.testing import build_tiny_model

    inputs = build_tiny_model("clip_bart", seed=4).inputs
    model.eval()
    with torch.no_grad():
        model(**inputs)
        first = dict(calls)
        (visual,) = tokens
        calls.clear()
        other = {**inputs, "pixel_values": torch.cat([inputs["pixel_values"][1:], inputs["pixel_values"][1:]])}
        model(**other)
        second = dict(calls)
    assert set(first) == routed  # every adapted layer, encoder and decoder
    expected = visual.mean(dim=1, keepdim=True)
    assert visual.shape[:2] == (2, 36)
    for name, features in first.items():
        assert features.shape == (2, 1, 32), name
        torch.testing.assert_close(features, expected)
        assert (second[name][0] - features[0]).abs().max() > 1e-4  # sample 0's image changed
        torch.testing.assert_close(second[name][1], features[1])
