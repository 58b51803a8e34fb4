"""Key pooling for cross-attention p-adapters (p-adapter.md §2.4 A.1, §3.1 step 8, hazard H7)."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional


def pool_keys(x_kv: Tensor, attn: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Average-pool the key axis of features and attention to ``k`` nodes.

    1-D adaptive average pooling over the token *index* (``adaptive_avg_pool1d`` semantics, as in the
    released code): bin i averages tokens floor(i n / k) .. ceil((i + 1) n / k) - 1, so neighbouring bins
    can share a token and pooled attention rows sum to about k / n, not 1.

    Args:
        x_kv: key/value features (..., n_k, d), e.g. (batch, n_k, d) before the head split or
            (batch, heads, n_k, d).
        attn: attention (..., n_q, n_k), e.g. (batch, heads, n_q, n_k).
        k: number of pooled key nodes, 1 <= k <= n_k.

    Returns:
        (pooled features (..., k, d), pooled attention (..., n_q, k)), in the input dtypes.
    """
    if x_kv.dim() < 2 or attn.dim() < 2:
        raise ValueError(
            f"x_kv must be (..., n_k, d) and attn (..., n_q, n_k); got {tuple(x_kv.shape)} and {tuple(attn.shape)}"
        )
    n_k = x_kv.shape[-2]
    if attn.shape[-1] != n_k:
        raise ValueError(f"attn has {attn.shape[-1]} key columns but x_kv has n_k={n_k} tokens")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_k:
        raise ValueError(f"k must be an int in [1, n_k={n_k}], got k={k!r}")
    pooled_features = _pool_last_axis(x_kv.transpose(-1, -2), k).transpose(-1, -2)
    pooled_attn = _pool_last_axis(attn, k)
    return pooled_features, pooled_attn


def _pool_last_axis(tensor: Tensor, k: int) -> Tensor:
    lead = tensor.shape[:-1]
    flat = tensor.reshape(-1, 1, tensor.shape[-1])
    return functional.adaptive_avg_pool1d(flat, k).reshape(*lead, k)


def adaptive_bins(n: int, k: int) -> list[tuple[int, int]]:
    """The [start, stop) token ranges that adaptive average pooling uses for each of the ``k`` bins."""
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got k={k}")
    return [((i * n) // k, -((-(i + 1) * n) // k)) for i in range(k)]


__all__ = ["adaptive_bins", "pool_keys"]
