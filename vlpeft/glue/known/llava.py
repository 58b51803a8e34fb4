"""LLaVA-1.5 and PaliGemma (the routing paper's LLaVA and its SigLIP + Gemma sibling).

Their structure is derivable; they stay written out so that their x_R keeps being the projector output (PaliGemma
scales image features by 1/sqrt(d) before they enter the language model's embeddings, so the placeholder rows
differ from the projector output) and so that their names are known before any model is loaded.
"""

from __future__ import annotations

from vlpeft.glue.description import ModelFamily, Tower
from vlpeft.glue.known.layouts import LAYER_LAYOUTS


def projector_vlm(name: str, class_name: str, image_token_id: int | None = None) -> ModelFamily:
    """A CLIP/SigLIP tower, a multi-modal projector (x_R) and a Llama/Gemma-style language model."""
    return ModelFamily(
        name=name,
        class_names=(class_name,),
        towers=(
            Tower("vision", "model.vision_tower.", LAYER_LAYOUTS["clip_vision"], "vision_config", "vision"),
            Tower("language_model", "model.language_model.", LAYER_LAYOUTS["llama"], "text_config", "text"),
        ),
        language_towers=("language_model",),
        visual_feature_module="model.multi_modal_projector",
        visual_feature_output="tensor",
        image_token_id=image_token_id,
    )


FAMILIES = (
    projector_vlm("llava", "LlavaForConditionalGeneration"),
    projector_vlm("paligemma", "PaliGemmaForConditionalGeneration"),
)
