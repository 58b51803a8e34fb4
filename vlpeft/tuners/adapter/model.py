"""The bottleneck adapter tuner (PEFT ``BaseTuner``): presets per style, injection, no merging."""

from __future__ import annotations

import inspect
import re
from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers.pytorch_utils import Conv1D

from vlpeft.glue.families import ModelFamily
from vlpeft.tuners.adapter.config import AdapterConfig
from vlpeft.tuners.adapter.layer import BottleneckAdapterLayer, ParallelAdapter, SequentialAdapter
from vlpeft.tuners.routed_lora.routing_support import (
    RoutingTunerMixin,
    family_or_none,
    preset_family,
    target_regex,
)

_LAYER_KEY = re.compile(r"^(.*\.\d+)\.")


def apply_adapter_preset(config: AdapterConfig, model: nn.Module) -> None:
    """Fill ``target_modules`` from the model family for ``config.style`` / positions / towers when None.

    Sequential styles target the attention output projections (``self_attn`` / ``cross_attn``) and the FFN
    output projection (``ffn``); ``parallel`` targets the FFN blocks.
    """
    if config.target_modules is not None:
        return
    family = preset_family(model, "AdapterConfig")
    regexes = []
    for position in config.resolved_positions:
        if position == "ffn":
            # Sequential: after the FFN's output projection, or after the whole block where it has no plain one
            # (mixture-of-experts blocks with fused expert weights).
            parts = ["block"] if config.style == "parallel" else ["ffn_output"]
            if config.style != "parallel" and not _has_part(family, config.towers, "ffn_output"):
                parts = ["block"]
        else:
            parts = ["attn_output"]
        try:
            regexes.append(target_regex(family, config.towers, [position], parts))
        except ValueError as error:
            if position != "cross_attn":
                raise ValueError(f"style={config.style!r} cannot be placed in model family {family.name!r}: {error}") from error
    config.target_modules = "(" + "|".join(regexes) + ")"


def _has_part(family: ModelFamily, towers: list[str] | None, part: str) -> bool:
    try:
        family.module_regex(towers, ["ffn"], part)
    except ValueError:
        return False
    return True


def _block_call_style(config: AdapterConfig, family: ModelFamily | None, key: str, block: nn.Module) -> str:
    if config.parallel_block_style != "auto":
        return config.parallel_block_style
    if family is not None:
        for tower in family.towers:
            layout = tower.layer
            if layout.ffn_block is None:
                continue
            if re.fullmatch(tower.layer_regex() + r"\." + re.escape(layout.ffn_block), key):
                assert layout.ffn_block_style is not None
                return layout.ffn_block_style
    required = [
        p
        for p in inspect.signature(block.forward).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return "bert_output" if len(required) >= 2 else "mlp"


def _block_width(block: nn.Module, style: str, key: str) -> int:
    """Hidden width of an FFN block: input width of its first projection (mlp) or output width (bert_output)."""
    for module in block.modules():
        if isinstance(module, nn.Linear):
            return module.in_features if style == "mlp" else module.out_features
        if isinstance(module, Conv1D):
            return module.weight.shape[0] if style == "mlp" else module.weight.shape[1]
    raise ValueError(f"cannot find a projection inside the FFN block {key!r} to size its parallel adapter")


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Conv1D)


def _block_output_width(model: nn.Module, block: nn.Module, key: str) -> int:
    """Output width of a whole FFN block wrapped sequentially (a mixture-of-experts block with no plain output
    projection): the input width of its first Linear (the router), else the language model's hidden size."""
    try:
        return _block_width(block, "mlp", key)
    except ValueError:
        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        width = getattr(text, "hidden_size", None)
        if not isinstance(width, int):
            raise ValueError(f"cannot find the output width of {key!r} to size its sequential adapter") from None
        return width


class BottleneckAdapterModel(RoutingTunerMixin, BaseTuner):
    """Injects :class:`SequentialAdapter` / :class:`ParallelAdapter` layers for an :class:`AdapterConfig`."""

    prefix: str = "bottleneck_adapter_"
    tuner_layer_cls = BottleneckAdapterLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: AdapterConfig, model_config: dict[str, Any]) -> AdapterConfig:
        apply_adapter_preset(peft_config, self.model)
        return peft_config

    def _shared_adapters(self) -> dict[tuple[str, str], tuple[nn.Linear, nn.Linear]]:
        shared = self.__dict__.get("_vlpeft_shared_adapters")
        if shared is None:
            shared = self.__dict__["_vlpeft_shared_adapters"] = {}
        return shared

    def _create_and_replace(
        self,
        peft_config: AdapterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if parameter_name is not None:
            raise ValueError("bottleneck adapters target modules, not parameters")
        attached = self._attach_visual_source(self.model, peft_config)
        source = None if attached is None else attached.module
        shared = None
        layer_key = None
        if peft_config.share_block_adapter:
            match = _LAYER_KEY.match(current_key)
            if match is None:
                raise ValueError(f"share_block_adapter=True needs numbered layers; cannot find the layer of {current_key!r}")
            layer_key = match.group(1)
            shared = self._shared_adapters().get((adapter_name, layer_key))
        if isinstance(target, BottleneckAdapterLayer):
            target.update_layer(adapter_name, peft_config, visual_source=source, shared=shared)
            new_module = target
        else:
            base = target
            if peft_config.style == "parallel":
                style = _block_call_style(peft_config, family_or_none(self.model), current_key, base)
                new_module = ParallelAdapter(
                    base,
                    adapter_name,
                    peft_config,
                    block_style=style,
                    width=_block_width(base, style, current_key),
                    visual_source=source,
                    visual_context=self.visual_context,
                    module_name=current_key,
                    shared=shared,
                )
            else:
                new_module = SequentialAdapter(
                    base,
                    adapter_name,
                    peft_config,
                    visual_source=source,
                    visual_context=self.visual_context,
                    module_name=current_key,
                    shared=shared,
                    width=None if _is_projection(base) else _block_output_width(self.model, base, current_key),
                )
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
        if layer_key is not None and shared is None:
            self._shared_adapters()[(adapter_name, layer_key)] = (
                new_module.bottleneck_adapter_down[adapter_name],
                new_module.bottleneck_adapter_up[adapter_name],
            )

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "bottleneck adapters cannot be merged: they are non-linear functions of the hidden states. Use unload()."
        )

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(merge=merge, **kwargs)
        self._detach_visual_context()
        return model
