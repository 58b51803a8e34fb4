"""Configuration of the CLIP-BART composite (the routing paper's third setting, VL-Adapter's CLIP + BART-base)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

__all__ = ["DOWNSAMPLE_POOLINGS", "ClipBartConfig"]

DOWNSAMPLE_POOLINGS = ("max", "avg")
_SPECIAL_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_bos_token_id")


class ClipBartConfig(PreTrainedConfig):
    r"""Configuration of :class:`~vlpeft.models.ClipBartForConditionalGeneration`.

    A frozen vision encoder (CLIP vision by default) gives a g x g grid of patch features (the class token is
    dropped); adaptive pooling over the grid downsamples it to ``num_visual_tokens`` = s x s tokens; a trainable
    visual embedding (Linear(d_vision, d_model) + LayerNorm) maps them to BART's width, and they are appended
    after the text in the BART encoder input. BART's decoder generates.

    Args:
        vision_config: config of an HF vision encoder with a square patch grid (``clip_vision_model`` default,
            also ``vit``/``siglip_vision_model``); dict or config.
        text_config: config of BART (``bart`` default); dict or config.
        num_visual_tokens: tokens after downsampling, a perfect square (VL-Adapter: 36, a 6 x 6 grid from CLIP's
            7 x 7).
        downsample_pooling: ``"max"`` (``nn.AdaptiveMaxPool2d``, what VL-Adapter's released ``Downsample`` in
            ``VL-T5/src/modeling_bart.py`` uses for ``--downsample``) or ``"avg"`` (adaptive average pooling).
        visual_layer_norm: LayerNorm after the visual Linear (VL-Adapter's ``individual_vis_layer_norm``).
        freeze_vision_model: set ``requires_grad=False`` on the vision encoder at construction (VL-Adapter feeds
            precomputed CLIP features, so the encoder is never trained).
    """

    model_type: ClassVar[str] = "vlpeft_clip_bart"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bart"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_visual_tokens: int = 36
    downsample_pooling: str = "max"
    visual_layer_norm: bool = True
    freeze_vision_model: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.is_encoder_decoder = True
        for key in _SPECIAL_TOKENS:  # generation reads them from the top-level config
            if getattr(self, key, None) is None and getattr(self.text_config, key, None) is not None:
                setattr(self, key, getattr(self.text_config, key))
        if self.downsample_pooling not in DOWNSAMPLE_POOLINGS:
            raise ValueError(
                f"ClipBartConfig: downsample_pooling={self.downsample_pooling!r} is not one of {DOWNSAMPLE_POOLINGS}"
            )
        side = math.isqrt(int(self.num_visual_tokens))
        if self.num_visual_tokens < 1 or side * side != self.num_visual_tokens:
            raise ValueError(
                f"ClipBartConfig: num_visual_tokens must be a positive perfect square (s x s pooled grid), got "
                f"{self.num_visual_tokens}"
            )

    @property
    def pooled_grid_size(self) -> int:
        """s: the side of the pooled s x s grid (6 for 36 tokens)."""
        return math.isqrt(int(self.num_visual_tokens))

    @property
    def vision_hidden_size(self) -> int:
        return int(self.vision_config.hidden_size)

    @property
    def text_hidden_size(self) -> int:
        return int(self.text_config.d_model)
