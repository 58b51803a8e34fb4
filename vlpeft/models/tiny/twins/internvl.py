"""InternVL twin (``OpenGVLab/InternVL3-1B-hf``): InternViT tower (CLS dropped), dynamic tiling (an aspect-ratio grid
of crops plus a thumbnail, at most MAX_PATCHES tiles), pixel-shuffle downsampling (``downsample_ratio`` 0.5) into an
MLP projector, ``<img><IMG_CONTEXT>...</img>`` placeholders, Qwen2 LM with grouped-query attention and tied
embeddings, ``<|im_start|>`` turns.

The video processor class needs torchvision, so the processor is :class:`InternVLProcessor` without its video slot
(:class:`ImageOnlyInternVLProcessor`); ``<video>`` stays in the vocabulary.
"""

from __future__ import annotations

from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
)

from vlpeft.models.tiny.twins.base import (
    ImageOnlyProcessorMixin,
    TwinSpec,
    build_chat_tokenizer,
    chat_template,
)
from vlpeft.models.tiny.twins.sizes import TINY_TEXT, TINY_VISION

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<unk>")
#: A tile is IMAGE_SIZE square: (IMAGE_SIZE / PATCH) ** 2 = 16 patches, pixel-shuffled to 4 tokens (448 / 14 -> 256).
IMAGE_SIZE, PATCH, DOWNSAMPLE = 16, 4, 0.5
IMAGE_SEQ_LENGTH = int((IMAGE_SIZE // PATCH * DOWNSAMPLE) ** 2)
#: The real processor allows 12 tiles; 4 keep the twin small while wide and large images still get grids.
MAX_PATCHES = 4


class ImageOnlyInternVLProcessor(ImageOnlyProcessorMixin, InternVLProcessor):
    """:class:`InternVLProcessor` without the video processor slot (whose class needs torchvision)."""


def build_config() -> InternVLConfig:
    return InternVLConfig(
        vision_config={**TINY_VISION, "image_size": IMAGE_SIZE, "patch_size": PATCH},
        text_config={**TINY_TEXT, "model_type": "qwen2", "tie_word_embeddings": True,
                     "pad_token_id": SPECIAL.index("<|endoftext|>"), "bos_token_id": None,
                     "eos_token_id": SPECIAL.index("<|im_end|>")},
        image_token_id=SPECIAL.index("<IMG_CONTEXT>"),
        image_seq_length=IMAGE_SEQ_LENGTH,
        downsample_ratio=DOWNSAMPLE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )


def build_processor() -> InternVLProcessor:
    # The template writes one <IMG_CONTEXT> per image; the processor expands it to <img> + tiles x 4 + </img>.
    template = chat_template(turn_start="<|im_start|>", turn_end="<|im_end|>", image="<IMG_CONTEXT>\n")
    tokenizer = build_chat_tokenizer(
        SPECIAL, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
        vocab_size=TINY_TEXT["vocab_size"], chat_template=template,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=True, min_patches=1,
        max_patches=MAX_PATCHES,
    )
    return ImageOnlyInternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=IMAGE_SEQ_LENGTH,
        chat_template=template,
    )


SPEC = TwinSpec(
    name="internvl",
    hub_name="OpenGVLab/InternVL3-1B-hf",
    build_config=build_config,
    model_class=InternVLForConditionalGeneration,
    build_processor=build_processor,
    # 16x16: one tile (no thumbnail); 32x32: a 2x2 grid plus thumbnail; 48x16: a 3x1 grid plus thumbnail.
    image_sizes=((16, 16), (32, 32), (48, 16)),
)
