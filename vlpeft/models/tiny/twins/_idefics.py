"""What the Idefics3-family twins (``idefics3``, ``smolvlm``) share: the tile markers, the ``User:``/``Assistant:``
chat format ending turns with ``<end_of_utterance>``, and the config and processor assembly around each twin's own
tokens, patch size and pixel-shuffle scale.

Both split images into TILE-pixel tiles plus a global image without resizing them (see
:mod:`vlpeft.models.tiny.twins.idefics3`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from transformers import PretrainedConfig, ProcessorMixin

from vlpeft.models.tiny.twins.base import build_chat_tokenizer
from vlpeft.models.tiny.twins.sizes import TINY_TEXT, TINY_VISION

ConfigT = TypeVar("ConfigT", bound=PretrainedConfig)
ProcessorT = TypeVar("ProcessorT", bound=ProcessorMixin)

#: The tile markers the Idefics3/SmolVLM processors write (rows and columns 1..6, as in the real vocabularies).
ROW_COL_TOKENS: tuple[str, ...] = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
#: Tile side in pixels (the vision tower's ``image_size``); the largest image is 2x2 tiles.
TILE = 32
#: The token that ends every turn, and the end-of-sequence token.
END_OF_UTTERANCE = "<end_of_utterance>"


def tokens_per_tile(patch: int, scale: int) -> int:
    """Image tokens per tile (and for the global image): (TILE / ``patch``)^2 patches, pixel-shuffled by
    ``scale``^2."""
    return (TILE // patch) ** 2 // scale**2


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


def idefics_config(
    config_class: type[ConfigT], special: Sequence[str], *, pad_token: str, bos_token: str, patch: int, scale: int,
) -> ConfigT:
    """A config of class ``config_class``: SigLIP-style tower on TILE-pixel tiles of ``patch``-pixel patches, pixel
    shuffle by ``scale``, Llama LM; token ids are the tokens' positions in ``special``."""
    pad_token_id = special.index(pad_token)
    return config_class(
        vision_config={**TINY_VISION, "image_size": TILE, "patch_size": patch},
        text_config={**TINY_TEXT, "model_type": "llama", "pad_token_id": pad_token_id,
                     "bos_token_id": special.index(bos_token),
                     "eos_token_id": special.index(END_OF_UTTERANCE)},
        scale_factor=scale,
        image_token_id=special.index("<image>"),
        pad_token_id=pad_token_id,
    )


def idefics_processor(
    processor_class: type[ProcessorT],
    image_processor_class: type[Any],
    special: Sequence[str],
    *,
    pad_token: str,
    bos_token: str,
    unk_token: str,
    image_seq_len: int,
    named_tokens: dict[str, str] | None = None,
) -> ProcessorT:
    """The offline processor of class ``processor_class``: the twin tokenizer over ``special`` (the roles as given,
    ``<end_of_utterance>`` as eos, ``named_tokens`` as its ``extra_special_tokens``) with the chat format opened by
    ``bos_token``, and an ``image_processor_class`` that splits images into TILE-pixel tiles without resizing."""
    tokenizer = build_chat_tokenizer(
        special, pad_token=pad_token, bos_token=bos_token, eos_token=END_OF_UTTERANCE, unk_token=unk_token,
        extra_special_tokens=named_tokens, vocab_size=TINY_TEXT["vocab_size"],
        chat_template=idefics_chat_template(bos_token),
    )
    image_processor = image_processor_class(
        do_resize=False, size={"longest_edge": 2 * TILE}, do_image_splitting=True,
        max_image_size={"longest_edge": TILE},
    )
    return processor_class(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
        chat_template=tokenizer.chat_template,
    )
