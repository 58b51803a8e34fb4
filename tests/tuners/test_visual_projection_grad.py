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


def _adapter_reference(layer: nn.Module, x: torch.Tensor, feats: torch.Tensor, routing: str, flag: bool):
    """routing.md §4 written out: (output, [W_d, b_d] as fresh leaves, the tuner's [W_d, b_d])."""
    down, up = layer.bottleneck_adapter_down["default"], layer.bottleneck_adapter_up["default"]
    w, b = down.weight.detach().clone().requires_grad_(), down.bias.detach().clone().requires_grad_()
    visual = feats.mean(1, keepdim=True) @ (w if flag else w.detach()).T + (b if flag else b.detach())
    y = layer.base_layer(x).detach()
    return y + up(ACT2FN["gelu"](route(y @ w.T + b, visual, routing))), [w, b], [down.weight, down.bias]


def _routed_lora_reference(layer: nn.Module, x: torch.Tensor, feats: torch.Tensor, routing: str, flag: bool):
    """routing.md §3 written out (s = alpha / r = 2): (output, [A, B] as fresh leaves, the tuner's [A, B])."""
    lora_a, lora_b = layer.routed_lora_A["default"], layer.routed_lora_B["default"]
    a, b_up = lora_a.weight.detach().clone().requires_grad_(), lora_b.weight.detach().clone().requires_grad_()
    visual = feats.mean(1, keepdim=True) @ (a if flag else a.detach()).T
    output = layer.base_layer(x).detach() + route(x @ a.T, visual, routing) @ b_up.T * (6 / 3)
    return output, [a, b_up], [lora_a.weight, lora_b.weight]


@pytest.mark.parametrize("routing", ROUTING_KINDS)
@pytest.mark.parametrize("flag", [True, False])
@pytest.mark.parametrize(("build", "reference"), [(_adapter, _adapter_reference),
                                                  (_routed_lora, _routed_lora_reference)], ids=["adapter", "lora"])
def test_gradients_match_the_formula(build, reference, routing, flag):
    """The shared down-projection's gradient (and the up-projection's and x_R's) equals the formula's, where
    ``flag=False`` detaches the down-projection in the visual term only."""
    model = build(flag, routing)
    x, image = _inputs()
    layer = model.base_model.model.proj
    feats = image.detach().clone().requires_grad_()
    expected, leaves, params = reference(layer, x, feats, routing, flag)
    model(x, image).square().sum().backward()
    expected.square().sum().backward()
    for actual, wanted in zip([*params, image], [*leaves, feats], strict=True):
        torch.testing.assert_close(actual.grad, wanted.grad)


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
