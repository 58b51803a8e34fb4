"""Qwen3-VL twin (``Qwen/Qwen3-VL-2B-Instruct``): dynamic resolution (``image_grid_thw``, 2x2 merge), interleaved
M-RoPE, learned vision position embeddings resampled to each grid, DeepStack (features of two inner vision blocks
added to the image tokens' hidden states after LM layers 0 and 1), grouped-query Qwen3 LM (q/k norms, tied
embeddings), ChatML turns.

The processor is ``Qwen3VLProcessor`` without its video slot (its video processor class needs torchvision):
:class:`Qwen3VLImageOnlyProcessor` passes ``None`` for it and declares only the image processor and tokenizer.
"""

from __future__ import annotations

from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
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

#: Vision blocks whose outputs feed DeepStack (the real 24-block tower uses blocks 5, 11 and 17, each feeding one of
#: the first LM layers); the last block feeds the main merger.
DEEPSTACK_INDEXES = [0, 1]
VISION_DEPTH = 3


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` for images and text only (no video processor, so no torchvision)."""

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, tokenizer: PreTrainedTokenizerFast,
                 chat_template: str | None = None) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


def build_config() -> Qwen3VLConfig:
    return Qwen3VLConfig(
        vision_config={
            **TINY_VISION, "num_hidden_layers": VISION_DEPTH, "hidden_act": "gelu_pytorch_tanh",
            "out_hidden_size": TINY_TEXT["hidden_size"], "patch_size": PATCH, "spatial_merge_size": MERGE,
            "temporal_patch_size": TEMPORAL_PATCH, "num_position_embeddings": 8 * 8,
            "deepstack_visual_indexes": DEEPSTACK_INDEXES,
        },
        text_config={
            **TINY_TEXT, **TOKEN_IDS, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": MROPE_SECTION,
                                "mrope_interleaved": True},
        },
        **VISION_TOKEN_IDS,
        tie_word_embeddings=True,
    )


def build_processor() -> Qwen3VLImageOnlyProcessor:
    tokenizer = build_tokenizer()
    return Qwen3VLImageOnlyProcessor(build_image_processor(mean_std=0.5), tokenizer,
                                     chat_template=tokenizer.chat_template)


SPEC = TwinSpec(
    name="qwen3_vl",
    hub_name="Qwen/Qwen3-VL-2B-Instruct",
    build_config=build_config,
    model_class=Qwen3VLForConditionalGeneration,
    build_processor=build_processor,
    image_sizes=IMAGE_SIZES,
)
