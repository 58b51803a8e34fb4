"""Precision helpers: run a numerical block in float32 (or float64) whatever autocast is active."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_WIDE_FLOATS = (torch.float32, torch.float64)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Return float64 if any of ``dtypes`` is float64, else float32 (half types are upcast)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def output_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Promoted floating dtype of the feature inputs, used to cast the result back."""
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    if not result.is_floating_point:
        raise TypeError(f"features must be floating point, got dtype {result}")
    return result


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager[None]:
    """Disable autocast for ``device_type`` (and for CPU, which may autocast independently).

    A no-op context when neither autocasts (the usual float32 case: this runs several times per adapted layer).
    """
    kinds = [kind for kind in dict.fromkeys((device_type, "cpu"))
             if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)]
    return _autocast_off(kinds) if kinds else contextlib.nullcontext()


@contextlib.contextmanager
def _autocast_off(kinds: list[str]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for kind in kinds:
            stack.enter_context(torch.autocast(device_type=kind, enabled=False))
        yield
