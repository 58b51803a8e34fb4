"""Qwen2.5-VL twin (``Qwen/Qwen2.5-VL-3B-Instruct``): Qwen2-VL's dynamic resolution and M-RoPE plus windowed vision
attention (windows of 2x2 merged patches, the last vision block attending over the whole image, as every eighth
block does in the real tower), SwiGLU vision MLP, grouped-query Qwen2 LM with tied embeddings, ChatML turns.

The processor is ``Qwen2_5_VLProcessor`` without its video slot (its video processor class needs torchvision):
:class:`Qwen2_5_VLImageOnlyProcessor` passes ``None`` for it and declares only the image processor and tokenizer
(:class:`~vlpeft.models.tiny.twins.base.ImageOnlyProcessorMixin`).
"""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from vlpeft.models.tiny.twins._qwen import IMAGE_SIZES, QWEN2_TEXT, qwen_config, qwen_processor
from vlpeft.models.tiny.twins.base import ImageOnlyProcessorMixin, TwinSpec
from vlpeft.models.tiny.twins.sizes import TINY_TEXT, TINY_VISION

#: Vision attention window side in pixels: 16 // PATCH // MERGE = 2 merged patches (the real 112 gives 4), so a
#: 32x32 image (4x4 merged patches) is split into 2x2 windows.
WINDOW_SIZE = 16


class Qwen2_5_VLImageOnlyProcessor(ImageOnlyProcessorMixin, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images and text only (no video processor, so no torchvision)."""


def build_config() -> Qwen2_5_VLConfig:
    depth = TINY_VISION["num_hidden_layers"]
    vision = {
        **TINY_VISION, "hidden_act": "silu", "out_hidden_size": TINY_TEXT["hidden_size"],
        "window_size": WINDOW_SIZE, "fullatt_block_indexes": [depth - 1], "tokens_per_second": 2,
    }
    return qwen_config(Qwen2_5_VLConfig, vision=vision, text=QWEN2_TEXT, rope_theta=1_000_000.0)


def build_processor() -> Qwen2_5_VLImageOnlyProcessor:
    return qwen_processor(Qwen2_5_VLImageOnlyProcessor)


SPEC = TwinSpec(
    name="qwen2_5_vl",
    hub_name="Qwen/Qwen2.5-VL-3B-Instruct",
    build_config=build_config,
    model_class=Qwen2_5_VLForConditionalGeneration,
    build_processor=build_processor,
    image_sizes=IMAGE_SIZES,
)
