"""vlpeft's registrations with transformers and PEFT, all in one place.

``import vlpeft`` calls :func:`register_all` (in ``vlpeft/__init__.py``); no other module registers anything when
it is imported. After it:

- transformers' Auto classes know vlpeft's model classes, so saved checkpoints reload through them:
  :class:`~vlpeft.models.VisionPrefixLMConfig` (``model_type="vlpeft_vision_prefix_lm"``) with ``AutoConfig``,
  its classifier with ``AutoModelForSequenceClassification`` and its decoder with ``AutoModelForCausalLM``;
  :class:`~vlpeft.models.ClipBartConfig` (``model_type="vlpeft_clip_bart"``) with ``AutoConfig``,
  ``AutoModelForSeq2SeqLM`` and ``AutoModelForImageTextToText``;
- PEFT knows vlpeft's methods (:class:`~vlpeft.tuners._peft_registry.VLPeftType`), so ``peft.get_peft_model`` and
  ``PeftModel.from_pretrained`` work with :class:`~vlpeft.PAdapterConfig`, :class:`~vlpeft.RoutedLoraConfig` and
  :class:`~vlpeft.AdapterConfig` (through :func:`vlpeft.tuners._peft_registry.register_method`, the one place that
  writes PEFT's registry).

:func:`register_all` is idempotent: calling it again registers the same classes again, which changes nothing.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

from vlpeft.models import (
    ClipBartConfig,
    ClipBartForConditionalGeneration,
    VisionPrefixLMConfig,
    VisionPrefixLMForCausalLM,
    VisionPrefixLMForClassification,
)
from vlpeft.tuners._peft_registry import VLPeftType, register_method
from vlpeft.tuners.adapter import AdapterConfig, BottleneckAdapterModel
from vlpeft.tuners.p_adapter import PAdapterConfig, PAdapterModel
from vlpeft.tuners.routed_lora import RoutedLoraConfig, RoutedLoraModel

__all__ = ["AUTO_MODELS", "PEFT_METHODS", "register_all", "register_with_peft", "register_with_transformers"]

#: (Auto class, config class, model class) registered with transformers.
AUTO_MODELS: tuple[tuple[type, type, type], ...] = (
    (AutoModelForSequenceClassification, VisionPrefixLMConfig, VisionPrefixLMForClassification),
    (AutoModelForCausalLM, VisionPrefixLMConfig, VisionPrefixLMForCausalLM),
    (AutoModelForSeq2SeqLM, ClipBartConfig, ClipBartForConditionalGeneration),
    (AutoModelForImageTextToText, ClipBartConfig, ClipBartForConditionalGeneration),
)

#: (PEFT type, config class, tuner class) registered with PEFT, in the order the tuner packages registered
#: themselves on import before registration moved here (PEFT's registry dicts keep insertion order).
PEFT_METHODS: tuple[tuple[VLPeftType, type, type], ...] = (
    (VLPeftType.ROUTED_LORA, RoutedLoraConfig, RoutedLoraModel),
    (VLPeftType.BOTTLENECK_ADAPTER, AdapterConfig, BottleneckAdapterModel),
    (VLPeftType.PADAPTER, PAdapterConfig, PAdapterModel),
)


def register_with_transformers() -> None:
    """Register vlpeft's configs with ``AutoConfig`` and its models with the Auto model classes."""
    for config_cls in (VisionPrefixLMConfig, ClipBartConfig):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    for auto_cls, config_cls, model_cls in AUTO_MODELS:
        auto_cls.register(config_cls, model_cls, exist_ok=True)


def register_with_peft() -> None:
    """Register vlpeft's PEFT methods (raises if PEFT's internals changed or a prefix or type clashes)."""
    for peft_type, config_cls, model_cls in PEFT_METHODS:
        register_method(peft_type, config_cls, model_cls)


def register_all() -> None:
    """Every registration of vlpeft with transformers and PEFT (idempotent)."""
    register_with_transformers()
    register_with_peft()
