"""p-adapter on tiny BLIP (captioning, VQA), BLIP-2, LLaVA and PaliGemma models, both variants.

For every family and variant: forward/backward with gradients on every adapter parameter (and nowhere else),
frozen weights bit-identical after an optimizer step, disable/unload restore the base outputs exactly,
save/load round trip, and KV-cached generation (greedy and beam) equal to cache-free generation.
"""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from vlpeft.testing import IMAGE_TOKEN_ID, build_tiny_model
from vlpeft.tuners.p_adapter import PAdapterConfig
from vlpeft.tuners.param_groups import build_param_groups


@pytest.fixture(autouse=True)
def _seed_torch():
    """Adapter initialisation draws from the global RNG: make every test independent of test order."""
    torch.manual_seed(0)

FAMILIES = ["blip_caption", "blip_vqa", "blip2", "llava", "paligemma"]
CASES = [(family, variant) for family in FAMILIES for variant in ("paper", "release")]


def _tiny(family, seed=0):
    tiny = build_tiny_model(family, seed=seed)
    if family == "blip2":
        # The tiny config initialises the Q-Former query tokens to zeros, which makes every query identical
        # and the first Q-Former self-attention degenerate (zero adapter gradients). Use distinct tokens.
        with torch.no_grad():
            tiny.model.query_tokens.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    tiny.model.eval()
    return tiny


def _config(variant):
    # Release: pooled cross-attention keys (17 image tokens -> 3 nodes); paper: all keys.
    if variant == "release":
        return PAdapterConfig(variant="release", p_init=1.25, key_pool_size=3)
    return PAdapterConfig(variant="paper", p_init=1.5)


def _tensors(output):
    return {key: value for key, value in output.items() if isinstance(value, torch.Tensor)}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _run(model, inputs):
    with torch.no_grad():
        return _tensors(model(**inputs))


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_forward_backward_reaches_every_adapter_parameter(family, variant):
    tiny = _tiny(family)
    model = peft.get_peft_model(tiny.model, _config(variant))
    model.train()
    loss = model(**tiny.inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("padapter_" in name for name in trainable)
    for name, parameter in trainable.items():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen_with_grad == []


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_training_step_changes_only_adapters(family, variant):
    tiny = _tiny(family)
    model = peft.get_peft_model(tiny.model, _config(variant))
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(build_param_groups(model, weight_decay=0.1), lr=1e-2)
    model(**tiny.inputs).loss.backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        if "padapter_" in name:
            assert not torch.equal(parameter, before[name]), name
        else:
            assert torch.equal(parameter, before[name]), name


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_disable_and_unload_restore_base_outputs(family, variant):
    tiny = _tiny(family)
    base = tiny.model
    implementations = {k: getattr(base.config, k)._attn_implementation for k in base.config.sub_configs}
    expected = _run(base, tiny.inputs)
    model = peft.get_peft_model(base, _config(variant))
    adapted = _run(model, tiny.inputs)
    assert not torch.equal(adapted["loss"], expected["loss"])
    with model.disable_adapter():
        _assert_same(_run(model, tiny.inputs), expected)
    _assert_same(_run(model, tiny.inputs), adapted)
    unloaded = model.unload()
    assert not any("padapter_" in name for name, _ in unloaded.named_parameters())
    assert {k: getattr(unloaded.config, k)._attn_implementation for k in implementations} == implementations
    _assert_same(_run(unloaded, tiny.inputs), expected)


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_save_and_reload_give_identical_outputs(family, variant, tmp_path):
    tiny = _tiny(family)
    model = peft.get_peft_model(tiny.model, _config(variant))
    # Move the adapter away from its initialisation so that reloading is really tested.
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**tiny.inputs).loss.backward()
    optimizer.step()
    model.eval()
    expected = _run(model, tiny.inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all("padapter_" in key and ".default." not in key for key in saved)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PADAPTER"

    fresh = _tiny(family)
    reloaded = peft.PeftModel.from_pretrained(fresh.model, tmp_path)
    reloaded.eval()
    _assert_same(_run(reloaded, fresh.inputs), expected)


def _generate(model, inputs, num_beams, use_cache):
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=4,
            num_beams=num_beams,
            do_sample=False,
            use_cache=use_cache,
            # A generated image placeholder would break cache-free re-encoding of image-token models.
            bad_words_ids=[[IMAGE_TOKEN_ID]],
            output_scores=True,
            return_dict_in_generate=True,
        )


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_generation_with_cache_equals_without(family, variant):
    tiny = _tiny(family)
    model = peft.get_peft_model(tiny.model, _config(variant))
    model.eval()
    inputs = tiny.generation_inputs(batch_size=2, num_padding=1 if tiny.layout == "image_tokens" else 0)
    for num_beams in (1, 2):
        cached = _generate(model, inputs, num_beams, use_cache=True)
        uncached = _generate(model, inputs, num_beams, use_cache=False)
        assert torch.equal(cached.sequences, uncached.sequences), num_beams
        for step_cached, step_uncached in zip(cached.scores, uncached.scores, strict=True):
            torch.testing.assert_close(step_cached, step_uncached, rtol=1e-4, atol=1e-4)
        if num_beams > 1:
            torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=1e-5, atol=1e-5)
