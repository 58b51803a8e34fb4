"""BLIP captioning and VQA (the p-adapter paper's models): BERT-style text towers with inline attention, written
out because their attention is computed inside the modules (no attention interface to derive it from)."""

from __future__ import annotations

from vlpeft.glue.description import ModelFamily, Tower
from vlpeft.glue.known.layouts import LAYER_LAYOUTS

_VISION = Tower("vision", "vision_model.", LAYER_LAYOUTS["blip_vision"], None, "vision")
_DECODER = Tower("text_decoder", "text_decoder.bert.", LAYER_LAYOUTS["blip_text"], None, "text")

BLIP_CAPTION = ModelFamily(
    name="blip_caption",
    class_names=("BlipForConditionalGeneration",),
    towers=(_VISION, _DECODER),
    language_towers=("text_decoder",),
    visual_feature_module="vision_model",
    visual_feature_output="last_hidden_state",
    pooler_module="vision_model.post_layernorm",
    block_placement=(("text_decoder", ("self_attn", "cross_attn", "ffn")),),  # p-adapter.md §4
)

BLIP_VQA = ModelFamily(
    name="blip_vqa",
    class_names=("BlipForQuestionAnswering",),
    towers=(_VISION, Tower("text_encoder", "text_encoder.", LAYER_LAYOUTS["blip_text"], None, "text"), _DECODER),
    language_towers=("text_encoder", "text_decoder"),
    visual_feature_module="vision_model",
    visual_feature_output="last_hidden_state",
    pooler_module="vision_model.post_layernorm",
    block_placement=(
        ("text_encoder", ("self_attn", "cross_attn", "ffn")),
        ("text_decoder", ("self_attn", "cross_attn", "ffn")),
    ),
)

FAMILIES = (BLIP_CAPTION, BLIP_VQA)
