"""Tiny twins of the chat VLMs users fine-tune (see :mod:`vlpeft.models.tiny.twins.base`).

``build_twin(name)`` builds a twin by name; :data:`TWINS` lists them. Each family's twin lives in its own module of
this package, which defines ``SPEC`` (a :class:`TwinSpec`); modules are found on import, so adding a twin is adding
a module.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from vlpeft.models.tiny.twins.base import Sample, Twin, TwinSpec, tiny_image

__all__ = ["TWINS", "Sample", "Twin", "TwinSpec", "build_twin", "tiny_image"]

_NOT_TWINS = frozenset({"base", "sizes"})


def _discover() -> dict[str, TwinSpec]:
    """Every module of this package (but the shared ones) defines one twin as ``SPEC``."""
    found: dict[str, TwinSpec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in _NOT_TWINS or info.name.startswith("_"):
            continue
        spec = importlib.import_module(f"{__name__}.{info.name}").SPEC
        if spec.name in found:
            raise RuntimeError(f"two twin modules define the twin {spec.name!r}")
        found[spec.name] = spec
    return found


TWINS: dict[str, TwinSpec] = _discover()


def build_twin(name: str, *, seed: int = 0, initializer_range: float = 0.2) -> Twin:
    """Build the twin ``name`` (one of :data:`TWINS`) with weights drawn from ``seed``.

    ``initializer_range`` defaults to 0.2 (not HF's 0.02) so that outputs visibly depend on the images. The global
    torch RNG state is restored afterwards.
    """
    if name not in TWINS:
        raise ValueError(f"unknown twin {name!r}; expected one of {sorted(TWINS)}")
    spec = TWINS[name]
    config = spec.build_config()
    _set_everywhere(config, "initializer_range", initializer_range)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.model_class(config)
        if spec.adjust_model is not None:
            spec.adjust_model(model)
    generation = getattr(model, "generation_config", None)
    processor = spec.build_processor()
    if generation is not None:
        tokenizer = processor.tokenizer
        generation.pad_token_id = tokenizer.pad_token_id
        generation.eos_token_id = tokenizer.eos_token_id
        generation.bos_token_id = tokenizer.bos_token_id
        generation.max_new_tokens = 6
        generation.max_length = None
        generation.do_sample = False
    return Twin(spec=spec, model=model, processor=processor, seed=seed)


def _set_everywhere(config: object, key: str, value: float) -> None:
    if hasattr(config, key):
        setattr(config, key, value)
    for sub in getattr(config, "sub_configs", {}) or {}:
        child = getattr(config, sub, None)
        if child is not None:
            _set_everywhere(child, key, value)
