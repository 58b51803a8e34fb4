"""Mistral 3 twin (``mistralai/Mistral-Small-3.1-24B-Instruct-2503``): Pixtral tower at each image's own size (2D RoPE,
``[IMG]`` rows closed by ``[IMG_BREAK]`` / ``[IMG_END]``), 2x2 patch-merger projector, Mistral LM, ``[INST]`` turns.

``PixtralProcessor``'s module imports a size helper from the torchvision image processor at import time, so without
torchvision the class is only a placeholder; :func:`_pixtral_processor_class` imports the real module with that one
helper taken from the PIL image processor module (the same computation) for the duration of the import.
:func:`~vlpeft.models.tiny.twins.base.suppress_image_token` keeps the random model from generating ``[IMG]``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessorPil
from transformers.models.pixtral import image_processing_pil_pixtral

from vlpeft.models.tiny.twins.base import TwinSpec, build_chat_tokenizer, suppress_image_token
from vlpeft.models.tiny.twins.sizes import TINY_TEXT, TINY_VISION

# The Tekken tokenizer's control tokens at their real ids ([IMG] = 10 as Mistral3Config's default, <pad> = 11).
SPECIAL = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
)
PATCH, MERGE = 4, 2  # one [IMG] per 2x2 merged 4-pixel patches, i.e. per 8x8 pixels
LONGEST_EDGE = 32  # images are downscaled to fit 32x32, then each side rounded up to a multiple of 8

_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}[IMG]{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
)
#: Mistral's style: <s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]user[/INST]answer</s>; no role names are written and
#: the generation prompt adds nothing (the prompt ends with [/INST]).
CHAT_TEMPLATE = (
    "<s>{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]" + _CONTENT + "[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]" + _CONTENT + "[/INST]"
    "{% elif message['role'] == 'assistant' %}{% generation %}" + _CONTENT + "</s>{% endgeneration %}"
    "{% endif %}{% endfor %}"
)


def _pixtral_processor_class() -> Any:
    """The real ``PixtralProcessor`` class, imported without torchvision (see the module docstring)."""
    name = "transformers.models.pixtral.image_processing_pixtral"
    try:
        importlib.import_module(name)
    except ImportError:
        stand_in = types.ModuleType(name)
        stand_in.get_resize_output_image_size = image_processing_pil_pixtral.get_resize_output_image_size
        sys.modules[name] = stand_in
        try:
            module = importlib.import_module("transformers.models.pixtral.processing_pixtral")
        finally:
            del sys.modules[name]
    else:
        module = importlib.import_module("transformers.models.pixtral.processing_pixtral")
    return module.PixtralProcessor


def build_config() -> Mistral3Config:
    return Mistral3Config(
        vision_config={**TINY_VISION, "model_type": "pixtral", "image_size": LONGEST_EDGE, "patch_size": PATCH},
        # as Mistral Small 3.1: full attention everywhere (no sliding window), RoPE base 1e9, untied LM head
        text_config={**TINY_TEXT, "model_type": "mistral", "sliding_window": None,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000_000.0},
                     "pad_token_id": SPECIAL.index("<pad>"), "bos_token_id": 1, "eos_token_id": 2},
        image_token_index=SPECIAL.index("[IMG]"),
        spatial_merge_size=MERGE,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def build_processor() -> Any:
    tokenizer = build_chat_tokenizer(
        SPECIAL, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        vocab_size=TINY_TEXT["vocab_size"], chat_template=CHAT_TEMPLATE,
    )
    image_processor = PixtralImageProcessorPil(size={"longest_edge": LONGEST_EDGE},
                                               patch_size={"height": PATCH, "width": PATCH})
    return _pixtral_processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH, spatial_merge_size=MERGE,
        chat_template=CHAT_TEMPLATE,
    )


SPEC = TwinSpec(
    name="mistral3",
    hub_name="mistralai/Mistral-Small-3.1-24B-Instruct-2503",
    build_config=build_config,
    model_class=Mistral3ForConditionalGeneration,
    build_processor=build_processor,
    adjust_model=suppress_image_token,
    image_sizes=((16, 16), (48, 32)),
)
