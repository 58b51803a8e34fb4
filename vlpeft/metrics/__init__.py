"""Evaluation metrics: official VQA accuracy, entailment accuracy, COCO caption metrics.

Pure Python (+ numpy through pycocoevalcap); nothing here imports torch. pycocoevalcap is imported lazily, only
when caption metrics are computed (optional extra: ``pip install vlpeft[metrics]``).
"""

from vlpeft.metrics.captioning import (
    CAPTION_METRICS,
    CaptionScores,
    SpiceUnavailableError,
    UnofficialCaptionMetricsWarning,
    caption_scores,
    java_available,
    python_caption_tokenize,
    spice_models_present,
)
from vlpeft.metrics.entailment import (
    ENTAILMENT_LABELS,
    PADAPTER_LABEL_WORDS,
    EntailmentScore,
    entailment_accuracy,
)
from vlpeft.metrics.vqa_accuracy import (
    VQAScore,
    vqa_accuracy,
    vqa_label_accuracy,
    vqa_label_score,
    vqa_soft_score,
)
from vlpeft.metrics.vqa_normalize import normalize_answer, process_digit_article, process_punctuation

__all__ = [
    "CAPTION_METRICS",
    "ENTAILMENT_LABELS",
    "PADAPTER_LABEL_WORDS",
    "CaptionScores",
    "EntailmentScore",
    "SpiceUnavailableError",
    "UnofficialCaptionMetricsWarning",
    "VQAScore",
    "caption_scores",
    "entailment_accuracy",
    "java_available",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "python_caption_tokenize",
    "spice_models_present",
    "vqa_accuracy",
    "vqa_label_accuracy",
    "vqa_label_score",
    "vqa_soft_score",
]
