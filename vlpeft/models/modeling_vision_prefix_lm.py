"""The routing paper's composite models: an HF vision encoder whose features enter an HF text model as a prefix.

Two heads share one base (:class:`VisionPrefixLMPreTrainedModel`):

- :class:`VisionPrefixLMForClassification`: an encoder LM (BERT/RoBERTa) with a two-layer MLP head, for VQA
  (soft-score BCE over an answer vocabulary) or entailment (cross-entropy);
- :class:`VisionPrefixLMForCausalLM`: a decoder LM (GPT-2 family) that captions/answers, with ``generate()``.

Module layout (``named_modules()``): ``vision_model`` (the HF vision model), ``prefix_projector``
(``nn.Identity`` or ``nn.Linear``), ``text_model`` (``RobertaModel``/``BertModel`` for classification, a
``*ForCausalLM``/``GPT2LMHeadModel`` for the decoder), and ``classifier.{fc1,layer_norm,fc2}`` for classification.

Every forward runs ``prefix_projector`` on the selected visual features, so a forward hook on it sees the
(batch, m, d_text) visual features x_R even when they are not used as a prefix (``use_visual_prefix=False``).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import ModelOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

from vlpeft._transformers_compat import CACHE_ARGUMENT, cache_argument_of, cache_of_output
from vlpeft.models.configuration_vision_prefix_lm import VisionPrefixLMConfig

__all__ = [
    "VisionPrefixLMPreTrainedModel",
    "VisionPrefixLMForClassification",
    "VisionPrefixLMForCausalLM",
    "VisionPrefixClassifierHead",
    "VisionPrefixClassifierOutput",
    "VisionPrefixCausalLMOutput",
    "build_vision_prefix_lm",
]


@dataclass
class VisionPrefixClassifierOutput(ModelOutput):
    """Output of :class:`VisionPrefixLMForClassification`.

    Attributes:
        loss: scalar loss when ``labels`` are given.
        logits: (batch, num_labels).
        hidden_states / attentions: the text model's, over the full sequence [prefix; text].
        visual_features: (batch, m, d_text), the ``prefix_projector`` output.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    visual_features: torch.FloatTensor | None = None


@dataclass
class VisionPrefixCausalLMOutput(ModelOutput):
    """Output of :class:`VisionPrefixLMForCausalLM`.

    Attributes:
        loss: scalar mean next-token loss over the labelled text tokens.
        logits: (batch, p + seq_len, vocab) where p is the number of prefix tokens prepended **in this call**
            (m on a first forward with the prefix on, otherwise 0); ``logits[:, p - 1 + i]`` predicts text token i.
        cache: the text model's cache (covers the prefix positions); ``past_key_values`` before transformers 5.25.
        hidden_states / attentions: the text model's.
        visual_features: (batch, m, d_text), the ``prefix_projector`` output.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    # The cache field has the name transformers' generation reads (``cache`` from 5.25, ``past_key_values`` before).
    if CACHE_ARGUMENT == "cache":
        cache: Any = None
    else:
        past_key_values: Any = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    visual_features: torch.FloatTensor | None = None


class VisionPrefixClassifierHead(nn.Module):
    """Linear(d, h) -> LayerNorm(h) -> GELU -> Linear(h, num_labels), the released ``--classifier_2layer`` head.

    Input (batch, d), output (batch, num_labels). ``h`` defaults to 2d.
    """

    def __init__(
        self, hidden_size: int, num_labels: int, inner_size: int | None = None, dropout: float = 0.0
    ):
        super().__init__()
        inner_size = inner_size or 2 * hidden_size
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(hidden_size, inner_size)
        self.layer_norm = nn.LayerNorm(inner_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(inner_size, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.layer_norm(self.fc1(self.dropout(pooled))))
        return self.fc2(self.dropout(hidden))


def _accepts_kwarg(model_class: type, name: str) -> bool:
    return name in inspect.signature(model_class.__init__).parameters


def _build_vision_model(config: VisionPrefixLMConfig) -> PreTrainedModel:
    vision_class = MODEL_MAPPING[type(config.vision_config)]
    kwargs = {}
    if _accepts_kwarg(vision_class, "add_pooling_layer"):
        kwargs["add_pooling_layer"] = config.visual_features == "pooler"
    return AutoModel.from_config(config.vision_config, **kwargs)


def _build_text_model(config: VisionPrefixLMConfig) -> PreTrainedModel:
    if config.task == "causal_lm":
        return AutoModelForCausalLM.from_config(config.text_config)
    text_class = MODEL_MAPPING[type(config.text_config)]
    kwargs = {}
    if _accepts_kwarg(text_class, "add_pooling_layer"):
        kwargs["add_pooling_layer"] = config.head_pooling == "random_frozen_pooler"
    return AutoModel.from_config(config.text_config, **kwargs)


class VisionPrefixLMPreTrainedModel(PreTrainedModel):
    """Shared base: vision encoder, visual-feature selection, ``prefix_projector`` and the text model."""

    config_class = VisionPrefixLMConfig
    config: VisionPrefixLMConfig
    base_model_prefix = "vision_prefix_lm"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache", "past_key_values"]

    def __init__(
        self,
        config: VisionPrefixLMConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else _build_vision_model(config)
        self.text_model = text_model if text_model is not None else _build_text_model(config)
        if config.prefix_projector == "identity":
            self.prefix_projector: nn.Module = nn.Identity()
        else:
            self.prefix_projector = nn.Linear(config.vision_hidden_size, config.text_hidden_size)
        self._check_visual_feature_source()

    # ------------------------------------------------------------------ helpers
    def _check_visual_feature_source(self) -> None:
        mode = self.config.visual_features
        if mode == "pooler":
            has_pooler = getattr(self.vision_model, "pooler", True) is not None
            inner = getattr(self.vision_model, "vision_model", None)
            if inner is not None and getattr(inner, "use_head", True) is False:
                has_pooler = False
            if not has_pooler:
                raise ValueError(
                    f"visual_features='pooler' but the vision model {type(self.vision_model).__name__} has no "
                    "pooler (pooler_output would be None); use visual_features='cls', 'mean' or 'all'"
                )
        if mode == "cls" and not self._vision_has_cls_token():
            raise ValueError(
                f"visual_features='cls' but the vision model {type(self.vision_model).__name__} has no class "
                "token; use visual_features='pooler', 'mean' or 'all'"
            )

    def _vision_has_cls_token(self) -> bool:
        for module in self.vision_model.modules():
            if hasattr(module, "cls_token") or hasattr(module, "class_embedding"):
                return True
        return False

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def freeze_vision(self) -> None:
        """Set ``requires_grad=False`` on every vision-model parameter (the paper keeps the ViT frozen)."""
        for parameter in self.vision_model.parameters():
            parameter.requires_grad_(False)

    @property
    def num_prefix_tokens(self) -> int:
        """Number of prefix positions a first forward prepends: m with the prefix on, else 0."""
        if not self.config.use_visual_prefix:
            return 0
        return self.num_visual_tokens

    @property
    def num_visual_tokens(self) -> int:
        """m: the number of visual tokens ``prefix_projector`` receives per image."""
        if self.config.visual_features != "all":
            return 1
        vision_config = self.config.vision_config
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        return patches + (1 if self._vision_has_cls_token() else 0)

    def select_visual_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run the vision model and select the visual tokens.

        Args:
            pixel_values: (batch, channels, height, width).

        Returns:
            (batch, m, d_vision) features before ``prefix_projector``.
        """
        outputs = self.vision_model(pixel_values=pixel_values)
        mode = self.config.visual_features
        if mode == "pooler":
            pooled = outputs.pooler_output
            if pooled is None:
                raise ValueError(
                    f"visual_features='pooler' but {type(self.vision_model).__name__} returned no pooler_output"
                )
            return pooled.unsqueeze(1)
        hidden = outputs.last_hidden_state
        if mode == "cls":
            return hidden[:, :1]
        if mode == "mean":
            return hidden.mean(dim=1, keepdim=True)
        return hidden

    def _visual_features(
        self, pixel_values: torch.Tensor | None, vision_features: torch.Tensor | None
    ) -> torch.Tensor:
        """Projected visual features (batch, m, d_text); ``prefix_projector`` runs here on every forward."""
        if vision_features is None:
            if pixel_values is None:
                raise ValueError(
                    f"{type(self).__name__} needs the image: pass pixel_values (batch, 3, H, W) or precomputed "
                    "vision_features (batch, m, d_vision)"
                )
            vision_features = self.select_visual_features(pixel_values)
        elif vision_features.dim() != 3 or vision_features.shape[-1] != self.config.vision_hidden_size:
            raise ValueError(
                f"vision_features must be (batch, m, {self.config.vision_hidden_size}), got "
                f"{tuple(vision_features.shape)}"
            )
        return self.prefix_projector(vision_features)

    def _embed_text(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(
                "pass exactly one of input_ids (batch, seq_len) and inputs_embeds (batch, seq_len, d)"
            )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        return inputs_embeds

    @classmethod
    def from_pretrained_parts(
        cls,
        vision: str | PreTrainedModel | PreTrainedConfig,
        text: str | PreTrainedModel | PreTrainedConfig,
        *,
        task: str | None = None,
        vision_kwargs: dict[str, Any] | None = None,
        text_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> VisionPrefixLMPreTrainedModel:
        """Build a composite from a vision part and a text part.

        Each part is a hub name or local path (loaded with ``from_pretrained``), a model instance (used as is),
        or a config (randomly initialised). Example: ``from_pretrained_parts("google/vit-base-patch16-224-in21k",
        "roberta-base", task="classification", num_labels=3129)``.

        Args:
            vision: vision encoder (``ViTModel``, ``CLIPVisionModel``, ``SiglipVisionModel``, ...).
            text: text model: an encoder for ``task="classification"``, a decoder LM for ``"causal_lm"``.
            task: see :class:`VisionPrefixLMConfig`; inferred from the text model when ``None``.
            vision_kwargs / text_kwargs: extra ``from_pretrained`` keyword arguments for loading by name.
            **config_kwargs: further :class:`VisionPrefixLMConfig` fields (``prefix_tokens``, ``num_labels``, ...).

        Returns:
            A :class:`VisionPrefixLMForClassification` or :class:`VisionPrefixLMForCausalLM` (or ``cls`` when
            called on one of them; the task must then match).
        """
        vision_config = _part_config(vision)
        text_config = _part_config(text)
        config = VisionPrefixLMConfig(
            vision_config=vision_config, text_config=text_config, task=task, **config_kwargs
        )
        model_class = _model_class_for(config, cls)
        vision_model = _load_part(vision, config, "vision", vision_kwargs or {})
        text_model = _load_part(text, config, "text", text_kwargs or {})
        config.vision_config = vision_model.config
        config.text_config = text_model.config
        return model_class(config, vision_model=vision_model, text_model=text_model)


def _part_config(part: str | PreTrainedModel | PreTrainedConfig) -> PreTrainedConfig:
    if isinstance(part, PreTrainedModel):
        return part.config
    if isinstance(part, PreTrainedConfig):
        return part
    if isinstance(part, str):
        return AutoConfig.from_pretrained(part)
    raise TypeError(
        f"a model part must be a name/path, a PreTrainedModel or a PreTrainedConfig, got {type(part)}"
    )


def _load_part(
    part: str | PreTrainedModel | PreTrainedConfig,
    config: VisionPrefixLMConfig,
    which: str,
    kwargs: dict[str, Any],
) -> PreTrainedModel:
    if isinstance(part, PreTrainedModel):
        return part
    if which == "vision":
        auto_class, mapping = AutoModel, MODEL_MAPPING
        part_config = config.vision_config
        wants_pooler = config.visual_features == "pooler"
    else:
        causal = config.task == "causal_lm"
        auto_class = AutoModelForCausalLM if causal else AutoModel
        mapping = MODEL_FOR_CAUSAL_LM_MAPPING if causal else MODEL_MAPPING
        part_config = config.text_config
        wants_pooler = config.head_pooling == "random_frozen_pooler"
    model_kwargs = dict(kwargs)
    if _accepts_kwarg(mapping[type(part_config)], "add_pooling_layer"):
        model_kwargs.setdefault("add_pooling_layer", wants_pooler)
    if isinstance(part, PreTrainedConfig):
        return auto_class.from_config(part, **model_kwargs)
    model, loading_info = auto_class.from_pretrained(part, output_loading_info=True, **model_kwargs)
    new_pooler = [key for key in loading_info.get("missing_keys", []) if "pooler" in key]
    if which == "vision" and wants_pooler and new_pooler:
        warnings.warn(
            f"{part!r} has no pooler weights ({', '.join(sorted(new_pooler))} newly initialised), yet "
            "visual_features='pooler' reads them (quirk Q14); consider visual_features='cls' or 'mean'",
            stacklevel=3,
        )
    return model


def _model_class_for(config: VisionPrefixLMConfig, requested: type) -> type[VisionPrefixLMPreTrainedModel]:
    model_class = VisionPrefixLMForCausalLM if config.task == "causal_lm" else VisionPrefixLMForClassification
    if requested is not VisionPrefixLMPreTrainedModel and not issubclass(model_class, requested):
        raise ValueError(
            f"{requested.__name__} cannot hold task={config.task!r}; use {model_class.__name__} (or call "
            "VisionPrefixLMPreTrainedModel.from_pretrained_parts to pick the class from the task)"
        )
    return model_class


def build_vision_prefix_lm(config: VisionPrefixLMConfig) -> VisionPrefixLMPreTrainedModel:
    """Randomly initialised composite of the class that fits ``config.task``."""
    return _model_class_for(config, VisionPrefixLMPreTrainedModel)(config)


class VisionPrefixLMForClassification(VisionPrefixLMPreTrainedModel):
    """Vision encoder + encoder LM (BERT/RoBERTa) + :class:`VisionPrefixClassifierHead`.

    Sequence fed to the text model: [prefix (m tokens); text (seq_len tokens)], the attention mask gets m leading
    ones, and the text is embedded once (word embeddings; the text model adds positions, token types, LN).
    """

    def __init__(
        self,
        config: VisionPrefixLMConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        if config.task != "classification":
            raise ValueError(
                f"VisionPrefixLMForClassification needs task='classification', got {config.task!r}"
            )
        super().__init__(config, vision_model=vision_model, text_model=text_model)
        self.num_labels = config.num_labels
        self.classifier = VisionPrefixClassifierHead(
            config.text_hidden_size,
            config.num_labels,
            config.classifier_hidden_size,
            config.classifier_dropout,
        )
        if config.head_pooling == "random_frozen_pooler":
            pooler = getattr(self.text_model, "pooler", None)
            if pooler is None:
                raise ValueError(
                    f"head_pooling='random_frozen_pooler' but {type(self.text_model).__name__} has no pooler"
                )
        self.post_init()
        if config.head_pooling == "random_frozen_pooler":
            self.text_model.pooler.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        **kwargs: Any,
    ) -> VisionPrefixClassifierOutput:
        """Classify (image, text) pairs.

        Args:
            input_ids: (batch, seq_len) text token ids (or ``inputs_embeds`` (batch, seq_len, d_text)).
            attention_mask: (batch, seq_len) 1 for real tokens; defaults to all ones.
            pixel_values: (batch, 3, H, W), or ``vision_features`` (batch, m, d_vision) precomputed.
            labels: (batch, num_labels) soft scores in [0, 1] for ``multi_label_classification`` (BCE with
                logits, mean over all entries), or (batch,) class ids for ``single_label_classification``.
            token_type_ids: optional (batch, seq_len); the prefix gets type 0.
            **kwargs: passed to the text model (e.g. ``output_attentions``, ``output_hidden_states``).
        """
        visual = self._visual_features(pixel_values, vision_features)
        text_embeds = self._embed_text(input_ids, inputs_embeds)
        batch_size, seq_len = text_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=text_embeds.device)
        prefix_len = visual.shape[1] if self.config.use_visual_prefix else 0
        if prefix_len:
            embeds = torch.cat([visual.to(text_embeds.dtype), text_embeds], dim=1)
            full_mask = torch.cat([attention_mask.new_ones(batch_size, prefix_len), attention_mask], dim=1)
            if token_type_ids is not None:
                token_type_ids = torch.cat(
                    [token_type_ids.new_zeros(batch_size, prefix_len), token_type_ids], 1
                )
        else:
            embeds, full_mask = text_embeds, attention_mask
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        kwargs["return_dict"] = True
        outputs = self.text_model(inputs_embeds=embeds, attention_mask=full_mask, **kwargs)
        pooled = self._pool(outputs, prefix_len, attention_mask)
        logits = self.classifier(pooled)
        loss = self._loss(logits, labels) if labels is not None else None
        return VisionPrefixClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            visual_features=visual,
        )

    def _pool(self, outputs: Any, prefix_len: int, text_mask: torch.Tensor) -> torch.Tensor:
        """(batch, d_text) head input from the text model's (batch, prefix_len + seq_len, d_text) states."""
        mode = self.config.head_pooling
        hidden = outputs.last_hidden_state
        if mode == "random_frozen_pooler":
            return outputs.pooler_output
        if mode == "first":
            return hidden[:, 0]
        if mode == "first_text":
            return hidden[:, prefix_len]
        text_hidden = hidden[:, prefix_len:]
        weights = text_mask.to(text_hidden.dtype).unsqueeze(-1)
        return (text_hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.problem_type == "multi_label_classification":
            if labels.shape != logits.shape:
                raise ValueError(
                    f"multi_label_classification labels must be soft scores of shape {tuple(logits.shape)}, got "
                    f"{tuple(labels.shape)}"
                )
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.is_floating_point():
            raise ValueError(
                f"single_label_classification labels must be class ids of shape ({logits.shape[0]},), got "
                f"{tuple(labels.shape)} {labels.dtype}"
            )
        return F.cross_entropy(logits, labels)


class VisionPrefixLMForCausalLM(VisionPrefixLMPreTrainedModel, GenerationMixin):
    """Vision encoder + decoder LM (GPT-2 family); captions/answers with ``generate()``.

    Training sequence: [prefix (m tokens); text]; ``labels`` (batch, seq_len) align with the text and use -100
    for ignored positions (padding, prompt). The standard shift trains every labelled text token, including the
    first one, which is predicted from the last prefix position (unless ``skip_first_token_loss``, quirk Q10).
    """

    def __init__(
        self,
        config: VisionPrefixLMConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        if config.task != "causal_lm":
            raise ValueError(f"VisionPrefixLMForCausalLM needs task='causal_lm', got {config.task!r}")
        super().__init__(config, vision_model=vision_model, text_model=text_model)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.text_model.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        vision_features: torch.FloatTensor | None = None,
        prefix_in_sequence: bool = False,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> VisionPrefixCausalLMOutput:
        """Next-token prediction conditioned on the image.

        Args:
            input_ids: (batch, seq_len) text ids (or ``inputs_embeds`` (batch, seq_len, d_text)).
            attention_mask: (batch, seq_len) over the text (the prefix is added here), or, with
                ``prefix_in_sequence``, over the whole sequence including the prefix positions.
            pixel_values: (batch, 3, H, W), or ``vision_features`` (batch, m, d_vision) precomputed.
            labels: (batch, seq_len) target ids aligned with the text, -100 to ignore.
            cache / use_cache: the text model's cache. The prefix is prepended only when the cache is
                empty (first forward). ``past_key_values`` is the same (its name before transformers 5.25).
            prefix_in_sequence: used by :meth:`generate`: ``inputs_embeds`` already reserves the first m
                positions for the prefix (they are overwritten with the projected features) and
                ``attention_mask`` covers them.
            **kwargs: passed to the text model.
        """
        visual = self._visual_features(pixel_values, vision_features)
        text_embeds = self._embed_text(input_ids, inputs_embeds)
        batch_size, seq_len = text_embeds.shape[:2]
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        cache_len = cache.get_seq_length() if cache is not None else 0
        use_prefix = self.config.use_visual_prefix
        num_visual = visual.shape[1]
        added = 0  # prefix positions prepended in this call
        if prefix_in_sequence:
            if use_prefix and cache_len == 0:
                if seq_len < num_visual:
                    raise ValueError(
                        f"prefix_in_sequence: inputs_embeds has {seq_len} positions, fewer than the {num_visual} "
                        "reserved for the prefix"
                    )
                embeds = torch.cat([visual.to(text_embeds.dtype), text_embeds[:, num_visual:]], dim=1)
            else:
                embeds = text_embeds
            full_mask = attention_mask
        else:
            embeds = text_embeds
            full_mask = attention_mask
            if use_prefix:
                if cache_len == 0:
                    embeds = torch.cat([visual.to(text_embeds.dtype), text_embeds], dim=1)
                    added = num_visual
                if attention_mask is not None:
                    full_mask = torch.cat(
                        [attention_mask.new_ones(batch_size, num_visual), attention_mask], dim=1
                    )
        new_len = embeds.shape[1]
        if full_mask is None:
            full_mask = torch.ones(batch_size, cache_len + new_len, dtype=torch.long, device=embeds.device)
        if full_mask.shape[1] != cache_len + new_len:
            raise ValueError(
                f"attention_mask covers {full_mask.shape[1]} positions but the cache holds {cache_len} and "
                f"{new_len} are new"
            )
        kwargs.pop("position_ids", None)  # positions are derived from the full mask (handles left padding)
        position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_len:]
        kwargs["return_dict"] = True
        outputs = self.text_model(
            inputs_embeds=embeds,
            attention_mask=full_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{cache_argument_of(self.text_model.forward): cache},
            **kwargs,
        )
        logits = outputs.logits
        loss = self._loss(logits, labels, added) if labels is not None else None
        return VisionPrefixCausalLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_ARGUMENT: cache_of_output(outputs)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            visual_features=visual,
        )

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, prefix_len: int) -> torch.Tensor:
        batch_size = labels.shape[0]
        if labels.shape[1] + prefix_len != logits.shape[1]:
            raise ValueError(
                f"labels must align with the text: expected (batch, {logits.shape[1] - prefix_len}), got "
                f"{tuple(labels.shape)}"
            )
        if self.config.skip_first_token_loss:
            labels = labels.clone()
            labels[:, 0] = -100
        full_labels = torch.cat([labels.new_full((batch_size, prefix_len), -100), labels], dim=1)
        shift_logits = logits[:, :-1].float()
        shift_labels = full_labels[:, 1:].to(logits.device)
        return F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        **generate_kwargs: Any,
    ) -> Any:
        """Generate text for images, optionally continuing a (left-padded) prompt.

        The vision model runs once; its selected features (batch, m, d_vision) travel as ``vision_features``,
        which ``generate`` expands per beam like every other per-example input, and ``prefix_projector`` runs on
        them at every step. Returns only the **new** tokens (batch * num_return_sequences, new_len), or the
        usual generate output object with ``return_dict_in_generate=True``.

        Args:
            pixel_values: (batch, 3, H, W), or ``vision_features`` (batch, m, d_vision).
            input_ids: optional prompt (batch, prompt_len), left-padded. Without a prefix and without a prompt,
                generation starts from ``bos_token_id``.
            attention_mask: (batch, prompt_len) for the prompt.
            **generate_kwargs: ``num_beams``, ``max_new_tokens``, ... as for ``GenerationMixin.generate``.
        """
        if generate_kwargs.get("use_cache") is False:
            raise ValueError(
                "VisionPrefixLMForCausalLM.generate needs use_cache=True (the prefix lives in the cache)"
            )
        for key in ("inputs_embeds", "prefix_in_sequence"):
            if key in generate_kwargs:
                raise ValueError(f"VisionPrefixLMForCausalLM.generate builds {key} itself; do not pass it")
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("generate needs pixel_values (batch, 3, H, W) or vision_features")
            vision_features = self.select_visual_features(pixel_values)
        batch_size = vision_features.shape[0]
        device = vision_features.device
        if input_ids is None:
            if self.config.use_visual_prefix:
                input_ids = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
            else:
                bos = self.generation_config.bos_token_id
                if bos is None:
                    raise ValueError(
                        "generation without a visual prefix and without a prompt needs bos_token_id"
                    )
                input_ids = torch.full((batch_size, 1), int(bos), dtype=torch.long, device=device)
        if input_ids.shape[0] != batch_size:
            raise ValueError(f"input_ids has batch {input_ids.shape[0]} but there are {batch_size} images")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_embeds = self.get_input_embeddings()(input_ids)
        if self.config.use_visual_prefix:
            num_visual = vision_features.shape[1]
            placeholder = text_embeds.new_zeros(batch_size, num_visual, text_embeds.shape[-1])
            inputs_embeds = torch.cat([placeholder, text_embeds], dim=1)
            attention_mask = torch.cat(
                [attention_mask.new_ones(batch_size, num_visual), attention_mask], dim=1
            )
        else:
            inputs_embeds = text_embeds
        return super().generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            vision_features=vision_features,
            prefix_in_sequence=True,
            **generate_kwargs,
        )
