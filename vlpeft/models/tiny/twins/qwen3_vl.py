"""Qwen3-VL twin (``Qwen/Qwen3-VL-2B-Instruct``): dynamic resolution (``image_grid_thw``, 2x2 merge), interleaved
M-RoPE, learned vision position embeddings resampled to each grid, DeepStack (features of two inner vision blocks
added to the image tokens' hidden states after LM layers 0 and 1), grouped-query Qwen3 LM (q/k norms, tied
embeddings), ChatML turns.

The processor is ``Qwen3VLProcessor`` without its video slot (its video processor class needs torchvision):
:class:`Qwen3VLImageOnlyProcessor` passes ``None`` for it and declares only the image processor and tokenizer
(:class:`~vlpeft.models.tiny.twins.base.ImageOnlyProcessorMixin`).
"""

from __future__ import annotations

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from vlpeft.models.tiny.twins._qwen import IMAGE_SIZES, qwen_config, qwen_processor
from vlpeft.models.tiny.twins.base import ImageOnlyProcessorMixin, TwinSpec
from vlpeft.models.tiny.twins.sizes import TINY_TEXT, TINY_VISION

#: Vision blocks whose outputs feed DeepStack (the real 24-block tower uses blocks 5, 11 and 17, each feeding one of
#: the first LM layers); the last block feeds the main merger.
DEEPSTACK_INDEXES = [0, 1]
VISION_DEPTH = 3


class Qwen3VLImageOnlyProcessor(ImageOnlyProcessorMixin, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` for images and text only (no video processor, so no torchvision)."""


def build_config() -> Qwen3VLConfig:
    vision = {
        **TINY_VISION, "num_hidden_layers": VISION_DEPTH, "hidden_act": "gelu_pytorch_tanh",
        "out_hidden_size": TINY_TEXT["hidden_size"], "num_position_embeddings": 8 * 8,
        "deepstack_visual_indexes": DEEPSTACK_INDEXES,
    }
    return qwen_config(Qwen3VLConfig, vision=vision, text=TINY_TEXT, rope_theta=5_000_000.0, interleaved=True)


def build_processor() -> Qwen3VLImageOnlyProcessor:
    return qwen_processor(Qwen3VLImageOnlyProcessor, mean_std=0.5)


SPEC = TwinSpec(
    name="qwen3_vl",
    hub_name="Qwen/Qwen3-VL-2B-Instruct",
    build_config=build_config,
    model_class=Qwen3VLForConditionalGeneration,
    build_processor=build_processor,
    image_sizes=IMAGE_SIZES,
)
