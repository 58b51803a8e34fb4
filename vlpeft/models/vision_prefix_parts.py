"""The two parts of the vision-prefix composite (:mod:`vlpeft.models.modeling_vision_prefix_lm`): building a
vision encoder and a text model from the composite's config, or loading them from a name, a model or a config."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

from vlpeft.models.configuration_vision_prefix_lm import VisionPrefixLMConfig

__all__ = ["accepts_kwarg", "build_text_model", "build_vision_model", "load_part", "part_config"]


def accepts_kwarg(model_class: type, name: str) -> bool:
    return name in inspect.signature(model_class.__init__).parameters


def build_vision_model(config: VisionPrefixLMConfig) -> PreTrainedModel:
    """A randomly initialised vision encoder of ``config.vision_config`` (with a pooler only when it is read)."""
    vision_class = MODEL_MAPPING[type(config.vision_config)]
    kwargs = {}
    if accepts_kwarg(vision_class, "add_pooling_layer"):
        kwargs["add_pooling_layer"] = config.visual_features == "pooler"
    return AutoModel.from_config(config.vision_config, **kwargs)


def build_text_model(config: VisionPrefixLMConfig) -> PreTrainedModel:
    """A randomly initialised text model: a causal LM for ``task="causal_lm"``, else the bare encoder."""
    if config.task == "causal_lm":
        return AutoModelForCausalLM.from_config(config.text_config)
    text_class = MODEL_MAPPING[type(config.text_config)]
    kwargs = {}
    if accepts_kwarg(text_class, "add_pooling_layer"):
        kwargs["add_pooling_layer"] = config.head_pooling == "random_frozen_pooler"
    return AutoModel.from_config(config.text_config, **kwargs)


def part_config(part: str | PreTrainedModel | PreTrainedConfig) -> PreTrainedConfig:
    """The config of a part given as a name/path, a model or a config."""
    if isinstance(part, PreTrainedModel):
        return part.config
    if isinstance(part, PreTrainedConfig):
        return part
    if isinstance(part, str):
        return AutoConfig.from_pretrained(part)
    raise TypeError(
        f"a model part must be a name/path, a PreTrainedModel or a PreTrainedConfig, got {type(part)}"
    )


def load_part(
    part: str | PreTrainedModel | PreTrainedConfig,
    config: VisionPrefixLMConfig,
    which: str,
    kwargs: dict[str, Any],
) -> PreTrainedModel:
    """The ``which`` part (``"vision"`` or ``"text"``) as a model: used as is, built from a config, or loaded by
    name (warning when ``visual_features='pooler'`` reads a pooler the checkpoint lacks)."""
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
    if accepts_kwarg(mapping[type(part_config)], "add_pooling_layer"):
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
