"""Pure-torch numerical core of vlpeft (no transformers/peft imports).

- :func:`p_laplacian_aggregate`: one p-Laplacian message-passing step on an attention graph
  (p-adapter ``paper`` and ``release`` variants; the package :mod:`vlpeft.functional.p_laplacian`), plus
  :func:`accumulate_column_degrees` for cached decoding with causal degrees and :func:`pool_keys` for
  cross-attention key pooling.
- :func:`choose_backend`: which backend (fused Triton / blocked or eager torch attention; fused C kernels or torch
  for the aggregation) computes a p-Laplacian block, as a :class:`BackendChoice` with its reason; override with
  ``VLPEFT_BACKEND=torch|cpu|triton``.
- :func:`route`: the routing functions of the routing paper (:data:`ROUTING_KINDS`); :func:`project_visual`:
  x_R through the shared down-projection, optionally without gradient into it.
- :class:`PBounds`, :func:`p_from_theta`, :func:`theta_from_p`, :func:`mu_from_offset`: parametrisations
  of the learnable p and mu.
"""

from vlpeft.functional.p_laplacian import (
    GRAPHS,
    PAPER_DIST_FLOOR,
    RELEASE_EPS,
    SELF_LOOP_POLICIES,
    VARIANTS,
    BackendChoice,
    BackendUnavailableError,
    accumulate_column_degrees,
    choose_backend,
    p_laplacian_aggregate,
)
from vlpeft.functional.parameters import (
    DEFAULT_P_BOUNDS,
    PBounds,
    check_p_bounds,
    mu_from_offset,
    p_from_theta,
    theta_from_p,
)
from vlpeft.functional.pooling import adaptive_bins, pool_keys
from vlpeft.functional.routing import POOLINGS, ROUTING_KINDS, project_visual, route

__all__ = [
    "DEFAULT_P_BOUNDS",
    "GRAPHS",
    "PAPER_DIST_FLOOR",
    "POOLINGS",
    "RELEASE_EPS",
    "ROUTING_KINDS",
    "SELF_LOOP_POLICIES",
    "VARIANTS",
    "BackendChoice",
    "BackendUnavailableError",
    "PBounds",
    "accumulate_column_degrees",
    "adaptive_bins",
    "check_p_bounds",
    "choose_backend",
    "mu_from_offset",
    "p_from_theta",
    "p_laplacian_aggregate",
    "pool_keys",
    "project_visual",
    "route",
    "theta_from_p",
]
