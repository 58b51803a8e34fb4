"""The maths of p-adapter's two attention variants (p-adapter.md §2.3-2.5, §3.1): the ``release`` branch (W_O folded
into W_down, gated output) and the ``paper`` branch (Eqs. 14-16 on V̂ = [Q ; V] W_O + b_O), with their
token/head reshapes, key pooling and grouped-query value factors.

Plain functions of tensors and modules; :class:`~vlpeft.tuners.p_adapter.attention.PAdapterAttention` gathers
their inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

from vlpeft.functional import p_laplacian_aggregate, pool_keys
from vlpeft.tuners._quantized import dequantized_weight
from vlpeft.tuners.p_adapter.layer import AdapterSettings


def _projection_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W (out, in), b (out,) or None) of a Linear-like projection (Conv1D weights are transposed; a quantized
    weight, e.g. bitsandbytes' packed 4-bit ``Params4bit``, is dequantized)."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    weight = dequantized_weight(base)
    if type(base).__name__ == "Conv1D":
        weight = weight.t()
    return weight, getattr(base, "bias", None)


def _heads_to_tokens(states: torch.Tensor) -> torch.Tensor:
    """(batch, heads, n, head_dim) -> (batch, n, heads * head_dim)."""
    batch, heads, n, dim = states.shape
    return states.transpose(1, 2).reshape(batch, n, heads * dim)


def _tokens_to_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, n, heads * d) -> (batch, heads, n, d)."""
    batch, n, width = states.shape
    if width % heads:
        raise ValueError(f"feature width {width} is not divisible by the {heads} attention heads")
    return states.reshape(batch, n, heads, width // heads).transpose(1, 2)


def _pool_key_nodes(
    nodes: torch.Tensor, attn: torch.Tensor, k: int, module_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool cross-attention key nodes (batch, n_k, d) and attention columns to ``k`` (release §2.4 A)."""
    n_k = nodes.shape[-2]
    if k > n_k:
        raise ValueError(
            f"PAdapterConfig.key_pool_size={k} but cross-attention of {module_name!r} has only n_k={n_k} key tokens; "
            f"expected key_pool_size <= {n_k} (the release pools ViT-B/16's 197 image tokens to 16 or 24)."
        )
    return pool_keys(nodes, attn, k)


def grouped_value_factors(
    value: torch.Tensor, w_o: torch.Tensor, b_o: torch.Tensor | None, heads: int, kv_heads: int | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``paper`` value nodes V̂ = V W_O^T + b_O of grouped-query attention as coordinates times a basis.

    ``value`` (batch, n_k, heads * head_dim) repeats ``kv_heads`` distinct heads (head h is key/value head
    h // group, group = heads / kv_heads), so V̂ = C B with C = [v, 1] (batch, n_k, r), v the distinct heads'
    values (batch, n_k, kv_heads * head_dim), and B (r, d) = [W_O^T summed over each group's heads ; b_O],
    r = kv_heads * head_dim (+ 1 with an output bias).

    Returns:
        ``(C, B)``, or ``None`` when it would not be narrower (no grouping, or r >= d).
    """
    if kv_heads is None or kv_heads >= heads:
        return None
    batch, n_k, width = value.shape
    d = w_o.shape[0]
    head_dim, group = width // heads, heads // kv_heads
    rank = kv_heads * head_dim + (b_o is not None)
    if rank >= d:
        return None
    coords = value.reshape(batch, n_k, kv_heads, group, head_dim)[:, :, :, 0].reshape(batch, n_k, -1)
    basis = w_o.reshape(d, kv_heads, group, head_dim).sum(dim=2).reshape(d, -1).t()
    if b_o is not None:
        coords = torch.cat([coords, coords.new_ones(batch, n_k, 1)], dim=-1)
        basis = torch.cat([basis, b_o.unsqueeze(0)], dim=0)
    return coords, basis


# ------------------------------------------------------------------------------------------------ release


def release_fold(
    down: nn.Linear, out_proj: nn.Module, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """§3.1 step 7: the frozen W_O folded into W_down, F = Z (W_O W_down) + (b_O W_down + b_down), in ``dtype``."""
    out_weight, out_bias = _projection_weights(out_proj)
    weight = down.weight.to(dtype)
    fold_weight = weight @ out_weight.to(dtype)
    fold_bias = down.bias.to(dtype) if out_bias is None else down.bias.to(dtype) + weight @ out_bias.to(dtype)
    return fold_weight, fold_bias


def release_output(
    gate: nn.Linear, up: nn.Linear, dropout: nn.Module, o: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """W_up(GELU(W_gate o + b_gate) ⊙ U) + b_up for U (batch, n, r), in the dtype of ``o``."""
    hidden = F.gelu(F.linear(o, gate.weight.to(o.dtype), gate.bias.to(o.dtype))) * u.to(o.dtype)
    hidden = dropout(hidden)
    return F.linear(hidden, up.weight.to(o.dtype), up.bias.to(o.dtype))


def release_branch(
    o: torch.Tensor,
    query: torch.Tensor,
    value: torch.Tensor,
    probs: torch.Tensor,
    *,
    settings: AdapterSettings,
    fold: tuple[torch.Tensor, torch.Tensor],
    gate: nn.Linear,
    up: nn.Linear,
    dropout: nn.Module,
    p: torch.Tensor | float,
    mu: torch.Tensor | float,
    module_name: str,
    recompute: Callable[[slice], torch.Tensor] | None = None,
) -> torch.Tensor:
    """y - o = W_up(GELU(W_gate o + b_gate) ⊙ U) + b_up with U from the release graph (§2.4, §3.1).

    ``fold`` is :func:`release_fold` in the dtype of ``o``. ``recompute`` (rows -> probs[..., rows, :]) lets a
    chunked self-graph block rebuild the attention rows in the backward pass instead of keeping ``probs`` (the
    kernel uses it only when ``probs`` needs no gradient).
    """
    fold_weight, fold_bias = fold
    heads = probs.shape[1]
    n_q = probs.shape[-2]
    if settings.graph == "self":
        nodes = F.linear(value, fold_weight, fold_bias)
        key_features = _tokens_to_heads(nodes, heads)
        query_features = key_features[:, :, key_features.shape[2] - n_q :]
        attn = probs
        options = {"self_loop": settings.self_loop}
        if recompute is not None and settings.chunk_size is not None:
            options["recompute_attention"] = recompute
    else:
        keys, attn = value, probs
        if settings.key_pool_size is not None:
            keys, attn = _pool_key_nodes(value, probs, settings.key_pool_size, module_name)
        key_features = _tokens_to_heads(F.linear(keys, fold_weight, fold_bias), heads)
        query_features = _tokens_to_heads(F.linear(query, fold_weight, fold_bias), heads)
        options = {}
    aggregated = p_laplacian_aggregate(
        query_features,
        key_features,
        attn,
        p,
        mu,
        variant="release",
        graph=settings.graph,
        p_bounds=settings.p_bounds,
        chunk_size=settings.chunk_size,
        compiled=settings.compile_block,
        backend=settings.backend,
        **options,
    )
    return release_output(gate, up, dropout, o, _heads_to_tokens(aggregated))


# ------------------------------------------------------------------------------------------------ paper


def paper_branch(
    o: torch.Tensor,
    query: torch.Tensor,
    value: torch.Tensor,
    probs: torch.Tensor,
    w_o: torch.Tensor,
    b_o: torch.Tensor | None,
    *,
    settings: AdapterSettings,
    down: nn.Linear,
    up: nn.Linear,
    dropout: nn.Module,
    p: torch.Tensor | float,
    mu: torch.Tensor | float,
    module_name: str,
    kv_heads: int | None = None,
    block_plan: list[tuple[slice, int]] | None = None,
    past_degrees: torch.Tensor | None = None,
    store_degrees: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Ū' - o with Ū from Eqs. 14-16 on V̂ = [Q ; V] W_O + b_O and head-mean attention (§2.3, §2.5).

    Under grouped-query attention (``kv_heads`` < heads) the value nodes are passed as coordinates in the
    span of their distinct heads (:func:`grouped_value_factors`), which makes the block's pairwise products
    narrower; the result is the same. ``block_plan`` (from the blocked attention) spares the block loop a pass
    over the attention for its key extents. ``past_degrees`` / ``store_degrees`` carry the causal column degrees
    across cached decoding steps (:func:`~vlpeft.tuners.p_adapter.decoding_state.paper_past_degrees`).
    """
    query_nodes = F.linear(query, w_o, b_o)
    factors = grouped_value_factors(value, w_o, b_o, probs.shape[1], kv_heads)
    value_nodes, kv_basis = (F.linear(value, w_o, b_o), None) if factors is None else factors
    # The graph is the head-mean attention; the kernel averages the heads block by block (attn_head_mean), so
    # no (n_q, n_k) mean tensor is built and kept for backward. Pooling is linear, so it commutes with the mean
    # and with the basis.
    attn = probs
    if settings.key_pool_size is not None:
        value_nodes, attn = _pool_key_nodes(value_nodes, attn, settings.key_pool_size, module_name)
    result = p_laplacian_aggregate(
        query_nodes.unsqueeze(1),
        value_nodes.unsqueeze(1),
        attn,
        p,
        mu,
        variant="paper",
        graph="bipartite",
        p_bounds=settings.p_bounds,
        causal_degrees=settings.causal_degrees,
        past_column_degrees=past_degrees,
        chunk_size=settings.chunk_size,
        attn_head_mean=True,
        kv_basis=kv_basis,
        return_column_degrees=store_degrees is not None,
        attn_block_plan=block_plan if settings.key_pool_size is None and settings.chunk_size is None else None,
        backend=settings.backend,
    )
    if store_degrees is not None:
        result, degrees = result
        store_degrees(degrees)
    u_bar = result.squeeze(1)
    hidden = F.gelu(F.linear(u_bar, down.weight.to(u_bar.dtype), down.bias.to(u_bar.dtype)))
    hidden = dropout(hidden)
    u_prime = F.linear(hidden, up.weight.to(u_bar.dtype), up.bias.to(u_bar.dtype)) + u_bar
    return u_prime - o
