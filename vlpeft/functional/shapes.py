"""Shape arithmetic on plain tuples (``torch.broadcast_shapes`` costs ~30 us per call in eager mode; the p-Laplacian
blocks call it several times per block)."""

from __future__ import annotations

from collections.abc import Sequence


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """The broadcast of ``shapes`` by torch's rules (aligned on the right, 1 stretches).

    Raises:
        RuntimeError: when two sizes of one axis differ and neither is 1 (as ``torch.broadcast_shapes``).
    """
    ndim = max((len(shape) for shape in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for axis, size in enumerate(shape, ndim - len(shape)):
            if size != 1:
                if out[axis] not in (1, size):
                    raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast (axis {axis - ndim})")
                out[axis] = size
    return tuple(out)
