"""How an attention block is laid out for a method that wraps it whole (p-adapter): :class:`AttentionBlockSpec` and
:func:`describe_attention_block`, which works it out from the block's structure (BERT-style post-LN blocks, or
blocks returning the projected attention output), with the projection names and dispatch test of
:mod:`vlpeft.glue.derive`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlpeft._transformers_compat import takes_cache_argument
from vlpeft.glue.derive import (
    FUSED_QKV_NAMES,
    OUTPUT_NAMES,
    QUERY_NAMES,
    VALUE_NAMES,
    uses_attention_interface,
)
from vlpeft.glue.description import LayerLayout


@dataclass(frozen=True)
class AttentionBlockSpec:
    """How an attention block is laid out (names relative to the wrapped block).

    Attributes:
        style: ``"bert"`` (post-LN ``output`` submodule, adapter between its dropout and LayerNorm) or
            ``"projected"`` (the block returns the projected attention output first).
        capture: ``"interface"`` or ``"inline"``.
        attention: the module computing attention (``""`` = the block itself).
        out_proj: the attention output projection W_O.
        out_dropout: (bert) the dropout whose output the adapter edits.
        query / value / fused_qkv: (inline) projections whose outputs give Q and V.
        is_cross: cross-attention block (keys/values from another sequence).
        is_causal: block of a decoder that can run with a KV cache (``paper`` then uses causal degrees by default,
            so that cached decoding equals cache-free decoding).
    """

    style: str
    capture: str
    attention: str
    out_proj: str
    out_dropout: str | None
    query: str | None
    value: str | None
    fused_qkv: str | None
    is_cross: bool
    is_causal: bool


def _child_name(module: nn.Module, candidates: tuple[str, ...]) -> str | None:
    for name in candidates:
        if isinstance(getattr(module, name, None), nn.Module):
            return name
    return None


def submodule(block: nn.Module, name: str) -> nn.Module:
    """The submodule of ``block`` a spec name refers to (``""``: the block itself)."""
    return block if name == "" else block.get_submodule(name)


def _runs_with_kv_cache(attention: nn.Module) -> bool:
    """Whether an attention module belongs to a (causal or prefix-LM) decoder that can decode with a KV cache.

    True if it declares ``is_causal`` or a decoder config, or if its forward takes a cache (``cache`` from
    transformers 5.25, ``past_key_values`` before; PaliGemma's Gemma has ``is_causal = False`` because of its
    bidirectional prefix, yet decodes with a cache).
    """
    config = getattr(attention, "config", None)
    if getattr(attention, "is_causal", False) or getattr(config, "is_decoder", False):
        return True
    return takes_cache_argument(attention.forward)


def describe_attention_block(block: nn.Module, module_name: str) -> AttentionBlockSpec:
    """Work out the layout of an attention block from its structure.

    Raises:
        ValueError: the module is not an attention block p-adapter knows how to wrap.
    """
    output = getattr(block, "output", None)
    inner_name = _child_name(block, ("self", "attention"))
    is_cross = "cross" in module_name.rsplit(".", 1)[-1].lower()
    if (
        inner_name is not None
        and isinstance(output, nn.Module)
        and all(isinstance(getattr(output, n, None), nn.Module) for n in ("dense", "dropout", "LayerNorm"))
    ):
        inner = getattr(block, inner_name)
        query = _child_name(inner, QUERY_NAMES)
        value = _child_name(inner, VALUE_NAMES)
        if query is None or value is None:
            raise ValueError(f"{module_name}: inner attention {type(inner).__name__} has no query/value projections.")
        capture = "interface" if uses_attention_interface(type(inner)) else "inline"
        return AttentionBlockSpec(
            style="bert",
            capture=capture,
            attention=inner_name,
            out_proj="output.dense",
            out_dropout="output.dropout",
            query=f"{inner_name}.{query}",
            value=f"{inner_name}.{value}",
            fused_qkv=None,
            is_cross=is_cross,
            is_causal=_runs_with_kv_cache(inner),
        )
    out_proj = _child_name(block, OUTPUT_NAMES)
    if out_proj is None:
        raise ValueError(
            f"{module_name} ({type(block).__name__}) is not an attention block p-adapter can wrap: expected a "
            f"BERT-style block (self/attention + output.dense/dropout/LayerNorm) or an attention module with an "
            f"output projection named one of {OUTPUT_NAMES}."
        )
    capture = "interface" if uses_attention_interface(type(block)) else "inline"
    query = _child_name(block, QUERY_NAMES)
    value = _child_name(block, VALUE_NAMES)
    fused = _child_name(block, FUSED_QKV_NAMES)
    if fused is None and (query is None or value is None):
        raise ValueError(
            f"{module_name} ({type(block).__name__}) is not an attention block p-adapter can wrap: it exposes no "
            f"query/value projections (one of {QUERY_NAMES} and {VALUE_NAMES}, or fused {FUSED_QKV_NAMES})."
        )
    return AttentionBlockSpec(
        style="projected",
        capture=capture,
        attention="",
        out_proj=out_proj,
        out_dropout=None,
        query=query,
        value=value,
        fused_qkv=fused if query is None else None,
        is_cross=is_cross,
        is_causal=_runs_with_kv_cache(block),
    )


def spec_from_layout(layout: LayerLayout, is_cross: bool, block: nn.Module, module_name: str) -> AttentionBlockSpec:
    """The spec of an attention block as its model description lays it out.

    BERT-style layouts (output projection ``output.dense`` in a post-LN ``output`` module, q/k/v in an inner
    attention module) adapt between the output dropout and the LayerNorm; the others adapt the block's projected
    output.
    """
    query, value, fused = layout.query, layout.value, layout.fused_qkv
    inner = query.split(".", 1)[0] if query is not None and "." in query else ""
    if layout.attn_output.startswith("output.") and inner:
        attention = block.get_submodule(inner)
        return AttentionBlockSpec(
            style="bert", capture=layout.attention_style, attention=inner, out_proj=layout.attn_output,
            out_dropout="output.dropout", query=query, value=value, fused_qkv=None, is_cross=is_cross,
            is_causal=_runs_with_kv_cache(attention),
        )
    return AttentionBlockSpec(
        style="projected", capture=layout.attention_style, attention="", out_proj=layout.attn_output,
        out_dropout=None, query=query, value=value, fused_qkv=fused if query is None else None, is_cross=is_cross,
        is_causal=_runs_with_kv_cache(block),
    )
