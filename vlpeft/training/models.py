"""Resolve the model family before loading, then load the model and its processor (hub name or tiny twin)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from vlpeft.models import VisionPrefixLMPreTrainedModel
from vlpeft.models.tiny import FAMILIES, build_tiny_model
from vlpeft.tasks.layouts import LAYOUTS, families_where
from vlpeft.tasks.processors import ImageTextProcessor, build_tiny_processor
from vlpeft.training.config import ConfigError, TrainConfig
from vlpeft.training.image_pairs import install_image_pairs, uses_two_images

__all__ = ["CHAT_TEMPLATE", "COMPOSITE_FAMILIES", "COMPOSITE_FAMILY_OPTIONS", "FAMILY_CLASSES", "KNOWN_HUB_FAMILIES",
           "check_model_options", "resolve_family", "load_model", "load_processor"]

# The tables below are read off the family layouts (vlpeft.tasks.layouts), one entry per family there.
#: Model class per family for ``from_pretrained`` (module:Class).
FAMILY_CLASSES: dict[str, str] = {name: layout.model_class for name, layout in LAYOUTS.items() if layout.model_class}
#: Composite family of a (vision, text) pair, by the text model's name.
COMPOSITE_TEXT_FAMILIES: dict[str, str] = {
    prefix: name for name, layout in LAYOUTS.items() for prefix in layout.composite_text_models
}
COMPOSITE_FAMILIES: tuple[str, ...] = families_where(lambda layout: layout.composite_task is not None)

#: Hub-name prefixes whose family is known without reading a config (no download needed to validate).
KNOWN_HUB_FAMILIES: dict[str, str] = {
    prefix: name for name, layout in LAYOUTS.items() for prefix in layout.hub_prefixes
}
#: The family of every image-text-to-text model outside the tables above: driven by its chat template.
CHAT_TEMPLATE = "chat_template"
#: ``model.options`` a recipe may set, by ``InputLayout.composite_task``: fields of
#: :class:`vlpeft.models.VisionPrefixLMConfig` (vlpeft's ViT + text-model composites) or of
#: :class:`vlpeft.models.ClipBartConfig` (CLIP-BART).
_PREFIX_OPTIONS = ("prefix_tokens", "visual_features", "use_visual_prefix", "prefix_projector", "head_pooling",
                   "classifier_hidden_size", "classifier_dropout", "skip_first_token_loss", "problem_type")
COMPOSITE_FAMILY_OPTIONS: dict[str, tuple[str, ...]] = {
    "causal_lm": _PREFIX_OPTIONS,
    "classification": _PREFIX_OPTIONS,
    "conditional_generation": ("num_visual_tokens", "downsample_pooling", "visual_layer_norm", "freeze_vision_model"),
}


def check_model_options(config: TrainConfig, family: str) -> None:
    """``model.options`` must be fields of the family's composite config (checked before any model loads).

    Raises:
        ConfigError: naming the option, the family and the allowed options.
    """
    options = config.model.options or {}
    if not options:
        return
    task = _composite_task(family)
    if task is None:
        raise ConfigError(f"model.options: {sorted(options)} set, but model family {family!r} is not a composite "
                          f"(model.options configures {list(COMPOSITE_FAMILIES)})")
    allowed = COMPOSITE_FAMILY_OPTIONS[task]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"model.options.{unknown[0]}: not an option of model family {family!r}; allowed: "
                          f"{sorted(allowed)}")


def resolve_family(config: TrainConfig) -> str:
    """The model family, found without loading weights (tiny name, ``model.family``, a local ``config.json``, or a
    known hub-name prefix). Raises :class:`ConfigError` when it cannot be determined."""
    model = config.model
    parts = model.vision is not None or model.text is not None
    if sum((model.name is not None, parts, model.tiny is not None)) != 1:
        raise ConfigError("model: set exactly one of model.name (hub name or path), model.vision + model.text "
                          "(composite parts) and model.tiny (tiny family)")
    if parts:
        if model.vision is None or model.text is None:
            raise ConfigError("model.vision / model.text: the composite needs both parts")
        if model.family is not None:
            if _composite_task(model.family) is None:
                raise ConfigError(f"model.family: {model.family!r} is not a composite family {list(COMPOSITE_FAMILIES)}")
            return model.family
        base = model.text.rsplit("/", 1)[-1].lower()
        for prefix, family in sorted(COMPOSITE_TEXT_FAMILIES.items(), key=lambda kv: -len(kv[0])):
            if base.startswith(prefix):
                return family
        raise ConfigError(f"model.family: cannot infer the composite family of text model {model.text!r}; set "
                          f"model.family to one of {list(COMPOSITE_FAMILIES)}")
    if model.tiny_twin is not None and model.tiny_twin not in tiny_names():
        raise ConfigError(f"model.tiny_twin: unknown tiny family {model.tiny_twin!r}; allowed: {tiny_names()}")
    if model.tiny is not None:
        if model.tiny not in tiny_names():
            raise ConfigError(f"model.tiny: unknown tiny family {model.tiny!r}; allowed: {tiny_names()}")
        return CHAT_TEMPLATE if model.tiny in _twins() else model.family or model.tiny
    if model.family is not None:
        return model.family
    local = Path(model.name)
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"model.name: local folder {model.name!r} has no config.json")
        saved = json.loads(config_file.read_text())
        architectures = saved.get("architectures") or []
        for family, path in FAMILY_CLASSES.items():
            if path.split(":")[1] in architectures:
                return family
        if saved.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            return CHAT_TEMPLATE
        raise ConfigError(
            f"model.name: architectures {architectures} of {model.name!r} belong to no known family and its "
            f"model_type {saved.get('model_type')!r} is not an image-text-to-text model; set model.family "
            f"(one of {sorted(FAMILY_CLASSES)})"
        )
    for prefix, family in KNOWN_HUB_FAMILIES.items():
        if model.name.startswith(prefix):
            return family
    # Any other hub model: an image-text-to-text model driven by its processor's chat template (its structure is
    # derived when the method is attached; a model of another kind fails to load with transformers' message).
    return CHAT_TEMPLATE


def _twins() -> dict[str, Any]:
    """The tiny twins of chat VLMs (:mod:`vlpeft.models.tiny.twins`), by name."""
    from vlpeft.models.tiny.twins import TWINS  # lazy: loads every twin family's model classes

    return TWINS


def tiny_names() -> list[str]:
    """Allowed ``model.tiny`` / ``model.tiny_twin`` values: the tiny families and the chat-VLM twins."""
    return sorted({*FAMILIES, *_twins()})


def _composite_task(family: str) -> str | None:
    """The head task of vlpeft's ViT + text-model composite ``family`` (``None`` for any other family)."""
    layout = LAYOUTS.get(family)
    return layout.composite_task if layout is not None else None


def _import(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def load_model(config: TrainConfig, family: str, num_labels: int | None = None) -> nn.Module:
    """Build the tiny twin (seeded with ``run.seed``), assemble the composite from its parts, or
    ``from_pretrained`` the named checkpoint. ``num_labels``: classifier width (discriminative framing).

    A family that takes two images per sample through its vision tower gets its pair hooks when the task has two
    images per sample (:mod:`vlpeft.training.image_pairs`)."""
    model = _load_model(config, family, num_labels)
    if uses_two_images(config):
        install_image_pairs(model, family)
    return model


def _load_model(config: TrainConfig, family: str, num_labels: int | None) -> nn.Module:
    model = config.model
    if model.tiny is not None and model.tiny in _twins():
        from vlpeft.models.tiny.twins import build_twin  # lazy: loads every twin family's model classes

        twin = build_twin(model.tiny, seed=config.run.seed).model
        if model.attn_implementation is not None:
            twin.set_attn_implementation(model.attn_implementation)
        return twin
    if model.tiny is not None:
        overrides = dict(model.tiny_overrides)
        if _composite_task(family) is not None:
            overrides = {**model.options, **overrides}
        if num_labels is not None:
            if overrides.get("num_labels", num_labels) != num_labels:
                raise ConfigError(f"model.tiny_overrides.num_labels: {overrides['num_labels']} does not match the "
                                  f"task's {num_labels} classes")
            overrides["num_labels"] = num_labels
        if model.attn_implementation is not None:
            overrides["attn_implementation"] = model.attn_implementation
        try:
            return build_tiny_model(model.tiny, seed=config.run.seed, **overrides).model
        except ValueError as error:
            raise ConfigError(f"model.tiny_overrides: {error}") from error
    kwargs: dict[str, Any] = {}
    if model.attn_implementation is not None:
        kwargs["attn_implementation"] = model.attn_implementation
    if model.vision is not None:
        return _assemble_parts(config, family, kwargs, num_labels)
    if family not in FAMILY_CLASSES:
        raise ConfigError(f"model.family: no model class known for family {family!r}; known: {sorted(FAMILY_CLASSES)}")
    if model.revision is not None:
        kwargs["revision"] = model.revision
    if num_labels is not None and _composite_task(family) is not None:
        kwargs["num_labels"] = num_labels
    if family == CHAT_TEMPLATE and config.run.precision == "bf16":
        kwargs["dtype"] = torch.bfloat16  # what fits one GPU; adapters keep float32 weights
    return _import(FAMILY_CLASSES[family]).from_pretrained(model.name, **kwargs)


def _assemble_parts(config: TrainConfig, family: str, kwargs: dict[str, Any], num_labels: int | None) -> nn.Module:
    """The composite of ``model.vision`` + ``model.text``: CLIP-BART (``conditional_generation``: its own
    ``from_pretrained_parts``, ``model.options`` = :class:`~vlpeft.models.ClipBartConfig` fields) or vlpeft's
    ViT + text-model prefix composite."""
    model = config.model
    task = _composite_task(family)
    if task == "conditional_generation":
        composite = _import(FAMILY_CLASSES[family])
        return composite.from_pretrained_parts(model.vision, model.text, vision_kwargs=kwargs, text_kwargs=kwargs,
                                               **model.options)
    labels = {"num_labels": num_labels} if num_labels is not None else {}
    return VisionPrefixLMPreTrainedModel.from_pretrained_parts(
        model.vision, model.text, task=task or "classification",
        vision_kwargs=kwargs, text_kwargs=kwargs, **model.options, **labels)


def load_processor(config: TrainConfig, family: str, texts: list[str]) -> Any:
    """The model's processor; for tiny models one built offline from ``texts`` (the task's words)."""
    model = config.model
    if model.tiny is not None and model.tiny in _twins():
        return _twins()[model.tiny].build_processor()
    if model.tiny is not None:
        sizes = model.tiny_overrides
        return build_tiny_processor(
            model.tiny,
            texts,
            vocab_size=int(sizes.get("vocab_size", 99)),
            image_size=int(sizes.get("image_size", LAYOUTS[family].tiny_image_size if family in LAYOUTS else 32)),
            patch_size=int(sizes.get("patch_size", 8)),
        )
    kwargs = {"revision": model.revision} if model.revision is not None else {}
    if model.vision is not None and model.processor is None:
        return ImageTextProcessor.from_parts(model.vision, model.text, **kwargs)
    source = model.processor or model.name
    if ImageTextProcessor.is_saved_in(source):
        return ImageTextProcessor.from_pretrained(source)
    return AutoProcessor.from_pretrained(source, **kwargs)
