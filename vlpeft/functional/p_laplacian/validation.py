"""Input checks of the p-Laplacian block, shared by both variants and the fused attention kernels.

Shapes follow :func:`vlpeft.functional.p_laplacian_aggregate`: x_q (batch, heads, n_q, d), x_kv (batch, heads, n_k, d),
attn (batch, heads, n_q, n_k). Coefficients p and mu are a float, a 0-d tensor, a per-head tensor (heads,) or a
tensor broadcastable to (batch, heads, n_q, 1).

CPU values are checked eagerly (with a readable error); accelerator values are checked with ``torch._assert_async``,
so that no host synchronisation is added to a training step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vlpeft.functional.parameters import check_p_bounds
from vlpeft.functional.shapes import broadcast_shapes

VARIANTS: tuple[str, ...] = ("paper", "release")
GRAPHS: tuple[str, ...] = ("bipartite", "self")
SELF_LOOP_POLICIES: tuple[str, ...] = ("release", "drop")
RELEASE_EPS: float = 1e-8
PAPER_DIST_FLOOR: float = 1e-12

Scalar = float | Tensor


def check_chunk_size(chunk_size: int | None) -> None:
    """``chunk_size`` must be a positive int (not a bool) or None."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got chunk_size={chunk_size!r}")


def check_positive_option(value: float, name: str) -> None:
    """A float option (``eps``, ``dist_floor``) must be finite and > 0."""
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {name}={value}")


def check_shapes(x_q: Tensor, x_kv: Tensor, attn: Tensor,
                 kv_basis: Tensor | None = None) -> tuple[int, int, tuple[int, ...]]:
    """Check the block's tensors; return (n_q, n_k, the broadcast (batch, heads) shape).

    Args:
        x_q: (batch, heads, n_q, d); x_kv: (batch, heads, n_k, d), or (batch, heads, n_k, r) coordinates with
            ``kv_basis`` (r, d); attn: (batch, heads, n_q, n_k). Leading axes must broadcast, devices agree.
    """
    for name, tensor in (("x_q", x_q), ("x_kv", x_kv), ("attn", attn)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 4:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, rows, cols), got {shape}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {tensor.dtype}")
    n_q, d = x_q.shape[-2:]
    n_k, d_kv = x_kv.shape[-2:]
    if kv_basis is not None:
        if not isinstance(kv_basis, Tensor) or kv_basis.dim() != 2 or not kv_basis.is_floating_point():
            shape = tuple(kv_basis.shape) if isinstance(kv_basis, Tensor) else type(kv_basis).__name__
            raise ValueError(f"kv_basis must be a 2-D floating-point tensor (r, d), got {shape}")
        if tuple(kv_basis.shape) != (d_kv, d):
            raise ValueError(f"kv_basis must be (r, d) = ({d_kv}, {d}) for x_kv with r={d_kv} coordinates and x_q "
                             f"with d={d} features, got {tuple(kv_basis.shape)}")
        if kv_basis.device != x_q.device:
            raise ValueError(f"kv_basis is on {kv_basis.device}, x_q on {x_q.device}")
    elif d != d_kv:
        raise ValueError(f"feature dims differ: x_q has d={d}, x_kv has d={d_kv}")
    if d < 1 or n_k < 1:
        raise ValueError(f"need d >= 1 and n_k >= 1, got d={d}, n_k={n_k}")
    if tuple(attn.shape[-2:]) != (n_q, n_k):
        raise ValueError(
            f"attn must end in (n_q, n_k) = ({n_q}, {n_k}) to match x_q and x_kv, got {tuple(attn.shape)}"
        )
    try:
        lead = broadcast_shapes(x_q.shape[:2], x_kv.shape[:2], attn.shape[:2])
    except RuntimeError as err:
        raise ValueError(
            "batch/heads axes do not broadcast: x_q "
            f"{tuple(x_q.shape[:2])}, x_kv {tuple(x_kv.shape[:2])}, attn {tuple(attn.shape[:2])}"
        ) from err
    if not (x_q.device == x_kv.device == attn.device):
        raise ValueError(f"inputs on different devices: {x_q.device}, {x_kv.device}, {attn.device}")
    return n_q, n_k, tuple(lead)


def resolve_query_offset(query_offset: int | None, n_q: int, n_k: int) -> int:
    """The key node of query row 0 in a self graph: ``query_offset``, default n_k - n_q (the last n_q nodes)."""
    if n_q > n_k:
        raise ValueError(f"graph='self' needs n_q <= n_k (queries are a subset of the nodes), got {n_q} > {n_k}")
    if query_offset is None:
        return n_k - n_q
    if isinstance(query_offset, bool) or not isinstance(query_offset, int) or not 0 <= query_offset <= n_k - n_q:
        raise ValueError(f"query_offset must be an int in [0, n_k - n_q] = [0, {n_k - n_q}], got {query_offset!r}")
    return query_offset


def check_p(p: Scalar, p_bounds: tuple[float, float] | None) -> None:
    """p must lie in [p_min, p_max] (``p_bounds``), or be > 0 in raw mode (``p_bounds=None``)."""
    if p_bounds is None:
        check_positive(p, "p", "p must be > 0 (raw mode, p_bounds=None)")
        return
    p_min, p_max = (float(v) for v in p_bounds)
    check_p_bounds(p_min, p_max)
    requirement = f"p must lie in [p_min, p_max] = [{p_min}, {p_max}]"
    if isinstance(p, Tensor):
        check_tensor_values(p, "p", lambda v: (v >= p_min) & (v <= p_max), requirement)
        return
    value = as_float(p, "p")
    if not p_min <= value <= p_max:
        raise ValueError(f"p={value} is out of range: {requirement}")


def check_mu(mu: Scalar) -> None:
    """mu must be finite and > 0."""
    check_positive(mu, "mu", "mu must be > 0 (so that 2 mu / p keeps alpha finite on empty rows)")


def check_attention(attn: Tensor) -> None:
    """Attention must be non-negative (zeros are non-edges); one reduction, no host sync off the CPU."""
    if attn.numel() == 0:
        return
    smallest = attn.detach().amin()
    if attn.device.type == "cpu":
        if bool(smallest < 0):
            raise ValueError(f"attn must be non-negative (post-softmax attention), got a minimum of {smallest.item()}")
    else:
        torch._assert_async(smallest >= 0, "attn must be non-negative (post-softmax attention)")


def check_positive(value: Scalar, name: str, requirement: str) -> None:
    """A coefficient (float or tensor) must be finite and > 0."""
    if isinstance(value, Tensor):
        check_tensor_values(value, name, positive_finite, requirement)
        return
    number = as_float(value, name)
    if not (math.isfinite(number) and number > 0.0):
        raise ValueError(f"{name}={number} is out of range: {requirement}")


def positive_finite(value: Tensor | float) -> Tensor | bool:
    """Elementwise ``value > 0 and finite`` for a tensor (boolean tensor) or a float (bool)."""
    if isinstance(value, Tensor):
        return (value > 0) & torch.isfinite(value)
    return value > 0 and math.isfinite(value)


def as_float(value: object, name: str) -> float:
    """``value`` as a float; bools and non-numbers are a TypeError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float or a floating-point tensor, got {type(value).__name__}")
    return float(value)


def check_tensor_values(value: Tensor, name: str, is_ok: Callable[[Any], Any], requirement: str) -> None:
    """Check a coefficient tensor; CPU values are checked eagerly, accelerator values without a host sync.

    ``is_ok`` maps a tensor to a boolean tensor and a float to a bool (one CPU value is checked as a float: one op
    instead of four, and this runs for every adapted layer and step).
    """
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {value.dtype}")
    if value.device.type == "cpu" and value.numel() == 1:
        number = value.item()
        if not is_ok(number):
            raise ValueError(f"{name}={number} is out of range: {requirement}")
        return
    ok = is_ok(value.detach())
    if value.device.type == "cpu":
        if not bool(ok.all()):
            bad = value.detach()[~ok].flatten()[:8].tolist()
            raise ValueError(f"{name} has out-of-range values {bad}: {requirement}")
    else:
        torch._assert_async(ok.all(), f"{name} is out of range: {requirement}")


def as_coefficient(value: Scalar, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``value`` as a tensor of ``dtype`` broadcastable against (batch, heads, n_q, 1): 0-d, (heads, 1, 1) or 4-D."""
    if not isinstance(value, Tensor):
        return torch.tensor(float(value), dtype=dtype, device=device)
    value = value.to(device=device, dtype=dtype)
    if value.dim() == 0:
        return value
    if value.dim() == 1:
        return value.view(-1, 1, 1)
    if value.dim() == 4 and value.shape[-1] == 1:
        return value
    raise ValueError(
        f"{name} must be a float, a 0-d tensor, a per-head tensor (heads,), or 4-D broadcastable to "
        f"(batch, heads, n_q, 1); got shape {tuple(value.shape)}"
    )
