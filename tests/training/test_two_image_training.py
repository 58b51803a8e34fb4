"""Two images per sample (NLVR2) outside chat models: CLIP-BART (``two_images="model"``) and the BLIP-style families
(``"vision_tower"``: vlpeft.training.image_pairs) concatenate the two images' visual tokens, routing pools both
images' features per sample, and families that cannot take two images are refused at config validation."""

from __future__ import annotations

import peft
import pytest
import torch
from PIL import Image
from test_tasks_gqa_nlvr2 import write_nlvr2

import vlpeft
from vlpeft.glue.visual_features import find_visual_contexts
from vlpeft.tasks.collators import NLVR2GenerativeCollator
from vlpeft.tasks.processors import build_tiny_processor
from vlpeft.training import ConfigError, config_from_dict, run_training
from vlpeft.training.models import load_model, load_processor
from vlpeft.training.validation import validate_config

SENTENCE = "The left image has a red square."


def _config(family: str, files: dict[str, str], output_dir, method: dict | None = None, **task):
    return config_from_dict({
        "model": {"tiny": family},
        "method": method or {"type": "lora", "r": 4, "lora_alpha": 8},
        "task": {"type": "nlvr2", "train": files["train"], "eval": files["dev"], "images": files["images"],
                 "max_length": 40, **task},
        "optim": {"learning_rate": 1e-3, "max_steps": 2, "batch_size": 2},
        "eval": {"strategy": "steps", "steps": 2, "max_new_tokens": 3, "java": "no"},
        "run": {"output_dir": str(output_dir), "seed": 3, "logging_steps": 1, "progress_bar": False,
                "report_to": ["csv"]},
    })


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_nlvr2(tmp_path_factory.mktemp("nlvr2"))


def _item(left: str, right: str, label: str = "True") -> dict:
    images = [Image.new("RGB", (40, 40), left), Image.new("RGB", (40, 40), right)]
    return {"images": images, "image": images[0], "sentence": SENTENCE, "label": label, "identifier": "dev-1-0-0"}


def _model_and_collator(family: str, files, tmp_path):
    config = _config(family, files, tmp_path / "unused")
    plan = validate_config(config, for_training=False)
    processor = load_processor(config, plan.family, [SENTENCE, "red blue green"])
    model = load_model(config, plan.family).eval()
    collate = NLVR2GenerativeCollator(processor, plan.family, model_config=model.config)
    return model, collate


def _logits(model, batch) -> torch.Tensor:
    """The language side's output: logits, or BlipForQuestionAnswering's question encoding (the text encoder's
    output over the image tokens; that model returns no logits)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    encoded: list[torch.Tensor] = []
    encoder = getattr(model, "text_encoder", None)
    handle = encoder.register_forward_hook(lambda m, a, out: encoded.append(out[0])) if encoder else None
    with torch.no_grad():
        out = model(**inputs)
    if handle is not None:
        handle.remove()
        return encoded[0]
    return out.logits


@pytest.mark.parametrize("family", ["clip_bart", "blip_caption", "blip_vqa", "blip2"])
def test_both_images_reach_the_language_side(family, files, tmp_path):
    """A batch holds (batch, 2, 3, H, W) pixels; changing only sample 0's right image changes sample 0's output and
    not sample 1's (so the right image is read, per sample)."""
    model, collate = _model_and_collator(family, files, tmp_path)
    batch = collate([_item("red", "blue"), _item("green", "red", "False")])
    assert batch["pixel_values"].shape[:2] == (2, 2)
    changed = collate([_item("red", "white"), _item("green", "red", "False")])
    base, other = _logits(model, batch), _logits(model, changed)
    assert (base[0] - other[0]).abs().max() > 1e-5
    torch.testing.assert_close(base[1], other[1])
    swapped = _logits(model, collate([_item("blue", "red"), _item("green", "red", "False")]))
    if family == "clip_bart":  # 2 x 36 visual tokens after the text, at different BART positions: order matters
        with torch.no_grad():
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
        assert out.encoder_last_hidden_state.shape[1] == batch["input_ids"].shape[1] + 2 * 36
        assert (swapped[0] - base[0]).abs().max() > 1e-5
    else:  # BLIP's cross-attention keys carry no image position: swapping the two images changes nothing
        torch.testing.assert_close(swapped[0], base[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("family", "method"), [
    ("clip_bart", vlpeft.AdapterConfig(reduction_factor=8, routing="matmul", pooling="mean")),
    ("blip_caption", vlpeft.RoutedLoraConfig(r=4, routing="mul", pooling="mean")),
    ("blip2", vlpeft.RoutedLoraConfig(r=4, routing="mul", pooling="mean")),
])
def test_routing_pools_both_images_features_per_sample(family, method, files, tmp_path, monkeypatch):
    """x_R of an NLVR2 batch: per sample, the mean over both images' visual tokens (CLIP-BART: the 72 visual
    embedding outputs; BLIP: both images' vision-tower tokens; BLIP-2: the projected Q-Former output over both)."""
    model, collate = _model_and_collator(family, files, tmp_path)
    source = {"clip_bart": "visual_embedding", "blip_caption": "vision_model", "blip2": "language_projection"}[family]
    captured: list[torch.Tensor] = []
    getattr(model, source).register_forward_hook(
        lambda m, a, out: captured.append((out if isinstance(out, torch.Tensor) else out.last_hidden_state).detach()))
    wrapped = peft.get_peft_model(model, method).eval()
    (context,) = find_visual_contexts(wrapped)
    served: list[torch.Tensor] = []
    original = context.visual_input

    def record(source_name, pooling, text_batch, **kwargs):
        features, mask = original(source_name, pooling, text_batch, **kwargs)
        served.append(features.detach())
        return features, mask

    monkeypatch.setattr(context, "visual_input", record)
    batch = collate([_item("red", "blue"), _item("green", "red", "False")])
    with torch.no_grad():
        wrapped(**{k: v for k, v in batch.items() if k != "labels"})
    (tokens,) = captured
    expected_tokens = {"clip_bart": 72, "blip_caption": 2 * 17, "blip2": 4}[family]
    assert tokens.shape[:2] == (2, expected_tokens)
    assert served and all(f.shape == (2, 1, tokens.shape[-1]) for f in served)
    torch.testing.assert_close(served[0], tokens.mean(dim=1, keepdim=True))
    if family == "blip_caption":  # the mean covers the right image's tokens too
        single = wrapped.get_base_model().vision_model(pixel_values=batch["pixel_values"][:, 0]).last_hidden_state
        assert (single.mean(dim=1, keepdim=True) - served[0]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["blip_caption", "blip_vqa", "blip2"])
def test_nlvr2_trains_two_steps_on_blip_style_families(family, files, tmp_path):
    config = _config(family, files, tmp_path / "run",
                     method={"type": "routed_lora", "r": 4, "lora_alpha": 8, "routing": "matmul"})
    result = run_training(config)
    assert result.global_step == 2 and result.metric == "accuracy"
    evaluation = result.metrics["eval"]
    assert 0.0 <= evaluation["accuracy"] <= 100.0 and 0.0 <= evaluation["consistency"] <= 100.0
    # blip_vqa cannot rank (its answer is decoded from the question encoder): it generates and maps the word
    assert ("invalid" in evaluation) == (family == "blip_vqa")


def test_pooler_pooling_is_refused_for_two_images_through_the_vision_tower(files, tmp_path):
    config = _config("blip_caption", files, tmp_path / "run",
                     method={"type": "routed_lora", "r": 4, "routing": "mul", "pooling": "pooler"})
    with pytest.raises(ConfigError, match=r"method\.pooling: 'pooler' is one image's pooled output, but task "
                                          r"'nlvr2' has two images per sample on model\.tiny 'blip_caption'"):
        validate_config(config)


def test_the_tiny_processors_know_the_nlvr2_words():
    tokenizer = build_tiny_processor("blip_caption", []).tokenizer
    assert tokenizer.unk_token_id not in tokenizer("true false nlvr", add_special_tokens=False)["input_ids"]
