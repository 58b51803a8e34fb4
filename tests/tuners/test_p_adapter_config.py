"""p-adapter config, presets/target resolution, registration and parameter counts."""

import peft
import peft.mapping
import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration

import vlpeft
from vlpeft.glue.families import get_family
from vlpeft.testing import build_tiny_model
from vlpeft.tuners._peft_registry import VLPeftType
from vlpeft.tuners.p_adapter import (
    PRESETS,
    TASK_DEFAULTS,
    PAdapterAttention,
    PAdapterConfig,
    PAdapterFFN,
    PAdapterModel,
    resolve_targets,
)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Adapter initialisation draws from the global RNG: make every test independent of test order."""
    torch.manual_seed(0)


def test_import_registers_with_peft():
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[VLPeftType.PADAPTER] is PAdapterConfig
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[VLPeftType.PADAPTER] is PAdapterModel
    assert peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING[VLPeftType.PADAPTER] == "padapter_"
    assert vlpeft.PAdapterConfig is PAdapterConfig
    assert PAdapterConfig().peft_type == "PADAPTER"


@pytest.mark.parametrize(
    ("task", "p", "mu0", "k"), [("vqa", 1.25, 0.1, 16), ("snli_ve", 1.5, 10.0, 24), ("caption", 1.75, 0.1, 24)]
)
def test_task_defaults(task, p, mu0, k):
    config = PAdapterConfig.for_task(task, variant="release")
    assert (config.p_init, config.mu0, config.key_pool_size, config.reduction_factor) == (p, mu0, k, 8)
    assert TASK_DEFAULTS[task]["p_init"] == p
    assert config.variant == "release" and config.learnable_mu is True
    assert PAdapterConfig.for_task(task, key_pool_size=4).key_pool_size == 4
    with pytest.raises(ValueError, match="Unknown task"):
        PAdapterConfig.for_task("ocr")


def test_learnable_mu_default_follows_variant():
    assert PAdapterConfig(variant="paper").learnable_mu is False
    assert PAdapterConfig(variant="release").learnable_mu is True
    assert PAdapterConfig(variant="paper", learnable_mu=True).learnable_mu is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "graph"}, "variant"),
        ({"positions": ["attention"]}, "positions"),
        ({"p_init": 2.0}, "strictly inside"),
        ({"p_init": 0.5, "learnable_p": False}, "fixed p"),
        ({"p_bounds": (2.0, 1.0)}, "p_min < p_max"),
        ({"p_init_pattern": {"layer\\.0": 2.5}}, "strictly inside"),
        ({"mu0": 0.0}, "mu0"),
        ({"key_pool_size": 0}, "key_pool_size"),
        ({"self_loop": "keep"}, "self_loop"),
        ({"dropout": 1.0}, "dropout"),
        ({"init_weights": "xavier"}, "init_weights"),
        ({"bottleneck_size": 0}, "bottleneck_size"),
        ({"reduction_factor": 0}, "reduction_factor"),
        ({"p_parametrization": "softplus"}, "p_parametrization"),
        ({"target_modules": ["attention"], "towers": ["text"]}, "either explicit"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PAdapterConfig(**kwargs)


def test_fixed_p_on_bound_and_raw_mode_are_allowed():
    assert PAdapterConfig(p_init=2.0, learnable_p=False).p_init == 2.0
    assert PAdapterConfig(p_init=2.5, p_parametrization="raw").p_init == 2.5


def test_presets_cover_all_families():
    for family, towers in PRESETS.items():
        resolved = resolve_targets(get_family(family), None, None)
        assert resolved, family
        for tower in towers:
            get_family(family).tower(tower)


def test_resolve_targets_blip2_positions_and_errors():
    family = get_family("blip2")
    resolved = resolve_targets(family, None, None)
    assert set(resolved) == {"self_attn", "cross_attn", "ffn"}
    assert "qformer" in resolved["cross_attn"] and "language_model" not in resolved["cross_attn"]
    only_lm = resolve_targets(family, ["language_model"], ["self_attn"])
    assert set(only_lm) == {"self_attn"}
    with pytest.raises(ValueError, match="cross_attn"):
        resolve_targets(family, ["language_model"], ["cross_attn"])
    with pytest.raises(ValueError, match="Unknown tower"):
        resolve_targets(family, ["text_decoder"], None)


def _wrapped(model):
    return {
        name: type(module)
        for name, module in model.named_modules()
        if isinstance(module, PAdapterAttention | PAdapterFFN)
    }


def test_preset_targets_on_tiny_blip_vqa():
    tiny = build_tiny_model("blip_vqa", seed=0)
    model = peft.get_peft_model(tiny.model, PAdapterConfig())
    wrapped = _wrapped(model)
    prefix = "base_model.model."
    for tower in ("text_encoder.encoder", "text_decoder.bert.encoder"):
        for layer in range(2):
            assert wrapped[f"{prefix}{tower}.layer.{layer}.attention"] is PAdapterAttention
            assert wrapped[f"{prefix}{tower}.layer.{layer}.crossattention"] is PAdapterAttention
            assert wrapped[f"{prefix}{tower}.layer.{layer}.output"] is PAdapterFFN
    assert len(wrapped) == 12
    assert not any("vision_model" in name for name in wrapped)
    config = model.peft_config["default"]
    assert config.targets_resolved and config.family == "blip_vqa"


def test_towers_and_positions_narrow_the_preset():
    tiny = build_tiny_model("llava", seed=0)
    config = PAdapterConfig(towers=["vision"], positions=["self_attn"])
    model = peft.get_peft_model(tiny.model, config)
    wrapped = _wrapped(model)
    assert len(wrapped) == 2
    assert all(".vision_tower." in name and name.endswith("self_attn") for name in wrapped)
    # the vision tower now uses the padapter attention function, the language model keeps its own
    base = model.get_base_model()
    assert base.config.vision_config._attn_implementation == "padapter"
    assert base.config.text_config._attn_implementation != "padapter"


def test_explicit_targets():
    tiny = build_tiny_model("llava", seed=0)
    config = PAdapterConfig(target_modules=r".*language_model\.layers\.1\.(self_attn|mlp)")
    wrapped = _wrapped(peft.get_peft_model(tiny.model, config))
    assert sorted(wrapped.values(), key=lambda c: c.__name__) == [PAdapterAttention, PAdapterFFN]


def test_explicit_targets_matching_nothing_raise():
    tiny = build_tiny_model("llava", seed=0)
    with pytest.raises(ValueError, match="not found"):
        peft.get_peft_model(tiny.model, PAdapterConfig(target_modules=["no_such_block"]))


def test_projection_targets_are_rejected():
    tiny = build_tiny_model("llava", seed=0)
    with pytest.raises(ValueError, match="projection"):
        peft.get_peft_model(tiny.model, PAdapterConfig(target_modules=["q_proj"]))


def _blip_base_on_meta():
    with torch.device("meta"):
        return BlipForConditionalGeneration(BlipConfig())


def test_release_parameter_count_blip_base_decoder():
    """p-adapter.md §6: SA + CA + FFN adapters in 12 BLIP-base decoder layers, release variant."""
    model = peft.get_peft_model(_blip_base_on_meta(), PAdapterConfig(variant="release"))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 7_111_344
    layer = model.get_base_model().text_decoder.bert.encoder.layer[0]
    per_module = sum(p.numel() for n, p in layer.attention.named_parameters() if "padapter_" in n)
    assert per_module == 222_146
    assert sum(p.numel() for n, p in layer.output.named_parameters() if "padapter_" in n) == 148_320


def test_paper_parameter_count_blip_base_decoder():
    """`paper`: no W_gate, p learnable, mu fixed: 148,320 + 1 per attention adapter."""
    model = peft.get_peft_model(_blip_base_on_meta(), PAdapterConfig(variant="paper"))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 12 * (2 * (148_320 + 1) + 148_320)


@pytest.mark.parametrize("variant", ["release", "paper"])
def test_key_pool_size_larger_than_the_image_tokens_is_named(variant):
    tiny = build_tiny_model("blip_caption")  # 17 image tokens
    config = PAdapterConfig(variant=variant, positions=["cross_attn"], key_pool_size=24)
    model = peft.get_peft_model(tiny.model, config)
    with pytest.raises(ValueError, match=r"key_pool_size=24 .* n_k=17"):
        model(**tiny.inputs)
