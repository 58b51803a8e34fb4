"""Model descriptions derived from the model's structure (vlpeft.glue.derive)."""

from __future__ import annotations

import re

import pytest
from torch import nn

from vlpeft.glue.derive import DescriptionError, derive_family
from vlpeft.glue.families import detect_family, get_family
from vlpeft.testing import build_tiny_model
from vlpeft.testing.twins import build_twin

PARTS = {"self_attn": ("block", "query", "value", "attn_output"), "ffn": ("block", "ffn_input", "ffn_output")}


def _hits(family, model, tower, position, part) -> list[str]:
    regex = family.module_regex(tower, [position], part)
    return [name for name, _ in model.named_modules() if re.fullmatch(regex, name)]


@pytest.mark.parametrize("name", ["llava", "paligemma"])
def test_derived_description_of_todays_families_matches_the_written_out_one(name: str) -> None:
    model = build_tiny_model(name).model
    derived, written = derive_family(model), get_family(name)
    assert derived.derived and not written.derived
    for tower in ("language_model", "vision"):
        for position, parts in PARTS.items():
            for part in parts:
                assert _hits(derived, model, tower, position, part) == _hits(written, model, tower, position, part)


def test_mllama_description_has_self_and_cross_attention_layers() -> None:
    twin = build_twin("mllama")
    family = detect_family(twin.model)
    cross = _hits(family, twin.model, "language_model", "cross_attn", "block")
    self_attn = _hits(family, twin.model, "language_model", "self_attn", "block")
    layers = twin.model.config.text_config.num_hidden_layers
    cross_layers = twin.model.config.text_config.cross_attention_layers
    assert cross == [f"model.language_model.layers.{i}.cross_attn" for i in cross_layers]
    assert len(self_attn) == layers - len(cross_layers)
    assert family.visual_feature_output == "cross_attention_states"
    assert {t.modality for t in family.towers} == {"text", "vision"}


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(4, 4) for _ in range(4))


class _Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_proj, self.out_proj = nn.Linear(4, 8), nn.Linear(8, 4)


class _Layer(nn.Module):
    def __init__(self, attention: bool) -> None:
        super().__init__()
        self.mixer = _Attention() if attention else _Mixer()
        self.mlp = nn.Sequential()
        self.mlp.up_proj, self.mlp.down_proj = nn.Linear(4, 8), nn.Linear(8, 4)


class _Hybrid(nn.Module):
    """A language model whose layers alternate attention and state-space mixers, under the same name."""

    def __init__(self) -> None:
        super().__init__()
        self.language_model = nn.Module()
        self.language_model.layers = nn.ModuleList(_Layer(attention=i % 2 == 1) for i in range(4))

    def get_decoder(self) -> nn.Module:
        return self.language_model


def test_hybrid_stacks_are_restricted_to_their_attention_layers() -> None:
    model = _Hybrid()
    family = derive_family(model)
    assert _hits(family, model, "language_model", "self_attn", "query") == [
        "language_model.layers.1.mixer.q_proj", "language_model.layers.3.mixer.q_proj"]
    assert family.tower("language_model").layer.ffn_input == "mlp.up_proj"
    assert family.visual_feature_module == ""  # no image token, no projector: routing refuses at attach time


def test_models_without_attention_stacks_are_refused_with_the_reason() -> None:
    with pytest.raises(DescriptionError, match="found no stack of layers"):
        derive_family(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="Unknown model family for model class 'Linear'"):
        detect_family(nn.Linear(2, 2))


@pytest.mark.parametrize("source", ["blip_caption", "blip_vqa", "blip2", "llava", "paligemma", "qwen2_vl",
                                    "gemma3", "mllama", "idefics3"])
def test_p_adapter_block_specs_from_the_description_match_the_blocks_structure(source: str) -> None:
    from vlpeft.glue.attention_blocks import describe_attention_block, spec_from_layout
    from vlpeft.testing.twins import TWINS

    model = build_twin(source).model if source in TWINS else build_tiny_model(source).model
    family = detect_family(model)
    checked = 0
    for name, module in model.named_modules():
        located = family.locate_block(name)
        if located is None or located[1] == "ffn":
            continue
        tower, position = located
        from_layout = spec_from_layout(tower.layer, position == "cross_attn", module, name)
        assert from_layout == describe_attention_block(module, name), name
        checked += 1
    assert checked >= 2
