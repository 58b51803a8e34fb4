"""Task framing for generative models: turn a dataset item into (prompt, target, weight) text triples.

Defaults follow the p-adapter release (p-adapter.md §4): VQA is "question + answer" with one sequence per
distinct human answer weighted ``count / len(answers)``; SNLI-VE is "Is it correct that <hypothesis>?" followed
by ``Correct`` / ``Ambiguous`` / ``Incorrect``; captions use the prompt "a picture of" (BLIP's own prompt).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from vlpeft.tasks.vqa import basic_answer_normalizer

AnswerWeighting = Literal["release", "scores", "most_common"]
ANSWER_WEIGHTINGS: tuple[str, ...] = ("release", "scores", "most_common")

DEFAULT_VQA_PROMPT = "{question}"
DEFAULT_ENTAILMENT_PROMPT = "Is it correct that {hypothesis}?"
DEFAULT_CAPTION_PROMPT = "a picture of"
#: Label words of the release SNLI-VE framing.
DEFAULT_LABEL_WORDS: Mapping[str, str] = {"entailment": "Correct", "neutral": "Ambiguous",
                                          "contradiction": "Incorrect"}
#: Label words of generated SNLI-VE (encoder-decoder models, ``inference: generate``): each label is its own word.
GENERATED_LABEL_WORDS: Mapping[str, str] = {"entailment": "entailment", "neutral": "neutral",
                                            "contradiction": "contradiction"}


@dataclass(frozen=True)
class TextExample:
    """One training sequence: ``prompt`` (no loss), ``target`` (loss), its weight and source item index."""

    prompt: str
    target: str
    weight: float
    item_index: int


def format_prompt(template: str, **fields: Any) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError) as err:
        raise ValueError(f"prompt template {template!r} uses a field that is not available "
                         f"(available: {sorted(fields)})") from err


def vqa_targets(
    item: Mapping[str, Any], weighting: AnswerWeighting, normalizer: Callable[[str], str] = basic_answer_normalizer
) -> list[tuple[str, float]]:
    """``[(answer, weight), ...]`` for one VQA item.

    - ``"release"``: one entry per distinct normalised human answer, weight ``count / len(answers)`` (BLIP /
      p-adapter release). Items with only ``answer_scores`` (Karpathy JSON without annotations) use
      ``score / sum(scores)``, so every question again weighs 1 in total.
    - ``"scores"``: one entry per answer in ``answer_scores``, weight = the soft score.
    - ``"most_common"``: one entry, weight 1: the most frequent human answer (``multiple_choice_answer`` if
      present), else the highest-scoring answer; ties go to the alphabetically first answer.

    Raises ``ValueError`` naming the question when the item has no answers at all (e.g. a test split).
    """
    if weighting not in ANSWER_WEIGHTINGS:
        raise ValueError(f"answer weighting must be one of {ANSWER_WEIGHTINGS}, got {weighting!r}")
    answers = [normalizer(a) for a in item.get("answers") or []]
    scores: Mapping[str, float] = item.get("answer_scores") or {}
    if not answers and not any(s > 0 for s in scores.values()):
        raise ValueError(f"question {item.get('question_id')!r} has no answers to train on")
    if weighting == "release":
        if answers:
            return [(a, c / len(answers)) for a, c in sorted(Counter(answers).items())]
        total = sum(s for s in scores.values() if s > 0)
        return [(a, s / total) for a, s in sorted(scores.items()) if s > 0]
    if weighting == "scores":
        if not scores:
            raise ValueError(f"question {item.get('question_id')!r} has no answer_scores")
        return [(a, float(s)) for a, s in sorted(scores.items()) if s > 0]
    if item.get("multiple_choice_answer"):
        return [(normalizer(item["multiple_choice_answer"]), 1.0)]
    ranking = Counter(answers) if answers else Counter(scores)
    best = max(ranking.values())
    return [(min(a for a, v in ranking.items() if v == best), 1.0)]


def clean_hypothesis(hypothesis: str) -> str:
    """Strip whitespace and trailing sentence punctuation so it fits "Is it correct that ...?"."""
    return hypothesis.strip().rstrip(".!?").strip()


def vqa_examples(items: Sequence[Mapping[str, Any]], template: str, weighting: AnswerWeighting,
                 normalizer: Callable[[str], str] = basic_answer_normalizer) -> list[TextExample]:
    """VQA training sequences: the question in ``template`` and one target per answer of :func:`vqa_targets`."""
    out = []
    for i, item in enumerate(items):
        prompt = format_prompt(template, question=item["question"].strip())
        out.extend(TextExample(prompt, answer, weight, i) for answer, weight in vqa_targets(item, weighting, normalizer))
    return out


def entailment_examples(items: Sequence[Mapping[str, Any]], template: str,
                        label_words: Mapping[str, str]) -> list[TextExample]:
    """SNLI-VE training sequences: the hypothesis in ``template``, the label's word as the target."""
    out = []
    for i, item in enumerate(items):
        label = item["label"]
        if label not in label_words:
            raise ValueError(f"item {item.get('pair_id')!r}: label {label!r} has no label word "
                             f"(known: {sorted(label_words)})")
        prompt = format_prompt(template, hypothesis=clean_hypothesis(item["hypothesis"]))
        out.append(TextExample(prompt, label_words[label], 1.0, i))
    return out


def caption_examples(items: Sequence[Mapping[str, Any]], prompt: str,
                     transform: Callable[[str], str] | None = None) -> list[TextExample]:
    """Caption training sequences (``"pairs"`` view items with ``caption``): the prompt, then the caption."""
    out = []
    for i, item in enumerate(items):
        if "caption" not in item:
            raise ValueError(f"item for image {item.get('image_id')!r} has no 'caption'; use the 'pairs' view "
                             "of CaptionDataset for training")
        caption = item["caption"].strip()
        out.append(TextExample(prompt.strip(), transform(caption) if transform is not None else caption, 1.0, i))
    return out
