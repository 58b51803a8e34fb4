"""LLaVA-NeXT twin (``llava-hf/llava-v1.6-mistral-7b-hf``): CLIP tower read at its second-to-last layer without CLS,
anyres tiles (a base view plus a pinpoint grid of crops, unpadded, with a learned newline per row), Mistral LM with
grouped-query attention, ``[INST] ... [/INST]`` prompts."""

from __future__ import annotations

from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)

from vlpeft.models.tiny.twins.base import TwinSpec, build_chat_tokenizer
from vlpeft.models.tiny.twins.sizes import TINY_TEXT, TINY_VISION

SPECIAL = ("<pad>", "<s>", "</s>", "<image>", "[INST]", "[/INST]", "<unk>")
#: One tile is IMAGE_SIZE square and holds (IMAGE_SIZE / PATCH) ** 2 = 4 patches (336 / 14 in the real model).
IMAGE_SIZE, PATCH = 16, 8
#: The real pinpoints (336 x {1,2,3} tiles: 1x2, 2x1, 2x2, 1x3, 3x1) at the tiny tile size, as (height, width).
PINPOINTS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]

#: Mistral-style turns: ``<s>[INST] <image>\n... [/INST] answer</s>``; the images of a user turn come first.
CHAT_TEMPLATE = (
    "<s>"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% for part in parts if part['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for part in parts if part['type'] == 'text' %}{{ part['text'] }}{% endfor %} [/INST]"
    "{% elif message['role'] == 'assistant' %}{% generation %} "
    "{% for part in parts if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}</s>{% endgeneration %}"
    "{% else %}{% for part in parts if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{{ '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
)


def build_config() -> LlavaNextConfig:
    return LlavaNextConfig(
        vision_config={**TINY_VISION, "model_type": "clip_vision_model", "image_size": IMAGE_SIZE,
                       "patch_size": PATCH},
        text_config={**TINY_TEXT, "model_type": "mistral", "sliding_window": None,
                     "pad_token_id": SPECIAL.index("<pad>"), "bos_token_id": SPECIAL.index("<s>"),
                     "eos_token_id": SPECIAL.index("</s>")},
        image_token_index=SPECIAL.index("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def build_processor() -> LlavaNextProcessor:
    tokenizer = build_chat_tokenizer(
        SPECIAL, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, vocab_size=TINY_TEXT["vocab_size"],
        chat_template=CHAT_TEMPLATE,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=PINPOINTS,
    )
    # The CLIP tower emits a CLS token per tile that the "default" strategy drops: the processor counts it
    # (num_additional_image_tokens=1) and takes it off again, as the real checkpoint's processor does.
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


SPEC = TwinSpec(
    name="llava_next",
    hub_name="llava-hf/llava-v1.6-mistral-7b-hf",
    build_config=build_config,
    model_class=LlavaNextForConditionalGeneration,
    build_processor=build_processor,
    # 16x16: 1x2 tiles (unpadded to 2x2 features); 32x32: 2x2 tiles; 48x16: 1x3 tiles, a wide image.
    image_sizes=((16, 16), (32, 32), (48, 16)),
)
