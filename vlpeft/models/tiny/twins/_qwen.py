"""What the Qwen-VL twins (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``) share: Qwen's special tokens, tokenizer, chat
template, tiny dynamic-resolution image processor, the config pieces around each twin's own vision tower and LM
sizes (:func:`qwen_config`), and the image-only processor assembly (:func:`qwen_processor`).

The real checkpoints place these tokens at ids 151643-151656 in this order (with the box / object-reference tokens
between them); here they sit at ids 0-7, then the word-level tokenizer's ``<unk>`` (8). Every
image becomes ``<|vision_start|>`` + one ``<|image_pad|>`` per merged 2x2 patch group + ``<|vision_end|>``, so the
number of placeholders follows the image's size (``image_grid_thw``).
"""

from __future__ import annotations

from typing import Any, TypeVar

from transformers import PretrainedConfig, PreTrainedTokenizerFast, ProcessorMixin, Qwen2VLImageProcessorPil

from vlpeft.models.tiny.twins.base import build_chat_tokenizer, chat_template
from vlpeft.models.tiny.twins.sizes import TINY_TEXT

ConfigT = TypeVar("ConfigT", bound=PretrainedConfig)
ProcessorT = TypeVar("ProcessorT", bound=ProcessorMixin)

#: Qwen's special tokens in their hub order (``<|endoftext|>`` is the pad token, ``<|im_end|>`` ends turns).
SPECIAL: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<unk>",
)
TOKEN_IDS: dict[str, int] = {
    "pad_token_id": SPECIAL.index("<|endoftext|>"),
    "bos_token_id": SPECIAL.index("<|endoftext|>"),
    "eos_token_id": SPECIAL.index("<|im_end|>"),
}
#: Token ids of the top-level ``Qwen*VLConfig``.
VISION_TOKEN_IDS: dict[str, int] = {
    "image_token_id": SPECIAL.index("<|image_pad|>"),
    "video_token_id": SPECIAL.index("<|video_pad|>"),
    "vision_start_token_id": SPECIAL.index("<|vision_start|>"),
    "vision_end_token_id": SPECIAL.index("<|vision_end|>"),
}
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

#: Patch side in pixels (the real models: 14 for Qwen2/2.5-VL, 16 for Qwen3-VL), 2x2 spatial merge, 2 frames per
#: temporal patch (an image is repeated to fill them, as the real image processor does).
PATCH, MERGE, TEMPORAL_PATCH = 4, 2, 2
#: Pixel budget of the resize (``min_pixels`` / ``max_pixels``): sides are rounded to multiples of PATCH * MERGE
#: and the area kept within these bounds, so a 32x32 image gives an 8x8 patch grid (16 placeholders) and a 48x32
#: one a 8x12 grid (24 placeholders).
MIN_PIXELS, MAX_PIXELS = 16 * 16, 64 * 64
#: Example images: three sizes, three different grids.
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((32, 32), (48, 32), (24, 40))
#: M-RoPE: how the head_dim / 2 = 4 rotary frequencies are split over (temporal, height, width) positions.
MROPE_SECTION = [2, 1, 1]
#: LM sizes of the Qwen2 LM (Qwen2-VL, Qwen2.5-VL): no ``head_dim`` field, it is hidden_size / heads = 8.
QWEN2_TEXT: dict[str, int] = {key: value for key, value in TINY_TEXT.items() if key != "head_dim"}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The twin tokenizer with Qwen's ChatML template (``<|im_start|>role\\n ... <|im_end|>``)."""
    return build_chat_tokenizer(
        SPECIAL, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
        vocab_size=TINY_TEXT["vocab_size"],
        chat_template=chat_template(turn_start="<|im_start|>", turn_end="<|im_end|>", image=IMAGE_PLACEHOLDER),
    )


def build_image_processor(*, mean_std: float | None = None) -> Qwen2VLImageProcessorPil:
    """The Qwen2-VL PIL image processor with the tiny patch and pixel budget; ``mean_std`` sets both the
    normalisation mean and std of every channel (Qwen3-VL uses 0.5, the others CLIP's statistics)."""
    stats = {} if mean_std is None else {"image_mean": [mean_std] * 3, "image_std": [mean_std] * 3}
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, patch_size=PATCH, merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH, **stats,
    )


def qwen_config(
    config_class: type[ConfigT],
    *,
    vision: dict[str, Any],
    text: dict[str, int],
    rope_theta: float,
    interleaved: bool = False,
) -> ConfigT:
    """A ``Qwen*VLConfig`` of class ``config_class``: the vision tower ``vision`` with the tiny patching (PATCH,
    MERGE, TEMPORAL_PATCH), the LM sizes ``text`` with Qwen's token ids and M-RoPE over MROPE_SECTION (base
    ``rope_theta``; ``interleaved`` frequencies as Qwen3-VL), tied embeddings."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": MROPE_SECTION}
    if interleaved:
        rope["mrope_interleaved"] = True
    return config_class(
        vision_config={
            **vision, "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL_PATCH,
        },
        text_config={**text, **TOKEN_IDS, "tie_word_embeddings": True, "rope_parameters": rope},
        **VISION_TOKEN_IDS,
        tie_word_embeddings=True,
    )


def qwen_processor(processor_class: type[ProcessorT], *, mean_std: float | None = None) -> ProcessorT:
    """The offline processor: ``processor_class`` (the family's image-only processor) over :func:`build_tokenizer`
    and :func:`build_image_processor` (``mean_std`` as there), with the tokenizer's chat template."""
    tokenizer = build_tokenizer()
    return processor_class(build_image_processor(mean_std=mean_std), tokenizer, chat_template=tokenizer.chat_template)
