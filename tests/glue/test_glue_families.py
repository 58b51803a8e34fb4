"""Family layouts match the real module names of tiny transformers 5 models."""

import re

import pytest
import transformers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForQuestionAnswering,
    LlavaConfig,
    LlavaForConditionalGeneration,
    OPTConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
)

from vlpeft.glue.families import FAMILIES, detect_family, get_family

transformers.logging.set_verbosity_error()

V = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
TXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=64)
LLAMA = dict(TXT, num_key_value_heads=2)


def _models():
    blip = BlipConfig(text_config=dict(TXT, encoder_hidden_size=32), vision_config=V, projection_dim=16,
                      image_text_hidden_size=16)
    return {
        "blip_caption": BlipForConditionalGeneration(blip),
        "blip_vqa": BlipForQuestionAnswering(blip),
        "blip2": Blip2ForConditionalGeneration(Blip2Config(
            vision_config=V, qformer_config=dict(TXT, encoder_hidden_size=32), cross_attention_frequency=1,
            text_config=OPTConfig(vocab_size=99, hidden_size=32, ffn_dim=37, num_hidden_layers=2,
                                  num_attention_heads=4, word_embed_proj_dim=32).to_dict(),
            num_query_tokens=4, image_token_index=3)),
        "llava": LlavaForConditionalGeneration(LlavaConfig(
            vision_config=dict(V, model_type="clip_vision_model"), text_config=dict(LLAMA, model_type="llama"),
            image_token_index=3, vision_feature_layer=-1)),
        "paligemma": PaliGemmaForConditionalGeneration(PaliGemmaConfig(
            vision_config=dict(V, model_type="siglip_vision_model"),
            text_config=dict(LLAMA, model_type="gemma", head_dim=8), image_token_index=3, projection_dim=32)),
    }


MODELS = _models()
PARTS = {
    "self_attn": ["block", "query", "key", "value", "fused_qkv", "attn_output"],
    "cross_attn": ["block", "query", "key", "value", "fused_qkv", "attn_output"],
    "ffn": ["block", "ffn_input", "ffn_output"],
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_layout_part_names_real_modules(name):
    model = MODELS[name]
    family = detect_family(model)
    assert family.name == name
    names = [n for n, _ in model.named_modules()]
    for tower in family.towers:
        layout = tower.layer
        for position, parts in PARTS.items():
            for part in parts:
                try:
                    regex = family.module_regex(tower.name, [position], part)
                except ValueError:
                    continue  # the layout has no such part (e.g. no cross-attention): reported as an error
                hits = [n for n in names if re.fullmatch(regex, n)]
                # one hit per layer (2 layers), except the Q-Former whose tiny config cross-attends in one layer only
                expected = 1 if (name, position) == ("blip2", "cross_attn") and tower.name == "qformer" else 2
                assert len(hits) == expected, (name, tower.name, position, part, regex)
        assert layout.attention_style in ("inline", "interface")
    modules = dict(model.named_modules())
    assert family.visual_feature_module in modules


def test_aliases_and_errors():
    family = get_family("blip_vqa")
    assert [t.name for t in family.resolve_towers("language")] == ["text_encoder", "text_decoder"]
    assert [t.name for t in family.resolve_towers("vision")] == ["vision"]
    assert len(family.resolve_towers("all")) == 3
    with pytest.raises(ValueError, match="Unknown tower 'qformer'"):
        family.resolve_towers("qformer")
    with pytest.raises(ValueError, match="no 'block' at positions \\['cross_attn'\\]"):
        family.module_regex("vision", ["cross_attn"], "block")
    with pytest.raises(ValueError, match="Unknown position"):
        family.module_regex(None, ["mlp"], "block")
    with pytest.raises(ValueError, match="Unknown model family"):
        get_family("flamingo")


def test_detect_family_rejects_unknown_models():
    import torch

    with pytest.raises(ValueError, match="Unknown model family for model class 'Linear'"):
        detect_family(torch.nn.Linear(2, 2))
    assert set(FAMILIES) >= {"blip_caption", "blip_vqa", "blip2", "llava", "paligemma"}
