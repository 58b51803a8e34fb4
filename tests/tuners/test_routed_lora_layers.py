"""Routed LoRA layer math, fused q/k/v (GPT-2 Conv1D), merging, config validation and error messages."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from vlpeft import RoutedLoraConfig
from vlpeft.functional import ROUTING_KINDS, route
from vlpeft.glue.visual_features import MissingVisualFeaturesError, provide_visual_features
from vlpeft.testing import build_tiny_model

D = 8


class Toy(nn.Module):
    """A 'model' with a visual module (identity on the image features) and two projections."""

    def __init__(self) -> None:
        super().__init__()
        self.vis = nn.Identity()
        self.proj = nn.Linear(D, 6)
        self.qkv = Conv1D(3 * D, D)

    def forward(self, x: torch.Tensor, image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if image is not None:
            self.vis(image)
        return self.proj(x), self.qkv(x)


def toy_peft(config: RoutedLoraConfig, seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(Toy(), config)


def toy_config(**kwargs) -> RoutedLoraConfig:
    defaults = dict(
        r=3,
        lora_alpha=6,
        target_modules=["proj", "qkv"],
        fused_qkv_modules=["qkv"],
        visual_feature_module="vis",
        init_lora_weights=False,
    )
    return RoutedLoraConfig(**{**defaults, **kwargs})


def inputs(batch: int = 2, n: int = 5, m: int = 4, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, D, generator=generator), torch.randn(batch, m, D, generator=generator)


VALID_PAIRS = [(kind, pooling) for kind in ROUTING_KINDS for pooling in ("mean", "cls")] + [("matmul", "none")]


@pytest.mark.parametrize(("routing", "pooling"), VALID_PAIRS)
def test_linear_matches_formula(routing, pooling):
    model = toy_peft(toy_config(routing=routing, pooling=pooling, target_modules=["proj"], fused_qkv_modules=None))
    x, image = inputs()
    layer = model.base_model.model.proj
    a, b = layer.routed_lora_A["default"].weight, layer.routed_lora_B["default"].weight
    pooled = {"mean": image.mean(1, keepdim=True), "cls": image[:, :1], "none": image}[pooling]
    expected = layer.base_layer(x) + 2.0 * route(x @ a.T, pooled @ a.T, routing) @ b.T
    torch.testing.assert_close(model(x, image)[0], expected)


@pytest.mark.parametrize("routing", ["mul", "matmul"])
def test_fused_qkv_independent_slices_and_untouched_key(routing):
    model = toy_peft(toy_config(routing=routing))
    x, image = inputs()
    layer = model.base_model.model.qkv
    base = layer.base_layer(x)
    out = model(x, image)[1]
    torch.testing.assert_close(out[..., D : 2 * D], base[..., D : 2 * D])  # k is not adapted
    a, b = layer.routed_lora_A["default"].weight, layer.routed_lora_B["default"].weight
    visual = image.mean(1, keepdim=True)
    for group, position in enumerate([0, 2]):
        a_j, b_j = a[group * 3 : (group + 1) * 3], b[group * D : (group + 1) * D]
        delta = 2.0 * route(x @ a_j.T, visual @ a_j.T, routing) @ b_j.T
        torch.testing.assert_close(out[..., position * D : (position + 1) * D], base[..., position * D : (position + 1) * D] + delta)


def test_fused_qv_bottleneck_quirk_couples_matmul_only():
    x, image = inputs()
    for routing, same in [("mul", True), ("add", True), ("matmul", False), ("matmul_expand", False)]:
        independent = toy_peft(toy_config(routing=routing), seed=5)(x, image)[1]
        coupled = toy_peft(toy_config(routing=routing, fused_qv_bottleneck=True), seed=5)(x, image)[1]
        assert torch.allclose(independent, coupled) == same, routing


def test_plain_routing_none_equals_peft_lora_outputs_and_gradients():
    tiny = build_tiny_model("blip_caption", seed=2)
    targets = ["query", "value"]
    torch.manual_seed(11)
    ours = get_peft_model(copy.deepcopy(tiny.model), RoutedLoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(11)
    theirs = get_peft_model(copy.deepcopy(tiny.model), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    ours_layers = {n: m for n, m in ours.named_modules() if hasattr(m, "routed_lora_A")}
    assert len(ours_layers) == 8  # 2 layers x (self, cross) attention x (query, value)
    generator = torch.Generator().manual_seed(0)
    for name, layer in ours_layers.items():
        peft_layer = theirs.get_submodule(name)
        # Same seed, same construction order: identical Kaiming A and zero B.
        torch.testing.assert_close(layer.routed_lora_A["default"].weight, peft_layer.lora_A["default"].weight)
        assert layer.routed_lora_B["default"].weight.abs().sum() == 0
        random_b = torch.randn(peft_layer.lora_B["default"].weight.shape, generator=generator)
        with torch.no_grad():
            layer.routed_lora_B["default"].weight.copy_(random_b)
            peft_layer.lora_B["default"].weight.copy_(random_b)
    results = []
    for model in (ours, theirs):
        model.train()
        out = model(**tiny.inputs)
        out.loss.backward()
        grads = {
            n.replace("routed_lora_", "lora_"): p.grad for n, p in model.named_parameters() if p.requires_grad
        }
        results.append((out.logits, grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], msg=name)


def test_merge_and_unmerge_routing_none_including_fused():
    model = toy_peft(toy_config(routing=None))
    x, _ = inputs()
    model.eval()
    expected = model(x)
    model.base_model.merge_adapter()
    merged = model(x)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(merged[0], expected[0])
    torch.testing.assert_close(merged[1], expected[1])
    torch.testing.assert_close(model(x)[1], expected[1])
    unloaded = model.merge_and_unload()
    assert isinstance(unloaded.qkv, Conv1D) and isinstance(unloaded.proj, nn.Linear)
    torch.testing.assert_close(unloaded(x)[1], expected[1])


def test_merge_with_routing_raises_clear_error():
    model = toy_peft(toy_config(routing="matmul"))
    with pytest.raises(ValueError, match="depends on each sample's visual features"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="visual features"):
        model.base_model.model.proj.merge()


def test_missing_visual_features_names_the_module():
    model = toy_peft(toy_config(routing="add"))
    x, _ = inputs()
    with pytest.raises(MissingVisualFeaturesError, match="'proj'"):
        model(x)


def test_width_mismatch_raises():
    model = toy_peft(toy_config(routing="add"))
    x, _ = inputs()
    with pytest.raises(ValueError, match="input width 8"):
        model(x, torch.randn(2, 4, D + 1))


def test_explicit_features_and_beam_expansion():
    model = toy_peft(toy_config(routing="matmul", pooling="none"))
    x, image = inputs()
    reference = model(x, image)
    with provide_visual_features(model, image):
        torch.testing.assert_close(model(x)[0], reference[0])
    # A text batch that is a multiple of the feature batch: features are repeat_interleave-d (beam layout).
    beams = x.repeat_interleave(3, dim=0)
    with provide_visual_features(model, image):
        out = model(beams)[0]
    torch.testing.assert_close(out, reference[0].repeat_interleave(3, dim=0))
    with provide_visual_features(model, image), pytest.raises(ValueError, match="multiple"):
        model(torch.randn(3, 5, D))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"routing": "dot"}, "routing='dot'"),
        ({"routing": "mul", "pooling": "none"}, "needs one visual vector"),
        ({"pooling": "max"}, "pooling='max'"),
        ({"routing": "add", "matmul_reshape_quirk": True}, "matmul_reshape_quirk"),
        ({"fused_qkv_slices": ["q", "x"]}, "fused_qkv_slices"),
        ({"r": 0}, "r must be"),
        ({"bias": "some"}, "bias="),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoutedLoraConfig(**kwargs)


def test_train_qv_bias_quirk_via_bias_option():
    model = toy_peft(toy_config(routing="mul", bias="routed_lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.proj.base_layer.bias" in trainable
    assert "base_model.model.proj.base_layer.weight" not in trainable
