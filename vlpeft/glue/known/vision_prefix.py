"""Model families of vlpeft's own vision-prefix composite (``vlpeft.models``), written out (its own model classes).

- ``vit_prefix_encoder``: :class:`~vlpeft.models.VisionPrefixLMForClassification` (ViT + BERT/RoBERTa);
- ``vit_prefix_decoder``: :class:`~vlpeft.models.VisionPrefixLMForCausalLM` (ViT + GPT-2).

Their visual features x_R are the output of ``prefix_projector`` (batch, m, d_text), which the composite runs on
every forward (and at every generation step, on beam-expanded features).
"""

from __future__ import annotations

from vlpeft.glue.description import ModelFamily, Tower
from vlpeft.glue.known.layouts import LAYER_LAYOUTS

_VISION = Tower("vision", "vision_model.", LAYER_LAYOUTS["vit"], "vision_config", "vision")

VIT_PREFIX_ENCODER = ModelFamily(
    name="vit_prefix_encoder",
    class_names=("VisionPrefixLMForClassification",),
    towers=(_VISION, Tower("text", "text_model.", LAYER_LAYOUTS["bert"], "text_config", "text")),
    language_towers=("text",),
    visual_feature_module="prefix_projector",
    visual_feature_output="tensor",
)

VIT_PREFIX_DECODER = ModelFamily(
    name="vit_prefix_decoder",
    class_names=("VisionPrefixLMForCausalLM",),
    towers=(_VISION, Tower("text", "text_model.transformer.", LAYER_LAYOUTS["gpt2"], "text_config", "text")),
    language_towers=("text",),
    visual_feature_module="prefix_projector",
    visual_feature_output="tensor",
)

FAMILIES = (VIT_PREFIX_ENCODER, VIT_PREFIX_DECODER)
