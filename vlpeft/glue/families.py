"""The model-family registry: the description of a model, found by its class or derived from its structure.

:func:`detect_family` returns a model's :class:`~vlpeft.glue.description.ModelFamily`: the written-out entry of
:mod:`vlpeft.glue.known` for its class, or else the description derived by :mod:`vlpeft.glue.derive` (corrected by
the family's refinement, if it has one). Every consumer (tuners, training) reads descriptions through here; none
branches on family names.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from torch import nn

from vlpeft.glue import known
from vlpeft.glue.derive import DescriptionError, derive_family
from vlpeft.glue.description import (
    POSITIONS,
    TOWER_ALIASES,
    VISUAL_FEATURE_OUTPUTS,
    LayerLayout,
    ModelFamily,
    Tower,
)
from vlpeft.glue.known.layouts import LAYER_LAYOUTS

__all__ = [
    "FAMILIES",
    "LAYER_LAYOUTS",
    "POSITIONS",
    "TOWER_ALIASES",
    "VISUAL_FEATURE_OUTPUTS",
    "LayerLayout",
    "ModelFamily",
    "Tower",
    "detect_family",
    "family_for",
    "get_family",
    "register_family",
    "register_refinement",
]

#: Written-out families by name.
FAMILIES: dict[str, ModelFamily] = {family.name: family for family in known.FAMILIES}
_REFINEMENTS: dict[str, Callable[[ModelFamily], ModelFamily]] = dict(known.REFINEMENTS)
#: Descriptions derived in this process, by name (the latest derivation of a name wins).
_DERIVED: dict[str, ModelFamily] = {}
#: The description of each model object seen (tuners ask once per target module while they wrap the model).
_BY_MODEL: weakref.WeakKeyDictionary[nn.Module, ModelFamily] = weakref.WeakKeyDictionary()


def register_family(family: ModelFamily) -> None:
    """Add a written-out model family (for custom models whose structure cannot be derived)."""
    if family.name in FAMILIES and FAMILIES[family.name] != family:
        raise ValueError(f"Model family {family.name!r} is already registered with a different layout.")
    FAMILIES[family.name] = family


def register_refinement(class_name: str, refine: Callable[[ModelFamily], ModelFamily]) -> None:
    """Correct the derived description of models of class ``class_name`` with ``refine``."""
    _REFINEMENTS[class_name] = refine


def get_family(name: str) -> ModelFamily:
    """A written-out family, or one derived earlier in this process, by name."""
    if name in FAMILIES:
        return FAMILIES[name]
    if name in _DERIVED:
        return _DERIVED[name]
    raise ValueError(
        f"Unknown model family {name!r}; expected one of {sorted(FAMILIES)}, or a family derived from a loaded "
        f"model ({sorted(_DERIVED)} so far)."
    )


def detect_family(model: nn.Module) -> ModelFamily:
    """The description of ``model`` (a transformers model, possibly wrapped by PEFT).

    Raises:
        ValueError: the class has no written-out entry and its structure cannot be described (the message says
            what is missing).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    for family in FAMILIES.values():
        if name in family.class_names:
            return family
    known = _BY_MODEL.get(base)
    if known is not None:
        return known
    try:
        family = derive_family(base)
    except DescriptionError as error:
        raise ValueError(
            f"Unknown model family for model class {name!r}: {error}. Pass explicit `target_modules`, or register a "
            "ModelFamily with vlpeft.glue.families.register_family()."
        ) from error
    refine = _REFINEMENTS.get(name)
    if refine is not None:
        family = refine(family)
    _DERIVED[family.name] = family
    _BY_MODEL[base] = family
    return family


def family_for(model: nn.Module, name: str | None) -> ModelFamily:
    """The family ``name`` (e.g. from a saved adapter config) of ``model``: written out, or derived again."""
    if name is None or name not in FAMILIES:
        family = detect_family(model)
        if name is not None and family.name != name:
            raise ValueError(
                f"the adapter was made for model family {name!r}, but {type(model).__name__} is {family.name!r}"
            )
        return family
    return FAMILIES[name]
