"""LLaVA-NeXT twin (``llava-hf/llava-v1.6-mistral-7b-hf``): CLIP vision tower, anyres tiles, Llama-style LM."""

from __future__ import annotations

from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)

from vlpeft.testing.twins.base import TwinSpec, build_chat_tokenizer, chat_template
from vlpeft.testing.twins.sizes import TINY_TEXT, TINY_VISION

SPECIAL = ("<pad>", "<s>", "</s>", "<image>", "<unk>")
IMAGE_SIZE, PATCH = 16, 8


def build_config() -> LlavaNextConfig:
    return LlavaNextConfig(
        vision_config={**TINY_VISION, "model_type": "clip_vision_model", "image_size": IMAGE_SIZE,
                       "patch_size": PATCH},
        text_config={**TINY_TEXT, "model_type": "llama", "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        image_token_index=SPECIAL.index("<image>"),
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )


def build_processor() -> LlavaNextProcessor:
    tokenizer = build_chat_tokenizer(
        SPECIAL, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, vocab_size=TINY_TEXT["vocab_size"],
        chat_template=chat_template(turn_start="[INST] ", turn_end=" </s>", image="<image>\n", bos="<s>"),
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
    )
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", chat_template=tokenizer.chat_template,
    )


SPEC = TwinSpec(
    name="llava_next",
    hub_name="llava-hf/llava-v1.6-mistral-7b-hf",
    build_config=build_config,
    model_class=LlavaNextForConditionalGeneration,
    build_processor=build_processor,
    image_sizes=((16, 16), (32, 16)),
)
