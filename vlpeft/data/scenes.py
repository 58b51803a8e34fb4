"""Procedural scenes: coloured shapes on a plain background, drawn with PIL.

A :class:`Scene` holds a few :class:`SceneObject` s (shape, colour, size, centre) and, for entailment scenes, an
optional *occluder*: a hatched grey box that may hide objects, so that some statements about the image can be
neither confirmed nor refuted (the "neutral" class of visual entailment).

Compositional split. Some (colour, shape) pairs are *held out* (:func:`heldout_combinations`): training and
validation scenes never contain them, test scenes do (half of the test scenes are made to contain at least one).
Every colour and every shape still occurs in training, only the pairing is new.

Everything is deterministic: :func:`sample_scene` draws from the ``numpy.random.Generator`` it is given, and the
generator of one image is seeded by ``(seed, split, index)`` (:func:`scene_rng`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 220),
    "yellow": (235, 200, 30),
    "purple": (145, 55, 185),
}
"""Colour names and their RGB fill (well apart, so JPEG compression does not confuse them)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Random-stream names: the benchmark splits plus "pretrain" (the procedural pretraining corpus of the demo base).
STREAMS: tuple[str, ...] = (*SPLITS, "pretrain")

# Radius of the bounding circle of an object, as a fraction of the image side.
_RADIUS_FRACTION = {"small": 0.085, "large": 0.15}
_BACKGROUND = (228, 228, 224)
_OCCLUDER_FILL = (120, 120, 120)
_OCCLUDER_HATCH = (95, 95, 95)


@dataclass(frozen=True)
class SceneObject:
    """One visible object. ``x``, ``y`` are the centre in pixels (y grows downwards); ``radius`` in pixels."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float

    @property
    def combination(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """A drawable scene.

    Attributes:
        size: image side in pixels.
        objects: the visible objects (never overlapping, never under the occluder).
        occluder: ``(x0, y0, x1, y1)`` of the hatched box that may hide objects, or ``None``.
        background: RGB background colour (slightly jittered per image).
    """

    size: int
    objects: tuple[SceneObject, ...]
    occluder: tuple[int, int, int, int] | None
    background: tuple[int, int, int]

    def combinations(self) -> set[tuple[str, str]]:
        return {o.combination for o in self.objects}


def all_combinations() -> list[tuple[str, str]]:
    """Every (colour, shape) pair, colours in :data:`COLOURS` order, then shapes."""
    return [(c, s) for c in COLOURS for s in SHAPES]


def heldout_combinations(count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` (colour, shape) pairs kept out of training, chosen from ``seed``.

    No two held-out pairs share a colour or a shape, so every colour and shape still appears in training.
    Raises ``ValueError`` when ``count`` exceeds ``min(#colours, #shapes)`` or is negative.
    """
    limit = min(len(COLOURS), len(SHAPES))
    if not 0 <= count <= limit:
        raise ValueError(f"heldout combination count must be in [0, {limit}], got {count}")
    rng = np.random.default_rng([seed, 7919])
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:count]]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:count]]
    return sorted(zip(colours, shapes))


def scene_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The random generator of image ``index`` of ``split`` (one of :data:`STREAMS`; ``stream`` separates
    independent uses of one image)."""
    if split not in STREAMS:
        raise ValueError(f"split must be one of {STREAMS}, got {split!r}")
    return np.random.default_rng([seed, STREAMS.index(split), index, stream])


def sample_scene(
    rng: np.random.Generator,
    *,
    image_size: int,
    min_objects: int,
    max_objects: int,
    allowed: Sequence[tuple[str, str]],
    required: Sequence[tuple[str, str]] = (),
    occluder: bool = False,
) -> Scene:
    """Draw a scene with ``min_objects``..``max_objects`` non-overlapping objects.

    Args:
        rng: the random generator (consumed).
        image_size: side in pixels (>= 32).
        min_objects, max_objects: bounds on the number of visible objects (1 <= min <= max <= 5).
        allowed: the (colour, shape) pairs objects may have.
        required: if not empty, one object gets a pair drawn from these (they must be in ``allowed``).
        occluder: add a hatched box covering about a sixth of the image; objects are kept clear of it.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    if not 1 <= min_objects <= max_objects <= 5:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 5, got {min_objects}, {max_objects}")
    if not allowed:
        raise ValueError("sample_scene: no allowed (colour, shape) combinations")
    missing = [c for c in required if c not in allowed]
    if missing:
        raise ValueError(f"required combinations {missing} are not among the allowed ones")
    box = _sample_occluder(rng, image_size) if occluder else None
    count = int(rng.integers(min_objects, max_objects + 1))
    combos = [required[int(rng.integers(len(required)))]] if required else []
    combos += [allowed[int(rng.integers(len(allowed)))] for _ in range(count - len(combos))]
    objects: list[SceneObject] = []
    for colour, shape in combos:
        size = SIZES[int(rng.integers(len(SIZES)))]
        placed = _place(rng, image_size, size, objects, box)
        if placed is None:  # no room left: try the small size once, then give up on this object
            size = "small"
            placed = _place(rng, image_size, size, objects, box)
        if placed is None:
            continue
        x, y, radius = placed
        objects.append(SceneObject(shape, colour, size, x, y, radius))
    background = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in _BACKGROUND)
    return Scene(image_size, tuple(objects), box, background)  # type: ignore[arg-type]


def _sample_occluder(rng: np.random.Generator, size: int) -> tuple[int, int, int, int]:
    width = int(size * rng.uniform(0.36, 0.46))
    height = int(size * rng.uniform(0.36, 0.46))
    x0 = int(rng.integers(0, size - width + 1))
    y0 = int(rng.integers(0, size - height + 1))
    return (x0, y0, x0 + width, y0 + height)


def _place(
    rng: np.random.Generator,
    size: int,
    object_size: str,
    objects: Sequence[SceneObject],
    box: tuple[int, int, int, int] | None,
    attempts: int = 60,
) -> tuple[float, float, float] | None:
    radius = _RADIUS_FRACTION[object_size] * size
    margin = radius + 1.0
    for _ in range(attempts):
        x = float(rng.uniform(margin, size - margin))
        y = float(rng.uniform(margin, size - margin))
        if any(np.hypot(x - o.x, y - o.y) < radius + o.radius + 2.0 for o in objects):
            continue
        if box is not None and _circle_hits_box(x, y, radius + 1.5, box):
            continue
        return x, y, radius
    return None


def _circle_hits_box(x: float, y: float, r: float, box: tuple[int, int, int, int]) -> bool:
    x0, y0, x1, y1 = box
    nearest_x = min(max(x, x0), x1)
    nearest_y = min(max(y, y0), y1)
    return bool(np.hypot(x - nearest_x, y - nearest_y) < r)


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``scene.size`` pixels, with mild pixel noise from ``rng``."""
    image = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(image)
    if scene.occluder is not None:
        x0, y0, x1, y1 = scene.occluder
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=_OCCLUDER_FILL)
        for offset in range(-(y1 - y0), x1 - x0, 5):
            draw.line([(x0 + offset, y0), (x0 + offset + (y1 - y0), y1)], fill=_OCCLUDER_HATCH, width=1)
        # re-clip the hatching to the box by redrawing the background around it
        image.paste(scene.background, (0, 0, scene.size, y0))
        image.paste(scene.background, (0, y1, scene.size, scene.size))
        image.paste(scene.background, (0, y0, x0, y1))
        image.paste(scene.background, (x1, y0, scene.size, y1))
    for obj in scene.objects:
        _draw_object(draw, obj)
    pixels = np.asarray(image, dtype=np.int16)
    noise = rng.integers(-6, 7, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8), "RGB")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    fill = COLOURS[obj.colour]
    x, y, r = obj.x, obj.y, obj.radius
    if obj.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif obj.shape == "square":
        half = r * 0.82
        draw.rectangle([x - half, y - half, x + half, y + half], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x + r * 0.95, y + r * 0.75), (x - r * 0.95, y + r * 0.75)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(x, y - r), (x + r * 0.8, y), (x, y + r), (x - r * 0.8, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
