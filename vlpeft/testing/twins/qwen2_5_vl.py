"""Qwen2.5-VL twin (``Qwen/Qwen2.5-VL-3B-Instruct``): Qwen2-VL's dynamic resolution and M-RoPE plus windowed vision
attention (windows of 2x2 merged patches, the last vision block attending over the whole image, as every eighth
block does in the real tower), SwiGLU vision MLP, grouped-query Qwen2 LM with tied embeddings, ChatML turns.

The processor is ``Qwen2_5_VLProcessor`` without its video slot (its video processor class needs torchvision):
:class:`Qwen2_5_VLImageOnlyProcessor` passes ``None`` for it and declares only the image processor and tokenizer.
"""

from __future__ import annotations

from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
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

#: Vision attention window side in pixels: 16 // PATCH // MERGE = 2 merged patches (the real 112 gives 4), so a
#: 32x32 image (4x4 merged patches) is split into 2x2 windows.
WINDOW_SIZE = 16


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images and text only (no video processor, so no torchvision)."""

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, tokenizer: PreTrainedTokenizerFast,
                 chat_template: str | None = None) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


def build_config() -> Qwen2_5_VLConfig:
    text = {key: value for key, value in TINY_TEXT.items() if key != "head_dim"}  # hidden_size / heads = 8
    depth = TINY_VISION["num_hidden_layers"]
    return Qwen2_5_VLConfig(
        vision_config={
            **TINY_VISION, "hidden_act": "silu", "out_hidden_size": TINY_TEXT["hidden_size"],
            "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL_PATCH,
            "window_size": WINDOW_SIZE, "fullatt_block_indexes": [depth - 1], "tokens_per_second": 2,
        },
        text_config={
            **text, **TOKEN_IDS, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": MROPE_SECTION},
        },
        **VISION_TOKEN_IDS,
        tie_word_embeddings=True,
    )


def build_processor() -> Qwen2_5_VLImageOnlyProcessor:
    tokenizer = build_tokenizer()
    return Qwen2_5_VLImageOnlyProcessor(build_image_processor(), tokenizer, chat_template=tokenizer.chat_template)


SPEC = TwinSpec(
    name="qwen2_5_vl",
    hub_name="Qwen/Qwen2.5-VL-3B-Instruct",
    build_config=build_config,
    model_class=Qwen2_5_VLForConditionalGeneration,
    build_processor=build_processor,
    image_sizes=IMAGE_SIZES,
)
