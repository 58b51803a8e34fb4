"""Llama 3.2 Vision twin (``meta-llama/Llama-3.2-11B-Vision-Instruct``): tiled vision encoder (local + gated global
stacks, intermediate-layer features, aspect-ratio ids/masks), Llama 3 LM with a cross-attention layer at depth 1 of 3.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
)

from vlpeft.models.tiny.twins.base import TwinSpec, build_chat_tokenizer
from vlpeft.models.tiny.twins.sizes import TINY_TEXT, TINY_VISION

SPECIAL = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>", "<unk>",
)
IMAGE_SIZE, PATCH, MAX_TILES = 16, 8, 4
#: The LM layers that cross-attend to the image (the real 40-layer LM has them at 3, 8, ..., 38).
CROSS_ATTENTION_LAYERS = (1,)
#: Gate value the twin gives the tanh gates that Mllama initialises at zero (closed gates would make a randomly
#: initialised model ignore its images and the tile embeddings).
OPEN_GATE = 0.5

# Llama 3.2 Vision's chat format (without the default dated system block, which the real template drops whenever
# images are present): <|begin_of_text|>, then per turn <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% set content %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|image|>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endset %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ content }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ content }}{{ '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def build_config() -> MllamaConfig:
    text = {key: value for key, value in TINY_TEXT.items() if key != "head_dim"}  # Mllama: hidden / heads
    return MllamaConfig(
        vision_config={
            **{key: value for key, value in TINY_VISION.items() if key != "num_attention_heads"},
            "attention_heads": TINY_VISION["num_attention_heads"],
            "num_global_layers": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH,
            "max_num_tiles": MAX_TILES,
            # final local-encoder output + the outputs of local layers 0 and 1, concatenated per patch
            "intermediate_layers_indices": [0, 1],
            "vision_output_dim": TINY_VISION["hidden_size"] * 3,
        },
        text_config={
            **text,
            "num_hidden_layers": 3,
            "cross_attention_layers": list(CROSS_ATTENTION_LAYERS),
            "rope_parameters": {
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            },
            "bos_token_id": SPECIAL.index("<|begin_of_text|>"),
            "eos_token_id": SPECIAL.index("<|eot_id|>"),
            "pad_token_id": SPECIAL.index("<|finetune_right_pad_id|>"),
        },
        image_token_index=SPECIAL.index("<|image|>"),
    )


def open_gates(model: nn.Module) -> None:
    """Open the tanh gates Mllama initialises closed: the cross-attention layers' attention and MLP gates, and the
    vision tower's gated tile / position embeddings."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate", "embedding.gate")):
                parameter.fill_(OPEN_GATE)


def build_processor() -> MllamaProcessor:
    tokenizer = build_chat_tokenizer(
        SPECIAL, pad_token="<|finetune_right_pad_id|>", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        unk_token="<unk>", extra_special_tokens={"image_token": "<|image|>"}, vocab_size=TINY_TEXT["vocab_size"],
        chat_template=CHAT_TEMPLATE,
    )
    image_processor = MllamaImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=MAX_TILES,
    )
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


SPEC = TwinSpec(
    name="mllama",
    hub_name="meta-llama/Llama-3.2-11B-Vision-Instruct",
    build_config=build_config,
    model_class=MllamaForConditionalGeneration,
    build_processor=build_processor,
    image_sizes=((16, 16), (32, 16), (32, 32)),  # 1, 2 (1x2) and 4 (2x2) tiles
    adjust_model=open_gates,
)
