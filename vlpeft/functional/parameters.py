"""Bounded reparametrisation of p and the mu offset used by p-adapter layers (p-adapter.md §2.4 F, §3.3).

- p = p_min + (p_max - p_min) * sigmoid(theta), default bounds (1, 2), with 0 < p_min < p_max.
- mu = mu0 * (2 + tanh(m)), so mu lies in (mu0, 3 mu0) and equals 2 mu0 at m = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_P_BOUNDS: tuple[float, float] = (1.0, 2.0)


def check_p_bounds(p_min: float, p_max: float) -> None:
    """Raise ValueError unless 0 < p_min < p_max (both finite)."""
    if not (math.isfinite(p_min) and math.isfinite(p_max) and 0.0 < p_min < p_max):
        raise ValueError(f"p bounds must satisfy 0 < p_min < p_max, got p_min={p_min}, p_max={p_max}")


@dataclass(frozen=True)
class PBounds:
    """Bounds (p_min, p_max) of the sigmoid reparametrisation of p."""

    p_min: float = DEFAULT_P_BOUNDS[0]
    p_max: float = DEFAULT_P_BOUNDS[1]

    def __post_init__(self) -> None:
        check_p_bounds(self.p_min, self.p_max)

    def p_from_theta(self, theta: Tensor) -> Tensor:
        return p_from_theta(theta, self.p_min, self.p_max)

    def theta_from_p(self, p0: float) -> float:
        return theta_from_p(p0, self.p_min, self.p_max)


def p_from_theta(theta: Tensor, p_min: float = 1.0, p_max: float = 2.0) -> Tensor:
    """p = p_min + (p_max - p_min) * sigmoid(theta); any shape, differentiable in theta."""
    check_p_bounds(p_min, p_max)
    return p_min + (p_max - p_min) * torch.sigmoid(theta)


def theta_from_p(p0: float, p_min: float = 1.0, p_max: float = 2.0) -> float:
    """Inverse of :func:`p_from_theta`: the theta with p(theta) = p0; p0 must lie strictly inside the bounds."""
    check_p_bounds(p_min, p_max)
    p0 = float(p0)
    if not p_min < p0 < p_max:
        raise ValueError(
            f"p0={p0} must lie strictly inside the bounds ({p_min}, {p_max}) to be reachable by the "
            "sigmoid reparametrisation"
        )
    fraction = (p0 - p_min) / (p_max - p_min)
    return math.log(fraction) - math.log1p(-fraction)


def mu_from_offset(m: Tensor, mu0: float) -> Tensor:
    """mu = mu0 * (2 + tanh(m)) with mu0 > 0 (the released parametrisation; m is learnable, init 0)."""
    mu0 = float(mu0)
    if not (math.isfinite(mu0) and mu0 > 0.0):
        raise ValueError(f"mu0 must be a finite number > 0, got mu0={mu0}")
    return mu0 * (2.0 + torch.tanh(m))
