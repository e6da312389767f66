"""The compositional T2I detector: verified on real ``shapes`` images, rejects wrong attributes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from muddit_jax.data import shapes
from muddit_jax.eval.compositional import (category_scores, classify, detect, judge,
                                            shapes_prompts, templates)

N = 300


def _objs(scene):
    return [dict(color=o.color, shape=o.shape, size=o.size, bbox=list(o.bbox)) for o in scene.objects]


@pytest.mark.parametrize("resolution,scale", [(32, 1.0), (64, 1.0), (32, 1.5)])
def test_detector_accepts_real_images(resolution, scale):
    cfg = shapes.ShapesConfig(resolution=resolution, num_test=N, object_scale=scale)
    verdicts = []
    for i in range(N):
        ex = shapes.generate(cfg, "test", i)
        verdicts.append(judge(ex.image, _objs(ex.scene)))
        dets = detect(ex.image, object_scale=scale)
        assert sorted((d.color, d.shape, d.size) for d in dets) == sorted(
            (o.color, o.shape, o.size) for o in ex.scene.objects)
    scores = category_scores(verdicts)
    assert scores["overall"] >= 0.99, scores
    assert set(scores) == {"single_object", "two_objects", "counting", "colors", "color_attr",
                           "position", "overall"}


@pytest.mark.parametrize("side", [6, 10, 15, 20])
def test_templates_are_the_renderers_shapes(side):
    for shape, template in templates(side, side).items():
        obj = shapes.ShapeObject(shape, "red", "small", (0, 0, side, side))
        assert np.array_equal(template, shapes.object_mask(obj, side)), shape
        assert classify(template) == shape


def test_blunt_triangle_is_still_a_triangle():
    # a VQ reconstruction widens a small triangle's apex: 68% of its box is filled, nearer a
    # circle's pi/4 than a triangle's 1/2, but its outline is still a triangle's
    yy, xx = np.mgrid[0:10, 0:10] + 0.5
    blunt = np.abs(xx - 5) <= np.maximum(yy / 2, 2.5)
    assert abs(blunt.mean() - np.pi / 4) < abs(blunt.mean() - 0.5)
    assert classify(blunt) == "triangle"
    assert classify(blunt[::-1]) != "triangle"  # apex down is not the renderer's triangle


def _scenes_with(min_objects: int, n: int = 60):
    cfg = shapes.ShapesConfig(resolution=64, num_test=400)
    out = [shapes.generate(cfg, "test", i).scene for i in range(400)]
    return [s for s in out if len(s.objects) >= min_objects][:n]


def _other_color(scene, obj):
    used = {o.color for o in scene.objects}
    return next(c for c in shapes.COLORS if c not in used)


WRONG = {
    # a wrong colour on one object
    "color": lambda s: dataclasses.replace(s, objects=(dataclasses.replace(
        s.objects[0], color=_other_color(s, s.objects[0])),) + s.objects[1:]),
    # a wrong shape on one object
    "shape": lambda s: dataclasses.replace(s, objects=(dataclasses.replace(
        s.objects[0], shape=next(x for x in shapes.SHAPES if x != s.objects[0].shape)),)
        + s.objects[1:]),
    # one object missing
    "missing": lambda s: dataclasses.replace(s, objects=s.objects[1:]),
    # colours of two objects swapped (colour attribution)
    "swap": lambda s: dataclasses.replace(s, objects=(
        dataclasses.replace(s.objects[0], color=s.objects[1].color),
        dataclasses.replace(s.objects[1], color=s.objects[0].color)) + s.objects[2:]),
}


@pytest.mark.parametrize("kind", sorted(WRONG))
def test_detector_rejects_wrong_attributes(kind):
    scenes = _scenes_with(2)
    rejected = []
    for scene in scenes:
        bad = WRONG[kind](scene)
        a, b = scene.objects[:2]
        if kind == "swap" and (a.shape == b.shape or a.color == b.color):
            continue  # swapping changes nothing
        rejected.append(not judge(shapes.render(bad), _objs(scene))["overall"])
    assert len(rejected) >= 20 and all(rejected), f"{kind}: {sum(rejected)}/{len(rejected)} rejected"


def test_mirrored_image_fails_horizontal_relations():
    cfg = shapes.ShapesConfig(resolution=64, num_test=200)
    checked = 0
    for i in range(200):
        ex = shapes.generate(cfg, "test", i)
        objs = ex.scene.objects
        if len(objs) == 2 and shapes.relation(objs[0], objs[1]) in ("to the left of", "to the right of"):
            verdict = judge(ex.image[:, ::-1], _objs(ex.scene))
            assert verdict["color_attr"] and not verdict["position"]
            checked += 1
    assert checked >= 10


def test_shapes_prompts_are_captions_with_ground_truth():
    cfg = shapes.ShapesConfig(resolution=32, num_test=5)
    ex = shapes_prompts(cfg, "test", 5)
    assert [e["id"] for e in ex] == [f"test-{i}" for i in range(5)]
    first = shapes.generate(cfg, "test", 0)
    assert ex[0]["prompt"] == first.captions[0] and len(ex[0]["objects"]) == len(first.scene.objects)


def test_t2i_evaluator_scores_generated_images(tmp_path):
    import muddit_jax.eval.compositional  # noqa: F401
    from muddit_jax.eval.base import get_evaluator
    from tests.helpers import tiny_pipeline

    pipe = tiny_pipeline(tmp_path, image_size=32)
    examples = shapes_prompts(shapes.ShapesConfig(resolution=32, num_test=4), "test", 4)
    ev = get_evaluator("t2i", examples, batch_size=2, shard_size=2, steps=2, guidance_scale=None)
    scores = ev.run(pipe, tmp_path / "eval")
    assert 0.0 <= scores["overall"] <= 1.0 and "counting" in scores
