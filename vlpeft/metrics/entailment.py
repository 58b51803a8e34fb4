"""Three-way visual entailment accuracy (SNLI-VE): overall and per gold class.

Labels are the SNLI-VE strings ``entailment``, ``neutral`` and ``contradiction``. Other spellings (for example
the label words the p-adapter code generates, :data:`PADAPTER_LABEL_WORDS`) are accepted only through an
explicit ``label_map``; anything else raises, so a typo never counts silently as a wrong answer. Generated text
(an encoder-decoder model writing the label word) is scored with ``invalid="wrong"``: a prediction that is no label
counts wrong and is counted in ``num_invalid``, as :func:`vlpeft.metrics.nlvr2.nlvr2_scores` scores generated
True/False.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ENTAILMENT_LABELS", "PADAPTER_LABEL_WORDS", "EntailmentScore", "entailment_accuracy"]

ENTAILMENT_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")

PADAPTER_LABEL_WORDS: dict[str, str] = {"Correct": "entailment", "Ambiguous": "neutral", "Incorrect": "contradiction"}
"""Label words of the p-adapter SNLI-VE prompt ("Is it correct that <hypothesis> ? <word>"), as a ``label_map``."""


@dataclass(frozen=True)
class EntailmentScore:
    """Result of :func:`entailment_accuracy`.

    Attributes:
        overall: percent of examples whose predicted label equals the gold label (not rounded).
        per_class: gold class -> percent of that class's examples predicted correctly (per-class recall);
            ``None`` for a class with no gold examples.
        support: gold class -> number of gold examples.
        num_examples: number of evaluated examples.
        num_invalid: predictions that are no label (counted wrong; only with ``invalid="wrong"``).
    """

    overall: float
    per_class: dict[str, float | None]
    support: dict[str, int]
    num_examples: int
    num_invalid: int = 0


def _canonical(label: object, label_map: Mapping[str, str] | None, role: str, key: object) -> str:
    mapped = label_map.get(label, label) if (label_map is not None and isinstance(label, Hashable)) else label
    if mapped not in ENTAILMENT_LABELS:
        extra = f" or a key of label_map {sorted(label_map)}" if label_map else ""
        raise ValueError(
            f"unknown {role} label {label!r} for example {key!r}; expected one of {list(ENTAILMENT_LABELS)}{extra}"
        )
    return mapped  # type: ignore[return-value]


def _aligned_pairs(predictions, labels) -> list[tuple[object, object, object]]:
    if isinstance(predictions, Mapping) != isinstance(labels, Mapping):
        raise TypeError("predictions and labels must both be mappings (by example id) or both be sequences")
    if isinstance(predictions, Mapping):
        missing = [k for k in labels if k not in predictions]
        extra = [k for k in predictions if k not in labels]
        if missing or extra:
            raise ValueError(
                f"predictions and labels must have the same ids; without prediction: {missing[:5]}, "
                f"without label: {extra[:5]}"
            )
        return [(k, predictions[k], labels[k]) for k in labels]
    if isinstance(predictions, str) or isinstance(labels, str):
        raise TypeError("predictions and labels must be sequences of labels, not single strings")
    predictions, labels = list(predictions), list(labels)
    if len(predictions) != len(labels):
        raise ValueError(f"got {len(predictions)} predictions but {len(labels)} labels")
    return [(i, p, g) for i, (p, g) in enumerate(zip(predictions, labels))]


def entailment_accuracy(
    predictions: Mapping[Hashable, str] | Sequence[str],
    labels: Mapping[Hashable, str] | Sequence[str],
    *,
    label_map: Mapping[str, str] | None = None,
    invalid: str = "raise",
) -> EntailmentScore:
    """Accuracy of entailment predictions, overall and per gold class, in percent.

    Args:
        predictions: predicted labels, either aligned with ``labels`` (sequences) or keyed by example id.
        labels: gold labels in the same form.
        label_map: optional mapping from other spellings to the canonical labels, applied to both sides
            (e.g. :data:`PADAPTER_LABEL_WORDS`). Canonical labels pass through unchanged.
        invalid: what a predicted label outside the labels gets: ``"raise"`` (the default: a typo is an error), or
            ``"wrong"`` (generated text: counted wrong for its gold class, and in ``num_invalid``). Gold labels
            outside the labels always raise.

    Raises:
        ValueError: on an unknown label (naming it and the expected ones; predictions only with
            ``invalid="raise"``), mismatched ids/lengths, no examples, or an ``invalid`` other than raise/wrong.
        TypeError: when one side is a mapping and the other is not.
    """
    if invalid not in ("raise", "wrong"):
        raise ValueError(f"invalid must be 'raise' or 'wrong', got {invalid!r}")
    if label_map is not None:
        bad_targets = {v for v in label_map.values() if v not in ENTAILMENT_LABELS}
        if bad_targets:
            raise ValueError(f"label_map maps to unknown labels {sorted(bad_targets)}; expected {ENTAILMENT_LABELS}")
    pairs = _aligned_pairs(predictions, labels)
    if not pairs:
        raise ValueError("no examples to evaluate")

    correct = dict.fromkeys(ENTAILMENT_LABELS, 0)
    support = dict.fromkeys(ENTAILMENT_LABELS, 0)
    num_invalid = 0
    for key, predicted, gold in pairs:
        gold_label = _canonical(gold, label_map, "gold", key)
        try:
            predicted_label = _canonical(predicted, label_map, "predicted", key)
        except ValueError:
            if invalid == "raise":
                raise
            predicted_label = None
            num_invalid += 1
        support[gold_label] += 1
        correct[gold_label] += int(predicted_label == gold_label)

    total_correct = sum(correct.values())
    return EntailmentScore(
        overall=100.0 * total_correct / len(pairs),
        per_class={c: (100.0 * correct[c] / support[c] if support[c] else None) for c in ENTAILMENT_LABELS},
        support=support,
        num_examples=len(pairs),
        num_invalid=num_invalid,
    )
