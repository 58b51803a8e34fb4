"""Qwen2-VL twin (``Qwen/Qwen2-VL-2B-Instruct``): dynamic resolution (``image_grid_thw``, 2x2 patch merge, 2-frame
temporal patches), M-RoPE over (t, h, w) positions from the processor's ``mm_token_type_ids``, grouped-query Qwen2 LM
with tied embeddings, ChatML turns and ``<|vision_start|><|image_pad|><|vision_end|>`` placeholders.

The processor is ``Qwen2VLProcessor`` without its video slot (its video processor class needs torchvision):
:class:`Qwen2VLImageOnlyProcessor` passes ``None`` for it and declares only the image processor and tokenizer.
"""

from __future__ import annotations

from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from vlpeft.testing.twins._qwen import (
    IMAGE_SIZES,
    MERGE,
    MROPE_SECTION,
    PATCH,
    TEMPORAL_PATCH,
    TOKEN_IDS,
    VISION_TOKEN_IDS,
    build_image_processor,
    build_tokenizer,
)
from vlpeft.testing.twins.base import TwinSpec
from vlpeft.testing.twins.sizes import TINY_TEXT, TINY_VISION


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images and text only (no video processor, so no torchvision)."""

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, tokenizer: PreTrainedTokenizerFast,
                 chat_template: str | None = None) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


def build_config() -> Qwen2VLConfig:
    text = {key: value for key, value in TINY_TEXT.items() if key != "head_dim"}  # hidden_size / heads = 8
    return Qwen2VLConfig(
        vision_config={
            "depth": TINY_VISION["num_hidden_layers"], "embed_dim": TINY_VISION["hidden_size"],
            "num_heads": TINY_VISION["num_attention_heads"], "mlp_ratio": 2, "hidden_size": TINY_TEXT["hidden_size"],
            "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL_PATCH,
        },
        text_config={
            **text, **TOKEN_IDS, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": MROPE_SECTION},
        },
        **VISION_TOKEN_IDS,
        tie_word_embeddings=True,
    )


def build_processor() -> Qwen2VLImageOnlyProcessor:
    tokenizer = build_tokenizer()
    return Qwen2VLImageOnlyProcessor(build_image_processor(), tokenizer, chat_template=tokenizer.chat_template)


SPEC = TwinSpec(
    name="qwen2_vl",
    hub_name="Qwen/Qwen2-VL-2B-Instruct",
    build_config=build_config,
    model_class=Qwen2VLForConditionalGeneration,
    build_processor=build_processor,
    image_sizes=IMAGE_SIZES,
)
