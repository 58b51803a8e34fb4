"""Gemma 3 twin (``google/gemma-3-4b-it``): SigLIP tower, avg-pool projector to ``mm_tokens_per_image`` soft tokens,
sliding-window and global layers alternating (dual RoPE), bidirectional attention among an image's tokens.

Gemma initialises the projector's input projection to zeros (a random model would ignore its images), so
:func:`adjust_model` draws it at random; it also keeps the random model from generating the soft image token.
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
)

from vlpeft.models.tiny.twins.base import (
    CHAT_WORDS,
    TwinSpec,
    build_chat_tokenizer,
    chat_template,
    suppress_image_token,
)
from vlpeft.models.tiny.twins.sizes import TINY_TEXT, TINY_VISION

# Gemma's own order for the first four (<pad>=0, <eos>=1, <bos>=2, <unk>=3), then the chat and image tokens.
SPECIAL = (
    "<pad>", "<eos>", "<bos>", "<unk>",
    "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
)
IMAGE_SIZE, PATCH = 16, 4  # a 4x4 patch grid ...
MM_TOKENS_PER_IMAGE = 4  # ... average-pooled 2x2 to 4 soft tokens per image
SLIDING_WINDOW = 8  # shorter than every twin sequence (an image alone takes 6 tokens with its begin/end markers)


def build_config() -> Gemma3Config:
    head_dim = TINY_TEXT["head_dim"]
    return Gemma3Config(
        vision_config={**TINY_VISION, "model_type": "siglip_vision_model", "image_size": IMAGE_SIZE,
                       "patch_size": PATCH, "vision_use_head": False},
        text_config={
            **TINY_TEXT,
            "model_type": "gemma3_text",
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": SLIDING_WINDOW,
            # as gemma-3-4b: scores scaled by query_pre_attn_scalar**-0.5 with the scalar = head_dim, no
            # soft-capping; local layers RoPE base 1e4, global layers 1e6 with linear scaling 8
            "query_pre_attn_scalar": head_dim,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            },
        },
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=SPECIAL.index("<start_of_image>"),
        eoi_token_index=SPECIAL.index("<end_of_image>"),
        image_token_index=SPECIAL.index("<image_soft_token>"),
    )


def adjust_model(model: Gemma3ForConditionalGeneration) -> None:
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        weight.normal_(std=model.config.text_config.initializer_range)
    suppress_image_token(model)


def build_processor() -> Gemma3Processor:
    tokenizer = build_chat_tokenizer(
        SPECIAL, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
        words=(*CHAT_WORDS, "model"), vocab_size=TINY_TEXT["vocab_size"],
        # Gemma's turns: <start_of_turn>user ... <end_of_turn>, the assistant role written as "model"; an image
        # part is <start_of_image>, which the processor expands to the soft tokens between begin/end markers
        chat_template=chat_template(turn_start="<start_of_turn>", turn_end="<end_of_turn>",
                                    image="<start_of_image>", role_names={"assistant": "model"}, bos="<bos>"),
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                           image_seq_length=MM_TOKENS_PER_IMAGE, chat_template=tokenizer.chat_template)


SPEC = TwinSpec(
    name="gemma3",
    hub_name="google/gemma-3-4b-it",
    build_config=build_config,
    model_class=Gemma3ForConditionalGeneration,
    build_processor=build_processor,
    adjust_model=adjust_model,
    image_sizes=((32, 32), (48, 32)),
)
