"""BLIP-2: a Q-Former between the vision tower and an OPT language model; x_R is the Q-Former output projected to
the language model's width (``language_projection``), and the Q-Former is a language-side tower of its own."""

from __future__ import annotations

from vlpeft.glue.description import ModelFamily, Tower
from vlpeft.glue.known.layouts import LAYER_LAYOUTS

BLIP2 = ModelFamily(
    name="blip2",
    class_names=("Blip2ForConditionalGeneration",),
    towers=(
        Tower("vision", "vision_model.", LAYER_LAYOUTS["blip2_vision"], "vision_config", "vision"),
        Tower("qformer", "qformer.", LAYER_LAYOUTS["qformer"], "qformer_config", "text"),
        Tower("language_model", "language_model.", LAYER_LAYOUTS["opt"], "text_config", "text"),
    ),
    language_towers=("language_model",),
    visual_feature_module="language_projection",
    visual_feature_output="tensor",
    # p-adapter: the Q-Former's blocks and the language model's self-attention (p-adapter.md §4).
    block_placement=(("qformer", ("self_attn", "cross_attn", "ffn")), ("language_model", ("self_attn",))),
)

FAMILIES = (BLIP2,)
