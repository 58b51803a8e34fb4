"""LLaVA-OneVision twin (``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``): SigLIP tower (all patch tokens), anyres tiles
for a single image (unpadded, newline per row, bilinear shrink past ``anyres_max_N``) and one padded square view per
image when a sample has several, Qwen2 LM with grouped-query attention and tied embeddings, ``<|im_start|>`` turns.

The video processor class needs torchvision, so the processor is :class:`LlavaOnevisionProcessor` without its video
slot (:class:`ImageOnlyLlavaOnevisionProcessor`); ``<video>`` stays in the vocabulary and the config.
"""

from __future__ import annotations

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
)

from vlpeft.models.tiny.twins.base import (
    ImageOnlyProcessorMixin,
    TwinSpec,
    build_chat_tokenizer,
    chat_template,
)
from vlpeft.models.tiny.twins.sizes import TINY_TEXT, TINY_VISION

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<unk>")
#: One tile is IMAGE_SIZE square with (IMAGE_SIZE / PATCH) ** 2 = 4 patch tokens (384 / 14 -> 729 in the real model).
IMAGE_SIZE, PATCH = 16, 8
#: The real pinpoints are 384 x {1..6} by {1..6} tiles; the twin has 1..3 by 1..3 tiles, as (height, width).
PINPOINTS = [[IMAGE_SIZE * rows, IMAGE_SIZE * cols] for rows in (1, 2, 3) for cols in (1, 2, 3)]
#: The real "anyres_max_9" shrinks grids of more than 9 tiles' worth of features; at most 4 here, so that a 3x3 grid
#: is shrunk as large real images are.
ASPECT_RATIO = "anyres_max_4"


class ImageOnlyLlavaOnevisionProcessor(ImageOnlyProcessorMixin, LlavaOnevisionProcessor):
    """:class:`LlavaOnevisionProcessor` without the video processor slot (whose class needs torchvision)."""


def build_config() -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config={**TINY_VISION, "model_type": "siglip_vision_model", "image_size": IMAGE_SIZE,
                       "patch_size": PATCH, "vision_use_head": False},
        text_config={**TINY_TEXT, "model_type": "qwen2", "tie_word_embeddings": True,
                     "pad_token_id": SPECIAL.index("<|endoftext|>"), "bos_token_id": None,
                     "eos_token_id": SPECIAL.index("<|im_end|>")},
        image_token_index=SPECIAL.index("<image>"),
        video_token_index=SPECIAL.index("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio=ASPECT_RATIO,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )


def build_processor() -> LlavaOnevisionProcessor:
    template = chat_template(turn_start="<|im_start|>", turn_end="<|im_end|>", image="<image>\n")
    tokenizer = build_chat_tokenizer(
        SPECIAL, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        vocab_size=TINY_TEXT["vocab_size"], chat_template=template,
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=PINPOINTS,
    )
    return ImageOnlyLlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(IMAGE_SIZE // PATCH) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio=ASPECT_RATIO, chat_template=template,
    )


SPEC = TwinSpec(
    name="llava_onevision",
    hub_name="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    build_config=build_config,
    model_class=LlavaOnevisionForConditionalGeneration,
    build_processor=build_processor,
    # Alone, 48x48 is a 3x3 grid shrunk to 4x4 features, 16x16 one tile and 32x16 a 1x2 grid; in a sample with
    # several images each image is one padded square view.
    image_sizes=((48, 48), (16, 16), (32, 16)),
)
