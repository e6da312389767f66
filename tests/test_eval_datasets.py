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


def test_unknown_task_and_missing_ground_truth(data_dir):
    with pytest.raises(ValueError, match="unknown evaluation task"):
        eval_examples("fid", "shapes", "test", image_size=32, data_dir=data_dir, **OPTS)
