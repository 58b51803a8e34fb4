"""SmolVLM twin (``HuggingFaceTB/SmolVLM-256M-Instruct``): SigLIP-style tower on 32-pixel tiles plus a global image,
pixel-shuffle connector (``scale_factor`` 4, as the 256M model), ``pixel_attention_mask``, GQA Llama (SmolLM2) LM,
``<|im_start|>User:``/``Assistant:`` chat ending turns with ``<end_of_utterance>``.

Images are split as in :mod:`vlpeft.models.tiny.twins.idefics3` (``do_image_splitting=True``, ``do_resize=False``): a
tile-sized image is one global image, a larger one tiles plus the global image; the config and processor are
assembled as Idefics3's (:mod:`vlpeft.models.tiny.twins._idefics`). The processor is
:class:`SmolVLMImageOnlyProcessor`, ``SmolVLMProcessor`` without its video slot (``SmolVLMVideoProcessor`` needs
torchvision; the video prompt needs ``num2words``): images and text only.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    PreTrainedTokenizerBase,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
)
from transformers.processing_utils import ProcessorMixin

from vlpeft.models.tiny.twins._idefics import (
    ROW_COL_TOKENS,
    TILE,
    idefics_config,
    idefics_processor,
    tokens_per_tile,
)
from vlpeft.models.tiny.twins.base import TwinSpec

__all__ = ["IMAGE_TOKENS_PER_TILE", "SPEC", "SPECIAL", "TILE", "SmolVLMImageOnlyProcessor"]

SPECIAL: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>",
    "<global-img>", *ROW_COL_TOKENS,
)
PATCH, SCALE = 4, 4
#: Image tokens per tile (and for the global image): (TILE / PATCH)^2 patches, pixel-shuffled by ``SCALE``^2.
IMAGE_TOKENS_PER_TILE = tokens_per_tile(PATCH, SCALE)
PAD, BOS = "<|im_end|>", "<|im_start|>"

#: Named tokens the processor reads from the tokenizer (as the real tokenizer's ``extra_special_tokens``).
NAMED_TOKENS: dict[str, str] = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "end_of_utterance_token": "<end_of_utterance>",
    "global_image_token": "<global-img>",
}


class SmolVLMImageOnlyProcessor(SmolVLMProcessor):
    """``SmolVLMProcessor`` for images and text, without the video processor slot.

    Prompt expansion, image splitting and the chat template are the parent's; only the constructor (no video
    processor, so no ``num2words`` either) and ``apply_chat_template`` (no video frame defaults) differ.
    """

    def __init__(
        self,
        image_processor: SmolVLMImageProcessorPil,
        tokenizer: PreTrainedTokenizerBase,
        image_seq_len: int = 169,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


def build_config() -> SmolVLMConfig:
    return idefics_config(SmolVLMConfig, SPECIAL, pad_token=PAD, bos_token=BOS, patch=PATCH, scale=SCALE)


def build_processor() -> SmolVLMImageOnlyProcessor:
    return idefics_processor(
        SmolVLMImageOnlyProcessor, SmolVLMImageProcessorPil, SPECIAL, pad_token=PAD, bos_token=BOS,
        unk_token="<|endoftext|>", image_seq_len=IMAGE_TOKENS_PER_TILE, named_tokens=NAMED_TOKENS,
    )


SPEC = TwinSpec(
    name="smolvlm",
    hub_name="HuggingFaceTB/SmolVLM-256M-Instruct",
    build_config=build_config,
    model_class=SmolVLMForConditionalGeneration,
    build_processor=build_processor,
    image_sizes=((32, 32), (64, 64)),
)
