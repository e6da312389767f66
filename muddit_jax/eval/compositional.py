"""Compositional text-to-image score on ``shapes`` prompts, judged by a pixel-level detector.

The detector reads an image the way the ``shapes`` renderer draws it: every pixel within
``color_tol`` (max-abs RGB) of a palette colour belongs to that colour; each connected component
of a colour large enough to be an object is one detection, classified as the shape whose template
(drawn like the renderer draws it, stretched to the component's bounding box) it overlaps best
(IoU), and sized by its bbox side. Real images are classified exactly; the templates also keep a
VQ-blurred 10-px triangle (its apex widened, filling ~65% of its box) a triangle, where a
bbox-fill threshold calls it a circle.

:func:`judge` compares detections with the prompt's ground-truth objects, per GenEval-style
category: ``single_object`` / ``two_objects`` (every named (colour, shape) is present),
``counting`` (as many objects as named), ``colors`` (the colours match as a multiset), ``color_attr``
(every colour is bound to the right shape, ≥ 2 objects) and ``position`` (each stated relation
holds between the matched detections' bbox centres, ≥ 2 objects); ``overall`` = all applicable categories pass.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from muddit_jax.data import shapes
from muddit_jax.eval.base import Evaluator, Example, register

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "color_attr", "position")


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object: bbox ``[x0, y0, x1, y1)`` in pixels and its bbox fill ratio."""

    color: str
    shape: str
    size: str
    bbox: tuple[int, int, int, int]
    fill: float


def templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Each shape drawn as the renderer draws it (pixel centres), stretched to an ``h × w`` box."""
    return {name: shapes.shape_mask(name, h, w) for name in shapes.SHAPES}


def classify(mask: np.ndarray) -> str:
    """The shape whose template over ``mask``'s own box overlaps it best (IoU)."""
    def iou(t: np.ndarray) -> float:
        return (mask & t).sum() / max((mask | t).sum(), 1)

    scores = {name: iou(t) for name, t in templates(*mask.shape).items()}
    return max(scores, key=scores.get)


def detect(image: np.ndarray, *, color_tol: int = 48, min_side: float = 0.1,
           object_scale: float = 1.0) -> list[Detection]:
    """Objects in ``image [R, R, 3] uint8``; components with a bbox side below ``min_side · R``
    (specks of noise) are ignored; sizes are named against ``shapes.SIZES · object_scale``."""
    img = np.asarray(image, np.int16)
    r = img.shape[0]
    names = list(shapes.COLORS)
    palette = np.array([shapes.COLORS[c] for c in names], np.int16)
    dist = np.abs(img[:, :, None, :] - palette[None, None]).max(-1)  # [R, R, colours]
    label = np.where(dist.min(-1) <= color_tol, dist.argmin(-1), -1)
    out = []
    for ci, color in enumerate(names):
        components, n = ndimage.label(label == ci)
        for k, sl in enumerate(ndimage.find_objects(components), start=1):
            ys, xs = sl
            h, w = ys.stop - ys.start, xs.stop - xs.start
            if max(h, w) < min_side * r:
                continue
            mask = components[sl] == k
            fill = int(mask.sum()) / float(max(h, w) ** 2)
            side = max(h, w) / r
            size = min(shapes.SIZES, key=lambda s: abs(shapes.SIZES[s] * object_scale - side))
            out.append(Detection(color, classify(mask), size,
                                 (xs.start, ys.start, xs.stop, ys.stop), round(fill, 4)))
    return out


def _rel(a: Any, b: Any) -> str:
    return shapes.relation(a, b)


def holds(relation: str, a: Any, b: Any) -> bool:
    """Whether ``a`` is ``relation`` ``b`` judged by bbox centres along the relation's axis."""
    ax, ay = (a.bbox[0] + a.bbox[2]) / 2, (a.bbox[1] + a.bbox[3]) / 2
    bx, by = (b.bbox[0] + b.bbox[2]) / 2, (b.bbox[1] + b.bbox[3]) / 2
    return {"to the left of": ax < bx, "to the right of": ax > bx,
            "above": ay < by, "below": ay > by}[relation]


def judge(image: np.ndarray, objects: Sequence[Mapping[str, Any]], **detect_kw: Any) -> dict[str, bool]:
    """Per-category verdicts for ``image`` against the prompt's ``objects`` (in prompt order,
    each with ``color``, ``shape``; consecutive objects' stated relation is recomputed from the
    ground-truth bboxes when present, else taken from ``relation`` (relative to the previous))."""
    dets = detect(image, **detect_kw)
    want = [(o["color"], o["shape"]) for o in objects]
    got = [(d.color, d.shape) for d in dets]
    present = all(got.count(p) >= want.count(p) for p in set(want))
    verdict = {
        "single_object" if len(want) == 1 else "two_objects": present,
        "counting": len(dets) == len(want),
        "colors": collections.Counter(c for c, _ in got) == collections.Counter(c for c, _ in want),
    }
    if len(want) >= 2:
        verdict["color_attr"] = collections.Counter(got) == collections.Counter(want)
        by_pair = {(d.color, d.shape): d for d in dets}
        ok = present
        for prev, cur in zip(objects, objects[1:]):
            a, b = by_pair.get((cur["color"], cur["shape"])), by_pair.get((prev["color"], prev["shape"]))
            stated = cur.get("relation") or _rel(_box(cur), _box(prev))
            ok = ok and a is not None and b is not None and holds(stated, a, b)
        verdict["position"] = bool(ok)
    verdict["overall"] = all(verdict.values())
    return verdict


def _box(obj: Mapping[str, Any]) -> Any:
    return shapes.ShapeObject(obj["shape"], obj["color"], obj.get("size", "small"), tuple(obj["bbox"]))


def shapes_prompts(config: shapes.ShapesConfig, split: str, n: int) -> list[dict[str, Any]]:
    """T2I evaluation examples from ``shapes``: prompt = first caption, objects = ground truth."""
    out = []
    for i in range(n):
        ex = shapes.generate(config, split, i)
        objs = [dict(color=o.color, shape=o.shape, size=o.size, bbox=list(o.bbox))
                for o in ex.scene.objects]
        out.append(dict(id=f"{split}-{i}", prompt=ex.captions[0], objects=objs,
                        object_scale=config.object_scale))
    return out


# the ``eval.*`` fields the t2i evaluator hands to ``MudditPipeline.generate``
SAMPLER_OPTIONS = ("guidance_scale", "temperature", "sampling", "top_k", "guidance_schedule",
                   "guidance_plausibility")


def sampler_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """``MudditPipeline.generate`` keyword arguments: the :data:`SAMPLER_OPTIONS` set in
    ``options`` (the ``eval.*`` fields); unset ones keep ``generate``'s defaults."""
    return {k: options[k] for k in SAMPLER_OPTIONS if k in options}


@register("t2i")
class CompositionalT2IEvaluator(Evaluator):
    """Examples: ``{"id", "prompt", "objects": [{color, shape, size, bbox}, ...]}``; predictions
    are the detector's verdicts per generated image."""

    config_options = (*Evaluator.config_options, *SAMPLER_OPTIONS)

    def predict(self, pipe: Any, batch: Sequence[Example], seeds: Sequence[int]) -> list[dict]:
        images = pipe.generate([e["prompt"] for e in batch], steps=self.steps, seed=list(seeds),
                               **sampler_kwargs(self.options))
        return [judge(img, e["objects"], object_scale=e.get("object_scale", 1.0))
                for img, e in zip(images, batch)]

    def score(self, predictions: Mapping[str, Any], examples: Sequence[Example]) -> dict[str, float]:
        return category_scores([predictions[str(e["id"])] for e in examples])


def caption_names_objects(caption: str, objects: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a caption names every object's colour + shape (``"red circle"``, optionally with a
    size word between) and no (colour, shape) pair that is not in the image."""
    words = caption.lower().replace(",", " ").replace(";", " ").replace(".", " ").split()
    named = set()
    for i, w in enumerate(words):
        if w in shapes.COLORS:
            rest = [x for x in words[i + 1 : i + 3] if x not in shapes.SIZES]
            if rest and rest[0].rstrip("s") in shapes.SHAPES:
                named.add((w, rest[0].rstrip("s")))
    truth = {(o["color"], o["shape"]) for o in objects}
    return named == truth


def category_scores(verdicts: Sequence[Mapping[str, bool]]) -> dict[str, float]:
    """Mean verdict per category over the images where it applies, plus ``overall``."""
    out = {}
    for cat in CATEGORIES + ("overall",):
        vals = [v[cat] for v in verdicts if cat in v]
        if vals:
            out[cat] = float(np.mean(vals))
    return out
