"""The shared base of the vision-prefix composite's task classes (:mod:`vlpeft.models.modeling_vision_prefix_lm`):
vision encoder, visual-feature selection, ``prefix_projector`` and the text model; building a composite from two
parts and picking the task class for a config."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from vlpeft.models.configuration_vision_prefix_lm import VisionPrefixLMConfig
from vlpeft.models.vision_prefix_parts import build_text_model, build_vision_model, load_part, part_config

__all__ = ["VisionPrefixLMPreTrainedModel", "build_vision_prefix_lm", "model_class_for"]


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
    #: The ``config.task`` a task class holds; a class that sets it is the one :meth:`from_pretrained_parts` and
    #: :func:`build_vision_prefix_lm` pick for that task (``None`` on this shared base).
    holds_task: ClassVar[str | None] = None
    # (annotated without the class itself: transformers evaluates the type hints while the class is created)
    _task_classes: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        task = cls.__dict__.get("holds_task")
        if task is not None:
            VisionPrefixLMPreTrainedModel._task_classes[task] = cls

    def __init__(
        self,
        config: VisionPrefixLMConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else build_vision_model(config)
        self.text_model = text_model if text_model is not None else build_text_model(config)
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
        vision_config = part_config(vision)
        text_config = part_config(text)
        config = VisionPrefixLMConfig(
            vision_config=vision_config, text_config=text_config, task=task, **config_kwargs
        )
        model_class = model_class_for(config, cls)
        vision_model = load_part(vision, config, "vision", vision_kwargs or {})
        text_model = load_part(text, config, "text", text_kwargs or {})
        config.vision_config = vision_model.config
        config.text_config = text_model.config
        return model_class(config, vision_model=vision_model, text_model=text_model)


def model_class_for(config: VisionPrefixLMConfig, requested: type) -> type[VisionPrefixLMPreTrainedModel]:
    """The task class that holds ``config.task``; ``requested`` (the class :meth:`from_pretrained_parts` was called
    on) must be it, one of its bases, or the shared base."""
    model_class = VisionPrefixLMPreTrainedModel._task_classes[config.task]
    if requested is not VisionPrefixLMPreTrainedModel and not issubclass(model_class, requested):
        raise ValueError(
            f"{requested.__name__} cannot hold task={config.task!r}; use {model_class.__name__} (or call "
            "VisionPrefixLMPreTrainedModel.from_pretrained_parts to pick the class from the task)"
        )
    return model_class


def build_vision_prefix_lm(config: VisionPrefixLMConfig) -> VisionPrefixLMPreTrainedModel:
    """Randomly initialised composite of the class that fits ``config.task``."""
    return model_class_for(config, VisionPrefixLMPreTrainedModel)(config)
