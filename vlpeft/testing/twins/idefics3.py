"""Idefics3 twin (``HuggingFaceM4/Idefics3-8B-Llama3``): SigLIP-style tower on 32-pixel tiles plus a global image,
pixel-shuffle connector (``scale_factor`` 2), ``pixel_attention_mask``, GQA Llama LM, ``User:``/``Assistant:`` chat.

The image processor keeps ``do_image_splitting=True`` and takes images at their own resolution (``do_resize=False``,
the family's documented no-upsampling mode), so an image no larger than a tile is one global image and a larger one
is split into tiles (``<row_i_col_j>``) plus the global image.
"""

from __future__ import annotations

from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
)

from vlpeft.testing.twins.base import TwinSpec, build_chat_tokenizer
from vlpeft.testing.twins.sizes import TINY_TEXT, TINY_VISION

__all__ = ["IMAGE_TOKENS_PER_TILE", "ROW_COL_TOKENS", "SPEC", "SPECIAL", "TILE", "idefics_chat_template"]

#: The tile markers the Idefics3/SmolVLM processors write (rows and columns 1..6, as in the real vocabularies).
ROW_COL_TOKENS: tuple[str, ...] = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))

SPECIAL: tuple[str, ...] = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<unk>",
    "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *ROW_COL_TOKENS,
)
TILE, PATCH, SCALE = 32, 8, 2
#: Image tokens per tile (and for the global image): (tile / patch)^2 patches, pixel-shuffled by ``SCALE``^2.
IMAGE_TOKENS_PER_TILE = (TILE // PATCH) ** 2 // SCALE**2


def idefics_chat_template(bos: str) -> str:
    """The Idefics3/SmolVLM chat format: ``{bos}User:<image>question<end_of_utterance>\\nAssistant: answer
    <end_of_utterance>\\n``, the generation prompt ``Assistant:``; assistant turns inside ``{% generation %}``."""
    render = (
        "{% macro render(content) %}{% if content is string %}{{ content }}{% else %}"
        "{% for part in content %}{% if part['type'] == 'image' %}<image>"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endmacro %}"
    )
    return (
        render + bos +
        "{% for message in messages %}{{ message['role'] | capitalize }}"
        "{% if message['content'] is not string and message['content'][0]['type'] == 'image' %}:"
        "{% else %}: {% endif %}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ render(message['content']) }}<end_of_utterance>{% endgeneration %}"
        "{% else %}{{ render(message['content']) }}<end_of_utterance>{% endif %}{{ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    )


def build_config() -> Idefics3Config:
    return Idefics3Config(
        vision_config={**TINY_VISION, "image_size": TILE, "patch_size": PATCH},
        text_config={**TINY_TEXT, "model_type": "llama", "pad_token_id": SPECIAL.index("<|reserved_special_token_0|>"),
                     "bos_token_id": SPECIAL.index("<|begin_of_text|>"),
                     "eos_token_id": SPECIAL.index("<end_of_utterance>")},
        scale_factor=SCALE,
        image_token_id=SPECIAL.index("<image>"),
        pad_token_id=SPECIAL.index("<|reserved_special_token_0|>"),
    )


def build_processor() -> Idefics3Processor:
    tokenizer = build_chat_tokenizer(
        SPECIAL, pad_token="<|reserved_special_token_0|>", bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>", unk_token="<unk>", vocab_size=TINY_TEXT["vocab_size"],
        chat_template=idefics_chat_template("<|begin_of_text|>"),
    )
    image_processor = Idefics3ImageProcessorPil(
        do_resize=False, size={"longest_edge": 2 * TILE}, do_image_splitting=True,
        max_image_size={"longest_edge": TILE},
    )
    return Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=IMAGE_TOKENS_PER_TILE,
        chat_template=tokenizer.chat_template,
    )


SPEC = TwinSpec(
    name="idefics3",
    hub_name="HuggingFaceM4/Idefics3-8B-Llama3",
    build_config=build_config,
    model_class=Idefics3ForConditionalGeneration,
    build_processor=build_processor,
    image_sizes=((32, 32), (64, 32)),
)
