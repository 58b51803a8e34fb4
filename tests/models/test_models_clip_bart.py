"""Tests for the CLIP-BART composite (vlpeft.models.ClipBartForConditionalGeneration) and its tiny twin.

The twin: CLIP vision (56 x 56 images, 8 x 8 patches: a 7 x 7 grid like ViT-B/32 at 224) pooled to 36 visual tokens,
a BART encoder-decoder of width 32.
"""

from __future__ import annotations

import copy
import re

import _routing_checks as checks
import peft
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartForConditionalGeneration,
    CLIPConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
)

import vlpeft
from vlpeft.glue.families import detect_family
from vlpeft.glue.visual_features import find_visual_contexts
from vlpeft.models import ClipBartConfig, ClipBartForConditionalGeneration
from vlpeft.testing import TinyModel, build_tiny_model


@pytest.fixture(scope="module")
def tiny() -> TinyModel:
    return build_tiny_model("clip_bart", seed=5, num_hidden_layers=1)


def _fresh(tiny: TinyModel) -> ClipBartForConditionalGeneration:
    return copy.deepcopy(tiny.model)


# ------------------------------------------------------------------------------------------------- the model
def test_forward_loss_and_shapes(tiny: TinyModel) -> None:
    model = _fresh(tiny)
    inputs = tiny.inputs
    out = model(**inputs)
    labels = inputs["labels"]
    assert out.logits.shape == (2, labels.shape[1], tiny.vocab_size)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, tiny.vocab_size), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.visual_embedding.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision_model.parameters())  # frozen by the model


def test_decoder_inputs_are_labels_shifted_right(tiny: TinyModel) -> None:
    model = _fresh(tiny).eval()
    inputs = tiny.inputs
    labels = inputs["labels"]
    start = model.config.decoder_start_token_id
    shifted = torch.cat([torch.full((2, 1), start), labels[:, :-1]], dim=1)
    with torch.no_grad():
        from_labels = model(**inputs).logits
        explicit = model(**{k: v for k, v in inputs.items() if k != "labels"}, decoder_input_ids=shifted).logits
    torch.testing.assert_close(from_labels, explicit)


def test_visual_tokens_are_appended_after_the_text(tiny: TinyModel) -> None:
    model = _fresh(tiny).eval()
    inputs = tiny.inputs
    text_len = inputs["input_ids"].shape[1]
    seen: list[tuple[int, ...]] = []
    handle = model.language_model.model.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["inputs_embeds"].shape)), with_kwargs=True
    )
    with torch.no_grad():
        out = model(**inputs)
        visual = model.visual_tokens(inputs["pixel_values"])
        text = model.get_input_embeddings()(inputs["input_ids"])
    handle.remove()
    assert visual.shape == (2, 36, 32)
    assert seen == [(2, text_len + 36, 32)]
    assert out.encoder_last_hidden_state.shape == (2, text_len + 36, 32)
    # The encoder input is exactly [text embeddings ; visual tokens].
    captured: list[torch.Tensor] = []
    handle = model.language_model.model.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    torch.testing.assert_close(captured[0], torch.cat([text, visual], dim=1))
    # The output depends on the image.
    with torch.no_grad():
        other = model(**{**inputs, "pixel_values": inputs["pixel_values"].flip(0)})
    assert (other.logits - out.logits).abs().max() > 1e-3


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_grid_is_pooled_to_six_by_six(pooling: str) -> None:
    tiny = build_tiny_model("clip_bart", num_hidden_layers=1, downsample_pooling=pooling)
    model = tiny.model.eval()
    pixels = tiny.inputs["pixel_values"]
    with torch.no_grad():
        grid = model.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]  # 7 x 7 patches, no CLS
        pooled = model.grid_features(pixels)
    assert grid.shape[1] == 49 and pooled.shape == (2, 36, 32)
    square = grid.transpose(1, 2).reshape(2, 32, 7, 7)
    pool = torch.nn.AdaptiveMaxPool2d(6) if pooling == "max" else torch.nn.AdaptiveAvgPool2d(6)
    torch.testing.assert_close(pooled, pool(square).flatten(2).transpose(1, 2))


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="perfect square"):
        ClipBartConfig(num_visual_tokens=35)
    with pytest.raises(ValueError, match="downsample_pooling"):
        ClipBartConfig(downsample_pooling="median")
    config = ClipBartConfig()
    assert config.vision_config.model_type == "clip_vision_model" and config.text_config.model_type == "bart"
    assert config.is_encoder_decoder and config.num_visual_tokens == 36


def test_save_and_auto_reload(tiny: TinyModel, tmp_path) -> None:
    model = _fresh(tiny).eval()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ClipBartConfig)
    for auto in (AutoModelForSeq2SeqLM, AutoModelForImageTextToText):
        loaded = auto.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, ClipBartForConditionalGeneration)
        assert not any(p.requires_grad for p in loaded.vision_model.parameters())
        with torch.no_grad():
            torch.testing.assert_close(loaded(**tiny.inputs).logits, model(**tiny.inputs).logits, rtol=0, atol=0)


def test_generate_cached_equals_uncached_and_beams(tiny: TinyModel) -> None:
    model = _fresh(tiny).eval()
    inputs = tiny.generation_inputs(batch_size=2)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    settings = {"do_sample": False, "max_new_tokens": 5}
    with torch.no_grad():
        cached = model.generate(**inputs, **settings)
        uncached = model.generate(**inputs, use_cache=False, **settings)
        beams = model.generate(**inputs, num_beams=3, **settings)
    torch.testing.assert_close(cached, uncached)
    assert cached[:, 0].eq(model.config.decoder_start_token_id).all()
    assert beams.shape[0] == 2
    padded = tiny.generation_inputs(batch_size=2, num_padding=2)
    with torch.no_grad():
        batch = model.generate(**padded, **settings)
        for row in range(2):
            alone = model.generate(**{k: v[row : row + 1] for k, v in padded.items()}, **settings)
            torch.testing.assert_close(batch[row : row + 1, : alone.shape[1]], alone)


def test_family_description(tiny: TinyModel) -> None:
    family = detect_family(tiny.model)
    assert family.name == "clip_bart" and not family.derived
    assert family.language_towers == ("text_encoder", "text_decoder")
    assert family.visual_feature_module == "visual_embedding"
    names = dict(tiny.model.named_modules())
    query = family.module_regex(None, ("self_attn", "cross_attn"), "query")
    matched = sorted(n for n in names if re.fullmatch(query, n))
    assert matched == [
        "language_model.model.decoder.layers.0.encoder_attn.q_proj",
        "language_model.model.decoder.layers.0.self_attn.q_proj",
        "language_model.model.encoder.layers.0.self_attn.q_proj",
    ]
    ffn = family.module_regex(None, ("ffn",), "ffn_output")
    assert sorted(n for n in names if re.fullmatch(ffn, n)) == [
        "language_model.model.decoder.layers.0.fc2",
        "language_model.model.encoder.layers.0.fc2",
    ]
    vision = family.module_regex("vision", ("self_attn",), "query")
    assert [n for n in names if re.fullmatch(vision, n)] == ["vision_model.encoder.layers.0.self_attn.q_proj"]


# ------------------------------------------------------------------------------------------------- methods
METHODS = {
    "routed_lora_mul": lambda: vlpeft.RoutedLoraConfig(routing="mul"),
    "routed_lora_matmul": lambda: vlpeft.RoutedLoraConfig(routing="matmul"),
    "routed_adapter_mul": lambda: vlpeft.AdapterConfig(routing="mul"),
    "routed_adapter_matmul": lambda: vlpeft.AdapterConfig(routing="matmul"),
    "lora": lambda: vlpeft.RoutedLoraConfig(),
    "adapter": lambda: vlpeft.AdapterConfig(),
    "p_adapter": lambda: vlpeft.PAdapterConfig(),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_attaches_and_trains_a_step(tiny: TinyModel, method: str) -> None:
    model = peft.get_peft_model(_fresh(tiny), METHODS[method]())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert not any("vision_model" in n or "visual_embedding" in n for n in trainable)  # defaults: adapters only
    assert any(".encoder.layers." in n for n in trainable) and any(".decoder.layers." in n for n in trainable)
    model.train()
    loss = model(**tiny.inputs).loss
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        out = model.generate(**tiny.generation_inputs(batch_size=2), max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2


@pytest.mark.parametrize("routing", ["mul", "matmul"])
def test_routing_reads_the_36_visual_tokens_in_every_layer(tiny: TinyModel, routing: str) -> None:
    """x_R is the visual embedding's (batch, 36, d) output: pooled (``mul``, mean) or all 36 tokens (``matmul``)
    in every adapted encoder and decoder layer; the adapted output changes with the image."""
    config = vlpeft.RoutedLoraConfig(r=4, routing=routing, init_lora_weights=False)
    model = peft.get_peft_model(_fresh(tiny), config)
    base = model.get_base_model()
    seen: list[tuple[int, ...]] = []
    base.visual_embedding.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    model.eval()
    inputs = tiny.inputs
    with torch.no_grad():
        out = model(**inputs)
        with model.disable_adapter():
            plain = model(**inputs)
        flipped = model(**{**inputs, "pixel_values": inputs["pixel_values"].flip(0)})
        with model.disable_adapter():
            plain_flipped = model(**{**inputs, "pixel_values": inputs["pixel_values"].flip(0)})
    assert seen[0] == (2, 36, 32)
    assert not torch.allclose(out.logits, plain.logits)
    # Swapping the images changes the routed update itself (not only the base model's output).
    assert not torch.allclose(out.logits - plain.logits, flipped.logits - plain_flipped.logits, atol=1e-6)
    routed = [n for n, m in model.named_modules() if hasattr(m, "routed_lora_A") and n.endswith("q_proj")]
    assert any(".encoder.layers." in n for n in routed)
    assert any(".decoder.layers.0.self_attn." in n for n in routed)
    assert any(".decoder.layers.0.encoder_attn." in n for n in routed)


@pytest.mark.parametrize(
    ("method", "config"),
    [
        ("routed_lora", vlpeft.RoutedLoraConfig(r=4, routing="matmul", pooling="none", init_lora_weights=False)),
        ("routed_adapter", vlpeft.AdapterConfig(routing="mul", pooling="mean", up_init="normal", init_std=0.2)),
    ],
)
def test_routed_methods_full_checks(tiny: TinyModel, method: str, config: object, tmp_path) -> None:
    """Checkpointing gradients, batch == single, beam batch == per image, save/load, disable/unload.

    (An adapter with unnormalised ``matmul`` over all 36 tokens at ``init_std=0.2`` saturates the tiny model's
    LayerNorms, so that some gradients underflow to 0; ``matmul`` is covered here with LoRA.)
    """
    torch.manual_seed(0)  # the adapters' random initialisation
    plain = (
        vlpeft.RoutedLoraConfig(r=4, init_lora_weights=False)
        if method == "routed_lora"
        else vlpeft.AdapterConfig(up_init="normal", init_std=0.2)
    )
    checks.run_all_checks(tiny, config, plain, tmp_path)


def test_visual_embedding_trains_with_modules_to_save(tiny: TinyModel) -> None:
    """VL-Adapter trains the visual embedding: ``modules_to_save=["visual_embedding"]``; routing still reads x_R."""
    config = vlpeft.AdapterConfig(routing="mul", modules_to_save=["visual_embedding"])
    model = peft.get_peft_model(_fresh(tiny), config)
    model.train()
    model(**tiny.inputs).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("visual_embedding" in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "visual_embedding" in n)
    assert not any("vision_model" in n for n in grads)


@pytest.mark.parametrize(
    ("method", "routing", "pooling"),
    [("lora", "mul", "mean"), ("lora", "matmul", "mean"), ("lora", "matmul", "none"), ("adapter", "mul", "mean")],
)
def test_every_adapted_layer_routes_with_the_visual_tokens(
    tiny: TinyModel, method: str, routing: str, pooling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each routed encoder and decoder module reads x_R from ``visual_embedding`` at every call, in training and at
    every generation step: (batch, 1, d), the 36 visual tokens mean-pooled (the default), or all (batch, 36, d)
    tokens for ``matmul`` with ``pooling="none"``."""
    config = (
        vlpeft.RoutedLoraConfig(r=4, routing=routing, pooling=pooling)
        if method == "lora"
        else vlpeft.AdapterConfig(routing=routing, pooling=pooling)
    )
    model = peft.get_peft_model(_fresh(tiny), config)
    (context,) = find_visual_contexts(model)
    calls: list[tuple[str, str, tuple[int, ...]]] = []
    served: list[torch.Tensor] = []
    original = context.visual_input

    def record(source: str, pooling: str, text_batch: int, **kwargs):
        features, mask = original(source, pooling, text_batch, **kwargs)
        calls.append((kwargs["requester"], source, tuple(features.shape)))
        served.append(features.detach())
        return features, mask

    tokens_out: list[torch.Tensor] = []
    model.get_base_model().visual_embedding.register_forward_hook(lambda m, a, out: tokens_out.append(out.detach()))

    monkeypatch.setattr(context, "visual_input", record)
    routed = {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if hasattr(m, "routed_lora_A") or hasattr(m, "bottleneck_adapter_down")
    }
    assert any(".encoder." in n for n in routed) and any(".decoder." in n for n in routed)
    model.train()
    model(**tiny.inputs).loss.backward()
    tokens = 36 if pooling == "none" else 1
    assert {c[0] for c in calls} == routed
    assert {(c[1], c[2]) for c in calls} == {("visual_embedding", (2, tokens, 32))}
    (visual,) = tokens_out
    expected = visual if pooling == "none" else visual.mean(dim=1, keepdim=True)
    for features in served:
        torch.testing.assert_close(features, expected)
    calls.clear()
    model.eval()
    with torch.no_grad():
        model.generate(**tiny.generation_inputs(batch_size=2), num_beams=2, max_new_tokens=3, do_sample=False)
    decoder = {n for n in routed if ".decoder." in n}
    assert {c[0] for c in calls} == routed
    for name in decoder:  # every decoding step; cross-attention keys/values only once (then cached)
        steps = sum(c[0] == name for c in calls)
        assert steps == 1 if re.search(r"encoder_attn\.[kv]_proj", name) else steps >= 3, (name, steps)
    assert {c[2] for c in calls if c[0] in decoder} == {(4, tokens, 32)}  # expanded to batch x beams


def test_from_pretrained_parts_with_configs() -> None:
    """The hub code path, with configs instead of names: a full CLIP config gives its vision tower."""
    clip = CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=56, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4),
    )
    bart = BartConfig(vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64)
    model = ClipBartForConditionalGeneration.from_pretrained_parts(vision=clip, text=bart, num_visual_tokens=16)
    assert type(model.vision_model).__name__ == "CLIPVisionModel"
    assert model.config.num_visual_tokens == 16 and model.config.vision_config.model_type == "clip_vision_model"
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    ids = torch.randint(5, 99, (1, 4))
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56), labels=ids)
    assert out.encoder_last_hidden_state.shape == (1, 4 + 16, 32) and torch.isfinite(out.loss)


def test_two_images_per_sample_concatenate_their_tokens(tiny: TinyModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """NLVR2: pixel_values (batch, 2, 3, H, W) give 2 x 36 visual tokens after the text, in image order; routing
    pools over both images' tokens; generation works."""
    model = _fresh(tiny).eval()
    inputs = tiny.inputs
    first, second = inputs["pixel_values"], inputs["pixel_values"].flip(0)
    pair = {**inputs, "pixel_values": torch.stack([first, second], dim=1)}
    with torch.no_grad():
        out = model(**pair)
        tokens = model.visual_tokens(pair["pixel_values"])
        expected = torch.cat([model.visual_tokens(first), model.visual_tokens(second)], dim=1)
        swapped = model(**{**inputs, "pixel_values": torch.stack([second, first], dim=1)})
    assert out.encoder_last_hidden_state.shape[1] == inputs["input_ids"].shape[1] + 72
    torch.testing.assert_close(tokens, expected)
    assert (swapped.logits - out.logits).abs().max() > 1e-4  # the image order matters
    peft_model = peft.get_peft_model(_fresh(tiny), vlpeft.RoutedLoraConfig(r=4, routing="mul"))
    (context,) = find_visual_contexts(peft_model)
    served: list[torch.Tensor] = []
    original = context.visual_input

    def record(source: str, pooling: str, text_batch: int, **kwargs):
        features, mask = original(source, pooling, text_batch, **kwargs)
        served.append(features)
        return features, mask

    monkeypatch.setattr(context, "visual_input", record)
    peft_model.eval()
    with torch.no_grad():
        peft_model(**pair)
        generated = peft_model.generate(
            input_ids=pair["input_ids"], attention_mask=pair["attention_mask"], pixel_values=pair["pixel_values"],
            max_new_tokens=3, num_beams=2, do_sample=False,
        )
    torch.testing.assert_close(served[0], expected.mean(dim=1, keepdim=True))
    assert generated.shape[0] == 2


def test_image_only_inputs(tiny: TinyModel) -> None:
    """Without text the encoder sees the 36 visual tokens alone (captioning without a prompt)."""
    model = _fresh(tiny).eval()
    pixels = tiny.inputs["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels, labels=tiny.inputs["labels"])
        generated = model.generate(pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert out.encoder_last_hidden_state.shape == (2, 36, 32) and torch.isfinite(out.loss)
    assert generated.shape[0] == 2
    with pytest.raises(ValueError, match="at most one"):
        model(input_ids=tiny.inputs["input_ids"], inputs_embeds=torch.zeros(2, 7, 32), pixel_values=pixels)


def test_from_pretrained_parts_loads_saved_parts_unchanged(tmp_path) -> None:
    """Loading parts by path (the hub-name code path) keeps their weights: only the visual embedding is new."""
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                              num_attention_heads=4, image_size=56, patch_size=8))
    text = BartForConditionalGeneration(
        BartConfig(vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64)
    )
    vision.save_pretrained(tmp_path / "vision")
    text.save_pretrained(tmp_path / "text")
    model = ClipBartForConditionalGeneration.from_pretrained_parts(
        vision=str(tmp_path / "vision"), text=str(tmp_path / "text")
    )
    for part, reference in ((model.vision_model, vision), (model.language_model, text)):
        expected = reference.state_dict()
        assert all(torch.equal(tensor, expected[key]) for key, tensor in part.state_dict().items())
