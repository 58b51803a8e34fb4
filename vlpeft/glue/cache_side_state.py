"""Side state kept next to a KV cache layer (e.g. p-adapter ``paper``'s running causal column degrees), following
the cache's beam reordering and batch selection: :func:`cache_layer_side_state`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["cache_layer_side_state"]


_SIDE_STATE_ATTR = "_vlpeft_side_state"
_STATEFUL_LAYER_CLASSES: dict[type, type] = {}


def _map_side_state(layer: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for entries in layer.__dict__.get(_SIDE_STATE_ATTR, {}).values():
        for key in list(entries):
            entries[key] = fn(entries[key])


def _stateful_layer_class(base: type) -> type:
    """A subclass of a cache-layer class whose batch reordering also reorders the attached side state."""
    if base in _STATEFUL_LAYER_CLASSES:
        return _STATEFUL_LAYER_CLASSES[base]

    def reorder_cache(self: Any, beam_idx: torch.LongTensor) -> None:
        base.reorder_cache(self, beam_idx)
        _map_side_state(self, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self: Any, repeats: int) -> None:
        base.batch_repeat_interleave(self, repeats)
        _map_side_state(self, lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self: Any, indices: torch.Tensor) -> None:
        base.batch_select_indices(self, indices)
        _map_side_state(self, lambda t: t[indices.to(t.device)])

    def crop(self: Any, tokens_to_remove: int) -> None:
        # Running sums cannot be un-accumulated: drop the state; a later cached step then raises.
        base.crop(self, tokens_to_remove)
        self.__dict__.get(_SIDE_STATE_ATTR, {}).clear()

    def reset(self: Any) -> None:
        base.reset(self)
        self.__dict__.get(_SIDE_STATE_ATTR, {}).clear()

    methods = {
        "reorder_cache": reorder_cache,
        "batch_repeat_interleave": batch_repeat_interleave,
        "batch_select_indices": batch_select_indices,
        "crop": crop,
        "reset": reset,
    }
    stateful = type(f"SideState{base.__name__}", (base,), {k: v for k, v in methods.items() if hasattr(base, k)})
    _STATEFUL_LAYER_CLASSES[base] = stateful
    return stateful


def cache_layer_side_state(layer: Any) -> dict[str, dict[int, torch.Tensor]]:
    """Side state stored on one KV-cache layer object, kept in step with the cache's batch order.

    The layer object's class is swapped (once) for a subclass whose ``reorder_cache`` / ``batch_select_indices`` /
    ``batch_repeat_interleave`` also apply to the side tensors (batch axis 0); ``crop`` and ``reset`` clear them.

    Returns:
        A dict owner key -> {number of tokens processed: tensor (batch, ...)}, owned by the callers.
    """
    if _SIDE_STATE_ATTR not in layer.__dict__:
        layer.__class__ = _stateful_layer_class(type(layer))
        layer.__dict__[_SIDE_STATE_ATTR] = {}
    return layer.__dict__[_SIDE_STATE_ATTR]
