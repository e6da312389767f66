"""The embedded ``shapes`` dataset: 1-4 flat-coloured shapes on a light background, no download.

Owns the palette, scene sampling, the rasteriser, captions, VQA pairs and the compositional
split; pure numpy (the TFDS builder is :mod:`muddit_jax.data.shapes_tfds`). Every example is a
pure function of ``(config, split, index)`` (a numpy ``Generator`` seeded with ``[seed,
split_id, index]``): builds are reproducible byte for byte and any index range can be generated
on its own.

Ground truth per image: ``objects`` (shape, color, size, bbox ``[x0, y0, x1, y1)`` in pixels).
Objects are squares of side :data:`SIZES` × ``object_scale`` × resolution.
What a pixel detector may rely on: object pixels are exactly their palette colour and lie inside
the bbox (circles fill ~79% of it, triangles ~50%, squares 100%); bboxes are at least ``gap``
pixels apart and ``margin`` pixels from the border; palette colours are >= 100 apart in RGB and
far from every background (whose texture stays within +-6 levels); PNG storage is lossless.

Relations: ``A to the left of B`` means A's bbox ends before B's starts along x (likewise
``to the right of``, ``above``, ``below``); of the two axes the one with the larger gap is stated.
Captions chain the objects in order (``o0 REL o1``, ``o2 REL the o1``, ...) and name every
object's size, colour and shape. (colour, shape) pairs are unique within an image, so ``the red
circle`` is unambiguous.

Splits: ``train`` / ``validation`` never show a :data:`HELD_OUT` (colour, shape) pair, not even in
question text; every ``test`` image contains at least one (the compositional test).
"""

from __future__ import annotations

import collections
import dataclasses
import io
from typing import Any

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 20, 20),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 235, 30),
    "purple": (150, 50, 200),
    "orange": (255, 140, 0),
    "cyan": (30, 210, 230),
    "brown": (100, 55, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.2, "large": 0.32}  # bbox side as a fraction of the resolution
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 242),
    "light gray": (212, 212, 212),
    "beige": (236, 226, 206),
}
TEXTURES = ("plain", "noise", "gradient")
TEXTURE_AMPLITUDE = 6
HELD_OUT = (("red", "triangle"), ("green", "circle"), ("blue", "square"), ("orange", "triangle"))
SPLITS = ("train", "validation", "test")
MIN_RESOLUTION, MAX_RESOLUTION = 32, 256
PLACEMENT_TRIES = 200
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
OPENERS = ("", "an image of ", "a picture showing ", "a drawing of ")
RELATION_WORD = {"to the left of": "left", "to the right of": "right", "above": "above",
                 "below": "below"}
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}
ALL_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """What a ``shapes`` build contains; the TFDS config name encodes every field."""

    resolution: int = 64
    seed: int = 0
    num_train: int = 20000
    num_validation: int = 1000
    num_test: int = 1000
    max_objects: int = 4
    textures: tuple[str, ...] = TEXTURES  # background textures drawn from (``plain`` = flat)
    object_scale: float = 1.0  # multiplies every :data:`SIZES` fraction (bigger, easier shapes)
    position_step: int = 1  # bbox corners on multiples of this many pixels (1 = anywhere)

    def __post_init__(self) -> None:
        object.__setattr__(self, "textures", tuple(self.textures))
        if not self.textures or any(t not in TEXTURES for t in self.textures):
            raise ValueError(f"shapes: textures={self.textures!r} must be a non-empty subset of "
                             f"{TEXTURES}")
        if not MIN_RESOLUTION <= self.resolution <= MAX_RESOLUTION:
            raise ValueError(
                f"shapes: resolution={self.resolution} is outside "
                f"[{MIN_RESOLUTION}, {MAX_RESOLUTION}]; set the 'resolution' option in range"
            )
        object.__setattr__(self, "object_scale", float(self.object_scale))
        margin = margins(self.resolution)[0]
        if not (self.object_scale > 0
                and side("small", self.resolution, self.object_scale) >= 3
                and side("large", self.resolution, self.object_scale) + 2 * margin
                <= self.resolution):
            raise ValueError(
                f"shapes: object_scale={self.object_scale} makes objects smaller than 3 px or "
                f"larger than a {self.resolution} px image; keep object_scale * "
                f"{SIZES['large']} * resolution within the image")
        step = self.position_step
        if not (isinstance(step, int) and step >= 1
                and _positions(margin, self.resolution - margin - side(
                    "large", self.resolution, self.object_scale), step)):
            raise ValueError(
                f"shapes: position_step={step!r} leaves a large object no position in a "
                f"{self.resolution} px image; use an integer >= 1 (1 = any pixel)")
        if not 1 <= self.max_objects <= 4:
            raise ValueError(f"shapes: max_objects={self.max_objects} must be in [1, 4]")
        for split in SPLITS:
            if self.num_examples(split) < 0:
                raise ValueError(f"shapes: num_{split} must be >= 0")

    @property
    def name(self) -> str:
        name = (f"{self.resolution}px_seed{self.seed}_{self.num_train}-{self.num_validation}-"
                f"{self.num_test}_max{self.max_objects}")
        if self.object_scale != 1.0:
            name += f"_scale{self.object_scale:g}"
        if self.position_step != 1:
            name += f"_step{self.position_step}"
        return name if self.textures == TEXTURES else name + "_" + "-".join(self.textures)

    def num_examples(self, split: str) -> int:
        return {"train": self.num_train, "validation": self.num_validation,
                "test": self.num_test}[split]


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    resolution: int
    objects: tuple[ShapeObject, ...]
    background: str
    texture: str
    texture_seed: int


@dataclasses.dataclass(frozen=True)
class QA:
    question: str
    answer: str
    question_type: str  # color / shape / count / position / exists / relation
    answer_type: str  # VQAv2's: other / number / yes/no


@dataclasses.dataclass(frozen=True)
class ShapesExample:
    scene: Scene
    image: np.ndarray  # uint8 [R, R, 3]
    captions: tuple[str, ...]
    qa: tuple[QA, ...]


def margins(resolution: int) -> tuple[int, int]:
    """``(border margin, minimum gap between bboxes)`` in pixels."""
    return max(1, resolution // 32), max(2, round(0.06 * resolution))


def side(size: str, resolution: int, scale: float = 1.0) -> int:
    """Bbox side in pixels of a ``size`` object."""
    return round(SIZES[size] * scale * resolution)


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where ``a`` is relative to ``b`` along the axis on which their bboxes are further apart."""
    gx = max(b.bbox[0] - a.bbox[2], a.bbox[0] - b.bbox[2])
    gy = max(b.bbox[1] - a.bbox[3], a.bbox[1] - b.bbox[3])
    if gx >= gy:
        return "to the left of" if a.bbox[2] <= b.bbox[0] else "to the right of"
    return "above" if a.bbox[3] <= b.bbox[1] else "below"


def _separated(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1]
            or b[3] + gap <= a[1])


def _positions(lo: int, hi: int, step: int) -> list[int]:
    """Multiples of ``step`` in ``[lo, hi]``."""
    return list(range(-(-lo // step) * step, hi + 1, step))


def _place(rng: np.random.Generator, s: int, boxes: list[tuple[int, ...]], resolution: int,
           step: int = 1) -> tuple[int, int, int, int] | None:
    margin, gap = margins(resolution)
    hi = resolution - margin - s
    grid = None if step == 1 else np.asarray(_positions(margin, hi, step))
    for _ in range(PLACEMENT_TRIES):
        if grid is None:  # the draws of builds made before position_step existed
            x0, y0 = (int(v) for v in rng.integers(margin, hi + 1, size=2))
        else:
            x0, y0 = (int(v) for v in grid[rng.integers(len(grid), size=2)])
        box = (x0, y0, x0 + s, y0 + s)
        if all(_separated(box, b, gap) for b in boxes):
            return box
    return None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, items: list[Any] | tuple[Any, ...]) -> Any:
    return items[int(rng.integers(len(items)))]


def sample_scene(config: ShapesConfig, split: str, rng: np.random.Generator) -> Scene:
    """Objects with distinct (colour, shape) pairs, placed without overlap (large ones that do
    not fit become small; ones that still do not fit are dropped, never the first)."""
    res, scale = config.resolution, config.object_scale
    n = int(rng.integers(1, config.max_objects + 1))
    if split == "test":
        first = _pick(rng, HELD_OUT)
        rest = [p for p in ALL_PAIRS if p != first]
        pairs = [first] + [rest[i] for i in rng.choice(len(rest), n - 1, replace=False)]
    else:
        allowed = [p for p in ALL_PAIRS if p not in HELD_OUT]
        pairs = [allowed[i] for i in rng.choice(len(allowed), n, replace=False)]
    objects: list[ShapeObject] = []
    for color, shape in pairs:
        size = _pick(rng, tuple(SIZES))
        boxes = [o.bbox for o in objects]
        box = _place(rng, side(size, res, scale), boxes, res, config.position_step)
        if box is None and size != "small":
            size = "small"
            box = _place(rng, side(size, res, scale), boxes, res, config.position_step)
        if box is not None:
            objects.append(ShapeObject(shape, color, size, box))
    background, texture = _pick(rng, tuple(BACKGROUNDS)), _pick(rng, TEXTURES)
    if texture not in config.textures:  # objects come first: a subset keeps every scene's objects
        texture = config.textures[int(rng.integers(len(config.textures)))]
    return Scene(res, tuple(objects), background, texture, int(rng.integers(2**31)))


def shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    """``bool [h, w]``: pixels of an ``h × w`` box whose centre lies inside ``shape`` stretched to
    the box (a circle becomes an ellipse; the triangle points up). Exact for integer sides."""
    yy, xx = np.mgrid[0:h, 0:w] * 2 + 1  # doubled pixel centres
    if shape == "square":
        return np.ones((h, w), bool)
    if shape == "circle":
        return (xx - w) ** 2 * h**2 + (yy - h) ** 2 * w**2 <= (w * h) ** 2
    # triangle: the half-width grows from 0 at the top to w / 2 at the bottom
    return np.abs(xx - w) * 2 * h <= yy * w


def object_mask(obj: ShapeObject, resolution: int) -> np.ndarray:
    """``bool [R, R]``: pixels whose centre lies inside the shape."""
    x0, y0, x1, y1 = obj.bbox
    mask = np.zeros((resolution, resolution), bool)
    mask[y0:y1, x0:x1] = shape_mask(obj.shape, y1 - y0, x1 - x0)
    return mask


def render(scene: Scene) -> np.ndarray:
    """The scene as ``uint8 [R, R, 3]``: textured background, then flat objects."""
    r = scene.resolution
    img = np.empty((r, r, 3), np.int16)
    img[:] = BACKGROUNDS[scene.background]
    trng = np.random.default_rng(scene.texture_seed)
    if scene.texture == "noise":
        img += trng.integers(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE + 1, (r, r, 1), dtype=np.int16)
    elif scene.texture == "gradient":
        ramp = np.round(np.linspace(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE, r)).astype(np.int16)
        img += ramp[:, None, None] if trng.integers(2) else ramp[None, :, None]
    img = np.clip(img, 0, 255).astype(np.uint8)
    for obj in scene.objects:
        img[object_mask(obj, r)] = COLORS[obj.color]
    return img


def captions(scene: Scene, rng: np.random.Generator) -> tuple[str, ...]:
    """Three paraphrases, each naming every object's size, colour, shape and the relations."""
    objs = scene.objects
    if len(objs) == 1:
        o = objs[0]
        return (f"{_pick(rng, OPENERS)}a {o.phrase}",
                f"there is a {o.phrase} on a {scene.background} background",
                f"one shape: a {o.phrase}")
    clauses = [f"a {objs[0].phrase} {relation(objs[0], objs[1])} a {objs[1].phrase}"]
    clauses += [f"a {cur.phrase} {relation(cur, prev)} the {prev.name}"
                for prev, cur in zip(objs[1:], objs[2:])]
    return (_pick(rng, OPENERS) + " and ".join(clauses),
            "there is " + ", and there is ".join(clauses),
            f"{NUMBER_WORDS[len(objs)]} shapes: " + "; ".join(clauses))


def questions(scene: Scene, split: str, rng: np.random.Generator) -> tuple[QA, ...]:
    """Colour / shape / count / position / yes-no questions with one short answer each."""
    objs = scene.objects
    by_shape = collections.Counter(o.shape for o in objs)
    by_color = collections.Counter(o.color for o in objs)
    by_size_shape = collections.Counter((o.size, o.shape) for o in objs)
    qa: list[QA] = []
    if unique := [o for o in objs if by_shape[o.shape] == 1]:
        o = _pick(rng, unique)
        qa.append(QA(f"what color is the {o.shape}?", o.color, "color", "other"))
    elif unique := [o for o in objs if by_size_shape[(o.size, o.shape)] == 1]:
        o = _pick(rng, unique)
        qa.append(QA(f"what color is the {o.size} {o.shape}?", o.color, "color", "other"))
    if unique := [o for o in objs if by_color[o.color] == 1]:
        o = _pick(rng, unique)
        qa.append(QA(f"what shape is the {o.color} object?", o.shape, "shape", "other"))
    kind = int(rng.integers(3))
    if kind == 0:
        qa.append(QA("how many objects are there?", str(len(objs)), "count", "number"))
    elif kind == 1:
        s = _pick(rng, SHAPES)
        qa.append(QA(f"how many {s}s are there?", str(by_shape[s]), "count", "number"))
    else:
        c = _pick(rng, tuple(COLORS))
        qa.append(QA(f"how many {c} objects are there?", str(by_color[c]), "count", "number"))
    if len(objs) >= 2:
        i, j = (int(k) for k in rng.choice(len(objs), 2, replace=False))
        a, b = objs[i], objs[j]
        rel = relation(a, b)
        qa.append(QA(f"where is the {a.name} relative to the {b.name}?", RELATION_WORD[rel],
                     "position", "other"))
        truth = bool(rng.integers(2))
        asked = rel if truth else OPPOSITE[rel]
        qa.append(QA(f"is the {a.name} {asked} the {b.name}?", "yes" if truth else "no",
                     "relation", "yes/no"))
    present = {(o.color, o.shape) for o in objs}
    if rng.integers(2):
        o = _pick(rng, objs)
        qa.append(QA(f"is there {_article(o.color)} {o.name}?", "yes", "exists", "yes/no"))
    else:
        absent = [p for p in ALL_PAIRS
                  if p not in present and (split == "test" or p not in HELD_OUT)]
        c, s = _pick(rng, absent)
        qa.append(QA(f"is there {_article(c)} {c} {s}?", "no", "exists", "yes/no"))
    return tuple(qa)


def generate(config: ShapesConfig, split: str, index: int) -> ShapesExample:
    """Example ``index`` of ``split``: a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"shapes: unknown split {split!r}; expected one of {SPLITS}")
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
    scene = sample_scene(config, split, rng)
    return ShapesExample(scene, render(scene), captions(scene, rng), questions(scene, split, rng))


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
