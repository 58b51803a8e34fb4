"""Idefics3 twin (``HuggingFaceM4/Idefics3-8B-Llama3``): SigLIP-style tower on 32-pixel tiles plus a global image,
pixel-shuffle connector (``scale_factor`` 2), ``pixel_attention_mask``, GQA Llama LM, ``User:``/``Assistant:`` chat.

The image processor keeps ``do_image_splitting=True`` and takes images at their own resolution (``do_resize=False``,
the family's documented no-upsampling mode), so an image no larger than a tile is one global image and a larger one
is split into tiles (``<row_i_col_j>``) plus the global image. What it shares with SmolVLM is in
:mod:`vlpeft.models.tiny.twins._idefics`.
"""

from __future__ import annotations

from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
)

from vlpeft.models.tiny.twins._idefics import (
    ROW_COL_TOKENS,
    TILE,
    idefics_config,
    idefics_processor,
    tokens_per_tile,
)
from vlpeft.models.tiny.twins.base import TwinSpec

__all__ = ["IMAGE_TOKENS_PER_TILE", "SPEC", "SPECIAL", "TILE"]

SPECIAL: tuple[str, ...] = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<unk>",
    "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *ROW_COL_TOKENS,
)
PATCH, SCALE = 8, 2
#: Image tokens per tile (and for the global image): (TILE / PATCH)^2 patches, pixel-shuffled by ``SCALE``^2.
IMAGE_TOKENS_PER_TILE = tokens_per_tile(PATCH, SCALE)
PAD, BOS = "<|reserved_special_token_0|>", "<|begin_of_text|>"


def build_config() -> Idefics3Config:
    return idefics_config(Idefics3Config, SPECIAL, pad_token=PAD, bos_token=BOS, patch=PATCH, scale=SCALE)


def build_processor() -> Idefics3Processor:
    return idefics_processor(
        Idefics3Processor, Idefics3ImageProcessorPil, SPECIAL, pad_token=PAD, bos_token=BOS, unk_token="<unk>",
        image_seq_len=IMAGE_TOKENS_PER_TILE,
    )


SPEC = TwinSpec(
    name="idefics3",
    hub_name="HuggingFaceM4/Idefics3-8B-Llama3",
    build_config=build_config,
    model_class=Idefics3ForConditionalGeneration,
    build_processor=build_processor,
    image_sizes=((32, 32), (64, 32)),
)
