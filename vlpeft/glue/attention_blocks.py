"""How an attention block is laid out: :class:`AttentionBlockSpec` and :func:`describe_attention_block`, which
works it out from the block's structure (BERT-style post-LN blocks, or blocks returning the projected output).

Self-contained (imports nothing from the p_adapter package).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

from torch import nn

from vlpeft._transformers_compat import takes_cache_argument

_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "projection", "c_proj", "dense")
_QUERY_NAMES = ("q_proj", "query")
_VALUE_NAMES = ("v_proj", "value")
_FUSED_QKV_NAMES = ("qkv", "c_attn", "qkv_proj")


@functools.cache
def _class_uses_attention_interface(cls: type) -> bool:
    """Whether an attention class dispatches through transformers' AttentionInterface (from its source)."""
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            break
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if "ALL_ATTENTION_FUNCTIONS.get_interface(" in source:
            return True
    return False


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


def _submodule(block: nn.Module, name: str) -> nn.Module:
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
        query = _child_name(inner, _QUERY_NAMES)
        value = _child_name(inner, _VALUE_NAMES)
        if query is None or value is None:
            raise ValueError(f"{module_name}: inner attention {type(inner).__name__} has no query/value projections.")
        capture = "interface" if _class_uses_attention_interface(type(inner)) else "inline"
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
    out_proj = _child_name(block, _OUTPUT_PROJECTIONS)
    if out_proj is None:
        raise ValueError(
            f"{module_name} ({type(block).__name__}) is not an attention block p-adapter can wrap: expected a "
            f"BERT-style block (self/attention + output.dense/dropout/LayerNorm) or an attention module with an "
            f"output projection named one of {_OUTPUT_PROJECTIONS}."
        )
    capture = "interface" if _class_uses_attention_interface(type(block)) else "inline"
    query = _child_name(block, _QUERY_NAMES)
    value = _child_name(block, _VALUE_NAMES)
    fused = _child_name(block, _FUSED_QKV_NAMES)
    if fused is None and (query is None or value is None):
        raise ValueError(
            f"{module_name} ({type(block).__name__}) is not an attention block p-adapter can wrap: it exposes no "
            f"query/value projections (one of {_QUERY_NAMES} and {_VALUE_NAMES}, or fused {_FUSED_QKV_NAMES})."
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
