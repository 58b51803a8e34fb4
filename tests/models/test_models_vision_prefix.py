"""Tests for the vision-prefix composite (vlpeft.models): ViT + RoBERTa/BERT classifiers and ViT + GPT-2."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaModel,
    ViTConfig,
    ViTModel,
)

from vlpeft._transformers_compat import enable_activation_checkpointing
from vlpeft.models import (
    VisionPrefixLMConfig,
    VisionPrefixLMForCausalLM,
    VisionPrefixLMForClassification,
    VisionPrefixLMPreTrainedModel,
)
from vlpeft.testing import build_tiny_model

VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------- classification
@pytest.mark.parametrize("family", ["vit_roberta", "vit_bert"])
def test_classifier_bce_on_soft_scores(family: str) -> None:
    tiny = build_tiny_model(family, num_labels=7)
    model, inputs = tiny
    assert isinstance(model, VisionPrefixLMForClassification)
    assert model.config.problem_type == "multi_label_classification"
    out = model(**inputs)
    assert out.logits.shape == (2, 7)
    expected = F.binary_cross_entropy_with_logits(out.logits, inputs["labels"])
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert _grad_norm(model.classifier) > 0
    assert _grad_norm(model.text_model) > 0
    assert _grad_norm(model.vision_model) > 0  # freezing is the PEFT method's job, not the model's


def test_classifier_single_label_cross_entropy() -> None:
    model, inputs = build_tiny_model("vit_roberta", num_labels=3, problem_type="single_label")
    assert model.config.problem_type == "single_label_classification"
    assert inputs["labels"].shape == (2,)
    out = model(**inputs)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, inputs["labels"]))
    with pytest.raises(ValueError, match="class ids"):
        model(**{**inputs, "labels": torch.rand(2, 3)})


def test_classifier_head_structure() -> None:
    model, _ = build_tiny_model("vit_roberta", num_labels=5)
    head = model.classifier
    assert (head.fc1.in_features, head.fc1.out_features) == (32, 64)
    assert head.layer_norm.normalized_shape == (64,)
    assert isinstance(head.act, torch.nn.GELU)
    assert (head.fc2.in_features, head.fc2.out_features) == (64, 5)


def test_head_pooling_reads_the_first_text_token_after_the_prefix() -> None:
    model, inputs = build_tiny_model("vit_roberta", head_pooling="first_text")
    model.eval()
    out = model(**inputs, output_hidden_states=True)
    last = out.hidden_states[-1]
    assert last.shape[1] == 1 + inputs["input_ids"].shape[1]  # one pooler token + text
    torch.testing.assert_close(out.logits, model.classifier(last[:, 1]))


def test_head_pooling_mean_ignores_padding() -> None:
    tiny = build_tiny_model("vit_bert", head_pooling="mean")
    model = tiny.model.eval()
    inputs = tiny.example_inputs(num_padding=2)
    out = model(**inputs, output_hidden_states=True)
    text = out.hidden_states[-1][:, 1:]
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    pooled = (text * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(out.logits, model.classifier(pooled))


def test_random_frozen_pooler_quirk() -> None:
    model, inputs = build_tiny_model("vit_roberta", head_pooling="random_frozen_pooler")
    pooler = model.text_model.pooler
    assert pooler is not None
    assert not any(p.requires_grad for p in pooler.parameters())
    model.eval()
    out = model(**inputs, output_hidden_states=True)
    expected = model.classifier(torch.tanh(pooler.dense(out.hidden_states[-1][:, 0])))
    torch.testing.assert_close(out.logits, expected)
    default_model, _ = build_tiny_model("vit_roberta")
    assert getattr(default_model.text_model, "pooler", None) is None  # no unused pooler by default


def test_labels_shape_is_checked() -> None:
    model, inputs = build_tiny_model("vit_roberta", num_labels=4)
    with pytest.raises(ValueError, match="soft scores of shape"):
        model(**{**inputs, "labels": torch.rand(2, 5)})


def test_missing_image_raises() -> None:
    model, inputs = build_tiny_model("vit_bert")
    with pytest.raises(ValueError, match="needs the image"):
        model(input_ids=inputs["input_ids"])


# ------------------------------------------------------------------------------------------------ prefix modes
@pytest.mark.parametrize(
    ("prefix_tokens", "num_prefix"),
    [("pooler", 1), ("cls", 1), ("mean", 1), ("all", 17), ("none", 0), (0, 0)],
)
def test_prefix_modes(prefix_tokens: str | int, num_prefix: int) -> None:
    model, inputs = build_tiny_model("vit_roberta", prefix_tokens=prefix_tokens)
    seen: list[tuple[int, ...]] = []
    model.prefix_projector.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    out = model(**inputs, output_hidden_states=True)
    assert out.hidden_states[-1].shape[1] == num_prefix + inputs["input_ids"].shape[1]
    assert model.num_prefix_tokens == num_prefix
    num_visual = 17 if prefix_tokens == "all" else 1
    assert seen == [(2, num_visual, 32)]  # the projector runs even without a prefix
    assert out.visual_features.shape == (2, num_visual, 32)


def test_prefix_modes_select_different_features() -> None:
    pixel_values = build_tiny_model("vit_gpt2").inputs["pixel_values"]
    features = {}
    for mode in ("pooler", "cls", "mean"):
        model, _ = build_tiny_model("vit_gpt2", prefix_tokens=mode)
        features[mode] = model.select_visual_features(pixel_values)
    hidden = model.vision_model(pixel_values=pixel_values).last_hidden_state
    torch.testing.assert_close(features["cls"], hidden[:, :1])
    torch.testing.assert_close(features["mean"], hidden.mean(1, keepdim=True))
    assert not torch.allclose(features["pooler"], features["cls"])


def test_no_prefix_still_depends_on_nothing_visual_but_runs() -> None:
    model, inputs = build_tiny_model("vit_gpt2", prefix_tokens="none")
    model.eval()
    out = model(**inputs)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1]
    other = model(**{**inputs, "pixel_values": inputs["pixel_values"].flip(0)})
    torch.testing.assert_close(out.logits, other.logits)  # the image enters only via routing


def test_width_mismatch_with_identity_projector_raises() -> None:
    with pytest.raises(ValueError, match="equal widths.*48.*32"):
        build_tiny_model("vit_roberta", vision_hidden_size=48)
    model, inputs = build_tiny_model("vit_roberta", vision_hidden_size=48, prefix_projector="linear")
    assert isinstance(model.prefix_projector, torch.nn.Linear)
    assert (model.prefix_projector.in_features, model.prefix_projector.out_features) == (48, 32)
    model(**inputs).loss.backward()
    assert model.prefix_projector.weight.grad is not None


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="prefix_tokens='two'"):
        build_tiny_model("vit_roberta", prefix_tokens="two")
    with pytest.raises(ValueError, match="head_pooling='max'"):
        build_tiny_model("vit_roberta", head_pooling="max")
    with pytest.raises(ValueError, match="problem_type='ranking'"):
        build_tiny_model("vit_roberta", problem_type="ranking")
    no_pooler = ViTModel(ViTConfig(**VISION), add_pooling_layer=False)
    text = RobertaModel(
        RobertaConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
        ),
        add_pooling_layer=False,
    )
    with pytest.raises(ValueError, match="has no pooler"):
        VisionPrefixLMPreTrainedModel.from_pretrained_parts(no_pooler, text, num_labels=3)
    model = VisionPrefixLMPreTrainedModel.from_pretrained_parts(
        no_pooler, text, num_labels=3, prefix_tokens="cls"
    )
    assert isinstance(model, VisionPrefixLMForClassification) and model.vision_model is no_pooler


# ------------------------------------------------------------------------------------------------ causal LM
def test_causal_loss_trains_every_caption_token() -> None:
    model, inputs = build_tiny_model("vit_gpt2")
    assert isinstance(model, VisionPrefixLMForCausalLM)
    tiny_inputs = build_tiny_model("vit_gpt2").example_inputs(num_padding=2)
    out = model(**tiny_inputs)
    labels = tiny_inputs["labels"]
    assert out.logits.shape[1] == 1 + labels.shape[1]
    # Position 0 is the prefix: logits[:, i] predicts text token i.
    predictions = out.logits[:, :-1]
    expected = F.cross_entropy(
        predictions.reshape(-1, predictions.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)
    assert (labels == -100).sum() == 2  # padding is ignored
    out.loss.backward()
    assert _grad_norm(model.text_model) > 0


def test_skip_first_token_loss_quirk() -> None:
    model, inputs = build_tiny_model("vit_gpt2", skip_first_token_loss=True)
    out = model(**inputs)
    labels = inputs["labels"].clone()
    labels[:, 0] = -100
    predictions = out.logits[:, :-1]
    expected = F.cross_entropy(
        predictions.reshape(-1, predictions.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


def test_cached_decoding_matches_full_forward() -> None:
    model, inputs = build_tiny_model("vit_gpt2", prefix_tokens="all")
    model.eval()
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    full = model(input_ids=ids, pixel_values=pixels).logits
    first = model(input_ids=ids[:, :3], pixel_values=pixels, use_cache=True)
    step = model(
        input_ids=ids[:, 3:4],
        attention_mask=torch.ones(2, 4, dtype=torch.long),
        pixel_values=pixels,
        past_key_values=first.past_key_values,
        use_cache=True,
    )
    num_prefix = 17
    torch.testing.assert_close(step.logits[:, -1], full[:, num_prefix + 3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("prefix_tokens", "num_beams"), [("pooler", 1), ("pooler", 3), ("all", 2)])
def test_generate_batch_equals_single(prefix_tokens: str, num_beams: int) -> None:
    model, inputs = build_tiny_model("vit_gpt2", prefix_tokens=prefix_tokens)
    model.eval()
    pixels = inputs["pixel_values"]
    kwargs = {
        "num_beams": num_beams,
        "max_new_tokens": 5,
        "do_sample": False,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    batch = model.generate(pixel_values=pixels, **kwargs)
    singles = [model.generate(pixel_values=pixels[i : i + 1], **kwargs) for i in range(2)]
    assert batch.sequences.shape[1] == max(s.sequences.shape[1] for s in singles)
    for i, single in enumerate(singles):
        assert torch.equal(batch.sequences[i, : single.sequences.shape[1]], single.sequences[0])
        rows = slice(i * num_beams, (i + 1) * num_beams)
        torch.testing.assert_close(batch.scores[0][rows], single.scores[0], atol=1e-5, rtol=1e-5)
    # The test can fail: the two images lead to different next-token scores.
    assert (singles[0].scores[0] - singles[1].scores[0]).abs().max() > 1e-2


def test_generate_with_left_padded_prompts_equals_unpadded() -> None:
    model, inputs = build_tiny_model("vit_gpt2")
    model.eval()
    pixels = inputs["pixel_values"]
    prompt = torch.tensor([[10, 11, 12], [0, 20, 21]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    batch = model.generate(pixel_values=pixels, input_ids=prompt, attention_mask=mask, max_new_tokens=5)
    single = model.generate(pixel_values=pixels[1:], input_ids=prompt[1:, 1:], max_new_tokens=5)
    assert torch.equal(batch[1, : single.shape[1]], single[0])


def test_projector_hook_sees_every_decoding_step_per_beam() -> None:
    model, inputs = build_tiny_model("vit_gpt2")
    model.eval()
    shapes: list[tuple[int, ...]] = []
    model.prefix_projector.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    model.generate(pixel_values=inputs["pixel_values"], num_beams=2, max_new_tokens=4, min_new_tokens=4)
    assert len(shapes) == 4
    assert set(shapes) == {(4, 1, 32)}


def test_generate_without_prefix_starts_from_bos() -> None:
    model, inputs = build_tiny_model("vit_gpt2", prefix_tokens="none")
    model.eval()
    out = model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=3, min_new_tokens=3)
    assert out.shape == (2, 3)


def test_generate_rejects_use_cache_false() -> None:
    model, inputs = build_tiny_model("vit_gpt2")
    with pytest.raises(ValueError, match="use_cache=True"):
        model.generate(pixel_values=inputs["pixel_values"], use_cache=False)


# ---------------------------------------------------------------------------------------- save / load / auto
@pytest.mark.parametrize("family", ["vit_roberta", "vit_gpt2"])
def test_save_load_round_trip(family: str, tmp_path) -> None:
    model, inputs = build_tiny_model(family, prefix_projector="linear")
    model.eval()
    expected = model(**inputs)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, VisionPrefixLMConfig) and config.prefix_projector == "linear"
    auto_class = AutoModelForCausalLM if family == "vit_gpt2" else AutoModelForSequenceClassification
    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    got = loaded(**inputs)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)
    if family == "vit_gpt2":
        lm = loaded.text_model
        assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()  # still tied
        kwargs = {"num_beams": 2, "max_new_tokens": 4}
        assert torch.equal(
            loaded.generate(pixel_values=inputs["pixel_values"], **kwargs),
            model.generate(pixel_values=inputs["pixel_values"], **kwargs),
        )


def test_from_pretrained_parts_with_instances_and_configs() -> None:
    vit = ViTModel(ViTConfig(**VISION))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    model = VisionPrefixLMPreTrainedModel.from_pretrained_parts(vit, gpt2)
    assert isinstance(model, VisionPrefixLMForCausalLM)
    assert model.vision_model is vit and model.text_model is gpt2
    from_configs = VisionPrefixLMForClassification.from_pretrained_parts(
        ViTConfig(**VISION),
        RobertaConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
        ),
        num_labels=3,
        problem_type="single_label",
    )
    assert isinstance(from_configs.text_model, RobertaModel)
    with pytest.raises(ValueError, match="cannot hold task='causal_lm'"):
        VisionPrefixLMForClassification.from_pretrained_parts(vit, gpt2)


def test_freeze_vision() -> None:
    model, inputs = build_tiny_model("vit_bert")
    model.freeze_vision()
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    model(**inputs).loss.backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert _grad_norm(model.text_model) > 0


# ------------------------------------------------------------------------------------------------------ PEFT
def test_peft_lora_on_encoder_classifier() -> None:
    model, inputs = build_tiny_model("vit_roberta")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    peft_model = get_peft_model(model, config)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("text_model.encoder.layer.0.attention.self.query.lora_A" in n for n in trainable)
    assert not any("vision_model" in n for n in trainable)  # ViT has q_proj/v_proj, not query/value
    out = peft_model(**inputs)
    out.loss.backward()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None for p in lora_b)


def test_peft_lora_on_gpt2_decoder_generates() -> None:
    model, inputs = build_tiny_model("vit_gpt2")
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    assert any("text_model.transformer.h.0.attn.c_attn.lora_A" in n for n, _ in peft_model.named_parameters())
    out = peft_model(**inputs)
    out.loss.backward()
    peft_model.eval()
    generated = peft_model.generate(pixel_values=inputs["pixel_values"], num_beams=2, max_new_tokens=3)
    assert generated.shape[0] == 2


def test_from_pretrained_parts_by_path_warns_on_new_pooler(tmp_path) -> None:
    """Loading by name/path (here local folders) goes through from_pretrained; a missing pooler is flagged (Q14)."""
    ViTModel(ViTConfig(**VISION), add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    GPT2LMHeadModel(
        GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    ).save_pretrained(tmp_path / "gpt2")
    with pytest.warns(UserWarning, match="no pooler weights"):
        model = VisionPrefixLMPreTrainedModel.from_pretrained_parts(
            str(tmp_path / "vit"), str(tmp_path / "gpt2")
        )
    assert isinstance(model, VisionPrefixLMForCausalLM) and model.vision_model.pooler is not None
    saved_text = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    torch.testing.assert_close(model.text_model.lm_head.weight, saved_text.lm_head.weight)
    saved_vision = ViTModel.from_pretrained(tmp_path / "vit", add_pooling_layer=False)
    for name, tensor in saved_vision.state_dict().items():
        torch.testing.assert_close(model.vision_model.state_dict()[name], tensor)  # not re-initialised
    model_cls = VisionPrefixLMPreTrainedModel.from_pretrained_parts(
        str(tmp_path / "vit"), str(tmp_path / "gpt2"), prefix_tokens="cls"
    )
    assert model_cls.vision_model.pooler is None


@pytest.mark.parametrize("family", ["vit_roberta", "vit_gpt2"])
def test_gradient_checkpointing_gives_equal_gradients(family: str) -> None:
    grads = []
    for checkpointing in (False, True):
        model, inputs = build_tiny_model(family)
        if checkpointing:
            enable_activation_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.text_model.modules())
        model(**inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
