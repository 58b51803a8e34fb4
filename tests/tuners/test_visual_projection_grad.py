"""``visual_projection_grad=False`` (routed LoRA and routed Adapter): the same forward values, and the shared
down-projection's gradient is the text term's alone, checked against the formulas of routing.md §3 / §4 written out
with the visual term detached (the default keeps the gradient through both terms, as the released code)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.activations import ACT2FN

from vlpeft import AdapterConfig, RoutedLoraConfig
from vlpeft.functional import ROUTING_KINDS, project_visual, route

D = 8


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vis = nn.Identity()
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        self.vis(image)
        return self.proj(x)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 5, D, generator=generator), torch.randn(2, 4, D, generator=generator, requires_grad=True)


def test_project_visual_detaches_only_the_projection():
    features = torch.randn(2, 3, D, requires_grad=True)
    weight, bias = torch.randn(4, D, requires_grad=True), torch.randn(4, requires_grad=True)
    with_grad = project_visual(features, weight, bias)
    without = project_visual(features, weight, bias, grad=False)
    torch.testing.assert_close(with_grad, without)
    without.sum().backward()
    assert weight.grad is None and bias.grad is None
    assert features.grad is not None and features.grad.abs().sum() > 0


def _adapter(flag: bool, routing: str):
    torch.manual_seed(0)
    config = AdapterConfig(target_modules=["proj"], adapter_size=3, up_init="normal", init_std=0.3,
                           visual_feature_module="vis", routing=routing, visual_projection_grad=flag)
    return get_peft_model(Toy(), config)


def _routed_lora(flag: bool, routing: str):
    torch.manual_seed(0)
    config = RoutedLoraConfig(r=3, lora_alpha=6, target_modules=["proj"], visual_feature_module="vis",
                              init_lora_weights=False, routing=routing, visual_projection_grad=flag)
    return get_peft_model(Toy(), config)


@pytest.mark.parametrize("routing", ROUTING_KINDS)
@pytest.mark.parametrize("flag", [True, False])
def test_adapter_down_projection_gradient(routing, flag):
    model = _adapter(flag, routing)
    x, image = _inputs()
    layer = model.base_model.model.proj
    down, up = layer.bottleneck_adapter_down["default"], layer.bottleneck_adapter_up["default"]
    model(x, image).square().sum().backward()
    got = (down.weight.grad.clone(), down.bias.grad.clone(), image.grad.clone())

    w, b = down.weight.detach().clone().requires_grad_(), down.bias.detach().clone().requires_grad_()
    feats = image.detach().clone().requires_grad_()
    y = layer.base_layer(x).detach()
    pooled = feats.mean(1, keepdim=True)
    visual = pooled @ (w if flag else w.detach()).T + (b if flag else b.detach())
    expected = y + up(ACT2FN["gelu"](route(y @ w.T + b, visual, routing)))
    expected.square().sum().backward()
    for actual, reference in zip(got, (w.grad, b.grad, feats.grad), strict=True):
        torch.testing.assert_close(actual, reference)


@pytest.mark.parametrize("routing", ROUTING_KINDS)
@pytest.mark.parametrize("flag", [True, False])
def test_routed_lora_a_gradient(routing, flag):
    model = _routed_lora(flag, routing)
    x, image = _inputs()
    layer = model.base_model.model.proj
    lora_a, lora_b = layer.routed_lora_A["default"], layer.routed_lora_B["default"]
    model(x, image).square().sum().backward()
    got = (lora_a.weight.grad.clone(), lora_b.weight.grad.clone(), image.grad.clone())

    a, b_up = lora_a.weight.detach().clone().requires_grad_(), lora_b.weight.detach().clone().requires_grad_()
    feats = image.detach().clone().requires_grad_()
    visual = feats.mean(1, keepdim=True) @ (a if flag else a.detach()).T
    expected = layer.base_layer(x).detach() + route(x @ a.T, visual, routing) @ b_up.T * (6 / 3)
    expected.square().sum().backward()
    for actual, reference in zip(got, (a.grad, b_up.grad, feats.grad), strict=True):
        torch.testing.assert_close(actual, reference)


def test_the_flag_changes_the_gradient_not_the_output():
    outputs, grads = [], []
    for flag in (True, False):
        model = _adapter(flag, "add")
        x, image = _inputs()
        out = model(x, image)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append(model.base_model.model.proj.bottleneck_adapter_down["default"].weight.grad)
    torch.testing.assert_close(outputs[0], outputs[1])
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("make", [AdapterConfig, RoutedLoraConfig])
def test_flag_needs_routing(make):
    with pytest.raises(ValueError, match="visual_projection_grad=False applies to a routed tuner only"):
        make(target_modules=["proj"], visual_projection_grad=False)
