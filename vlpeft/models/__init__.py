"""vlpeft's own model classes: the routing paper's vision-prefix composite (ViT + RoBERTa/BERT/GPT-2) and its
CLIP-BART composite (VL-Adapter's setting).

Importing this package registers :class:`VisionPrefixLMConfig` (``model_type="vlpeft_vision_prefix_lm"``) with
``AutoConfig``, the classification model with ``AutoModelForSequenceClassification`` and the decoder with
``AutoModelForCausalLM``, and :class:`ClipBartConfig` (``model_type="vlpeft_clip_bart"``) with ``AutoConfig``,
``AutoModelForSeq2SeqLM`` and ``AutoModelForImageTextToText``, so saved checkpoints reload through the Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

from vlpeft.models.configuration_clip_bart import DOWNSAMPLE_POOLINGS, ClipBartConfig
from vlpeft.models.configuration_vision_prefix_lm import (
    HEAD_POOLINGS,
    PREFIX_PROJECTORS,
    TASKS,
    VISUAL_FEATURES,
    VisionPrefixLMConfig,
)
from vlpeft.models.modeling_clip_bart import ClipBartForConditionalGeneration, ClipBartVisualEmbedding
from vlpeft.models.modeling_vision_prefix_lm import (
    VisionPrefixCausalLMOutput,
    VisionPrefixClassifierHead,
    VisionPrefixClassifierOutput,
    VisionPrefixLMForCausalLM,
    VisionPrefixLMForClassification,
    VisionPrefixLMPreTrainedModel,
    build_vision_prefix_lm,
)

AutoConfig.register(VisionPrefixLMConfig.model_type, VisionPrefixLMConfig, exist_ok=True)
AutoModelForSequenceClassification.register(
    VisionPrefixLMConfig, VisionPrefixLMForClassification, exist_ok=True
)
AutoModelForCausalLM.register(VisionPrefixLMConfig, VisionPrefixLMForCausalLM, exist_ok=True)
AutoConfig.register(ClipBartConfig.model_type, ClipBartConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(ClipBartConfig, ClipBartForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(ClipBartConfig, ClipBartForConditionalGeneration, exist_ok=True)

__all__ = [
    "DOWNSAMPLE_POOLINGS",
    "ClipBartConfig",
    "ClipBartForConditionalGeneration",
    "ClipBartVisualEmbedding",
    "HEAD_POOLINGS",
    "PREFIX_PROJECTORS",
    "TASKS",
    "VISUAL_FEATURES",
    "VisionPrefixCausalLMOutput",
    "VisionPrefixClassifierHead",
    "VisionPrefixClassifierOutput",
    "VisionPrefixLMConfig",
    "VisionPrefixLMForCausalLM",
    "VisionPrefixLMForClassification",
    "VisionPrefixLMPreTrainedModel",
    "build_vision_prefix_lm",
]
