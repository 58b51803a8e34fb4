"""NLVR2 accuracy and consistency, as the official ``nlvr2/eval/metrics.py`` (lil-lab/nlvr) computes them.

- **accuracy** (the script's "precision"): share of examples whose predicted label equals the gold label, compared
  case-insensitively (``"True"`` / ``"true"``).
- **consistency**: share of *sentences* all of whose examples are right. An identifier is
  ``split-set_id-pair_id-sentence_id`` (e.g. ``dev-850-0-0``); the script groups examples by the identifier with its
  **third field (pair_id) blanked** (``dev-850--0``), i.e. the same sentence over the image pairs of one image set.
  (Not "without its last field": the last field is the sentence id, and dropping it would merge the two different
  sentences an image pair may carry.)

Both in percent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["NLVR2Score", "nlvr2_scores", "sentence_group"]


@dataclass(frozen=True)
class NLVR2Score:
    """Accuracy and consistency in percent; ``num_examples`` and ``num_sentences`` (consistency groups)."""

    accuracy: float
    consistency: float
    num_examples: int
    num_sentences: int
    num_invalid: int = 0


def sentence_group(identifier: str) -> str:
    """The consistency group of an example: its identifier with the pair_id field blanked (official script).

    Raises:
        ValueError: ``identifier`` has fewer than four ``-``-separated fields.
    """
    parts = identifier.split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not split-set_id-pair_id-sentence_id")
    parts[2] = ""
    return "-".join(parts)


def _label(value: object, role: str, key: str) -> str:
    text = str(value).strip().lower() if isinstance(value, (str, bool)) else None
    if text not in ("true", "false"):
        raise ValueError(f"{role} label {value!r} of example {key!r} is not True or False")
    return text


def nlvr2_scores(predictions: Mapping[str, object], labels: Mapping[str, object], *,
                 invalid: str = "raise") -> NLVR2Score:
    """Accuracy and consistency of ``predictions`` (identifier -> ``"True"``/``"False"``) against ``labels``.

    Every labelled example must have a prediction (as the official script insists), and every prediction a label.
    ``invalid``: what a prediction other than True/False gets: ``"raise"`` (the official script's input is
    always a label), or ``"wrong"`` (a generated answer that is neither word, as VL-T5's NLVR2 evaluation scores
    generated text: counted wrong, and in ``num_invalid``).

    Raises:
        ValueError: missing or extra predictions (naming one), a label outside True/False (gold labels always;
            predictions with ``invalid="raise"``), or no examples.
    """
    if invalid not in ("raise", "wrong"):
        raise ValueError(f"invalid must be 'raise' or 'wrong', got {invalid!r}")
    if not labels:
        raise ValueError("no examples to evaluate")
    missing = [k for k in labels if k not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} example(s) have no prediction, e.g. {missing[0]!r}")
    extra = [k for k in predictions if k not in labels]
    if extra:
        raise ValueError(f"{len(extra)} prediction(s) have no gold label, e.g. {extra[0]!r}")
    consistent: dict[str, bool] = {}
    correct = invalid_count = 0
    for key, gold in labels.items():
        truth = _label(gold, "gold", key)
        try:
            hit = _label(predictions[key], "predicted", key) == truth
        except ValueError:
            if invalid == "raise":
                raise
            hit = False
            invalid_count += 1
        correct += hit
        group = sentence_group(key)
        consistent[group] = consistent.get(group, True) and hit
    return NLVR2Score(100.0 * correct / len(labels), 100.0 * sum(consistent.values()) / len(consistent),
                      len(labels), len(consistent), invalid_count)
