"""The routing paper's composite models: an HF vision encoder whose features enter an HF text model as a prefix.

Two heads share one base (:class:`VisionPrefixLMPreTrainedModel`):

- :class:`VisionPrefixLMForClassification`: an encoder LM (BERT/RoBERTa) with a two-layer MLP head, for VQA
  (soft-score BCE over an answer vocabulary) or entailment (cross-entropy);
- :class:`VisionPrefixLMForCausalLM`: a decoder LM (GPT-2 family) that captions/answers, with ``generate()``.

Module layout (``named_modules()``): ``vision_model`` (the HF vision model), ``prefix_projector``
(``nn.Identity`` or ``nn.Linear``), ``text_model`` (``RobertaModel``/``BertModel`` for classification, a
``*ForCausalLM``/``GPT2LMHeadModel`` for the decoder), and ``classifier.{fc1,layer_norm,fc2}`` for classification.

Every forward runs ``prefix_projector`` on the selected visual features, so a forward hook on it sees the
(batch, m, d_text) visual features x_R even when they are not used as a prefix (``use_visual_prefix=False``).

The code lives in one module per idea; this module gathers the public names:

- :mod:`~vlpeft.models.modeling_vision_prefix_base`: the shared base, :func:`build_vision_prefix_lm` and the
  choice of the task class;
- :mod:`~vlpeft.models.modeling_vision_prefix_classification`: the classification head, model and output;
- :mod:`~vlpeft.models.modeling_vision_prefix_causal_lm`: the decoder model and its output;
- :mod:`~vlpeft.models.vision_prefix_parts`: building and loading the vision and text parts.
"""

from vlpeft.models.modeling_vision_prefix_base import VisionPrefixLMPreTrainedModel, build_vision_prefix_lm
from vlpeft.models.modeling_vision_prefix_causal_lm import (
    VisionPrefixCausalLMOutput,
    VisionPrefixLMForCausalLM,
)
from vlpeft.models.modeling_vision_prefix_classification import (
    VisionPrefixClassifierHead,
    VisionPrefixClassifierOutput,
    VisionPrefixLMForClassification,
)

__all__ = [
    "VisionPrefixLMPreTrainedModel",
    "VisionPrefixLMForClassification",
    "VisionPrefixLMForCausalLM",
    "VisionPrefixClassifierHead",
    "VisionPrefixClassifierOutput",
    "VisionPrefixCausalLMOutput",
    "build_vision_prefix_lm",
]
