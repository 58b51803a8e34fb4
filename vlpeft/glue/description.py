"""Model descriptions: where the towers, layers, attention blocks, FFNs and visual features of a VLM live.

A :class:`ModelFamily` describes one model class:

- its :class:`Tower` s (transformer stacks), each with a :class:`LayerLayout` giving the *relative* names of one
  layer's modules (self-/cross-attention, q/k/v/o projections, FFN block and projections, attention dispatch);
- which towers form the language side (the default targets of every method);
- where the visual features ``x_R`` used by routing come from, and the image placeholder token.

Descriptions are derived from the loaded model (:mod:`vlpeft.glue.derive`) or, for models that detection cannot
describe, written out in one small file per family (:mod:`vlpeft.glue.known`). Module paths follow transformers 5
(``ecosystem.md`` §3.5). Regexes returned here are meant for PEFT's ``target_modules`` (a string there is matched
with ``re.fullmatch`` against the full module name).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

POSITIONS = ("self_attn", "cross_attn", "ffn")

#: Where x_R is read (see :class:`vlpeft.glue.visual_features.VisualSource`).
VISUAL_FEATURE_OUTPUTS = ("tensor", "last_hidden_state", "placeholder_embeds", "cross_attention_states")


@dataclass(frozen=True)
class LayerLayout:
    """Relative module names inside one transformer layer of an architecture.

    Attributes:
        layers: regex of the layer path relative to the tower prefix (e.g. ``encoder\\.layer\\.\\d+``).
        self_attn / cross_attn: attention block relative to the layer (``None`` if absent).
        query / key / value: projections relative to the attention block (``fused_qkv`` instead when fused).
        attn_output: the output projection relative to the attention block (its output is the attention
            output before residual/LayerNorm).
        ffn_input / ffn_output: first and last FFN linear relative to the layer (``None`` where the FFN has no
            plain projection there, e.g. mixture-of-experts blocks with fused expert weights).
        ffn_block: a module relative to the layer whose forward sees the FFN input and returns the FFN output
            (``mlp``), or the BERT-style ``output`` module called as ``output(hidden, input_tensor)``.
        ffn_block_style: ``"mlp"`` (``forward(x) -> ffn(x)``) or ``"bert_output"``
            (``forward(h, input_tensor) -> LayerNorm(dense(h) + input_tensor)``); ``None`` when no block exists.
        attention_style: ``"inline"`` (attention computed inside the module, probabilities returned by the
            ``self`` submodule) or ``"interface"`` (dispatch through transformers' ``AttentionInterface``).
        fused_qkv: the fused projection relative to the attention block, when q/k/v are one module.
    """

    layers: str
    self_attn: str | None
    cross_attn: str | None
    query: str | None
    key: str | None
    value: str | None
    attn_output: str
    ffn_input: str | None
    ffn_output: str | None
    ffn_block: str | None
    ffn_block_style: str | None
    attention_style: str
    fused_qkv: str | None = None


@dataclass(frozen=True)
class Tower:
    """One transformer stack inside a model.

    Attributes:
        name: tower name used in configs (``"vision"``, ``"text_encoder"``, ``"text_decoder"``, ``"qformer"``,
            ``"language_model"``).
        prefix: module-name prefix of the stack, ending with ``.`` (empty for a bare model).
        layout: the layout of its layers.
        config_key: sub-config holding this tower's ``_attn_implementation`` (``None``: the top config).
        modality: ``"vision"``, ``"text"`` or ``"other"`` (audio towers, resamplers, action experts).
    """

    name: str
    prefix: str
    layout: LayerLayout
    config_key: str | None
    modality: str

    @property
    def layer(self) -> LayerLayout:
        return self.layout

    def layer_regex(self) -> str:
        return re.escape(self.prefix) + self.layer.layers


@dataclass(frozen=True)
class ModelFamily:
    """A supported VLM family.

    Attributes:
        name: family key (``"blip_caption"``, ``"llava"``, ...).
        class_names: model class names that belong to the family (used for detection).
        towers: the model's transformer stacks.
        language_towers: names of the towers that form the language side (default targets of text methods).
        visual_feature_module: module whose forward output (or input, see below) carries the visual features
            ``x_R`` in the language model's width (see ``routing.md`` §5).
        visual_feature_output: how to read them: ``"tensor"`` (the module's output is the tensor),
            ``"last_hidden_state"`` (a ModelOutput / tuple whose first element is the sequence),
            ``"placeholder_embeds"`` (the module is the language model; x_R are its ``inputs_embeds`` rows at the
            image placeholder tokens, per sample), ``"cross_attention_states"`` (the module is the language model;
            x_R is its ``cross_attention_states`` argument, (batch, m, d) per sample).
        pooler_module: module whose output is a pooled visual vector (``None``: no pooler).
        image_token_id: the image placeholder token in ``input_ids`` (``None``: the model has none).
        block_placement: where methods that wrap whole blocks (p-adapter) go by default, as
            ``((tower, (positions...)), ...)``; ``None``: every position of the language towers (the papers' setups
            for BLIP and BLIP-2 differ and are written out).
        derived: whether the description was derived from the model's structure (not written out).
    """

    name: str
    class_names: tuple[str, ...]
    towers: tuple[Tower, ...]
    language_towers: tuple[str, ...]
    visual_feature_module: str
    visual_feature_output: str
    pooler_module: str | None = None
    image_token_id: int | None = None
    block_placement: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    derived: bool = False

    def default_placement(self) -> dict[str, tuple[str, ...]]:
        """Tower -> positions adapted by default by block-wrapping methods."""
        if self.block_placement is not None:
            return dict(self.block_placement)
        return {name: POSITIONS for name in self.language_towers}

    def tower(self, name: str) -> Tower:
        for tower in self.towers:
            if tower.name == name:
                return tower
        raise ValueError(
            f"Unknown tower {name!r} for model family {self.name!r}; expected one of {self.tower_names()} "
            f"or an alias in {sorted(TOWER_ALIASES)}."
        )

    def locate_block(self, key: str) -> tuple[Tower, str] | None:
        """The tower and position (``self_attn``, ``cross_attn``, ``ffn``) of the block named ``key``, or ``None``."""
        for tower in self.towers:
            for position in POSITIONS:
                relative = _relative_path(tower.layer, position, "block")
                if relative is not None and re.fullmatch(tower.layer_regex() + r"\." + re.escape(relative), key):
                    return tower, position
        return None

    def tower_names(self) -> list[str]:
        return [tower.name for tower in self.towers]

    def resolve_towers(self, names: Iterable[str] | str | None) -> list[Tower]:
        """Expand tower names and aliases (``"language"``, ``"text"``, ``"all"``) into towers.

        ``None`` selects the language towers.
        """
        if names is None:
            names = list(self.language_towers)
        elif isinstance(names, str):
            names = [names]
        towers: list[Tower] = []
        for name in names:
            if name == "all":
                expanded = self.tower_names()
            elif name in TOWER_ALIASES:
                expanded = [t.name for t in self.towers if t.name in self.language_towers] if TOWER_ALIASES[
                    name
                ] == "language" else [t.name for t in self.towers if t.modality == TOWER_ALIASES[name]]
            else:
                expanded = [self.tower(name).name]
            for tower_name in expanded:
                tower = self.tower(tower_name)
                if tower not in towers:
                    towers.append(tower)
        return towers

    def module_regex(self, towers: Iterable[str] | str | None, positions: Iterable[str], part: str) -> str:
        """A regex (for PEFT ``target_modules``) matching ``part`` of the attention/FFN blocks.

        Args:
            towers: tower names or aliases (``None``: language towers).
            positions: subset of ``("self_attn", "cross_attn", "ffn")``.
            part: for attention positions one of ``"block"`` (the attention module), ``"query"``, ``"key"``,
                ``"value"``, ``"fused_qkv"``, ``"attn_output"``; for the ``ffn`` position one of ``"block"``
                (the FFN block), ``"ffn_input"``, ``"ffn_output"``.

        Raises:
            ValueError: unknown position/part, or nothing of that kind exists in the selected towers.
        """
        alternatives: list[str] = []
        for position in positions:
            if position not in POSITIONS:
                raise ValueError(f"Unknown position {position!r}; expected one of {POSITIONS}.")
            for tower in self.resolve_towers(towers):
                relative = _relative_path(tower.layer, position, part)
                if relative is not None:
                    alternatives.append(tower.layer_regex() + r"\." + re.escape(relative))
        if not alternatives:
            raise ValueError(
                f"Model family {self.name!r} has no {part!r} at positions {list(positions)} in towers "
                f"{[t.name for t in self.resolve_towers(towers)]}."
            )
        return "(" + "|".join(alternatives) + ")"


TOWER_ALIASES = {"language": "language", "text": "language", "language_model": "language", "vision": "vision"}


def _relative_path(layout: LayerLayout, position: str, part: str) -> str | None:
    if position == "ffn":
        if part == "block":
            return layout.ffn_block
        if part in ("ffn_input", "ffn_output"):
            return getattr(layout, part)
        raise ValueError(f"Unknown part {part!r} for position 'ffn'; expected 'block', 'ffn_input', 'ffn_output'.")
    block = layout.self_attn if position == "self_attn" else layout.cross_attn
    if block is None:
        return None
    if part == "block":
        return block
    if part in ("query", "key", "value", "attn_output", "fused_qkv"):
        relative = getattr(layout, part)
        return None if relative is None else f"{block}.{relative}"
    raise ValueError(
        f"Unknown part {part!r} for attention positions; expected 'block', 'query', 'key', 'value', "
        "'fused_qkv', 'attn_output'."
    )
