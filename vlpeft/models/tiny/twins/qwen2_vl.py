"""Qwen2-VL twin (``Qwen/Qwen2-VL-2B-Instruct``): dynamic resolution (``image_grid_thw``, 2x2 patch merge, 2-frame
temporal patches), M-RoPE over (t, h, w) positions from the processor's ``mm_token_type_ids``, grouped-query Qwen2 LM
with tied embeddings, ChatML turns and ``<|vision_start|><|image_pad|><|vision_end|>`` placeholders.

The processor is ``Qwen2VLProcessor`` without its video slot (its video processor class needs torchvision):
:class:`Qwen2VLImageOnlyProcessor` passes ``None`` for it and declares only the image processor and tokenizer
(:class:`~vlpeft.models.tiny.twins.base.ImageOnlyProcessorMixin`).
"""

from __future__ import annotations

from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

from vlpeft.models.tiny.twins._qwen import IMAGE_SIZES, QWEN2_TEXT, qwen_config, qwen_processor
from vlpeft.models.tiny.twins.base import ImageOnlyProcessorMixin, TwinSpec
from vlpeft.models.tiny.twins.sizes import TINY_TEXT, TINY_VISION


class Qwen2VLImageOnlyProcessor(ImageOnlyProcessorMixin, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images and text only (no video processor, so no torchvision)."""


def build_config() -> Qwen2VLConfig:
    vision = {
        "depth": TINY_VISION["num_hidden_layers"], "embed_dim": TINY_VISION["hidden_size"],
        "num_heads": TINY_VISION["num_attention_heads"], "mlp_ratio": 2, "hidden_size": TINY_TEXT["hidden_size"],
    }
    return qwen_config(Qwen2VLConfig, vision=vision, text=QWEN2_TEXT, rope_theta=1_000_000.0)


def build_processor() -> Qwen2VLImageOnlyProcessor:
    return qwen_processor(Qwen2VLImageOnlyProcessor)


SPEC = TwinSpec(
    name="qwen2_vl",
    hub_name="Qwen/Qwen2-VL-2B-Instruct",
    build_config=build_config,
    model_class=Qwen2VLForConditionalGeneration,
    build_processor=build_processor,
    image_sizes=IMAGE_SIZES,
)
