"""GQA accuracy: exact match of the predicted short answer with the gold ``answer``.

The official GQA evaluation script (``eval.py`` of the GQA release) counts a question as right when the predicted
string equals the gold ``answer`` string, with no normalisation at all. Gold answers are already short, lower-case
words or phrases (``"yes"``, ``"left"``, ``"t-shirt"``), but free generation writes ``"Yes"``, ``"yes."`` or
``"the left"``; so :func:`gqa_accuracy` by default applies the official *VQA* answer normalisation
(:func:`vlpeft.metrics.vqa_normalize.normalize_answer`: whitespace, punctuation, number words, articles,
contractions) to **both** sides before comparing (symmetric, so an exact gold answer still only matches itself
or a spelling variant of itself). ``normalize=False`` is the official script's raw comparison; training reports
both (``accuracy`` and ``accuracy_strict``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from vlpeft.metrics.vqa_normalize import normalize_answer

__all__ = ["ExactMatchScore", "gqa_accuracy"]


@dataclass(frozen=True)
class ExactMatchScore:
    """Exact-match accuracy in percent, overall and per group (e.g. GQA's structural type), and the counts."""

    overall: float
    per_group: dict[str, float] = field(default_factory=dict)
    num_correct: int = 0
    num_examples: int = 0


def gqa_accuracy(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, str], *,
                 normalize: bool = True, groups: Mapping[Hashable, str] | None = None) -> ExactMatchScore:
    """Exact-match accuracy of ``predictions`` (question id -> answer) against ``answers`` (id -> gold answer).

    Args:
        normalize: compare after the official VQA answer normalisation of both sides (default); ``False``: raw
            string equality, as the official GQA ``eval.py``.
        groups: optional id -> group name (e.g. ``types["structural"]``: verify, query, choose, logical, compare)
            for per-group accuracies.

    Raises:
        ValueError: no predictions, or a prediction for an id without a gold answer (naming it).
        TypeError: a prediction or answer that is not a string.
    """
    if not predictions:
        raise ValueError("no predictions to evaluate")
    missing = [k for k in predictions if k not in answers]
    if missing:
        raise ValueError(f"{len(missing)} prediction(s) have no gold answer, e.g. question {missing[0]!r}")
    norm = normalize_answer if normalize else _check_str
    right: dict[str, list[int]] = {}
    correct = 0
    for key, predicted in predictions.items():
        hit = int(norm(predicted) == norm(answers[key]))
        correct += hit
        if groups is not None and key in groups:
            right.setdefault(groups[key], []).append(hit)
    per_group = {g: 100.0 * sum(h) / len(h) for g, h in sorted(right.items())}
    return ExactMatchScore(100.0 * correct / len(predictions), per_group, correct, len(predictions))


def _check_str(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected a str answer, got {type(text).__name__}: {text!r}")
    return text
