"""Families written out by hand: only where detection (:mod:`vlpeft.glue.derive`) cannot tell.

One small module per family. A module defines ``FAMILIES`` (complete descriptions, matched by model class name)
and/or ``REFINEMENTS`` (model class name -> a function that corrects the derived description, for a family whose
structure is derivable but whose visual features or placement detection cannot know).
"""

from __future__ import annotations

from collections.abc import Callable

from vlpeft.glue.description import ModelFamily
from vlpeft.glue.known import blip, blip2, clip_bart, llava, mllama, vision_prefix

__all__ = ["FAMILIES", "REFINEMENTS"]

_MODULES = (blip, blip2, clip_bart, llava, mllama, vision_prefix)

FAMILIES: tuple[ModelFamily, ...] = tuple(f for module in _MODULES for f in getattr(module, "FAMILIES", ()))
REFINEMENTS: dict[str, Callable[[ModelFamily], ModelFamily]] = {
    name: refine for module in _MODULES for name, refine in getattr(module, "REFINEMENTS", {}).items()
}
