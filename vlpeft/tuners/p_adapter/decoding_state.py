"""KV-cache side state of p-adapter attention blocks: locating a block's cache layer, its cached values, and the
running column degrees that the ``paper`` variant's causal degrees carry across cached decoding steps (§2.5, H10).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vlpeft.glue.attention import cache_layer_side_state
from vlpeft.tuners.p_adapter.layer import AdapterSettings


def layer_idx(attention: nn.Module, module_name: str) -> int:
    """The ``layer_idx`` of an attention module, which locates its layer in the KV cache."""
    idx = getattr(attention, "layer_idx", None)
    if not isinstance(idx, int):
        raise RuntimeError(f"{module_name}: attention module has no integer `layer_idx` to locate its cache.")
    return idx


def cache_for(cache: Any, cross: bool) -> Any:
    """The self- or cross-attention part of an encoder-decoder cache (the cache itself otherwise)."""
    if hasattr(cache, "self_attention_cache"):
        return cache.cross_attention_cache if cross else cache.self_attention_cache
    return cache


def cached_values(cache: Any, attention: nn.Module, is_cross: bool, module_name: str) -> torch.Tensor:
    """The cached values (batch, heads, n_k, head_dim) of an attention module's layer."""
    layer = cache_for(cache, is_cross).layers[layer_idx(attention, module_name)]
    return layer.values


def state_layer(cache: Any, attention: nn.Module, module_name: str) -> Any:
    """The self-attention cache layer of this block's layer (persistent across decoding steps)."""
    return cache_for(cache, False).layers[layer_idx(attention, module_name)]


def tokens_processed(cache: Any, attention: nn.Module, is_cross: bool, n_k: int, module_name: str) -> int:
    """How many tokens the decoder has processed, this call's included.

    Self-attention: the block's cache layer count (``cumulative_length`` of a sliding-window layer, which keeps
    only the last keys; else the ``n_k`` keys it attends). Cross-attention: the text count of the self-attention
    cache of an encoder-decoder cache, or, where self- and cross-attention layers share one cache (Mllama), of the
    nearest earlier layer, which this step has already updated.
    """
    if not is_cross:
        layer = state_layer(cache, attention, module_name)
        return int(getattr(layer, "cumulative_length", 0) or n_k)
    if hasattr(cache, "self_attention_cache"):
        return int(cache.self_attention_cache.layers[layer_idx(attention, module_name)].get_seq_length())
    index = layer_idx(attention, module_name)
    if index == 0:
        raise RuntimeError(f"{module_name}: a cross-attention block in the first layer of a shared cache has no "
                           "earlier layer to count the decoded tokens; use use_cache=False with causal degrees.")
    earlier = cache.layers[index - 1]
    return int(getattr(earlier, "cumulative_length", 0) or earlier.get_seq_length())


def paper_past_degrees(
    settings: AdapterSettings,
    n_q: int,
    n_k: int,
    cache: Any,
    *,
    attention: nn.Module,
    is_cross: bool,
    owner: object,
    module_name: str,
) -> tuple[torch.Tensor | None, Callable[[torch.Tensor], None] | None]:
    """Running column degrees of earlier queries for cached decoding with causal degrees (§2.5, H10).

    ``n_k`` is the number of key tokens before pooling. The running sums live next to the KV cache and follow
    its beam reordering; updating them is idempotent, so gradient-checkpoint recomputation and several adapters
    sharing one block are safe. ``owner`` (the wrapping block) and the pool size key them in the cache layer.

    Returns:
        ``(past degrees or None, store)``: ``store`` records the degrees after these queries (the block's own
        running sums, ``p_laplacian_aggregate(return_column_degrees=True)``); ``(None, None)`` without causal
        degrees or without a cache.
    """
    if not settings.causal_degrees or cache is None:
        return None, None
    layer = state_layer(cache, attention, module_name)
    past_tokens = tokens_processed(cache, attention, is_cross, n_k, module_name) - n_q
    key = f"padapter:{id(owner)}:{settings.key_pool_size}"
    entries = cache_layer_side_state(layer).setdefault(key, {})
    if past_tokens == 0:
        past = None
    elif past_tokens in entries:
        past = entries[past_tokens]
        if not is_cross and past.shape[-1] > n_k - n_q:
            # A sliding-window cache layer dropped its oldest keys: keep the degrees of the keys it still holds.
            past = past[..., past.shape[-1] - (n_k - n_q):]
    else:
        raise RuntimeError(
            f"{module_name}: cached decoding with the paper variant's causal degrees needs the column "
            f"degrees of the {past_tokens} earlier tokens, but the cache carries none (was the cache filled "
            "without this adapter, or cropped?). Decode from the start with this model, or use use_cache=False."
        )

    def store(degrees: torch.Tensor) -> None:
        entries[past_tokens + n_q] = degrees.detach()
        for stale in [k for k in entries if k < past_tokens]:
            del entries[stale]

    return past, store
