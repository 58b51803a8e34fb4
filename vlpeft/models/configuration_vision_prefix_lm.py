"""Configuration of the vision-prefix composite model (any HF vision encoder + any HF text model)."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

__all__ = [
    "VisionPrefixLMConfig",
    "TASKS",
    "VISUAL_FEATURES",
    "PREFIX_PROJECTORS",
    "HEAD_POOLINGS",
]

TASKS = ("classification", "causal_lm")
VISUAL_FEATURES = ("pooler", "cls", "mean", "all")
PREFIX_PROJECTORS = ("identity", "linear")
HEAD_POOLINGS = ("first_text", "mean", "first", "random_frozen_pooler")

_PROBLEM_TYPE_ALIASES = {
    "multi_label": "multi_label_classification",
    "single_label": "single_label_classification",
    "multi_label_classification": "multi_label_classification",
    "single_label_classification": "single_label_classification",
}


def _infer_task(text_config: PreTrainedConfig) -> str:
    """``causal_lm`` for decoder-only text models (GPT-2, Llama, OPT, ...), ``classification`` for encoders."""
    model_type = text_config.model_type
    if getattr(text_config, "is_decoder", False):
        return "causal_lm"
    if (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ):
        return "causal_lm"
    return "classification"


class VisionPrefixLMConfig(PreTrainedConfig):
    r"""Configuration of :class:`~vlpeft.models.VisionPrefixLMForClassification` and
    :class:`~vlpeft.models.VisionPrefixLMForCausalLM`: the routing paper's ViT + RoBERTa / ViT + GPT-2 models.

    The image is encoded by the vision model; ``visual_features`` selects (batch, m, d_vision) features, which
    the ``prefix_projector`` maps to (batch, m, d_text). These features are prepended to the text embeddings when
    ``use_visual_prefix`` is on; the projector runs on every forward either way, so vlpeft's routing reads its
    output as the visual features x_R.

    Args:
        vision_config: config of an HF vision encoder (``vit``, ``clip_vision_model``, ``siglip_vision_model``,
            ...); dict or config.
        text_config: config of an HF text model (``roberta``/``bert`` encoders for classification, ``gpt2`` and
            other decoder-only LMs for ``causal_lm``); dict or config.
        task: ``"classification"`` (encoder + classifier head), ``"causal_lm"`` (decoder LM), or ``None`` to infer
            from the text model (decoder-only LMs give ``causal_lm``).
        visual_features: which vision outputs form the m visual tokens: ``"pooler"`` (``pooler_output``, m = 1,
            the paper's setting), ``"cls"`` (the first token of ``last_hidden_state``, m = 1), ``"mean"`` (mean of
            ``last_hidden_state``, m = 1), or ``"all"`` (all tokens of ``last_hidden_state``).
        use_visual_prefix: prepend the projected visual tokens to the text (False: the image enters only
            through routing, the paper's ``--no_vis_prefix`` ablation).
        prefix_tokens: constructor shortcut, not stored: ``"pooler"``/``"cls"``/``"mean"``/``"all"`` set
            ``visual_features`` and turn the prefix on; ``"none"`` or ``0`` turns the prefix off.
        prefix_projector: ``"identity"`` (the paper; vision and text widths must match) or ``"linear"``
            (a trainable ``nn.Linear(d_vision, d_text)``).
        head_pooling: classification only; which hidden state feeds the head: ``"first_text"`` (the first text
            token, ``<s>``/``[CLS]``, right after the prefix), ``"mean"`` (masked mean over text tokens),
            ``"first"`` (position 0, the visual token when there is a prefix), or ``"random_frozen_pooler"``
            (quirk Q5: the text model's own pooler, dense + tanh at position 0, kept frozen).
        classifier_hidden_size: width of the head's hidden layer (default ``2 * d_text``).
        classifier_dropout: dropout before each linear layer of the head (default 0.0, as released).
        skip_first_token_loss: causal LM only; quirk Q10: do not train the prediction of the first text token
            from the last prefix position.
        num_labels, problem_type: classifier width and loss: ``"multi_label_classification"`` (alias
            ``"multi_label"``, BCE-with-logits on soft scores, the VQA default) or
            ``"single_label_classification"`` (alias ``"single_label"``, cross-entropy on class ids).
    """

    model_type: ClassVar[str] = "vlpeft_vision_prefix_lm"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="roberta"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    task: str | None = None
    visual_features: str = "pooler"
    use_visual_prefix: bool = True
    prefix_projector: str = "identity"
    head_pooling: str = "first_text"
    classifier_hidden_size: int | None = None
    classifier_dropout: float = 0.0
    skip_first_token_loss: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        prefix_tokens = kwargs.pop("prefix_tokens", None)
        if isinstance(self.problem_type, str):
            if self.problem_type not in _PROBLEM_TYPE_ALIASES and self.problem_type != "regression":
                raise ValueError(
                    f"problem_type={self.problem_type!r} is not supported; expected one of "
                    f"{sorted(_PROBLEM_TYPE_ALIASES)}"
                )
            self.problem_type = _PROBLEM_TYPE_ALIASES.get(self.problem_type, self.problem_type)
        super().__post_init__(**kwargs)

        if prefix_tokens is not None:
            if prefix_tokens in (0, "none", "None"):
                self.use_visual_prefix = False
            elif prefix_tokens in VISUAL_FEATURES:
                self.visual_features = prefix_tokens
                self.use_visual_prefix = True
            else:
                raise ValueError(
                    f"prefix_tokens={prefix_tokens!r} is not supported; expected one of {VISUAL_FEATURES} or "
                    "'none'/0"
                )
        if self.task is None:
            self.task = _infer_task(self.text_config)
        self._validate()
        if self.task == "classification" and self.problem_type is None:
            self.problem_type = "multi_label_classification"

    def _validate(self) -> None:
        checks = (
            ("task", self.task, TASKS),
            ("visual_features", self.visual_features, VISUAL_FEATURES),
            ("prefix_projector", self.prefix_projector, PREFIX_PROJECTORS),
            ("head_pooling", self.head_pooling, HEAD_POOLINGS),
        )
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(
                    f"VisionPrefixLMConfig: {name}={value!r} is not supported; expected one of {allowed}"
                )
        if self.problem_type == "regression":
            raise ValueError(
                "VisionPrefixLMConfig: problem_type='regression' is not supported; expected "
                "'multi_label_classification' or 'single_label_classification'"
            )
        if self.classifier_hidden_size is not None and self.classifier_hidden_size < 1:
            raise ValueError(f"classifier_hidden_size must be >= 1, got {self.classifier_hidden_size}")
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"classifier_dropout must be in [0, 1), got {self.classifier_dropout}")
        if self.prefix_projector == "identity" and self.vision_hidden_size != self.text_hidden_size:
            raise ValueError(
                f"prefix_projector='identity' needs equal widths, but the vision model is {self.vision_hidden_size} "
                f"wide and the text model {self.text_hidden_size} (as in the paper, pair ViT-B/16 with "
                "RoBERTa-base/GPT-2 and ViT-L/16 with RoBERTa-large/GPT-2-medium); use prefix_projector='linear' "
                "for other pairs"
            )

    @property
    def vision_hidden_size(self) -> int:
        return int(self.vision_config.hidden_size)

    @property
    def text_hidden_size(self) -> int:
        return int(self.text_config.hidden_size)
