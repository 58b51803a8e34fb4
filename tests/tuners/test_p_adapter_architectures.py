"""p-adapter on further attention layouts: vision towers and explicit targets in GIT, GPT-2, BERT and RoBERTa.

Covers inline attention with fused qkv (BLIP vision), interface attention with fused qkv (BLIP-2 vision),
CLIP and SigLIP towers, inline BERT-style text (GIT), GPT-2 ``Conv1D`` attention with cross-attention, and
BERT/RoBERTa interface attention.
"""

import peft
import pytest
import torch

from vlpeft.testing import build_tiny_model
from vlpeft.tuners.p_adapter import PAdapterAttention, PAdapterConfig, PAdapterFFN


@pytest.fixture(autouse=True)
def _seed_torch():
    """Adapter initialisation draws from the global RNG: make every test independent of test order."""
    torch.manual_seed(0)

CASES = {
    "blip_vision": ("blip_caption", {"towers": ["vision"]}),
    "blip2_vision": ("blip2", {"towers": ["vision"]}),
    "clip_vision": ("llava", {"towers": ["vision"]}),
    "siglip_vision": ("paligemma", {"towers": ["vision"]}),
    "git_text": ("git", {"target_modules": r"git\.encoder\.layer\.\d+\.(attention|output)"}),
    "gpt2_decoder": (
        "vision_encoder_decoder",
        {"target_modules": r"decoder\.transformer\.h\.\d+\.(attn|crossattention|mlp)"},
    ),
    "bert_text": ("vit_bert", {"target_modules": r"text_model\.encoder\.layer\.\d+\.(attention|output)"}),
    "roberta_text": ("vit_roberta", {"target_modules": r"text_model\.encoder\.layer\.\d+\.(attention|output)"}),
}
GENERATIVE = ("git_text", "gpt2_decoder")


def _build(case, variant):
    family, options = CASES[case]
    tiny = build_tiny_model(family, seed=0)
    tiny.model.eval()
    # r = 16: with the default r = 4 a ReLU bottleneck seen only through a pooled CLS token can be all dead.
    pool = 3 if variant == "release" else None
    config = PAdapterConfig(variant=variant, key_pool_size=pool, bottleneck_size=16, **options)
    return tiny, config


@pytest.mark.parametrize("variant", ["paper", "release"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_trains_and_disables_exactly(case, variant):
    tiny, config = _build(case, variant)
    with torch.no_grad():
        expected = tiny.model(**tiny.inputs).loss
    model = peft.get_peft_model(tiny.model, config)
    kinds = {type(m) for m in model.modules() if isinstance(m, PAdapterAttention | PAdapterFFN)}
    assert kinds == {PAdapterAttention, PAdapterFFN}
    model.train()
    loss = model(**tiny.inputs).loss
    loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(**tiny.inputs).loss, expected)
        with model.disable_adapter():
            assert torch.equal(model(**tiny.inputs).loss, expected)


@pytest.mark.parametrize("variant", ["paper", "release"])
@pytest.mark.parametrize("case", GENERATIVE)
def test_layout_generation_with_cache_equals_without(case, variant):
    tiny, config = _build(case, variant)
    model = peft.get_peft_model(tiny.model, config)
    model.eval()
    inputs = tiny.generation_inputs(batch_size=2)
    for num_beams in (1, 2):
        with torch.no_grad():
            runs = [
                model.generate(
                    **inputs,
                    max_new_tokens=4,
                    num_beams=num_beams,
                    do_sample=False,
                    use_cache=use_cache,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
                for use_cache in (True, False)
            ]
        assert torch.equal(runs[0].sequences, runs[1].sequences)
        for cached, uncached in zip(runs[0].scores, runs[1].scores, strict=True):
            torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-4)


def test_inline_attention_with_dropout_in_training_raises():
    tiny = build_tiny_model("blip_caption", seed=0)
    model = peft.get_peft_model(tiny.model, PAdapterConfig(towers=["vision"], positions=["self_attn"]))
    block = model.get_base_model().vision_model.encoder.layers[0].self_attn
    block.base_layer.dropout.p = 0.1
    model.train()
    with pytest.raises(ValueError, match="pre-dropout"):
        model(**tiny.inputs)
    model.eval()
    assert torch.isfinite(model(**tiny.inputs).loss)
