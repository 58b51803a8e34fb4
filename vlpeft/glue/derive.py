"""Derive a model description (:class:`~vlpeft.glue.families.ModelFamily`) from a loaded model's structure.

Most image-text-to-text models in transformers share one structure (``modern-vlms.md`` §2): a language model that
``get_decoder()`` returns, a vision tower, a projector whose output is scattered into the language model's input
embeddings at the image placeholder tokens (``config.image_token_id``), and decoder layers whose attention module
has q/k/v/o projections and calls transformers' attention interface. For such a model everything a tuner needs is
found here, with no per-family code:

- **layer stacks**: every ``nn.ModuleList`` whose layers hold an attention module;
- **towers**: the stacks under the language model (the language towers, adapted by default), under a module
  named like a vision tower (``vision``/``visual``/``image``), and any other stacks (audio towers, resamplers);
- **per layer**: the self-attention and cross-attention modules, their q/k/v (or fused qkv) and output
  projections, the FFN block and its first/last projection, and whether attention goes through the attention
  interface (p-adapter needs that to read the probabilities) or is computed inline;
- **visual features** x_R: the language model's input embeddings at the image placeholder positions, one variable
  length sequence per sample (``visual_feature_output="placeholder_embeds"``).

Families that detection cannot describe get an explicit entry in :mod:`vlpeft.glue.known`.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

from vlpeft.glue.description import LayerLayout, ModelFamily, Tower

__all__ = [
    "DescriptionError",
    "derive_family",
    "describe_attention_module",
    "image_token_id",
    "uses_attention_interface",
]

# Multi-head latent attention (DeepSeek-style) projects queries with ``q_b_proj`` and keys/values with ``kv_b_proj``.
QUERY_NAMES = ("q_proj", "query", "q", "wq", "to_q", "q_b_proj")
KEY_NAMES = ("k_proj", "key", "k", "wk", "to_k")
VALUE_NAMES = ("v_proj", "value", "v", "wv", "to_v", "kv_b_proj")
FUSED_QKV_NAMES = ("qkv", "qkv_proj", "c_attn", "query_key_value", "Wqkv", "wqkv")
OUTPUT_NAMES = ("o_proj", "out_proj", "dense", "proj", "projection", "projection_layer", "c_proj", "wo", "o",
                "to_out", "out", "output")
CROSS_WORDS = ("cross", "encoder_decoder", "encdec")
FFN_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block", "block_sparse_moe", "feedforward")
FFN_INPUT_NAMES = ("up_proj", "fc1", "c_fc", "w1", "gate_up_proj", "linear_fc1", "dense_h_to_4h", "wi", "lin1")
FFN_OUTPUT_NAMES = ("down_proj", "fc2", "c_proj", "w2", "linear_fc2", "dense_4h_to_h", "wo", "lin2")
VISION_WORDS = ("vision", "visual", "image")
#: Modules that map visual features into the language model's width, for models with no image placeholder token
#: (their output is x_R, one entry per image).
PROJECTOR_NAMES = ("multi_modal_projector", "language_projection", "image_to_text_projection", "mm_projector",
                   "merger", "connector", "mlp1", "vision_projection", "visual_projection")


class DescriptionError(ValueError):
    """A model's structure could not be described (no layer stack with attention, no language model, ...)."""


@functools.cache
def uses_attention_interface(cls: type) -> bool:
    """Whether an attention class (or a base class) dispatches through transformers' ``AttentionInterface``."""
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            break
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if "ALL_ATTENTION_FUNCTIONS" in source or "attention_interface" in source:
            return True
    return False


def _is_projection(module: object) -> bool:
    """A Linear-like projection, also when a PEFT tuner layer already wraps it."""
    get_base_layer = getattr(module, "get_base_layer", None)
    if callable(get_base_layer):
        module = get_base_layer()
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear8bitLt", "Linear4bit")


def _child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    for name in names:
        if _is_projection(getattr(module, name, None)):
            return name
    return None


@dataclass(frozen=True)
class AttentionModule:
    """The projections of one attention module, by relative name.

    Attributes:
        query / key / value: separate projections (``None`` with a fused projection).
        fused_qkv: the fused q/k/v projection, when there is one.
        output: the output projection W_O.
        interface: whether the module calls transformers' attention interface.
    """

    query: str | None
    key: str | None
    value: str | None
    fused_qkv: str | None
    output: str
    interface: bool


def describe_attention_module(module: nn.Module) -> AttentionModule | None:
    """The projections of ``module`` if it is a q/k/v/o attention module, else ``None``."""
    output = _child(module, OUTPUT_NAMES)
    if output is None:
        return None
    query, key, value = (_child(module, names) for names in (QUERY_NAMES, KEY_NAMES, VALUE_NAMES))
    fused = _child(module, FUSED_QKV_NAMES)
    if query is None or value is None:
        if fused is None:
            return None
        query = key = value = None
    else:
        fused = None
    return AttentionModule(query, key, value, fused, output, uses_attention_interface(type(module)))


@dataclass(frozen=True)
class _LayerParts:
    self_attn: str | None
    cross_attn: str | None
    attention: AttentionModule | None
    ffn: str | None
    ffn_input: str | None
    ffn_output: str | None


def _layer_parts(layer: nn.Module) -> _LayerParts:
    """Find the attention modules and the FFN of one layer (children and grandchildren)."""
    self_attn = cross_attn = None
    attention = None
    for name, module in layer.named_modules():
        if name == "" or name.count(".") > 1:
            continue
        found = describe_attention_module(module)
        if found is None:
            continue
        if any(word in name.lower() for word in CROSS_WORDS):
            cross_attn = cross_attn or name
            attention = attention or found
        elif self_attn is None:
            self_attn = name
            attention = found
    ffn = None
    for name in FFN_NAMES:
        if isinstance(getattr(layer, name, None), nn.Module):
            ffn = name
            break
    owner = layer if ffn is None else getattr(layer, ffn)
    ffn_input, ffn_output = _child(owner, FFN_INPUT_NAMES), _child(owner, FFN_OUTPUT_NAMES)
    if ffn is not None:  # names relative to the layer
        ffn_input = ffn_input and f"{ffn}.{ffn_input}"
        ffn_output = ffn_output and f"{ffn}.{ffn_output}"
    return _LayerParts(self_attn, cross_attn, attention, ffn, ffn_input, ffn_output)


def _most_common(values: list[str | None]) -> str | None:
    present = [v for v in values if v is not None]
    return Counter(present).most_common(1)[0][0] if present else None


def _stack_layout(layers: nn.ModuleList, list_name: str) -> LayerLayout | None:
    """The layout of a stack's layers, or ``None`` when none holds an attention module.

    Layers may differ (Mllama's cross-attention layers, hybrid stacks whose other layers hold linear attention or
    state-space mixers): names are the most common ones, and a stack where the self-attention name is an attention
    module in some layers only is restricted to those layers.
    """
    parts = [_layer_parts(layer) for layer in layers]
    attention = next((p.attention for p in parts if p.attention is not None), None)
    if attention is None:
        return None
    self_attn = _most_common([p.self_attn for p in parts])
    layer_pattern = r"\d+"
    if self_attn is not None and any(isinstance(getattr(layer, self_attn, None), nn.Module) for layer in layers):
        holding = [i for i, p in enumerate(parts) if p.self_attn == self_attn or p.cross_attn is not None]
        hybrid = [i for i, layer in enumerate(layers) if isinstance(getattr(layer, self_attn, None), nn.Module)]
        if set(hybrid) - set(holding):
            layer_pattern = "(?:" + "|".join(str(i) for i in holding) + ")"
    ffn = _most_common([p.ffn for p in parts])
    ffn_input = _most_common([p.ffn_input for p in parts])
    ffn_output = _most_common([p.ffn_output for p in parts])
    return LayerLayout(
        layers=re.escape(list_name) + r"\." + layer_pattern,
        self_attn=self_attn,
        cross_attn=_most_common([p.cross_attn for p in parts]),
        query=attention.query,
        key=attention.key,
        value=attention.value,
        fused_qkv=attention.fused_qkv,
        attn_output=attention.output,
        ffn_input=ffn_input,
        ffn_output=ffn_output,
        ffn_block=ffn,
        ffn_block_style="mlp" if ffn else None,
        attention_style="interface" if attention.interface else "inline",
    )


def _language_module(model: nn.Module) -> str | None:
    """Dotted name of the language model (``get_decoder()``), or ``None`` when the model names none."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, TypeError, ValueError):
            decoder = None
        if isinstance(decoder, nn.Module) and decoder is not model:
            for name, module in model.named_modules():
                if module is decoder:
                    return name
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("language_model", "text_model", "text_decoder"):
            return name
    return None


def image_token_id(model: nn.Module) -> int | None:
    """The image placeholder token id of ``model`` (``config.image_token_id``, older ``image_token_index``)."""
    config = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _tower_name(kind: str, path: str, anchor: str, count: int) -> str:
    if count == 1:
        return kind
    relative = path[len(anchor) + 1:] if anchor and path.startswith(anchor + ".") else path
    suffix = re.sub(r"[^0-9a-zA-Z]+", "_", relative.rsplit(".", 1)[0] if "." in relative else relative).strip("_")
    return f"{kind}_{suffix}" if suffix else kind


def derive_family(model: nn.Module) -> ModelFamily:
    """Describe ``model`` (a transformers model, possibly wrapped by PEFT) from its structure.

    Raises:
        DescriptionError: no layer stack with a q/k/v/o attention module, or none under the language model.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stacks: list[tuple[str, LayerLayout]] = []
    for name, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not name:
            continue
        if any(name.startswith(prefix + ".") for prefix, _ in stacks):
            continue  # a list inside a layer of a stack already found
        layout = _stack_layout(module, name.rsplit(".", 1)[-1])
        if layout is not None:
            stacks.append((name, layout))
    if not stacks:
        raise DescriptionError(
            f"{type(base).__name__}: found no stack of layers (nn.ModuleList) whose layers hold an attention module "
            f"with query/value projections (one of {QUERY_NAMES} / {VALUE_NAMES} or fused {FUSED_QKV_NAMES}) and "
            f"an output projection (one of {OUTPUT_NAMES})"
        )
    language = _language_module(base)
    groups: dict[str, list[tuple[str, LayerLayout]]] = {"language_model": [], "vision": [], "other": []}
    for path, layout in stacks:
        under_language = language is not None and path.startswith(language + ".")
        below = path[len(language) + 1:] if under_language else path
        if any(word in below.lower() for word in VISION_WORDS):
            groups["vision"].append((path, layout))
        elif under_language:
            groups["language_model"].append((path, layout))
        else:
            groups["other"].append((path, layout))
    if not groups["language_model"]:
        raise DescriptionError(
            f"{type(base).__name__}: none of the layer stacks {[p for p, _ in stacks]} lies under the language model "
            f"({language!r}, from get_decoder())"
        )
    towers = []
    for kind, members in groups.items():
        anchor = language if kind == "language_model" and language else ""
        modality = "text" if kind == "language_model" else kind
        for path, layout in members:
            prefix = path.rsplit(".", 1)[0] + "." if "." in path else ""
            tower_name = _tower_name(kind, path, anchor, len(members))
            towers.append(Tower(tower_name, prefix, layout, None, modality))
    language_towers = tuple(t.name for t in towers if t.modality == "text")
    token = image_token_id(base)
    visual_module, visual_output = language or "", "placeholder_embeds"
    if token is None:
        projector = _projector(base)
        visual_module, visual_output = (projector, "tensor") if projector else ("", "placeholder_embeds")
    return ModelFamily(
        name=getattr(getattr(base, "config", None), "model_type", None) or type(base).__name__,
        class_names=(type(base).__name__,),
        towers=tuple(towers),
        language_towers=language_towers,
        visual_feature_module=visual_module,
        visual_feature_output=visual_output,
        image_token_id=token,
        derived=True,
    )


def _projector(model: nn.Module) -> str | None:
    """The shallowest module named like a multi-modal projector, or ``None``."""
    found = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTOR_NAMES]
    return min(found, key=lambda name: name.count("."), default=None)
