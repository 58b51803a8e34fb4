"""The CLIP-BART composite of the routing paper's third setting (VL-Adapter's CLIP + BART-base, ``routing.md`` §6.3).

Module layout (``named_modules()``): ``vision_model`` (the HF vision model, ``CLIPVisionModel`` by default, frozen),
``visual_embedding.{linear,layer_norm}`` (trainable, its output is the (batch, n_images * s*s, d_model) visual tokens
and the x_R source of routing), ``language_model`` (``BartForConditionalGeneration``: ``model.encoder``, ``model.decoder``,
``lm_head``).

Encoder input: ``[text embeddings ; visual tokens]``, the attention mask extended by ones for the visual tokens.
Deviation from VL-T5/VL-Adapter, which concatenates the visual tokens *after* BART's position embedding and
``layernorm_embedding`` of the text: here the whole sequence enters ``BartEncoder`` as ``inputs_embeds``, so the
visual tokens also get BART's learned positions (after the text's) and ``layernorm_embedding``. Several images per
sample (NLVR2's pair, ``pixel_values`` (batch, 2, 3, H, W)) give their tokens one after the other (2 x 36), as
VL-Adapter concatenates them; their different BART positions tell the images apart (VL-Adapter: image order
embeddings).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSeq2SeqLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from vlpeft._transformers_compat import CACHE_ARGUMENTS, cache_argument_of
from vlpeft.models.configuration_clip_bart import ClipBartConfig

__all__ = ["ClipBartForConditionalGeneration", "ClipBartVisualEmbedding"]


class ClipBartVisualEmbedding(nn.Module):
    """VL-Adapter's visual embedding: Linear(d_vision, d_model) then LayerNorm(d_model).

    Input (batch, m, d_vision) pooled grid features, output (batch, m, d_model) visual tokens.
    """

    def __init__(self, in_features: int, d_model: int, layer_norm: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, d_model)
        self.layer_norm: nn.Module = nn.LayerNorm(d_model) if layer_norm else nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.linear(features))


class ClipBartForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Frozen CLIP vision grid -> pooled to s x s tokens -> visual embedding -> appended after the text in BART's
    encoder; BART's decoder generates (VQA answers, captions, NLVR2 true/false).

    ``labels`` (batch, target_len) give the loss; ``decoder_input_ids`` are shifted from them as BART does.
    """

    config_class = ClipBartConfig
    config: ClipBartConfig
    base_model_prefix = "clip_bart"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = list(CACHE_ARGUMENTS)

    def __init__(
        self,
        config: ClipBartConfig,
        vision_model: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else AutoModel.from_config(config.vision_config)
        self.visual_embedding = ClipBartVisualEmbedding(
            config.vision_hidden_size, config.text_hidden_size, config.visual_layer_norm
        )
        self.language_model = (
            language_model if language_model is not None else AutoModelForSeq2SeqLM.from_config(config.text_config)
        )
        self.post_init()
        if config.freeze_vision_model:
            self.vision_model.requires_grad_(False)

    # ------------------------------------------------------------------ accessors
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        return self.language_model.get_encoder()

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    @property
    def num_visual_tokens(self) -> int:
        return int(self.config.num_visual_tokens)

    # ------------------------------------------------------------------ vision
    def grid_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision encoder's pooled patch grid, the images of a sample one after the other.

        Args:
            pixel_values: (batch, 3, H, W), or (batch, n_images, 3, H, W) for several images per sample (NLVR2's
                pair: their tokens are concatenated in order, as VL-Adapter does).

        Returns:
            (batch, n_images * s*s, d_vision): ``last_hidden_state`` without the class token, each image's g x g
            grid pooled to s x s. With ``freeze_vision_model`` the encoder runs without autograd (as VL-Adapter's
            precomputed features).
        """
        if pixel_values.dim() == 5:
            batch, images = pixel_values.shape[:2]
            pooled = self.grid_features(pixel_values.flatten(0, 1))
            return pooled.reshape(batch, images * pooled.shape[1], pooled.shape[2])
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be (batch, 3, H, W) or (batch, n_images, 3, H, W), got {tuple(pixel_values.shape)}"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision_model):
            hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state
        side = int(self.config.vision_config.image_size) // int(self.config.vision_config.patch_size)
        if hidden.shape[1] == side * side + 1:
            hidden = hidden[:, 1:]
        elif hidden.shape[1] != side * side:
            raise ValueError(f"expected a {side} x {side} patch grid (+ class token), got {hidden.shape[1]} tokens")
        batch, _, width = hidden.shape
        grid = hidden.transpose(1, 2).reshape(batch, width, side, side)
        size = self.config.pooled_grid_size
        pool = F.adaptive_max_pool2d if self.config.downsample_pooling == "max" else F.adaptive_avg_pool2d
        return pool(grid, (size, size)).flatten(2).transpose(1, 2)

    def visual_tokens(
        self, pixel_values: torch.Tensor | None = None, grid_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(batch, n_images * s*s, d_model) visual tokens from ``pixel_values`` (batch, [n_images,] 3, H, W) or
        pooled ``grid_features`` (batch, n_images * s*s, d_vision); ``visual_embedding`` runs here on every call
        (routing reads its output, so it pools over all images of a sample)."""
        if grid_features is None:
            if pixel_values is None:
                raise ValueError(
                    "ClipBartForConditionalGeneration needs the image: pass pixel_values (batch, 3, H, W) or "
                    "grid_features (batch, num_visual_tokens, d_vision)"
                )
            grid_features = self.grid_features(pixel_values)
        return self.visual_embedding(grid_features)

    def _encoder_inputs(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        grid_features: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, T + V, d_model) encoder inputs [text ; visual] and their (batch, T + V) mask (V = n_images*s*s).

        Without ``input_ids`` and ``inputs_embeds`` the encoder sees the visual tokens alone (T = 0).
        """
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("pass at most one of input_ids (batch, T) and inputs_embeds (batch, T, d_model)")
        visual = self.visual_tokens(pixel_values, grid_features)
        if inputs_embeds is None:
            if input_ids is None:
                input_ids = torch.zeros(visual.shape[0], 0, dtype=torch.long, device=visual.device)
            inputs_embeds = self.get_input_embeddings()(input_ids)  # BART's scaled embedding
        visual = visual.to(inputs_embeds.dtype)
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch, visual.shape[1])], dim=1)
        return torch.cat([inputs_embeds, visual], dim=1), mask

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple[torch.Tensor, ...] | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        grid_features: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput:
        """Encode [text ; visual tokens], decode, and score ``labels``.

        Args:
            input_ids: (batch, T) text ids (question / task prompt), or ``inputs_embeds`` (batch, T, d_model).
            attention_mask: (batch, T) over the text (the visual tokens are added here); with ``encoder_outputs``
                it may also cover the whole encoder sequence (batch, T + V), as :meth:`generate` passes it.
            pixel_values: (batch, 3, H, W) or (batch, n_images, 3, H, W) (NLVR2: 2), or ``grid_features``
                (batch, n_images * s*s, d_vision) already pooled.
            labels: (batch, L) target ids, -100 ignored; ``decoder_input_ids`` default to them shifted right.
            encoder_outputs: precomputed encoder states (batch, T + V, d_model), V = n_images * s*s (generation).
            **kwargs: passed to BART (the cache under ``cache``/``past_key_values``, ``output_attentions``, ...).

        Returns:
            BART's ``Seq2SeqLMOutput``: ``logits`` (batch, L, vocab), ``loss`` with labels, the cache.
        """
        if encoder_outputs is None:
            embeds, mask = self._encoder_inputs(input_ids, inputs_embeds, attention_mask, pixel_values, grid_features)
        else:
            embeds = None
            encoder_length = encoder_outputs[0].shape[1]
            mask = attention_mask
            visual_length = encoder_length - (mask.shape[1] if mask is not None else 0)
            if mask is not None and visual_length > 0 and visual_length % self.num_visual_tokens == 0:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], visual_length)], dim=1)
        kwargs.pop("return_dict", None)
        for name in CACHE_ARGUMENTS:  # forward the cache under the name BART takes
            if name in kwargs:
                cache = kwargs.pop(name)
                if cache is not None:
                    kwargs[cache_argument_of(self.language_model.forward)] = cache
        return self.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            labels=labels,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        grid_features: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **generate_kwargs: Any,
    ) -> Any:
        """Generate answers/captions for (text, image) pairs.

        The encoder runs once here on [text ; visual tokens] (so ``visual_embedding`` runs once per call); its
        states and the (batch, T + V) mask travel as ``encoder_outputs``/``attention_mask``, which ``generate``
        expands per beam. Returns the decoder ids (batch * num_return_sequences, new_len), starting with the
        decoder start token as for BART, or the usual output object with ``return_dict_in_generate=True``.

        Args:
            input_ids: (batch, T) text ids (or ``inputs_embeds``), right-padded with ``attention_mask``.
            pixel_values: (batch, [n_images,] 3, H, W), or ``grid_features`` (batch, n_images * s*s, d_vision).
            **generate_kwargs: ``num_beams``, ``max_new_tokens``, ... as for ``GenerationMixin.generate``.
        """
        if "encoder_outputs" in generate_kwargs:
            return super().generate(attention_mask=attention_mask, **generate_kwargs)
        embeds, mask = self._encoder_inputs(input_ids, inputs_embeds, attention_mask, pixel_values, grid_features)
        encoder_outputs = self.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
        return super().generate(attention_mask=mask, encoder_outputs=encoder_outputs, **generate_kwargs)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained``, then the vision encoder is frozen again (``freeze_vision_model``):
        loading materialises fresh parameters, which would otherwise require gradients."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.config.freeze_vision_model:
            model.vision_model.requires_grad_(False)
        return loaded

    # ------------------------------------------------------------------ building from hub parts
    @classmethod
    def from_pretrained_parts(
        cls,
        vision: str | PreTrainedModel | PreTrainedConfig = "openai/clip-vit-base-patch32",
        text: str | PreTrainedModel | PreTrainedConfig = "facebook/bart-base",
        *,
        vision_kwargs: dict[str, Any] | None = None,
        text_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> ClipBartForConditionalGeneration:
        """Build the composite from a vision part and a BART part; the visual embedding is new (random).

        Each part is a hub name or local path (loaded with ``from_pretrained``; a full CLIP checkpoint gives its
        vision tower), a model instance (used as is), or a config (randomly initialised). Example:
        ``from_pretrained_parts(vision="openai/clip-vit-base-patch32", text="facebook/bart-base")``.

        Args:
            vision_kwargs / text_kwargs: extra ``from_pretrained`` keyword arguments of each part.
            **config_kwargs: further :class:`ClipBartConfig` fields (``num_visual_tokens``, ...).
        """
        vision_model = _load_part(vision, vision_kwargs or {}, text=False)
        language_model = _load_part(text, text_kwargs or {}, text=True)
        config = ClipBartConfig(
            vision_config=vision_model.config, text_config=language_model.config, **config_kwargs
        )
        model = cls(config, vision_model=vision_model, language_model=language_model)
        model.generation_config = language_model.generation_config
        return model


def _vision_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The vision sub-config of a full CLIP/SigLIP config, or the config itself."""
    return getattr(config, "vision_config", None) or config


def _load_part(part: str | PreTrainedModel | PreTrainedConfig, kwargs: dict[str, Any], *, text: bool) -> nn.Module:
    if isinstance(part, PreTrainedModel):
        return part
    if isinstance(part, PreTrainedConfig):
        config = part if text else _vision_config(part)
        return AutoModelForSeq2SeqLM.from_config(config) if text else AutoModel.from_config(config)
    if not isinstance(part, str):
        raise TypeError(f"a model part must be a name/path, a PreTrainedModel or a PreTrainedConfig, got {type(part)}")
    if text:
        return AutoModelForSeq2SeqLM.from_pretrained(part, **kwargs)
    vision_config = _vision_config(AutoConfig.from_pretrained(part))
    return MODEL_MAPPING[type(vision_config)].from_pretrained(part, config=vision_config, **kwargs)
