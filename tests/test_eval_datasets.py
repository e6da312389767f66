"""Evaluation examples built from a tiny ``shapes`` build."""

import numpy as np
import pytest

from muddit_jax.data import shapes
from muddit_jax.eval.compositional import judge
from muddit_jax.eval.datasets import eval_examples

OPTS = dict(resolution=32, num_train=2, num_validation=2, num_test=6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def test_caption_vqa_t2i_examples(data_dir):
    caps = eval_examples("caption", "shapes", "test", image_size=32, limit=4, data_dir=data_dir, **OPTS)
    assert len(caps) == 4 and caps[0]["image"].shape == (32, 32, 3) and len(caps[0]["captions"]) == 3
    vqa = eval_examples("vqa", "shapes", "test", image_size=32, limit=2, data_dir=data_dir, **OPTS)
    assert len({e["id"] for e in vqa}) == len(vqa) > 2 and all(len(e["answers"]) == 10 for e in vqa)
    t2i = eval_examples("t2i", "shapes", "test", image_size=32, data_dir=data_dir, **OPTS)
    assert len(t2i) == 6
    cfg = shapes.ShapesConfig(**OPTS)
    index = lambda ex: int(ex["id"].split("/")[-1])  # noqa: E731  (ids are "test/<index>")
    assert sorted(index(e) for e in t2i) == list(range(6))
    for ex in t2i:
        truth = shapes.generate(cfg, "test", index(ex))
        assert ex["prompt"] == truth.captions[0]
        assert judge(truth.image, ex["objects"])["overall"]
    for ex in caps:
        np.testing.assert_array_equal(ex["image"], shapes.generate(cfg, "test", index(ex)).image)
    for ex in vqa:  # "test/<index>/<question id = 16 index + k>": question k of that image
        _, i, q = ex["id"].split("/")
        qa = shapes.generate(cfg, "test", int(i)).qa[int(q) % 16]
        assert (ex["question"], ex["question_type"], ex["answer_type"]) == (
            qa.question, qa.question_type, qa.answer_type)


def test_examples_carry_the_object_scale_to_the_detector(tmp_path, monkeypatch):
    """At ``object_scale=1.5`` the t2i / caption examples say so, the detector then names every
    object's size right, and the T2I evaluator passes the scale on to it."""
    from muddit_jax.eval import compositional
    from muddit_jax.eval.base import get_evaluator

    opts = dict(OPTS, object_scale=1.5)
    caps = eval_examples("caption", "shapes", "test", image_size=32, data_dir=tmp_path, **opts)
    t2i = eval_examples("t2i", "shapes", "test", image_size=32, data_dir=tmp_path, **opts)
    prompts = compositional.shapes_prompts(shapes.ShapesConfig(**opts), "test", 2)
    assert {e["object_scale"] for e in caps + t2i + prompts} == {1.5}
    for ex in caps:
        dets = compositional.detect(ex["image"], object_scale=ex["object_scale"])
        assert sorted((d.color, d.size) for d in dets) == sorted(
            (o["color"], o["size"]) for o in ex["objects"])
    assert any(o["size"] == "large" for e in caps for o in e["objects"])
    seen = []
    monkeypatch.setattr(compositional, "detect", lambda image, **kw: seen.append(kw) or [])

    class Pipe:
        def generate(self, prompts, **kw):
            return np.zeros((len(prompts), 32, 32, 3), np.uint8)

    get_evaluator("t2i", t2i[:2], batch_size=2, shard_size=2, steps=1).run(Pipe(), tmp_path / "ev")
    assert seen == [{"object_scale": 1.5}] * 2


def test_unknown_task_and_missing_ground_truth(data_dir):
    with pytest.raises(ValueError, match="unknown evaluation task"):
        eval_examples("fid", "shapes", "test", image_size=32, data_dir=data_dir, **OPTS)
