"""The name under which transformers passes a model's KV cache, across the releases vlpeft supports.

transformers 5.25 renamed the cache argument of every ``forward`` (models, decoder layers, attention modules) and
the cache field of every model output from ``past_key_values`` to ``cache``; generation passes ``cache=`` and reads
``outputs["cache"]``. Releases before 5.25 pass and read ``past_key_values``. Code that receives a cache through
``**kwargs`` or returns one from its own ``forward`` goes through this module.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

from transformers import TrainingArguments
from transformers.generation import utils as _generation_utils

#: The keyword transformers' generation passes the cache under, and the output field it reads it from.
CACHE_ARGUMENT: str = "cache" if "cache" in _generation_utils.ALL_CACHE_NAMES else "past_key_values"

#: Every keyword a cache may arrive under (the current name first).
CACHE_ARGUMENTS: tuple[str, ...] = ("cache", "past_key_values")


def cache_from_kwargs(kwargs: Mapping[str, Any]) -> Any:
    """The cache passed in ``kwargs`` under either name, or ``None``."""
    for name in CACHE_ARGUMENTS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


@functools.cache
def _parameter_names(function: Any) -> frozenset[str] | None:
    try:
        return frozenset(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None


def _parameters(function: Any) -> frozenset[str] | None:
    """The parameter names of ``function`` (of a bound method's function, so that the lookup is cached once per
    class, not per call), or None where no signature can be read."""
    return _parameter_names(getattr(function, "__func__", function))


def cache_argument_of(function: Any) -> str:
    """The cache keyword a ``forward`` takes: ``"cache"`` if its signature has it, else ``"past_key_values"``."""
    parameters = _parameters(function)
    if parameters is None:
        return CACHE_ARGUMENT
    return "cache" if "cache" in parameters else "past_key_values"


def takes_cache_argument(function: Any) -> bool:
    """Whether a ``forward`` takes a KV cache argument under any of its names."""
    parameters = _parameters(function)
    return parameters is not None and any(name in parameters for name in (*CACHE_ARGUMENTS, "past_key_value"))


def cache_of_output(outputs: Any) -> Any:
    """The cache a model output carries (``outputs.cache`` from 5.25, ``outputs.past_key_values`` before)."""
    for name in CACHE_ARGUMENTS:
        if name in getattr(outputs, "__dataclass_fields__", {}):
            return getattr(outputs, name)
    return None


def activation_checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """``TrainingArguments`` keywords for non-reentrant activation checkpointing.

    transformers 5.25 renamed ``gradient_checkpointing(_kwargs)`` to ``activation_checkpointing(_kwargs)`` (the old
    names warn and go in v6).
    """
    fields = getattr(TrainingArguments, "__dataclass_fields__", {})
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def enable_activation_checkpointing(model: Any, *, use_reentrant: bool = False) -> None:
    """Turn on activation checkpointing of a transformers model (non-reentrant by default).

    ``activation_checkpointing_enable`` from transformers 5.25, ``gradient_checkpointing_enable`` before (the old
    name warns there and goes in v6).
    """
    options = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def disable_activation_checkpointing(model: Any) -> None:
    """Turn activation checkpointing off again (the 5.25 name, or the older one)."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
