"""Text about a :class:`~vlpeft.data.scenes.Scene`: VQA questions, captions and entailment hypotheses.

Design rule: *no answer is predictable from the text alone*. Every item is drawn answer-first:
- yes/no questions pick "yes" or "no" with equal probability, then a question with that answer;
- counting questions pick the count uniformly among the counts some question can have in this scene;
- entailment hypotheses pick the label first (1/3 each over the dataset) and then a statement with that label;
so a question or hypothesis string carries (almost) no information about its answer. The text-only baselines of
:mod:`vlpeft.data.baselines` measure what is left.

Held-out combinations. ``forbidden`` (colour, shape) pairs are never *mentioned* (training and validation text),
so a test question about a red triangle is new in its text as well as in its image.

Two caption styles. :func:`make_captions` writes the *procedural* style ("a large red circle and a blue square"),
the captions the demo's base model is pretrained on (:mod:`vlpeft.data.procedural`) and the SNLI-VE premises.
:func:`make_inventory_captions` writes the *inventory* style of the benchmark's caption task ("2 objects: circle
of color red, square of color blue"): the same facts in another surface form (noun first, colour after "of color",
digits for counts, comma lists), so that a captioner pretrained on the procedural style has something to learn.

Words used (see :func:`vocabulary`): colour, shape and size names, numbers zero..five, relation words.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from vlpeft.data.scenes import COLOURS, SHAPES, SIZES, Scene, SceneObject

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
ENTAILMENT_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")

# question_type / answer_type strings written into the VQAv2 annotations (the question's first words, as in VQAv2).
QUESTION_KINDS: dict[str, tuple[str, str]] = {
    "colour": ("what color is the", "other"),
    "shape": ("what shape is the", "other"),
    "size": ("what size is the", "other"),
    "count": ("how many", "number"),
    "exist": ("is there a", "yes/no"),
    "relation": ("is the", "yes/no"),
}


@dataclass(frozen=True)
class Question:
    """A VQA question with its answer. ``kind`` is a key of :data:`QUESTION_KINDS`."""

    text: str
    answer: str
    kind: str

    @property
    def question_type(self) -> str:
        return QUESTION_KINDS[self.kind][0]

    @property
    def answer_type(self) -> str:
        return QUESTION_KINDS[self.kind][1]


@dataclass(frozen=True)
class Hypothesis:
    """An entailment hypothesis (``text``) with its gold ``label`` (one of :data:`ENTAILMENT_LABELS`)."""

    text: str
    label: str
    kind: str


def answer_alternatives(answer: str) -> list[str]:
    """Other answers of the same kind (used to simulate annotator disagreement)."""
    for group in (list(COLOURS), list(SHAPES), list(SIZES), ["yes", "no"], [str(i) for i in range(6)]):
        if answer in group:
            return [a for a in group if a != answer]
    raise ValueError(f"answer {answer!r} is not a colour, shape, size, yes/no or count 0..5")


def vocabulary() -> list[str]:
    """Every word the generator can write (lower case), for building a word-level tokenizer offline."""
    words = {
        *COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *SIZES, *NUMBER_WORDS, *(str(i) for i in range(6)),
        "yes", "no", "what", "color", "shape", "size", "is", "the", "a", "how", "many", "are", "there", "object",
        "objects", "left", "right", "of", "above", "below", "top", "bottom", "middle", "center", "in", "on", "and",
        "shapes", "single", "to", "gray", "background", "picture", "with", "next", "it", "correct", "that",
        "entailment", "neutral", "contradiction", "does", "image", "describe", "at",
    }
    return sorted(words)


# ----------------------------------------------------------------------------------------------- references
def _phrase(obj: SceneObject, attributes: Sequence[str]) -> str:
    words = [getattr(obj, a) for a in ("size", "colour") if a in attributes]
    noun = obj.shape if "shape" in attributes else "object"
    return " ".join([*words, noun])


_REFERENCE_ORDER: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour",),
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour"),
    ("size", "colour", "shape"),
)


def refer(obj: SceneObject, scene: Scene, exclude: str | None = None) -> str | None:
    """The shortest description that picks out ``obj`` alone in ``scene`` without using attribute ``exclude``
    (e.g. "circle", "red object", "large red circle"); ``None`` when no such description exists."""
    for attributes in _REFERENCE_ORDER:
        if exclude in attributes:
            continue
        matches = [o for o in scene.objects if all(getattr(o, a) == getattr(obj, a) for a in attributes)]
        if matches == [obj]:
            return _phrase(obj, attributes)
    return None


def relation(a: SceneObject, b: SceneObject, image_size: int) -> str | None:
    """The clearest spatial relation of ``a`` to ``b`` ("left of", "above", ...), or ``None`` when the centres
    are too close on both axes to say (less than 12 % of the image side apart)."""
    dx, dy = b.x - a.x, b.y - a.y
    margin = 0.12 * image_size
    if max(abs(dx), abs(dy)) < margin:
        return None
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _article(phrase: str) -> str:
    return f"a {phrase}"


def _mentions(colour: str, shape: str, forbidden: Collection[tuple[str, str]]) -> bool:
    return (colour, shape) in forbidden


# ------------------------------------------------------------------------------------------------- questions
def make_questions(
    scene: Scene, rng: np.random.Generator, count: int, forbidden: Collection[tuple[str, str]] = ()
) -> list[Question]:
    """Up to ``count`` distinct questions about ``scene`` (kinds drawn uniformly among those possible)."""
    makers = {
        "colour": _colour_question,
        "shape": _shape_question,
        "size": _size_question,
        "count": _count_question,
        "exist": _exist_question,
        "relation": _relation_question,
    }
    questions: list[Question] = []
    seen: set[str] = set()
    for _ in range(count * 6):
        if len(questions) == count:
            break
        kind = list(makers)[int(rng.integers(len(makers)))]
        question = makers[kind](scene, rng, forbidden)
        if question is None or question.text in seen:
            continue
        seen.add(question.text)
        questions.append(question)
    return questions


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _attribute_question(scene: Scene, rng: np.random.Generator, attribute: str, template: str, kind: str):
    candidates = [(o, refer(o, scene, exclude=attribute)) for o in scene.objects]
    candidates = [(o, r) for o, r in candidates if r is not None]
    if not candidates:
        return None
    obj, reference = _pick(rng, candidates)
    return Question(template.format(ref=reference), getattr(obj, attribute), kind)


def _colour_question(scene: Scene, rng: np.random.Generator, forbidden) -> Question | None:
    return _attribute_question(scene, rng, "colour", "What color is the {ref}?", "colour")


def _shape_question(scene: Scene, rng: np.random.Generator, forbidden) -> Question | None:
    return _attribute_question(scene, rng, "shape", "What shape is the {ref}?", "shape")


def _size_question(scene: Scene, rng: np.random.Generator, forbidden) -> Question | None:
    return _attribute_question(scene, rng, "size", "What size is the {ref}?", "size")


def _count_question(scene: Scene, rng: np.random.Generator, forbidden) -> Question | None:
    by_count: dict[int, list[str]] = {}
    descriptions: list[tuple[str, int]] = []
    for colour in COLOURS:
        descriptions.append((f"{colour} objects", sum(o.colour == colour for o in scene.objects)))
        for shape in SHAPES:
            if not _mentions(colour, shape, forbidden):
                n = sum(o.combination == (colour, shape) for o in scene.objects)
                descriptions.append((f"{colour} {shape}s", n))
    for shape in SHAPES:
        descriptions.append((f"{shape}s", sum(o.shape == shape for o in scene.objects)))
    for size in SIZES:
        descriptions.append((f"{size} objects", sum(o.size == size for o in scene.objects)))
    for text, n in descriptions:
        by_count.setdefault(n, []).append(text)
    target = _pick(rng, sorted(by_count))
    return Question(f"How many {_pick(rng, by_count[target])} are there?", str(target), "count")


def _exist_question(scene: Scene, rng: np.random.Generator, forbidden) -> Question | None:
    present = sorted(scene.combinations())
    absent = [
        (c, s) for c in COLOURS for s in SHAPES if (c, s) not in scene.combinations() and (c, s) not in forbidden
    ]
    answer = "yes" if rng.random() < 0.5 else "no"
    pool = present if answer == "yes" else absent
    if not pool:
        return None
    colour, shape = _pick(rng, pool)
    return Question(f"Is there a {colour} {shape}?", answer, "exist")


def _relation_pairs(scene: Scene) -> list[tuple[str, str, str]]:
    pairs = []
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            rel = relation(a, b, scene.size)
            ref_a, ref_b = refer(a, scene), refer(b, scene)
            if rel is not None and ref_a is not None and ref_b is not None:
                pairs.append((ref_a, rel, ref_b))
    return pairs


def _relation_question(scene: Scene, rng: np.random.Generator, forbidden) -> Question | None:
    pairs = _relation_pairs(scene)
    if not pairs:
        return None
    ref_a, rel, ref_b = _pick(rng, pairs)
    answer = "yes" if rng.random() < 0.5 else "no"
    asked = rel if answer == "yes" else _OPPOSITE[rel]
    return Question(f"Is the {ref_a} {asked} the {ref_b}?", answer, "relation")


# -------------------------------------------------------------------------------------------------- captions
def _region(obj: SceneObject, size: int) -> str:
    col = ("left", "middle", "right")[min(2, int(3 * obj.x / size))]
    row = ("top", "middle", "bottom")[min(2, int(3 * obj.y / size))]
    if row == "middle" and col == "middle":
        return "center"
    if row == "middle":
        return col
    if col == "middle":
        return row
    return f"{row} {col}"


def _where(region: str) -> str:
    """Where a region is, as a phrase: on the left, at the top, at the bottom right, in the center."""
    if region == "center":
        return "in the center"
    if region in ("left", "right"):
        return f"on the {region}"
    return f"at the {region}"


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _grouped(objects: Sequence[SceneObject]) -> list[str]:
    """Objects grouped by (colour, shape), most frequent first: ["two red circles", "a blue square"]."""
    counts: dict[tuple[str, str], int] = {}
    for o in objects:
        counts[o.combination] = counts.get(o.combination, 0) + 1
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [f"{NUMBER_WORDS[n]} {c} {s}s" if n > 1 else _article(f"{c} {s}") for (c, s), n in ordered]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def make_captions(scene: Scene, rng: np.random.Generator, count: int = 5) -> list[str]:
    """``count`` different captions of ``scene`` (distinct templates, in random order; needs >= 1 object)."""
    if not scene.objects:
        raise ValueError("make_captions: the scene has no visible object")
    ordered = sorted(scene.objects, key=lambda o: o.x)
    full = [_article(f"{o.size} {o.colour} {o.shape}") for o in ordered]
    plain = [_article(f"{o.colour} {o.shape}") for o in ordered]
    n = len(ordered)
    templates = [
        _join(full),
        (f"{NUMBER_WORDS[n]} shapes: " if n > 1 else "a single shape: ") + _join(plain),
        _join([f"{p} {_where(_region(o, scene.size))}" for p, o in zip(plain, ordered)]),
        _join(_grouped(ordered)),
        "a picture with " + _join([_article(f"{o.colour} {o.shape}") for o in sorted(ordered, key=lambda o: o.y)]),
    ]
    pairs = [(a, b, relation(a, b, scene.size)) for a in ordered for b in ordered if a is not b]
    pairs = [(a, b, r) for a, b, r in pairs if r is not None]
    if pairs:
        a, b, rel = _pick(rng, pairs)
        rest = [_article(f"{o.colour} {o.shape}") for o in ordered if o is not a and o is not b]
        text = f"a {a.colour} {a.shape} {rel} a {b.colour} {b.shape}"
        templates.append(text + (" with " + _join(rest) if rest else ""))
    else:
        o = ordered[0]
        templates.append(f"a {o.size} {o.colour} {o.shape} {_where(_region(o, scene.size))}")
    order = rng.permutation(len(templates))
    captions = [_sentence(templates[i]) for i in order]
    while len(captions) < count:  # more captions than templates: repeat with the other order of objects
        captions.append(captions[len(captions) % len(templates)])
    return captions[:count]


#: Caption styles: ``procedural`` (:func:`make_captions`, the base's pretraining style) and ``inventory``
#: (:func:`make_inventory_captions`, the benchmark's caption task).
CAPTION_STYLES: tuple[str, ...] = ("inventory", "procedural")
#: The phrase that marks the inventory style: every object is written "<shape> of color <colour>".
INVENTORY_MARKER = "of color"


def _item(obj: SceneObject, *, size: bool = False) -> str:
    return f"{obj.size + ' ' if size else ''}{obj.shape} {INVENTORY_MARKER} {obj.colour}"


def _listed(items: Sequence[str]) -> str:
    return ", ".join(items)


def _count_header(n: int) -> str:
    return f"{n} {'object' if n == 1 else 'objects'}: "


def make_inventory_captions(scene: Scene, rng: np.random.Generator, count: int = 5) -> list[str]:
    """``count`` different captions of ``scene`` in the inventory style (distinct templates, random order).

    Every object is named "<shape> of color <colour>" (never "<colour> <shape>", the pretraining order), counts are
    digits, lists are comma-separated; the templates differ in object order (left to right, top to bottom), in a
    count header, sizes, positions and one spatial relation. Example for a red circle left of a blue square::

        2 objects: circle of color red, square of color blue
        image with circle of color red on the left, square of color blue on the right
        ...
    """
    if not scene.objects:
        raise ValueError("make_inventory_captions: the scene has no visible object")
    ordered = sorted(scene.objects, key=lambda o: o.x)
    n = len(ordered)
    templates = [
        _count_header(n) + _listed([_item(o) for o in ordered]),
        "image with " + _listed([f"{_item(o)} {_where(_region(o, scene.size))}" for o in ordered]),
        _listed([_item(o, size=True) for o in ordered]),
        "top to bottom: " + _listed([_item(o) for o in sorted(ordered, key=lambda o: o.y)]),
    ]
    pairs = [(a, b, relation(a, b, scene.size)) for a in ordered for b in ordered if a is not b]
    pairs = [(a, b, r) for a, b, r in pairs if r is not None]
    if pairs:
        a, b, rel = _pick(rng, pairs)
        rest = [_item(o) for o in ordered if o is not a and o is not b]
        templates.append(f"{_item(a)} {rel} {_item(b)}" + (", with " + _listed(rest) if rest else ""))
    else:
        templates.append(f"{_count_header(n)}{_item(ordered[0], size=True)} {_where(_region(ordered[0], scene.size))}")
    order = rng.permutation(len(templates))
    captions = [_sentence(templates[i]) for i in order]
    while len(captions) < count:  # more captions than templates: repeat
        captions.append(captions[len(captions) % len(templates)])
    return captions[:count]


def caption_maker(style: str):
    """The caption function of ``style`` (a key of :data:`CAPTION_STYLES`)."""
    if style == "inventory":
        return make_inventory_captions
    if style == "procedural":
        return make_captions
    raise ValueError(f"caption style must be one of {CAPTION_STYLES}, got {style!r}")


# ------------------------------------------------------------------------------------------------ entailment
def make_hypotheses(
    scene: Scene, rng: np.random.Generator, count: int, forbidden: Collection[tuple[str, str]] = ()
) -> list[Hypothesis]:
    """Up to ``count`` distinct hypotheses about ``scene``, labels drawn first.

    Labels: *entailment* (true of the visible scene), *contradiction* (false, and nothing can be hidden: the
    scene has no occluder), *neutral* (about an object that is not visible while the occluder could hide it).
    Scenes with an occluder get labels entailment / neutral with probability 1/3 / 2/3, scenes without one
    entailment / contradiction with 1/3 / 2/3; with half the scenes occluded, each label is 1/3 of the data.
    """
    hypotheses: list[Hypothesis] = []
    seen: set[str] = set()
    for _ in range(count * 6):
        if len(hypotheses) == count:
            break
        other = "neutral" if scene.occluder is not None else "contradiction"
        label = "entailment" if rng.random() < 1 / 3 else other
        kinds = ["exist", "size", "relation"]
        kind = kinds[int(rng.integers(len(kinds)))]
        hypothesis = _HYPOTHESIS_MAKERS[kind](scene, rng, label, forbidden)
        if hypothesis is None or hypothesis.text in seen:
            continue
        seen.add(hypothesis.text)
        hypotheses.append(hypothesis)
    return hypotheses


def _unique_combination_objects(scene: Scene) -> list[SceneObject]:
    counts: dict[tuple[str, str], int] = {}
    for o in scene.objects:
        counts[o.combination] = counts.get(o.combination, 0) + 1
    return [o for o in scene.objects if counts[o.combination] == 1]


def _absent(scene: Scene, forbidden: Collection[tuple[str, str]]) -> list[tuple[str, str]]:
    present = scene.combinations()
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present and (c, s) not in forbidden]


def _exist_hypothesis(scene: Scene, rng, label: str, forbidden) -> Hypothesis | None:
    pool = sorted(scene.combinations()) if label == "entailment" else _absent(scene, forbidden)
    if not pool:
        return None
    colour, shape = _pick(rng, pool)
    return Hypothesis(_sentence(f"there is a {colour} {shape}"), label, "exist")


def _size_hypothesis(scene: Scene, rng, label: str, forbidden) -> Hypothesis | None:
    if label == "neutral":
        pool = _absent(scene, forbidden)
        if not pool:
            return None
        colour, shape = _pick(rng, pool)
        size = _pick(rng, SIZES)
    else:
        objects = _unique_combination_objects(scene)
        if not objects:
            return None
        obj = _pick(rng, objects)
        colour, shape = obj.combination
        size = obj.size if label == "entailment" else next(s for s in SIZES if s != obj.size)
    return Hypothesis(_sentence(f"the {colour} {shape} is {size}"), label, "size")


def _relation_hypothesis(scene: Scene, rng, label: str, forbidden) -> Hypothesis | None:
    objects = _unique_combination_objects(scene)
    if label == "neutral":
        absent = _absent(scene, forbidden)
        if not objects or not absent:
            return None
        obj = _pick(rng, objects)
        colour, shape = _pick(rng, absent)
        rel = _pick(rng, RELATIONS)
        a, b = f"{obj.colour} {obj.shape}", f"{colour} {shape}"
        if rng.random() < 0.5:
            a, b = b, a
        return Hypothesis(_sentence(f"the {a} is {rel} the {b}"), label, "relation")
    pairs = [(a, b, relation(a, b, scene.size)) for a in objects for b in objects if a is not b]
    pairs = [(a, b, r) for a, b, r in pairs if r is not None]
    if not pairs:
        return None
    a, b, rel = _pick(rng, pairs)
    said = rel if label == "entailment" else _OPPOSITE[rel]
    return Hypothesis(_sentence(f"the {a.colour} {a.shape} is {said} the {b.colour} {b.shape}"), label, "relation")


_HYPOTHESIS_MAKERS = {"exist": _exist_hypothesis, "size": _size_hypothesis, "relation": _relation_hypothesis}
