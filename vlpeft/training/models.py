"""Resolve the model family before loading, then load the model and its processor (hub name or tiny twin)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from vlpeft.training.config import ConfigError, TrainConfig

__all__ = ["FAMILY_CLASSES", "KNOWN_HUB_FAMILIES", "resolve_family", "load_model", "load_processor"]

# Model class per family for ``from_pretrained`` (module:Class).
FAMILY_CLASSES: dict[str, str] = {
    "blip_caption": "transformers:BlipForConditionalGeneration",
    "blip_vqa": "transformers:BlipForQuestionAnswering",
    "blip2": "transformers:Blip2ForConditionalGeneration",
    "llava": "transformers:LlavaForConditionalGeneration",
    "paligemma": "transformers:PaliGemmaForConditionalGeneration",
    "git": "transformers:GitForCausalLM",
    "vision_encoder_decoder": "transformers:VisionEncoderDecoderModel",
}

# Hub-name prefixes whose family is known without reading a config (no download needed to validate).
KNOWN_HUB_FAMILIES: dict[str, str] = {
    "Salesforce/blip-image-captioning-": "blip_caption",
    "Salesforce/blip-vqa-": "blip_vqa",
    "Salesforce/blip2-": "blip2",
    "llava-hf/": "llava",
    "google/paligemma": "paligemma",
    "microsoft/git-": "git",
}


def resolve_family(config: TrainConfig) -> str:
    """The model family, found without loading weights (tiny name, ``model.family``, a local ``config.json``, or a
    known hub-name prefix). Raises :class:`ConfigError` when it cannot be determined."""
    model = config.model
    if (model.name is None) == (model.tiny is None):
        raise ConfigError("model: set exactly one of model.name (hub name or path) and model.tiny (tiny family)")
    if model.tiny is not None:
        from vlpeft.testing import FAMILIES

        if model.tiny not in FAMILIES:
            raise ConfigError(f"model.tiny: unknown tiny family {model.tiny!r}; allowed: {sorted(FAMILIES)}")
        return model.family or model.tiny
    if model.family is not None:
        return model.family
    local = Path(model.name)
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"model.name: local folder {model.name!r} has no config.json")
        architectures = json.loads(config_file.read_text()).get("architectures") or []
        for family, path in FAMILY_CLASSES.items():
            if path.split(":")[1] in architectures:
                return family
        raise ConfigError(
            f"model.name: architectures {architectures} of {model.name!r} belong to no known family; set model.family "
            f"(one of {sorted(FAMILY_CLASSES)})"
        )
    for prefix, family in KNOWN_HUB_FAMILIES.items():
        if model.name.startswith(prefix):
            return family
    raise ConfigError(
        f"model.family: cannot infer the family of {model.name!r}; set model.family to one of {sorted(FAMILY_CLASSES)}"
    )


def _import(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def load_model(config: TrainConfig, family: str) -> nn.Module:
    """Build the tiny twin (seeded with ``run.seed``) or ``from_pretrained`` the named checkpoint."""
    model = config.model
    if model.tiny is not None:
        from vlpeft.testing import build_tiny_model

        overrides = dict(model.tiny_overrides)
        if model.attn_implementation is not None:
            overrides["attn_implementation"] = model.attn_implementation
        try:
            return build_tiny_model(model.tiny, seed=config.run.seed, **overrides).model
        except ValueError as error:
            raise ConfigError(f"model.tiny_overrides: {error}") from error
    if family not in FAMILY_CLASSES:
        raise ConfigError(f"model.family: no model class known for family {family!r}; known: {sorted(FAMILY_CLASSES)}")
    kwargs: dict[str, Any] = {}
    if model.revision is not None:
        kwargs["revision"] = model.revision
    if model.attn_implementation is not None:
        kwargs["attn_implementation"] = model.attn_implementation
    return _import(FAMILY_CLASSES[family]).from_pretrained(model.name, **kwargs)


def load_processor(config: TrainConfig, family: str, texts: list[str]) -> Any:
    """The model's processor; for tiny models one built offline from ``texts`` (the task's words)."""
    model = config.model
    if model.tiny is not None:
        from vlpeft.tasks.processors import build_tiny_processor

        sizes = model.tiny_overrides
        return build_tiny_processor(
            model.tiny,
            texts,
            vocab_size=int(sizes.get("vocab_size", 99)),
            image_size=int(sizes.get("image_size", 32)),
            patch_size=int(sizes.get("patch_size", 8)),
        )
    from transformers import AutoProcessor

    kwargs = {"revision": model.revision} if model.revision is not None else {}
    return AutoProcessor.from_pretrained(model.processor or model.name, **kwargs)
