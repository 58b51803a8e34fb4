"""The routed LoRA tuner (PEFT ``BaseTuner``): target presets, layer injection, visual-feature plumbing."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from vlpeft.tuners.routed_lora.config import RoutedLoraConfig
from vlpeft.tuners.routed_lora.layer import Linear, RoutedLoraLayer
from vlpeft.tuners.routed_lora.routing_support import (
    RoutingTunerMixin,
    matches,
    preset_family,
    target_regex,
)


def apply_routed_lora_preset(config: RoutedLoraConfig, model: nn.Module) -> None:
    """Fill ``target_modules`` (and ``fused_qkv_modules``) from the model family when they are None.

    Preset: query and value projections of ``config.towers`` (default: the language towers) at
    ``config.positions``; where q/k/v are one fused projection (GPT-2 ``c_attn``), that projection with
    ``config.fused_qkv_slices``.
    """
    if config.target_modules is not None:
        return
    family = preset_family(model, "RoutedLoraConfig")
    separate = None
    fused = None
    try:
        separate = target_regex(family, config.towers, config.positions, ["query", "value"])
    except ValueError:
        separate = None
    # Fused q/k/v projections exist in self-attention only (GPT-2's cross-attention c_attn is a fused k/v).
    fused_positions = [p for p in config.positions if p == "self_attn"]
    try:
        fused = target_regex(family, config.towers, fused_positions, ["fused_qkv"]) if fused_positions else None
    except ValueError:
        fused = None
    alternatives = [regex for regex in (separate, fused) if regex is not None]
    if not alternatives:
        raise ValueError(
            f"model family {family.name!r} has no query/value projections in towers {config.towers} at "
            f"positions {config.positions}"
        )
    config.target_modules = "(" + "|".join(alternatives) + ")" if len(alternatives) > 1 else alternatives[0]
    if fused is not None and config.fused_qkv_modules is None:
        config.fused_qkv_modules = fused


class RoutedLoraModel(RoutingTunerMixin, BaseTuner):
    """Injects :class:`~vlpeft.tuners.routed_lora.layer.Linear` into the targets of a :class:`RoutedLoraConfig`.

    ``PeftModel.forward`` / ``generate`` open a visual-feature frame (``_enable_peft_forward_hooks``); a hook on
    the model's visual feature module fills it; routed layers read it.
    """

    prefix: str = "routed_lora_"
    tuner_layer_cls = RoutedLoraLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: RoutedLoraConfig, model_config: dict[str, Any]) -> RoutedLoraConfig:
        apply_routed_lora_preset(peft_config, self.model)
        return peft_config

    def _create_and_replace(
        self,
        peft_config: RoutedLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if parameter_name is not None:
            raise ValueError("routed LoRA targets modules, not parameters")
        fused = matches(peft_config.fused_qkv_modules, current_key)
        attached = self._attach_visual_source(self.model, peft_config)
        source = None if attached is None else attached.module
        if isinstance(target, RoutedLoraLayer):
            target.update_layer(adapter_name, peft_config, fused=fused, visual_source=source)
            return
        new_module = Linear(
            target,
            adapter_name,
            peft_config,
            fused=fused,
            visual_source=source,
            visual_context=self.visual_context,
            module_name=current_key,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        for name, config in self.peft_config.items():
            if name in self.active_adapters and config.routing is not None:
                raise ValueError(
                    f"cannot merge routed LoRA adapter {name!r} (routing={config.routing!r}): the update depends on "
                    "each sample's visual features. Only routing=None (plain LoRA) merges; use unload() instead."
                )

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(merge=merge, **kwargs)
        self._detach_visual_context()
        return model
