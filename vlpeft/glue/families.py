"""Model families: where the towers, attention blocks, FFNs and visual features of each supported VLM live.

Everything a tuner needs to place itself is derived from two small tables:

- :data:`LAYER_LAYOUTS` describes one transformer layer of an architecture (BERT-like, Llama-like, OPT, GPT-2,
  CLIP/SigLIP vision, ViT, BLIP vision, Q-Former) by the *relative* names of its modules.
- :data:`FAMILIES` places towers of those layouts inside a model (``text_decoder.bert.`` + BERT layout, ...)
  and names the module whose output is the visual feature sequence ``x_R`` used by routing.

Module paths follow transformers 5 (``ecosystem.md`` §3.5). Regexes returned here are meant for PEFT's
``target_modules`` (a string there is matched with ``re.fullmatch`` against the full module name).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

POSITIONS = ("self_attn", "cross_attn", "ffn")


@dataclass(frozen=True)
class LayerLayout:
    """Relative module names inside one transformer layer of an architecture.

    Attributes:
        layers: regex of the layer path relative to the tower prefix (e.g. ``encoder\\.layer\\.\\d+``).
        self_attn / cross_attn: attention block relative to the layer (``None`` if absent).
        query / key / value: projections relative to the attention block (``fused_qkv`` instead when fused).
        attn_output: the output projection relative to the attention block (its output is the attention
            output before residual/LayerNorm).
        ffn_input / ffn_output: first and last FFN linear relative to the layer.
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
    ffn_input: str
    ffn_output: str
    ffn_block: str | None
    ffn_block_style: str | None
    attention_style: str
    fused_qkv: str | None = None


LAYER_LAYOUTS: dict[str, LayerLayout] = {
    "bert": LayerLayout(
        layers=r"encoder\.layer\.\d+", self_attn="attention", cross_attn="crossattention",
        query="self.query", key="self.key", value="self.value", attn_output="output.dense",
        ffn_input="intermediate.dense", ffn_output="output.dense", ffn_block="output",
        ffn_block_style="bert_output", attention_style="interface",
    ),
    "blip_text": LayerLayout(
        layers=r"encoder\.layer\.\d+", self_attn="attention", cross_attn="crossattention",
        query="self.query", key="self.key", value="self.value", attn_output="output.dense",
        ffn_input="intermediate.dense", ffn_output="output.dense", ffn_block="output",
        ffn_block_style="bert_output", attention_style="inline",
    ),
    "qformer": LayerLayout(
        layers=r"encoder\.layer\.\d+", self_attn="attention", cross_attn="crossattention",
        query="attention.query", key="attention.key", value="attention.value", attn_output="output.dense",
        ffn_input="intermediate_query.dense", ffn_output="output_query.dense", ffn_block="output_query",
        ffn_block_style="bert_output", attention_style="interface",
    ),
    "llama": LayerLayout(
        layers=r"layers\.\d+", self_attn="self_attn", cross_attn=None,
        query="q_proj", key="k_proj", value="v_proj", attn_output="o_proj",
        ffn_input="mlp.up_proj", ffn_output="mlp.down_proj", ffn_block="mlp",
        ffn_block_style="mlp", attention_style="interface",
    ),
    "opt": LayerLayout(
        layers=r"model\.decoder\.layers\.\d+", self_attn="self_attn", cross_attn=None,
        query="q_proj", key="k_proj", value="v_proj", attn_output="out_proj",
        ffn_input="fc1", ffn_output="fc2", ffn_block=None, ffn_block_style=None, attention_style="interface",
    ),
    "gpt2": LayerLayout(
        layers=r"h\.\d+", self_attn="attn", cross_attn="crossattention",
        query=None, key=None, value=None, attn_output="c_proj", fused_qkv="c_attn",
        ffn_input="mlp.c_fc", ffn_output="mlp.c_proj", ffn_block="mlp", ffn_block_style="mlp",
        attention_style="interface",
    ),
    "clip_vision": LayerLayout(
        layers=r"encoder\.layers\.\d+", self_attn="self_attn", cross_attn=None,
        query="q_proj", key="k_proj", value="v_proj", attn_output="out_proj",
        ffn_input="mlp.fc1", ffn_output="mlp.fc2", ffn_block="mlp", ffn_block_style="mlp",
        attention_style="interface",
    ),
    "vit": LayerLayout(
        layers=r"layers\.\d+", self_attn="attention", cross_attn=None,
        query="q_proj", key="k_proj", value="v_proj", attn_output="o_proj",
        ffn_input="mlp.fc1", ffn_output="mlp.fc2", ffn_block="mlp", ffn_block_style="mlp",
        attention_style="interface",
    ),
    "blip_vision": LayerLayout(
        layers=r"encoder\.layers\.\d+", self_attn="self_attn", cross_attn=None,
        query=None, key=None, value=None, attn_output="projection", fused_qkv="qkv",
        ffn_input="mlp.fc1", ffn_output="mlp.fc2", ffn_block="mlp", ffn_block_style="mlp",
        attention_style="inline",
    ),
    "blip2_vision": LayerLayout(
        layers=r"encoder\.layers\.\d+", self_attn="self_attn", cross_attn=None,
        query=None, key=None, value=None, attn_output="projection", fused_qkv="qkv",
        ffn_input="mlp.fc1", ffn_output="mlp.fc2", ffn_block="mlp", ffn_block_style="mlp",
        attention_style="interface",
    ),
}


@dataclass(frozen=True)
class Tower:
    """One transformer stack inside a model.

    Attributes:
        name: tower name used in configs (``"vision"``, ``"text_encoder"``, ``"text_decoder"``, ``"qformer"``,
            ``"language_model"``).
        prefix: module-name prefix of the stack, ending with ``.`` (empty for a bare model).
        layout: key of :data:`LAYER_LAYOUTS`.
        config_key: sub-config holding this tower's ``_attn_implementation`` (``None``: the top config).
        modality: ``"vision"`` or ``"text"``.
    """

    name: str
    prefix: str
    layout: str
    config_key: str | None
    modality: str

    @property
    def layer(self) -> LayerLayout:
        return LAYER_LAYOUTS[self.layout]

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
        visual_feature_module: module whose forward output carries the visual features ``x_R`` in the language
            model's width (see ``routing.md`` §5).
        visual_feature_output: how to read them from that output: ``"tensor"`` (the output is the tensor),
            ``"last_hidden_state"`` (a ModelOutput / tuple whose first element is the sequence).
        pooler_module: module whose output is a pooled visual vector (``None``: no pooler).
    """

    name: str
    class_names: tuple[str, ...]
    towers: tuple[Tower, ...]
    language_towers: tuple[str, ...]
    visual_feature_module: str
    visual_feature_output: str
    pooler_module: str | None = None

    def tower(self, name: str) -> Tower:
        for tower in self.towers:
            if tower.name == name:
                return tower
        raise ValueError(
            f"Unknown tower {name!r} for model family {self.name!r}; expected one of {self.tower_names()} "
            f"or an alias in {sorted(TOWER_ALIASES)}."
        )

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


def _projector_vlm(name: str, class_name: str) -> ModelFamily:
    """LLaVA-style models: a CLIP/SigLIP tower, a multi-modal projector, and a Llama/Gemma-style language model."""
    return ModelFamily(
        name=name,
        class_names=(class_name,),
        towers=(
            Tower("vision", "model.vision_tower.", "clip_vision", "vision_config", "vision"),
            Tower("language_model", "model.language_model.", "llama", "text_config", "text"),
        ),
        language_towers=("language_model",),
        visual_feature_module="model.multi_modal_projector",
        visual_feature_output="tensor",
    )


_BLIP_VISION = Tower("vision", "vision_model.", "blip_vision", None, "vision")

FAMILIES: dict[str, ModelFamily] = {
    "blip_caption": ModelFamily(
        name="blip_caption",
        class_names=("BlipForConditionalGeneration",),
        towers=(_BLIP_VISION, Tower("text_decoder", "text_decoder.bert.", "blip_text", None, "text")),
        language_towers=("text_decoder",),
        visual_feature_module="vision_model",
        visual_feature_output="last_hidden_state",
        pooler_module="vision_model.post_layernorm",
    ),
    "blip_vqa": ModelFamily(
        name="blip_vqa",
        class_names=("BlipForQuestionAnswering",),
        towers=(
            _BLIP_VISION,
            Tower("text_encoder", "text_encoder.", "blip_text", None, "text"),
            Tower("text_decoder", "text_decoder.bert.", "blip_text", None, "text"),
        ),
        language_towers=("text_encoder", "text_decoder"),
        visual_feature_module="vision_model",
        visual_feature_output="last_hidden_state",
        pooler_module="vision_model.post_layernorm",
    ),
    "blip2": ModelFamily(
        name="blip2",
        class_names=("Blip2ForConditionalGeneration",),
        towers=(
            Tower("vision", "vision_model.", "blip2_vision", "vision_config", "vision"),
            Tower("qformer", "qformer.", "qformer", "qformer_config", "text"),
            Tower("language_model", "language_model.", "opt", "text_config", "text"),
        ),
        language_towers=("language_model",),
        visual_feature_module="language_projection",
        visual_feature_output="tensor",
    ),
    "llava": _projector_vlm("llava", "LlavaForConditionalGeneration"),
    "paligemma": _projector_vlm("paligemma", "PaliGemmaForConditionalGeneration"),
}


def register_family(family: ModelFamily) -> None:
    """Add a model family (used by vlpeft's own composite models and by users with custom models)."""
    if family.name in FAMILIES and FAMILIES[family.name] != family:
        raise ValueError(f"Model family {family.name!r} is already registered with a different layout.")
    FAMILIES[family.name] = family


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; expected one of {sorted(FAMILIES)}.")
    return FAMILIES[name]


def detect_family(model: nn.Module) -> ModelFamily:
    """Find the family of ``model`` (a transformers model, possibly wrapped by PEFT) by its class name.

    Raises:
        ValueError: the model's class belongs to no registered family.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    for family in FAMILIES.values():
        if name in family.class_names:
            return family
    known = sorted(c for f in FAMILIES.values() for c in f.class_names)
    raise ValueError(
        f"Unknown model family for model class {name!r}; supported classes: {known}. Pass explicit "
        "`target_modules`, or register a ModelFamily with vlpeft.glue.families.register_family()."
    )
