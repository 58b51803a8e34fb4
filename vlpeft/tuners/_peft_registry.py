"""The one place where vlpeft touches PEFT's private internals.

PEFT 0.21 keeps its method registry in four module-level dicts in ``peft.mapping``. Its public
``register_peft_method`` only accepts members of the closed ``peft.PeftType`` enum, so out-of-tree methods
register by writing those dicts directly (see ``ecosystem.md`` §2.2). Every other vlpeft module goes through
:func:`register_method`, which only :func:`vlpeft.registration.register_all` calls; ``tests/tuners/test_peft_registry.py``
fails loudly when PEFT changes these internals.
"""

from __future__ import annotations

import enum

import peft.mapping as _mapping
from peft.tuners import tuners_utils as _tuners_utils


class VLPeftType(str, enum.Enum):  # noqa: UP042 - same base classes as peft.PeftType
    """PEFT method types added by vlpeft.

    A ``str`` enum: members compare and hash equal to the ``"peft_type"`` string stored in
    ``adapter_config.json``, and transformers can call ``.value.lower()`` on them.
    """

    PADAPTER = "PADAPTER"
    ROUTED_LORA = "ROUTED_LORA"
    BOTTLENECK_ADAPTER = "BOTTLENECK_ADAPTER"


def get_submodules(model, key: str):
    """``(parent, target, target_name)`` of the module named ``key``: PEFT's private ``_get_submodules``, which its
    own tuners use to unload wrapped modules."""
    return _tuners_utils._get_submodules(model, key)


REQUIRED_PEFT_DICTS = (
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
)


def check_peft_internals() -> None:
    """Raise if PEFT no longer exposes the registry dicts vlpeft writes into."""
    if not callable(getattr(_tuners_utils, "_get_submodules", None)):
        raise RuntimeError(
            "peft.tuners.tuners_utils._get_submodules is missing in the installed PEFT; vlpeft's p-adapter unload "
            "(through vlpeft/tuners/_peft_registry.py) must be updated for this PEFT release."
        )
    for name in REQUIRED_PEFT_DICTS:
        if not isinstance(getattr(_mapping, name, None), dict):
            raise RuntimeError(
                f"peft.mapping.{name} is missing or not a dict in the installed PEFT; vlpeft's method "
                "registration (vlpeft/tuners/_peft_registry.py) must be updated for this PEFT release."
            )


def register_method(peft_type: VLPeftType, config_cls: type, model_cls: type) -> None:
    """Register a vlpeft method with PEFT so that ``get_peft_model`` and ``PeftModel.from_pretrained`` find it.

    The tuner's ``prefix`` must be ``f"{peft_type.value.lower()}_"`` (transformers' ``delete_adapter`` assumes
    it) and unique across all PEFT methods. Registration is idempotent for the same classes.
    """
    check_peft_internals()
    prefix = model_cls.prefix
    expected = f"{peft_type.value.lower()}_"
    if prefix != expected:
        raise ValueError(f"{model_cls.__name__}.prefix is {prefix!r}; expected {expected!r} for {peft_type.value}.")
    for other_type, other_prefix in _mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if other_prefix == prefix and other_type != peft_type:
            raise ValueError(f"PEFT prefix {prefix!r} of {peft_type.value} is already used by {other_type}.")
    existing = _mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if existing is not None and existing is not model_cls:
        raise ValueError(f"PEFT type {peft_type.value} is already registered to {existing.__name__}.")
    _mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    _mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    _mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix


# Prefixes, derived from the types as transformers expects. No prefix is a substring of another one, so
# PEFT's "prefix in parameter name" checks never confuse two vlpeft methods.
PREFIXES = {member: f"{member.value.lower()}_" for member in VLPeftType}
