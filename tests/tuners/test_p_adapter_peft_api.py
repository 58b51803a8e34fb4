"""p-adapter through PEFT's API: several adapters, merging errors, attention capture, training helpers."""

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vlpeft._transformers_compat import enable_activation_checkpointing
from vlpeft.glue.attention import PADAPTER_ATTENTION, MissingAttentionError
from vlpeft.testing import build_tiny_model
from vlpeft.tuners.p_adapter import PAdapterAttention, PAdapterConfig, PAdapterMergeError
from vlpeft.tuners.p_adapter import variants as padapter_variants
from vlpeft.tuners.param_groups import build_param_groups, split_decay_parameters


@pytest.fixture(autouse=True)
def _seed_torch():
    """Adapter initialisation draws from the global RNG: make every test independent of test order."""
    torch.manual_seed(0)


def _tiny(family="llava", seed=0):
    tiny = build_tiny_model(family, seed=seed)
    tiny.model.eval()
    return tiny


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_two_adapters_load_set_and_delete(tmp_path):
    first_config = PAdapterConfig(variant="paper", p_init=1.25)
    second_config = PAdapterConfig(variant="release", p_init=1.75, towers=["vision"])
    tiny = _tiny()
    first = peft.get_peft_model(tiny.model, first_config)
    first.save_pretrained(tmp_path / "first")
    first_logits = _logits(first, tiny.inputs)

    other = _tiny()
    second = peft.get_peft_model(other.model, second_config)
    second.save_pretrained(tmp_path / "second")
    second_logits = _logits(second, other.inputs)
    assert not torch.allclose(first_logits, second_logits)

    model = peft.PeftModel.from_pretrained(_tiny().model, tmp_path / "first")
    model.load_adapter(tmp_path / "second", adapter_name="second")
    assert torch.equal(_logits(model, tiny.inputs), first_logits)
    model.set_adapter("second")
    assert torch.equal(_logits(model, tiny.inputs), second_logits)
    base = model.get_base_model()
    # only the towers where the active adapter lives use captured attention; the others keep sdpa
    assert base.config.vision_config._attn_implementation == PADAPTER_ATTENTION
    assert base.config.text_config._attn_implementation == "sdpa"
    model.set_adapter("default")
    assert base.config.vision_config._attn_implementation == "sdpa"
    assert base.config.text_config._attn_implementation == PADAPTER_ATTENTION
    assert torch.equal(_logits(model, tiny.inputs), first_logits)
    model.delete_adapter("second")
    assert base.config.vision_config._attn_implementation == "sdpa"
    assert torch.equal(_logits(model, tiny.inputs), first_logits)


def test_merging_raises_a_clear_error():
    model = peft.get_peft_model(_tiny().model, PAdapterConfig())
    with pytest.raises(PAdapterMergeError, match="attention graph"):
        model.merge_and_unload()
    with pytest.raises(PAdapterMergeError, match="cannot be merged"):
        model.merge_adapter()
    block = next(m for m in model.modules() if isinstance(m, PAdapterAttention))
    with pytest.raises(PAdapterMergeError):
        block.merge()


def test_fused_attention_without_weights_raises():
    tiny = _tiny()
    model = peft.get_peft_model(tiny.model, PAdapterConfig())
    model.get_base_model().set_attn_implementation({"text_config": "sdpa"})
    with pytest.raises(MissingAttentionError, match="sdpa"):
        model(**tiny.inputs)


def test_padapter_attention_function_equals_eager_without_capture():
    """The registered function (with its mask builder) reproduces eager attention when nothing is adapted."""
    tiny = _tiny()
    tiny.model.set_attn_implementation("eager")
    eager = _logits(tiny.model, tiny.inputs)
    tiny.model.set_attn_implementation(PADAPTER_ATTENTION)
    assert torch.equal(_logits(tiny.model, tiny.inputs), eager)


def test_modules_to_save_are_trained_and_saved(tmp_path):
    tiny = _tiny()
    model = peft.get_peft_model(tiny.model, PAdapterConfig(modules_to_save=["lm_head"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n in trainable)
    model.train()
    model(**tiny.inputs).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()
    expected = _logits(model, tiny.inputs)
    model.save_pretrained(tmp_path)
    assert any("lm_head" in key for key in load_file(tmp_path / "adapter_model.safetensors"))
    reloaded = peft.PeftModel.from_pretrained(_tiny().model, tmp_path)
    assert torch.equal(_logits(reloaded, tiny.inputs), expected)


def test_p_stays_inside_its_bounds():
    tiny = _tiny()
    model = peft.get_peft_model(tiny.model, PAdapterConfig(p_bounds=(1.1, 1.9), p_init=1.5))
    blocks = [m for m in model.modules() if isinstance(m, PAdapterAttention)]
    for sign, block in zip((1.0, -1.0), blocks, strict=False):
        with torch.no_grad():
            block.padapter_p["default"].weight.fill_(sign * 60.0)
    for block in blocks:
        p = float(block.p_value("default").detach())
        assert 1.1 <= p <= 1.9
    assert torch.isfinite(model(**tiny.inputs).loss)
    assert model.base_model.p_values()  # one p per adapted attention block


@pytest.mark.parametrize("family", ["blip_caption", "llava"])
@pytest.mark.parametrize("variant", ["paper", "release"])
def test_gradient_checkpointing_gives_the_same_gradients(family, variant):
    tiny = _tiny(family)
    model = peft.get_peft_model(tiny.model, PAdapterConfig(variant=variant))
    model.train()
    model(**tiny.inputs).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    enable_activation_checkpointing(model.get_base_model())
    model(**tiny.inputs).loss.backward()
    for name, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-7)


@pytest.fixture
def block_dtypes(monkeypatch):
    """The (x_q, x_kv, attn) dtypes of every p-Laplacian block call the p-adapter layers make, as they happen."""
    seen = []
    original = padapter_variants.p_laplacian_aggregate

    def recording(x_q, x_kv, attn, *args, **kwargs):
        seen.append((x_q.dtype, x_kv.dtype, attn.dtype))
        return original(x_q, x_kv, attn, *args, **kwargs)

    monkeypatch.setattr(padapter_variants, "p_laplacian_aggregate", recording)
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["paper", "release"])
def test_autocast_computes_the_block_in_float32(dtype, variant, block_dtypes):
    seen = block_dtypes
    tiny = _tiny("blip_caption")
    model = peft.get_peft_model(tiny.model, PAdapterConfig(variant=variant))
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        output = model(**tiny.inputs)
    assert torch.isfinite(output.logits).all() and torch.isfinite(output.loss)
    output.loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert torch.isfinite(parameter.grad).all(), name
    assert seen and all(dtypes == (torch.float32,) * 3 for dtypes in seen)


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_float64_model_computes_the_block_in_float64(variant, block_dtypes):
    """float32 is the floor for half precision, not a cast for float64 models (gradient checks on whole models)."""
    seen = block_dtypes
    tiny = _tiny("blip_caption")
    model = peft.get_peft_model(tiny.model.double(), PAdapterConfig(variant=variant)).train()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in tiny.inputs.items()}
    output = model(**inputs)
    output.loss.backward()
    assert output.logits.dtype == torch.float64
    assert seen and all(dtypes == (torch.float64,) * 3 for dtypes in seen)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


def test_param_groups_exclude_p_mu_biases_and_norms():
    model = peft.get_peft_model(_tiny().model, PAdapterConfig(variant="release"))
    decay, no_decay = split_decay_parameters(model)
    assert decay and no_decay
    assert all(".padapter_p." in n or ".padapter_mu." in n or n.endswith(".bias") for n in no_decay)
    assert any(".padapter_p." in n for n in no_decay) and any(".padapter_mu." in n for n in no_decay)
    assert all(n.endswith(".weight") and "padapter_p" not in n and "padapter_mu" not in n for n in decay)
    faithful_decay, _ = split_decay_parameters(model, decay_adapter_scalars=True)
    assert any(".padapter_p." in n for n in faithful_decay)

    groups = build_param_groups(model, weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_param_groups_on_a_plain_module():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
    decay, no_decay = split_decay_parameters(net)
    assert decay == ["0.weight", "2.weight"]
    assert no_decay == ["0.bias", "1.weight", "1.bias"]
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_param_groups(net, 0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        build_param_groups(net, -1.0)
