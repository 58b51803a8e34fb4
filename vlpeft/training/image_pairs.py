"""Two images per sample (NLVR2) for models whose language side reads one vision tower (BLIP, BLIP-2).

Such a model takes ``pixel_values`` (batch, 3, H, W). For a family whose layout says ``two_images="vision_tower"``
(:mod:`vlpeft.tasks.layouts`), :func:`install_image_pairs` hooks its vision tower (``InputLayout.vision_module``) so
that it also takes (batch, n, 3, H, W): the pre-hook runs the batch's n images per sample as batch * n images,
and the post-hook concatenates each sample's n token sequences in image order, (batch * n, m, d) -> (batch, n * m, d),
before the language side (BLIP's cross-attention, BLIP-2's Q-Former) and routing (whose x_R hook on the same tower
is registered later, when the method is attached) read it. Calls with 4-D ``pixel_values`` pass unchanged.

What the concatenation gives the language side: BLIP's cross-attention and BLIP-2's Q-Former attend over the keys
without a position of their own, so both images' tokens are visible but which image a token came from is not
marked (each image's own ViT position embeddings are the same for both); CLIP-BART instead places the two images at
different BART positions (``two_images="model"``). The vision tower's per-image ``pooler_output`` and attention
maps have no per-sample form and are dropped from the regrouped output (routing with ``pooling: pooler`` is
refused for two-image tasks at config validation, :func:`two_image_problem`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from vlpeft.tasks.layouts import LAYOUTS, families_where

__all__ = ["TWO_IMAGE_FAMILIES", "TWO_IMAGE_TASKS", "install_image_pairs", "two_image_problem", "uses_two_images"]

#: Task types whose samples hold two images.
TWO_IMAGE_TASKS = ("nlvr2",)
#: Families that take two images per sample, by how (from the layouts).
TWO_IMAGE_FAMILIES: tuple[str, ...] = families_where(lambda layout: layout.two_images is not None)
_MARK = "_vlpeft_image_pairs"


def uses_two_images(config: Any) -> bool:
    """Whether the run's task (or one of its multi-task sub-tasks) has two images per sample."""
    task = config.task
    if task.type in TWO_IMAGE_TASKS:
        return True
    return task.type == "multitask" and any(
        isinstance(entry, dict) and entry.get("type") in TWO_IMAGE_TASKS for entry in task.tasks or ()
    )


def _model_name(config: Any) -> str:
    model = config.model
    if model.tiny is not None:
        return f"model.tiny {model.tiny!r}"
    if model.vision is not None:
        return f"model.vision + model.text {model.vision!r} + {model.text!r}"
    return f"model.name {model.name!r}"


def two_image_problem(config: Any, family: str) -> str | None:
    """Why the run's model cannot take the task's two images per sample (``None`` if it can); checked before any
    model loads. Names the model, its family and the task."""
    layout = LAYOUTS.get(family)
    task = config.task.type
    if layout is None or layout.two_images is None:
        return (f"task.type: {task!r} has two images per sample, which {_model_name(config)} (model family "
                f"{family!r}) cannot take: it reads one image per sequence. Families that take both images: "
                f"{list(TWO_IMAGE_FAMILIES)} (chat template: both in one user turn; BLIP, BLIP-2, CLIP-BART: the two "
                "images' visual tokens concatenated); use one of them, e.g. model.tiny clip_bart or a chat model")
    pooling = (config.method.options or {}).get("pooling")
    if layout.two_images == "vision_tower" and pooling == "pooler":
        return (f"method.pooling: 'pooler' is one image's pooled output, but task {task!r} has two images per sample "
                f"on {_model_name(config)}; use pooling 'mean' (both images' tokens) or 'none'")
    return None


# ---------------------------------------------------------------------------------------------- the hooks
class _PairHooks:
    """The pre/post hooks of one vision tower; ``pending`` holds (batch, n) of the calls in flight (None: 4-D)."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, int] | None] = []

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        in_kwargs = "pixel_values" in kwargs
        pixels = kwargs["pixel_values"] if in_kwargs else (args[0] if args else None)
        if not isinstance(pixels, Tensor) or pixels.dim() != 5:
            self.pending.append(None)
            return None
        self.pending.append((int(pixels.shape[0]), int(pixels.shape[1])))
        flat = pixels.flatten(0, 1)
        if in_kwargs:
            return args, {**kwargs, "pixel_values": flat}
        return (flat, *args[1:]), kwargs

    def after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        shape = self.pending.pop() if self.pending else None
        if shape is None:
            return None
        batch, images = shape
        if isinstance(output, Tensor):
            return _regroup(output, batch, images)
        if isinstance(output, tuple):
            return (_regroup(output[0], batch, images),)
        fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
        out = {name: None for name in fields}
        out["last_hidden_state"] = _regroup(fields["last_hidden_state"], batch, images)
        if fields.get("hidden_states") is not None:
            out["hidden_states"] = tuple(_regroup(h, batch, images) for h in fields["hidden_states"])
        return type(output)(**{k: v for k, v in out.items() if v is not None})


def _regroup(tokens: Tensor, batch: int, images: int) -> Tensor:
    """(batch * images, m, d) -> (batch, images * m, d): each sample's images' tokens one after the other."""
    if tokens.dim() != 3 or tokens.shape[0] != batch * images:
        raise ValueError(f"expected the vision tower's tokens as ({batch} x {images} images, m, d), got "
                         f"{tuple(tokens.shape)}")
    return tokens.reshape(batch, images * tokens.shape[1], tokens.shape[2])


def install_image_pairs(model: nn.Module, family: str) -> bool:
    """Let ``model`` (of ``family``) take ``pixel_values`` (batch, n, 3, H, W) through its vision tower (module
    docstring). Returns whether hooks are in place (already installed counts); ``False`` for families that take
    several images otherwise (chat template, CLIP-BART) or not at all."""
    layout = LAYOUTS.get(family)
    if layout is None or layout.two_images != "vision_tower":
        return False
    tower = getattr(model, str(layout.vision_module), None)
    if not isinstance(tower, nn.Module):
        raise ValueError(f"model family {family!r}: {type(model).__name__} has no vision tower "
                         f"{layout.vision_module!r} to take two images per sample")
    if getattr(tower, _MARK, False):
        return True
    hooks = _PairHooks()
    tower.register_forward_pre_hook(hooks.before, with_kwargs=True)
    tower.register_forward_hook(hooks.after)
    setattr(tower, _MARK, True)
    return True
