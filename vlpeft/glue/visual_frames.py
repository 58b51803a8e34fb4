"""Frames of the visual-feature context (:mod:`vlpeft.glue.visual_features`): one per top-level call, and the
checkpoint wrapper that re-activates the original call's frame when a checkpointed layer is recomputed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from vlpeft.glue.visual_rows import Captured

__all__ = ["Frame", "frame_binding_checkpoint"]


@dataclass
class Frame:
    """What one top-level call captured: features per source, that call's ``input_ids``, its call number, and the
    pooled / batch-expanded x_R derived from them (dropped whenever the features change)."""

    features: dict[str, Captured] = field(default_factory=dict)
    input_ids: Tensor | None = None
    call: int = 0
    cache: dict[tuple[Any, ...], tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    pooled: dict[tuple[str, str], tuple[Tensor, Tensor | None]] = field(default_factory=dict)

    def child(self) -> Frame:
        """A new frame for a nested scope; explicitly provided features are inherited."""
        return Frame(features={k: v for k, v in self.features.items() if v.explicit})


def frame_binding_checkpoint(context: Any, inner: Any) -> Any:
    """Wrap a layer's checkpoint function ``inner`` so that recomputation runs in the frame of the original
    forward (``context`` is the :class:`~vlpeft.glue.visual_features.VisualFeatureContext`), whichever thread or
    frame is active when the backward recomputes."""

    def checkpoint_with_visual_frame(function: Any, *args: Any, **kwargs: Any) -> Any:
        frame = context.current_frame()

        def run_in_frame(*inner_args: Any, **inner_kwargs: Any) -> Any:
            if context.current_frame() is frame:
                return function(*inner_args, **inner_kwargs)
            with context.activate(frame):
                return function(*inner_args, **inner_kwargs)

        return inner(run_in_frame, *args, **kwargs)

    checkpoint_with_visual_frame._vlpeft_context = context  # type: ignore[attr-defined]
    checkpoint_with_visual_frame._vlpeft_inner = inner  # type: ignore[attr-defined]
    return checkpoint_with_visual_frame
