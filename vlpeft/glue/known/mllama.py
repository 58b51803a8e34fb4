"""Llama 3.2 Vision (Mllama): the language model cross-attends to the image instead of reading image tokens.

Its structure is derived (self-attention layers and ``cross_attn`` layers at fixed depths, both through the
attention interface). What detection cannot know: the ``<|image|>`` token is an ordinary text embedding, and the
visual features reach the language model as its ``cross_attention_states`` argument, (batch, images * tiles *
patches, d) per sample.
"""

from __future__ import annotations

from dataclasses import replace

from vlpeft.glue.description import ModelFamily


def refine(family: ModelFamily) -> ModelFamily:
    return replace(family, visual_feature_output="cross_attention_states", image_token_id=None)


REFINEMENTS = {"MllamaForConditionalGeneration": refine}
