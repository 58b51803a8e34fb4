"""Method factory: one small :class:`MethodEntry` per fine-tuning method.

An entry knows the method's PEFT config class (for option checking before any model is loaded), the defaults it
derives from the task and model family (e.g. LoRA targets, p-adapter per-task constants), whether it needs
visual features, and how to wrap a loaded model. Adding a method is one :func:`register_training_method` call.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peft import LoraConfig, get_peft_model
from torch import nn

import vlpeft  # noqa: F401  (registers vlpeft's methods with PEFT)
from vlpeft.glue.families import FAMILIES
from vlpeft.tasks.layouts import LAYOUTS
from vlpeft.training.config import ConfigError
from vlpeft.tuners.p_adapter.config import TASK_DEFAULTS
from vlpeft.tuners.routed_lora.routing_support import preset_family, target_regex

__all__ = [
    "MethodEntry",
    "METHODS",
    "register_training_method",
    "get_method",
    "resolve_method_options",
    "apply_method",
    "count_parameters",
]

# PEFT config fields that the factory fills in itself; users may not set them.
_RESERVED_FIELDS = {
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "task_type",
}


@dataclass(frozen=True)
class MethodEntry:
    """How to build one fine-tuning method.

    Attributes:
        name: the ``method.type`` value.
        summary: one line for ``vlpeft train --help`` and error messages.
        config_path: ``"module:Class"`` of the method's PEFT config class (``None`` for full fine-tuning).
        defaults: ``(task_type, family) -> options`` filled in when the user leaves them unset.
        needs_visual_features: the method reads the model's visual features (routing); the family must name them.
        supported_families: families the method can be placed in (``None``: any family).
        option_fields: allowed options for methods without a config class.
    """

    name: str
    summary: str
    config_path: str | None
    defaults: Callable[[str, str | None], dict[str, Any]] = lambda task, family: {}
    needs_visual_features: bool = False
    supported_families: tuple[str, ...] | None = None
    option_fields: tuple[str, ...] = ()

    def config_class(self) -> type | None:
        """Import the config class (raises :class:`ConfigError` when the method is not installed)."""
        if self.config_path is None:
            return None
        module_name, class_name = self.config_path.split(":")
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ConfigError(
                f"method {self.name!r} needs {self.config_path.replace(':', '.')}, which cannot be imported "
                f"in this installation ({error})"
            ) from error

    def allowed_options(self) -> list[str]:
        cls = self.config_class()
        if cls is None:
            return list(self.option_fields)
        return [f.name for f in dataclasses.fields(cls) if f.name not in _RESERVED_FIELDS]


METHODS: dict[str, MethodEntry] = {}


def register_training_method(entry: MethodEntry) -> None:
    """Add (or replace) a method of the factory."""
    METHODS[entry.name] = entry


def get_method(name: str) -> MethodEntry:
    if name not in METHODS:
        raise ConfigError(f"method.type: unknown method {name!r}; allowed: {sorted(METHODS)}")
    return METHODS[name]


# --------------------------------------------------------------------------------------------- defaults
#: vlpeft.glue family of each training family that has a different name there (the composites; from the layouts).
GLUE_FAMILIES = {name: layout.glue_family for name, layout in LAYOUTS.items() if layout.glue_family}
#: Families whose task head is trained and saved alongside any PEFT method (from the layouts).
HEAD_MODULES = {name: list(layout.head_modules) for name, layout in LAYOUTS.items() if layout.head_modules}


def _family(name: str | None):
    if name is None:
        return None
    return FAMILIES.get(GLUE_FAMILIES.get(name, name))


def _described_at_attach(family: str | None) -> bool:
    """Whether the family's structure is derived from the model when the method is attached (chat-template models,
    :mod:`vlpeft.glue.derive`) rather than known before loading."""
    layout = LAYOUTS.get(family or "")
    return layout is not None and layout.sequence == "chat_template"


def _lora_targets(task: str, family_name: str | None) -> dict[str, Any]:
    """Query and value projections of every attention block in the language towers (LoRA's usual placement;
    routing.md §3.5-3.6), as a PEFT ``target_modules`` regex."""
    family = _family(family_name)
    if family is None:
        return {}
    try:
        regex = family.module_regex(None, ("self_attn", "cross_attn"), "query")
        regex_v = family.module_regex(None, ("self_attn", "cross_attn"), "value")
        return {"target_modules": f"({regex}|{regex_v})"}
    except ValueError:
        return {"target_modules": family.module_regex(None, ("self_attn", "cross_attn"), "fused_qkv")}


def _p_adapter_defaults(task: str, family_name: str | None) -> dict[str, Any]:
    """The tuner's per-task constants (p-adapter.md §5.1: p init, mu0, key pooling, reduction 8)."""
    return dict(TASK_DEFAULTS.get(task, {}))


# ----------------------------------------------------------------------------------------- entries
register_training_method(
    MethodEntry(
        name="full",
        summary="full fine-tuning of every parameter (optionally freezing towers)",
        config_path=None,
        option_fields=("freeze",),
    )
)
register_training_method(
    MethodEntry(
        name="lora",
        summary="PEFT LoRA (default targets: query/value of the language towers)",
        config_path="peft:LoraConfig",
        defaults=_lora_targets,
    )
)
register_training_method(
    MethodEntry(
        name="adapter",
        summary="bottleneck adapter (Houlsby/Pfeiffer/parallel), vlpeft.AdapterConfig",
        config_path="vlpeft:AdapterConfig",
    )
)
register_training_method(
    MethodEntry(
        name="p_adapter",
        summary="p-adapter (p-Laplacian adapter) on attention blocks plus an FFN adapter, vlpeft.PAdapterConfig",
        config_path="vlpeft:PAdapterConfig",
        defaults=_p_adapter_defaults,
    )
)
register_training_method(
    MethodEntry(
        name="routed_lora",
        summary="LoRA with a routing function over visual features, vlpeft.RoutedLoraConfig",
        config_path="vlpeft:RoutedLoraConfig",
        defaults=_lora_targets,
        needs_visual_features=True,
    )
)
register_training_method(
    MethodEntry(
        name="routed_adapter",
        summary="bottleneck adapter with a routing function, vlpeft.AdapterConfig(routing=...)",
        config_path="vlpeft:AdapterConfig",
        needs_visual_features=True,
    )
)


# ----------------------------------------------------------------------------------------- resolution
def resolve_method_options(method_type: str, options: dict[str, Any], task: str, family: str | None) -> Any:
    """Check the options of ``method_type`` and build its config object (no model needed).

    Returns:
        The PEFT config instance, or for ``full`` the checked options dict.

    Raises:
        ConfigError: unknown method/option (listing the allowed ones), a method unavailable in this install, a
            family the method cannot be placed in, or a value the config class rejects.
    """
    entry = get_method(method_type)
    allowed = entry.allowed_options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"method.{unknown[0]}: unknown option for method {method_type!r}; allowed: {allowed}")
    if entry.supported_families is not None and family not in entry.supported_families:
        raise ConfigError(
            f"method {method_type!r} cannot be used with model family {family!r}; "
            f"supported families: {list(entry.supported_families)}"
        )
    if entry.needs_visual_features and not _described_at_attach(family):
        fam = _family(family)
        if fam is None:
            raise ConfigError(
                f"method {method_type!r} routes visual features, but model family {family!r} has no "
                "registered visual-feature module (vlpeft.glue.families)"
            )
    cls = entry.config_class()
    if cls is None:
        freeze = options.get("freeze", [])
        if not isinstance(freeze, list) or not all(isinstance(x, str) for x in freeze):
            raise ConfigError(f"method.freeze: expected a list of tower names or regexes, got {freeze!r}")
        return dict(options)
    merged = {**entry.defaults(task, family), **options}
    head = HEAD_MODULES.get(family or "")
    if head and "modules_to_save" in allowed and merged.get("modules_to_save") is None:
        merged["modules_to_save"] = list(head)
    try:
        return cls(**merged)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"method {method_type!r}: invalid options {options}: {error}") from error


def _freeze_for_full(model: nn.Module, family_name: str | None, patterns: list[str]) -> None:
    family = _family(family_name)
    regexes = []
    for pattern in patterns:
        if family is not None and (pattern in family.tower_names() or pattern in ("vision", "language", "text")):
            regexes.extend(re.escape(t.prefix) + ".*" for t in family.resolve_towers(pattern))
        else:
            regexes.append(pattern)
    matched = 0
    for name, param in model.named_parameters():
        if any(re.match(r, name) for r in regexes):
            param.requires_grad_(False)
            matched += 1
    if patterns and matched == 0:
        raise ConfigError(f"method.freeze: {patterns} matched no parameter of the model")


def apply_method(model: nn.Module, method_type: str, method_config: Any, family: str | None) -> nn.Module:
    """Wrap ``model`` with the method (PEFT ``get_peft_model``) or, for ``full``, unfreeze it (minus ``freeze``)."""
    if method_type == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        _freeze_for_full(model, family, method_config.get("freeze", []))
        return model
    if isinstance(method_config, LoraConfig) and method_config.target_modules is None:
        # LoRA's usual placement from the model's own description: q/v of the language model's attention.
        described = preset_family(model, "LoraConfig")
        method_config.target_modules = target_regex(described, None, ("self_attn", "cross_attn"), ("query", "value"))
    return get_peft_model(model, method_config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
