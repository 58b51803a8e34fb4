"""Pieces shared by the routed tuners (routed LoRA and the bottleneck adapter).

- :class:`RoutingOptions`: the config fields that say how a tuner routes (routing kind, pooling, where x_R
  comes from) and their validation;
- :func:`target_regex`: PEFT target regexes from the model family presets;
- :class:`RoutingTunerMixin`: the tuner side of :class:`~vlpeft.glue.visual_features.VisualFeatureContext`:
  one context per tuner, hooks attached after injection, a frame per ``PeftModel.forward`` / ``generate``
  call, hooks removed on ``unload()``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vlpeft.functional import ROUTING_KINDS
from vlpeft.glue.derive import image_token_id
from vlpeft.glue.families import ModelFamily, detect_family
from vlpeft.glue.visual_features import (
    FEATURE_OUTPUTS,
    VISUAL_FEATURE_POOLINGS,
    VisualFeatureContext,
    VisualSource,
)

SINGLE_VECTOR_KINDS = ("mul", "add", "matmul_expand")


@dataclass
class RoutingOptions:
    """Config fields common to the routed tuners (mixed into their PEFT configs).

    Attributes:
        routing: routing function applied in the bottleneck (``"mul"``, ``"add"``, ``"matmul"``,
            ``"matmul_expand"``), or ``None`` for the plain method.
        pooling: how the visual tokens are reduced before the shared down-projection: ``"pooler"`` (the vision
            model's pooled output), ``"cls"`` (first visual token), ``"mean"`` (mean over the visual tokens, over
            all images of a sample), ``"none"`` (keep all tokens; only with ``routing="matmul"``).
        towers: towers adapted by the family preset when ``target_modules`` is None (``None``: language towers).
        visual_feature_module / visual_feature_output / pooler_module: where x_R comes from; ``None`` takes the
            model family's choice (``vlpeft.glue.families``).
        matmul_reshape_quirk: quirk Q1, faithful reproduction of the released ``reshape`` in ``"matmul"``
            (differs from the true transpose only with several visual tokens).
        visual_projection_grad: ``True`` (the released code): the shared down-projection (LoRA's A, the
            adapter's W_d and b_d) learns through the text and the visual term. ``False``: the visual term is
            computed with it detached (same forward values), so it learns from the text term only. An opt-in
            deviation: with ``"add"`` the visual term's gradient into W_d is 3-5x the text term's and routed
            Adapter collapses on the demo's VQA (docs/instabilities.md).
    """

    routing: str | None = field(default=None, metadata={"help": f"Routing function: one of {ROUTING_KINDS} or None."})
    pooling: str = field(default="mean", metadata={"help": f"Visual-token pooling: one of {VISUAL_FEATURE_POOLINGS}."})
    towers: list[str] | None = field(default=None, metadata={"help": "Towers for the preset targets (None: language)."})
    visual_feature_module: str | None = field(default=None, metadata={"help": "Module whose output is x_R."})
    visual_feature_output: str | None = field(
        default=None, metadata={"help": f"How to read x_R from that output: one of {FEATURE_OUTPUTS}."}
    )
    pooler_module: str | None = field(default=None, metadata={"help": "Module whose output is the pooled x_R."})
    matmul_reshape_quirk: bool = field(default=False, metadata={"help": "Quirk Q1 (released reshape in matmul)."})
    visual_projection_grad: bool = field(
        default=True, metadata={"help": "False: the down-projection gets no gradient through the visual term."}
    )

    def _validate_routing(self) -> None:
        if self.routing is not None and self.routing not in ROUTING_KINDS:
            raise ValueError(f"routing={self.routing!r} is not one of {ROUTING_KINDS} (or None for no routing)")
        if self.pooling not in VISUAL_FEATURE_POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not one of {VISUAL_FEATURE_POOLINGS}")
        if self.pooling == "none" and self.routing in SINGLE_VECTOR_KINDS:
            raise ValueError(
                f"routing={self.routing!r} needs one visual vector per sample; pooling='none' keeps all visual "
                "tokens. Use pooling='pooler', 'cls' or 'mean' (or routing='matmul')."
            )
        if not self.visual_projection_grad and self.routing is None:
            raise ValueError("visual_projection_grad=False applies to a routed tuner only (routing is None)")
        if self.matmul_reshape_quirk and self.routing != "matmul":
            raise ValueError(f"matmul_reshape_quirk=True applies to routing='matmul' only, got routing={self.routing!r}")
        if self.visual_feature_output is not None and self.visual_feature_output not in FEATURE_OUTPUTS:
            raise ValueError(f"visual_feature_output={self.visual_feature_output!r} is not one of {FEATURE_OUTPUTS}")
        if isinstance(self.towers, str):
            self.towers = [self.towers]


def family_or_none(model: nn.Module) -> ModelFamily | None:
    try:
        return detect_family(model)
    except ValueError:
        return None


def preset_family(model: nn.Module, config_name: str) -> ModelFamily:
    """The description of ``model`` for a ``target_modules=None`` preset; the error says why there is none."""
    try:
        return detect_family(model)
    except ValueError as error:
        raise ValueError(
            f"{config_name}(target_modules=None) places itself from the model's description, and "
            f"{type(model).__name__} has none: {error}"
        ) from error


def target_regex(family: ModelFamily, towers: Sequence[str] | None, positions: Iterable[str], parts: Iterable[str]) -> str:
    """One regex matching every existing ``part`` at ``positions`` of ``towers`` (parts missing in a tower are skipped).

    Raises:
        ValueError: none of the parts exists there.
    """
    alternatives = []
    errors = []
    positions = list(positions)
    for part in parts:
        for position in positions:
            try:
                alternatives.append(family.module_regex(towers, [position], part))
            except ValueError as error:
                errors.append(str(error))
    if not alternatives:
        raise ValueError(f"no preset targets for parts {list(parts)} at {positions}: " + "; ".join(errors))
    return "(" + "|".join(alternatives) + ")"


def matches(pattern: str | Sequence[str] | None, key: str) -> bool:
    """PEFT's matching rule: a string is a full regex match, a list matches exactly or as a dotted suffix."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, key) is not None
    return any(key == name or key.endswith("." + name) for name in pattern)


def visual_source(config: RoutingOptions, model: nn.Module) -> VisualSource:
    """The x_R source of ``config`` for ``model``: explicit config fields, else the model family's.

    Raises:
        ValueError: no source is known, or the family's source needs an image placeholder token the model lacks.
    """
    family = family_or_none(model)
    module = config.visual_feature_module or (family.visual_feature_module if family else None)
    if not module:
        raise ValueError(
            f"routing={config.routing!r} needs visual features, but {type(model).__name__} has no known source: no "
            "image placeholder token (config.image_token_id) and no multi-modal projector; set "
            "`visual_feature_module` (and `visual_feature_output`) in the config"
        )
    output = config.visual_feature_output or (
        family.visual_feature_output if family and module == family.visual_feature_module else "tensor"
    )
    if output == "placeholder_embeds" and image_token_id(model) is None:
        raise ValueError(
            f"routing={config.routing!r} reads x_R at the image placeholder tokens of the language model's input, "
            f"but {type(model).__name__} names no image token (config.image_token_id / image_token_index); set "
            "`visual_feature_module` to the module whose output is x_R (e.g. the multi-modal projector)"
        )
    pooler = config.pooler_module
    if pooler is None and family is not None and module == family.visual_feature_module and output == "tensor":
        # With "last_hidden_state" outputs the pooled vector is read from the output's pooler_output.
        pooler = family.pooler_module
    return VisualSource(module=module, output=output, pooler_module=pooler)


class RoutingTunerMixin:
    """Tuner-side plumbing of the visual-feature context (mixed into a PEFT ``BaseTuner``)."""

    model: nn.Module
    peft_config: dict[str, Any]
    prefix: str

    @property
    def visual_context(self) -> VisualFeatureContext:
        context = self.__dict__.get("_vlpeft_visual_context")
        if context is None:
            context = VisualFeatureContext()
            self.__dict__["_vlpeft_visual_context"] = context
            # Expose it under the name find_visual_contexts() looks for.
            self.__dict__["visual_context"] = context
        return context

    def _attach_visual_source(self, model: nn.Module, config: RoutingOptions) -> VisualSource | None:
        if config.routing is None:
            return None
        source = visual_source(config, model)
        self.visual_context.attach(model, source, image_token_id=image_token_id(model))
        self.visual_context.request(source.module, config.pooling)
        return source

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Open one visual-feature frame around ``PeftModel.forward`` / ``generate``."""
        with self.visual_context.scope():
            yield

    def _detach_visual_context(self) -> None:
        self.visual_context.detach()

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Swap in the wrapper (or, on unload, the original child) and move new adapter weights to its device.

        PEFT's default assumes Linear-like children (``new_module.weight = child.weight``), which breaks for the FFN
        blocks wrapped by parallel adapters when unloading.
        """
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        weight = next(child.parameters(), None)
        if weight is None:
            return
        for name, module in new_module.named_modules():
            if self.prefix in name:
                module.to(weight.device)
