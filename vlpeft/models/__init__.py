"""vlpeft's own model classes: the routing paper's vision-prefix composite (ViT + RoBERTa/BERT/GPT-2) and its
CLIP-BART composite (VL-Adapter's setting).

They are registered with transformers' Auto classes by :func:`vlpeft.registration.register_all` (``import vlpeft``
does it), so saved checkpoints reload through the Auto classes. Tiny random models of every supported family, for
tests, examples and the training API's ``model.tiny``, are in :mod:`vlpeft.models.tiny`.
"""

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
