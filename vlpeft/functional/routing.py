"""Routing functions R(x_t, x_v) on the shared rank-r bottleneck (routing.md §2).

x_t (batch, n, r) is the text bottleneck, x_v (batch, m, r) the visual bottleneck (m >= 1); the result is
(batch, n, r). Batch axes broadcast (e.g. one visual bottleneck shared across beams). No normalisation is
applied anywhere (routing.md §2.3, §13.1).

| kind            | result                                        | needs one visual vector |
|-----------------|-----------------------------------------------|-------------------------|
| "mul"           | x_t * v̄                                        | yes                     |
| "add"           | x_t + v̄                                        | yes                     |
| "matmul"        | x_t x_v^T x_v (true transpose)                 | no                      |
| "matmul_expand" | x_t (1_r v̄) = (sum_k x_t[..., k]) v̄            | yes                     |

v̄ is x_v itself when m == 1, or the mean over the m visual tokens with ``pooling="mean"``. Other pooling
rules (ViT pooler, CLS) select features upstream, before the down-projection.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

ROUTING_KINDS: tuple[str, ...] = ("mul", "add", "matmul", "matmul_expand")
POOLINGS: tuple[str | None, ...] = (None, "none", "mean")
_SINGLE_VECTOR_KINDS = ("mul", "add", "matmul_expand")


def project_visual(features: Tensor, weight: Tensor, bias: Tensor | None = None, *, grad: bool = True) -> Tensor:
    """x_v = x_R W^T + b: the visual features (batch, m, d) through the bottleneck's shared down-projection
    (weight (r, d), bias (r,)) -> (batch, m, r).

    ``grad=False`` gives the same values with ``weight`` and ``bias`` detached: the projection then learns from
    the text path only, while the features still receive gradients. The released code trains it through both
    paths (routing.md §3, §4); this is an opt-in deviation (the tuners' ``visual_projection_grad``)."""
    if not grad:
        weight = weight.detach()
        bias = None if bias is None else bias.detach()
    return F.linear(features, weight, bias)


def route(
    x_t: Tensor,
    x_v: Tensor,
    kind: str,
    *,
    pooling: str | None = None,
    reshape_quirk: bool = False,
) -> Tensor:
    """Apply routing function ``kind`` to the text bottleneck ``x_t`` given the visual bottleneck ``x_v``.

    Args:
        x_t: (batch, n, r) text bottleneck.
        x_v: (batch, m, r) visual bottleneck, m >= 1.
        kind: one of :data:`ROUTING_KINDS`.
        pooling: None / "none" (keep all m tokens: "mul", "add" and "matmul_expand" then need m == 1) or
            "mean" (average the m visual tokens to one vector first; for "matmul" this gives
            <t_i, v̄> v̄).
        reshape_quirk: "matmul" only, faithful reproduction of quirk Q1: x_v^T is formed with
            ``x_v.reshape(batch, r, m)`` instead of a transpose (identical for m == 1, scrambled for m > 1).

    Returns:
        (batch, n, r).
    """
    if kind not in ROUTING_KINDS:
        raise ValueError(f"unknown routing kind {kind!r}; allowed kinds: {ROUTING_KINDS}")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; allowed: {POOLINGS}")
    if reshape_quirk and kind != "matmul":
        raise ValueError(f"reshape_quirk=True applies to kind='matmul' only, got kind={kind!r}")
    _check_shapes(x_t, x_v)
    if pooling == "mean":
        x_v = x_v.mean(dim=-2, keepdim=True)
    m = x_v.shape[-2]
    if kind in _SINGLE_VECTOR_KINDS and m != 1:
        raise ValueError(
            f"routing kind {kind!r} needs one visual vector, got m={m} visual tokens; pass pooling='mean' "
            "or pool upstream (ViT pooler / CLS token)"
        )
    if kind == "mul":
        return x_t * x_v
    if kind == "add":
        return x_t + x_v
    if kind == "matmul_expand":
        return x_t.sum(dim=-1, keepdim=True) * x_v
    if reshape_quirk:
        batch, _, r = x_v.shape
        return (x_t @ x_v.reshape(batch, r, m)) @ x_v
    return _matmul_route(x_t, x_v)


def _matmul_route(x_t: Tensor, x_v: Tensor) -> Tensor:
    """x_t x_v^T x_v in the cheaper order: 2 n m r MACs left to right vs m r^2 + n r^2 through the Gram; with one
    visual vector (m = 1) as <x_t, v> v elementwise (the same sums, without two tiny batched matmuls and their four
    backward ones: this runs in every routed layer)."""
    n, r = x_t.shape[-2:]
    m = x_v.shape[-2]
    if m == 1:
        return (x_t * x_v).sum(dim=-1, keepdim=True) * x_v
    x_v_t = x_v.transpose(-1, -2)
    if 2 * n * m * r <= (m + n) * r * r:
        return (x_t @ x_v_t) @ x_v
    return x_t @ (x_v_t @ x_v)


def _check_shapes(x_t: Tensor, x_v: Tensor) -> None:
    if x_t.dim() != 3 or x_v.dim() != 3:
        raise ValueError(
            f"x_t must be (batch, n, r) and x_v (batch, m, r); got {tuple(x_t.shape)} and {tuple(x_v.shape)}"
        )
    if x_t.shape[-1] != x_v.shape[-1]:
        raise ValueError(f"bottleneck ranks differ: x_t has r={x_t.shape[-1]}, x_v has r={x_v.shape[-1]}")
    if x_v.shape[-2] < 1:
        raise ValueError("x_v has m=0 visual tokens; routing needs m >= 1 (a routed layer requires visual input)")
    if x_t.shape[0] != x_v.shape[0] and 1 not in (x_t.shape[0], x_v.shape[0]):
        raise ValueError(f"batch sizes do not broadcast: x_t {x_t.shape[0]}, x_v {x_v.shape[0]}")
