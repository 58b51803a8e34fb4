"""The p-adapter PEFT tuner: target resolution, block wrapping, attention-implementation switching, unloading."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from vlpeft.glue.attention import PADAPTER_ATTENTION
from vlpeft.glue.attention_blocks import AttentionBlockSpec, describe_attention_block, spec_from_layout
from vlpeft.glue.families import FAMILIES, POSITIONS, ModelFamily, detect_family, family_for
from vlpeft.tuners._peft_registry import get_submodules
from vlpeft.tuners.p_adapter.attention import PAdapterAttention
from vlpeft.tuners.p_adapter.config import PAdapterConfig
from vlpeft.tuners.p_adapter.ffn import PAdapterFFN
from vlpeft.tuners.p_adapter.layer import MERGE_ERROR_MESSAGE, PAdapterLayer, PAdapterMergeError

#: Default placement (tower -> positions) of each written-out family; derived families place themselves on every
#: position of their language towers (:meth:`ModelFamily.default_placement`).
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    name: family.default_placement() for name, family in FAMILIES.items()
}


def resolve_targets(
    family: ModelFamily, towers: list[str] | None, positions: list[str] | None
) -> dict[str, str]:
    """PEFT target regexes for the family's default placement narrowed by ``towers`` / ``positions``.

    Attention blocks are targeted only where the description says attention goes through transformers' attention
    interface (p-adapter reads the probabilities there) or is a written-out inline layout vlpeft wraps (BLIP).

    Returns:
        position -> regex over full module names (attention blocks for ``self_attn``/``cross_attn``, FFN blocks
        for ``ffn``).

    Raises:
        ValueError: an unknown tower/position, a requested position that exists in none of the towers, or no
            attention block p-adapter can read.
    """
    preset = family.default_placement()
    selected = [family.tower(name) for name in preset] if towers is None else family.resolve_towers(towers)
    wanted = list(positions) if positions is not None else None
    parts: dict[str, list[str]] = {position: [] for position in POSITIONS}
    unreadable: list[str] = []
    for tower in selected:
        tower_positions = wanted if wanted is not None else list(preset.get(tower.name, POSITIONS))
        for position in tower_positions:
            if position != "ffn" and family.derived and tower.layer.attention_style != "interface":
                unreadable.append(tower.name)
                continue
            if position == "ffn" and wanted is None and family.derived and tower.layer.ffn_input is None:
                continue  # no plain first projection to size the FFN adapter (mixture-of-experts blocks)
            try:
                parts[position].append(family.module_regex(tower.name, [position], "block"))
            except ValueError:
                continue  # this tower has no such block (e.g. no cross-attention in a decoder-only LM)
    for position in wanted or []:
        if not parts[position]:
            raise ValueError(
                f"Position {position!r} exists in none of the selected towers {[t.name for t in selected]} of "
                f"model family {family.name!r}."
            )
    attention_wanted = wanted is None or any(p != "ffn" for p in wanted)
    if attention_wanted and not parts["self_attn"] and not parts["cross_attn"]:
        why = (f": the attention of towers {sorted(set(unreadable))} is computed inline, not through transformers' "
               "attention interface, so there are no attention probabilities for p-adapter to read" if unreadable
               else "")
        raise ValueError(
            f"No attention block for p-adapter in towers {[t.name for t in selected]} of model family "
            f"{family.name!r}{why}."
        )
    resolved = {position: "|".join(regexes) for position, regexes in parts.items() if regexes}
    if not resolved:
        raise ValueError(f"No p-adapter targets in towers {[t.name for t in selected]} of family {family.name!r}.")
    return resolved


def _config_paths(config: Any, prefix: tuple[str, ...] = (), seen: dict[int, tuple[str, ...]] | None = None):
    seen = {} if seen is None else seen
    if id(config) in seen:
        return seen
    seen[id(config)] = prefix
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            _config_paths(sub, (*prefix, key), seen)
    return seen


class PAdapterModel(BaseTuner):
    """PEFT tuner that wraps attention and FFN blocks with p-adapters.

    Use through PEFT: ``peft.get_peft_model(model, PAdapterConfig(...))`` after ``import vlpeft``.
    """

    prefix: str = "padapter_"
    tuner_layer_cls = PAdapterLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------------------------------- targets
    def _prepare_adapter_config(self, peft_config: PAdapterConfig, model_config: dict) -> PAdapterConfig:
        if not isinstance(peft_config, PAdapterConfig):
            raise TypeError(f"PAdapterModel needs a PAdapterConfig, got {type(peft_config).__name__}")
        if peft_config.target_modules is None:
            family = family_for(self.model, peft_config.family)
            resolved = resolve_targets(family, peft_config.towers, peft_config.positions)
            peft_config.family = family.name
            peft_config.target_modules = "(" + "|".join(f"(?:{regex})" for regex in resolved.values()) + ")"
            peft_config.targets_resolved = True
        return peft_config

    def _placement(
        self, peft_config: PAdapterConfig, key: str, target: nn.Module
    ) -> tuple[str, AttentionBlockSpec | None]:
        """``("ffn", None)`` or ``("attention", spec)`` for a matched module: from the model's description where
        it places the module, else from the module's structure (explicit targets in custom models)."""
        family = self._description(peft_config)
        located = family.locate_block(key) if family is not None else None
        if located is not None:
            tower, position = located
            if position == "ffn":
                return "ffn", None
            return "attention", spec_from_layout(tower.layer, position == "cross_attn", target, key)
        if isinstance(target, nn.Linear) or type(target).__name__ == "Conv1D":
            raise ValueError(
                f"target {key!r} is a projection ({type(target).__name__}); p-adapter targets whole attention "
                "blocks (e.g. '...layer.0.attention', '...layers.0.self_attn') and FFN blocks ('...output', '...mlp')."
            )
        try:
            return "attention", describe_attention_block(target, key)
        except ValueError:
            return "ffn", None

    def _description(self, peft_config: PAdapterConfig) -> ModelFamily | None:
        if peft_config.family:
            return family_for(self.model, peft_config.family)
        try:
            return detect_family(self.model)
        except ValueError:
            return None

    def _create_and_replace(
        self,
        peft_config: PAdapterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if isinstance(target, PAdapterLayer):
            target.update_layer(adapter_name, peft_config)
            return
        if isinstance(target, BaseTunerLayer):
            raise ValueError(
                f"{current_key} is already wrapped by another PEFT method ({type(target).__name__}); p-adapter "
                "must be applied to the plain attention/FFN block."
            )
        position, spec = self._placement(peft_config, current_key, target)
        new_module: PAdapterLayer
        if position == "ffn":
            new_module = PAdapterFFN(target, current_key)
        else:
            new_module = PAdapterAttention(target, current_key, spec)
        new_module.update_layer(adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # The wrapped module is a whole block (no `.weight`); the adapter was created on the block's device.
        setattr(parent, child_name, new_module)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, parameter in model.named_parameters():
            if self.prefix not in name:
                parameter.requires_grad = False

    # ------------------------------------------------------------------------------------------- injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._sync_attention_implementation()

    def _interface_configs(self, active_only: bool) -> dict[int, Any]:
        """Configs of the attention modules that p-adapters read through the attention interface.

        With ``active_only``, only modules where one of the active adapters lives count.
        """
        active = set(self.active_adapters)
        configs: dict[int, Any] = {}
        for module in self.model.modules():
            if not (isinstance(module, PAdapterAttention) and module.spec.capture == "interface"):
                continue
            names = set(module.padapter_settings)
            if names and (not active_only or names & active):
                attention = module.base_layer if module.spec.attention == "" else module.base_layer.get_submodule(
                    module.spec.attention
                )
                config = getattr(attention, "config", None)
                if config is None:
                    raise RuntimeError(f"{module.module_name}: attention module has no `config` to switch.")
                configs[id(config)] = config
        return configs

    def _set_attention_implementations(self, wanted: dict[int, tuple[Any, str]]) -> None:
        if not wanted:
            return
        paths = _config_paths(self.model.config)
        request: dict[str, Any] = {}
        for config_id, (config, implementation) in wanted.items():
            if config_id not in paths:
                raise ValueError(
                    f"cannot locate attention config {type(config).__name__} in the model's config tree to switch "
                    f"its attention implementation to {implementation!r}."
                )
            path = paths[config_id]
            node = request
            for key in path:
                child = node.get(key)
                if not isinstance(child, dict):
                    child = {} if child is None else {"": child}
                    node[key] = child
                node = child
            node[""] = implementation
        self.model.set_attn_implementation(request)
        for config, implementation in wanted.values():
            if config._attn_implementation != implementation:
                raise RuntimeError(
                    f"could not set the attention implementation of {type(config).__name__} to {implementation!r} "
                    f"(it is {config._attn_implementation!r})."
                )

    def _sync_attention_implementation(self, enabled: bool | None = None) -> None:
        """Use ``"padapter"`` attention where an active adapter reads it, the original implementation elsewhere.

        Towers whose adapted blocks are all inactive or disabled run their original implementation (e.g. sdpa),
        so their outputs are exactly those of the base model.
        """
        if enabled is not None:
            self.__dict__["_padapter_enabled"] = enabled
        enabled = self.__dict__.get("_padapter_enabled", True)
        originals: dict[int, tuple[Any, str]] = self.__dict__.setdefault("_padapter_original_attention", {})
        for config_id, config in self._interface_configs(active_only=False).items():
            if config_id not in originals:
                current = config._attn_implementation
                originals[config_id] = (config, "eager" if current in (None, PADAPTER_ATTENTION) else current)
        configs = self._interface_configs(active_only=True)
        wanted: dict[int, tuple[Any, str]] = {}
        for config_id, (config, original) in originals.items():
            target = PADAPTER_ATTENTION if enabled and config_id in configs else original
            if config._attn_implementation != target:
                wanted[config_id] = (config, target)
        self._set_attention_implementations(wanted)
        adapted = self._interface_configs(active_only=False)
        for config_id in [cid for cid in originals if cid not in adapted]:
            del originals[config_id]

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._sync_attention_implementation(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._sync_attention_implementation()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_attention_implementation()

    # ------------------------------------------------------------------------------------------- merging
    def _check_merge_allowed(self) -> None:
        raise PAdapterMergeError(MERGE_ERROR_MESSAGE)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise PAdapterMergeError(MERGE_ERROR_MESSAGE)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            raise PAdapterMergeError(MERGE_ERROR_MESSAGE)
        keys = [key for key, module in self.model.named_modules() if isinstance(module, PAdapterLayer)]
        for key in keys:
            parent, target, target_name = get_submodules(self.model, key)
            setattr(parent, target_name, target.get_base_layer())
        originals = self.__dict__.get("_padapter_original_attention", {})
        self._set_attention_implementations(
            {cid: (config, original) for cid, (config, original) in originals.items()
             if config._attn_implementation != original}
        )
        originals.clear()
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def unload(self) -> nn.Module:
        """Remove all p-adapters and restore the original blocks and attention implementations."""
        return self._unload_and_optionally_merge(merge=False)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise PAdapterMergeError(MERGE_ERROR_MESSAGE)

    # ------------------------------------------------------------------------------------------- inspection
    def p_values(self) -> dict[str, float]:
        """Current p of every adapted attention block of the active adapter(s), by ``module.adapter`` name."""
        values: dict[str, float] = {}
        with torch.no_grad():
            for name, module in self.model.named_modules():
                if isinstance(module, PAdapterAttention):
                    for adapter in module._active_names():
                        values[f"{name}.{adapter}"] = float(module.p_value(adapter))
        return values

