"""Bottleneck adapter math, placements (Houlsby / Pfeiffer / parallel), quirks Q6/Q8, merging and validation."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.activations import ACT2FN

from vlpeft import AdapterConfig
from vlpeft.functional import route
from vlpeft.testing import build_tiny_model

D = 8


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vis = nn.Identity()
        self.proj = nn.Linear(6, D)

    def forward(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        if image is not None:
            self.vis(image)
        return self.proj(x)


def toy(config: AdapterConfig, seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(Toy(), config)


def toy_config(**kwargs) -> AdapterConfig:
    defaults = dict(target_modules=["proj"], adapter_size=3, up_init="normal", init_std=0.3, visual_feature_module="vis")
    return AdapterConfig(**{**defaults, **kwargs})


@pytest.mark.parametrize("routing", ["mul", "add", "matmul", "matmul_expand"])
@pytest.mark.parametrize("nonlinearity", ["relu", "gelu_new", "tanh"])
def test_routed_adapter_formula_routing_before_nonlinearity(routing, nonlinearity):
    model = toy(toy_config(routing=routing, nonlinearity=nonlinearity))
    generator = torch.Generator().manual_seed(0)
    x, image = torch.randn(2, 5, 6, generator=generator), torch.randn(2, 4, D, generator=generator)
    layer = model.base_model.model.proj
    down, up = layer.bottleneck_adapter_down["default"], layer.bottleneck_adapter_up["default"]
    y = layer.base_layer(x)
    visual = down(image.mean(1, keepdim=True))  # shared down-projection, bias included
    expected = y + up(ACT2FN[nonlinearity](route(down(y), visual, routing)))
    torch.testing.assert_close(model(x, image), expected)


def test_no_residual_quirk_q6_returns_adapter_output_only():
    model = toy(toy_config(residual=False))
    x = torch.randn(2, 5, 6)
    layer = model.base_model.model.proj
    y = layer.base_layer(x)
    expected = layer.bottleneck_adapter_up["default"](torch.nn.functional.gelu(layer.bottleneck_adapter_down["default"](y)))
    torch.testing.assert_close(model(x), expected)


def test_zero_up_init_leaves_model_unchanged_at_step_zero():
    tiny = build_tiny_model("blip_caption", seed=1, num_hidden_layers=1)
    base = copy.deepcopy(tiny.model).eval()
    for style in ("houlsby", "pfeiffer", "parallel"):
        model = get_peft_model(copy.deepcopy(tiny.model), AdapterConfig(style=style, routing="matmul")).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(**tiny.inputs).logits, base(**tiny.inputs).logits)


def test_placements_and_sizes_on_blip_text_decoder():
    tiny = build_tiny_model("blip_caption", seed=1)  # width 32, 2 layers
    prefix = "text_decoder.bert.encoder.layer."
    expected = {
        "houlsby": {f"{prefix}{i}.{p}" for i in (0, 1) for p in ("attention.output.dense", "output.dense")},
        "pfeiffer": {f"{prefix}{i}.output.dense" for i in (0, 1)},
        "parallel": {f"{prefix}{i}.output" for i in (0, 1)},
    }
    for style, names in expected.items():
        model = get_peft_model(copy.deepcopy(tiny.model), AdapterConfig(style=style, reduction_factor=8))
        assert set(model.base_model.targeted_module_names) == names
        # 32 // 8 = 4: down (32*4 + 4) + up (4*32 + 32) per adapter.
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == len(names) * (132 + 160)
    with_cross = get_peft_model(copy.deepcopy(tiny.model), AdapterConfig(positions=["self_attn", "cross_attn", "ffn"]))
    assert len(with_cross.base_model.targeted_module_names) == 6


def test_parallel_bert_output_block_adds_adapter_of_ffn_input_before_layernorm():
    tiny = build_tiny_model("vit_roberta", seed=1, num_hidden_layers=1)
    model = get_peft_model(copy.deepcopy(tiny.model), AdapterConfig(style="parallel", adapter_size=4, up_init="normal"))
    wrapper = model.base_model.model.text_model.encoder.layer[0].output
    assert wrapper.block_style == "bert_output"
    block = wrapper.base_layer
    h, attention_output = torch.randn(2, 5, 37), torch.randn(2, 5, 32)
    z = wrapper.adapter_output(attention_output, "default")
    expected = block.LayerNorm(block.dense(h) + z + attention_output)
    torch.testing.assert_close(wrapper(h, attention_output), expected)


def test_parallel_mlp_block_on_gpt2():
    tiny = build_tiny_model("vit_gpt2", seed=1, num_hidden_layers=1)
    model = get_peft_model(copy.deepcopy(tiny.model), AdapterConfig(style="parallel", adapter_size=4, up_init="normal"))
    wrapper = model.base_model.model.text_model.transformer.h[0].mlp
    assert wrapper.block_style == "mlp"
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(wrapper(x), wrapper.base_layer(x) + wrapper.adapter_output(x, "default"))


def test_share_block_adapter_quirk_q8_one_adapter_per_gpt2_block(tmp_path):
    tiny = build_tiny_model("vit_gpt2", seed=1)
    shared_config = AdapterConfig(style="houlsby", adapter_size=4, up_init="normal", share_block_adapter=True)
    model = get_peft_model(copy.deepcopy(tiny.model), shared_config)
    separate = get_peft_model(copy.deepcopy(tiny.model), AdapterConfig(style="houlsby", adapter_size=4))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(separate) == 2 * count(model)
    block = model.base_model.model.text_model.transformer.h[0]
    assert block.attn.c_proj.bottleneck_adapter_down["default"] is block.mlp.c_proj.bottleneck_adapter_down["default"]
    model.eval()
    with torch.no_grad():
        expected = model(**tiny.inputs).logits
    model.save_pretrained(tmp_path)
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny.model), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**tiny.inputs).logits, expected)


def test_merge_raises_and_unload_restores_blocks():
    tiny = build_tiny_model("vit_roberta", seed=1, num_hidden_layers=1)
    model = get_peft_model(copy.deepcopy(tiny.model), AdapterConfig(style="parallel"))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    unloaded = model.unload()
    assert type(unloaded.text_model.encoder.layer[0].output).__name__ == "RobertaOutput"


def test_parallel_not_available_without_ffn_block():
    tiny = build_tiny_model("blip2", seed=1, num_hidden_layers=1)
    with pytest.raises(ValueError, match="parallel"):
        get_peft_model(copy.deepcopy(tiny.model), AdapterConfig(style="parallel"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"style": "serial"}, "style="),
        ({"nonlinearity": "swish"}, "nonlinearity="),
        ({"up_init": "ones"}, "up_init="),
        ({"adapter_size": 4, "reduction_factor": 2}, "not both"),
        ({"adapter_size": 0}, "adapter_size"),
        ({"style": "parallel", "positions": ["self_attn"]}, "FFN block only"),
        ({"style": "parallel", "residual": False}, "always additive"),
        ({"routing": "add", "pooling": "none"}, "needs one visual vector"),
        ({"positions": ["mlp"]}, "positions"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**kwargs)
