"""The mixture pipeline: exact per-batch ratio and caption-first layout, union of keys,
determinism, exact resume from a JSON state, host shards that assemble the global batch, config
errors, and the trainer's ``data.kind="mixture"`` factory."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from muddit_jax.data import registry, text
from muddit_jax.data.mixture import (
    MixtureConfig,
    derived_seed,
    make_mixture,
    row_counts,
)
from muddit_jax.train.config import base_config
from muddit_jax.train.data import data_seed, dataset_factory, mixture_config

SHAPES = {"num_train": 24, "num_validation": 4, "num_test": 4}
B = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    data_dir = str(root / "data")
    source = registry.data_source("shapes", "train", data_dir, resolution=32, **SHAPES)
    tok = text.train_tokenizer(text.dataset_texts([source]), 128, root / "tok.model")
    spec = {  # VQA listed first: the layout still puts the captions first
        "vqa": {"weight": 0.75, "dataset": "shapes", "task": "vqa", "options": SHAPES},
        "captions": {"weight": 0.25, "dataset": "shapes", "task": "caption", "options": SHAPES},
    }
    mix = MixtureConfig.from_dict(spec, B, data_dir=data_dir, resolution=32, text_length=48,
                                  seed=5)
    return mix, tok, data_dir, spec, root / "tok.model"


def take(mix, tok, n, **kw):
    with make_mixture(mix, tok, **kw) as it:
        return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_row_counts():
    assert row_counts([1, 1], 8) == [4, 4]
    assert row_counts([1, 3], 8) == [2, 6]
    assert row_counts([1, 1, 1], 8) == [3, 3, 2]
    assert row_counts([0.3, 0.7], 10) == [3, 7]
    assert row_counts([0.01, 1.0], 4) == [0, 4]
    with pytest.raises(ValueError, match="positive"):
        row_counts([1.0, 0.0], 4)


def test_layout_ratio_and_keys(env):
    mix, tok, *_ = env
    assert [(s.name, a, b) for s, a, b in mix.layout()] == [("captions", 0, 2), ("vqa", 2, 8)]
    assert mix.has_vqa
    seeds = {s.name: s.config.seed for s in mix.sources}
    assert seeds == {"vqa": derived_seed(5, "vqa"), "captions": derived_seed(5, "captions")}
    batches = take(mix, tok, 3, process_index=0, process_count=1)
    for batch in batches:
        assert {k: v.shape for k, v in batch.items()} == {
            "images": (B, 32, 32, 3), "text_ids": (B, 48), "text_valid": (B, 48),
            "text_maskable": (B, 48), "micro_conds": (B, 5), "index": (B,), "source": (B,)}
        np.testing.assert_array_equal(batch["source"], [0, 0] + [1] * 6)
        assert batch["text_maskable"][:2].all()  # captions: the loss treats them as captions
        vqa = batch["text_maskable"][2:]
        assert not vqa[:, :2].any() and vqa.any(-1).all()  # bos + question never maskable
    # the two shapes streams are shuffled with their own seeds, not in lockstep
    caption_idx = np.concatenate([b["index"][:2] for b in batches])
    vqa_idx = np.concatenate([b["index"][2:4] for b in batches])
    assert not np.array_equal(caption_idx, vqa_idx)


def test_deterministic_and_resumes_exactly(env):
    mix, tok, *_ = env
    first = take(mix, tok, 5, process_index=0, process_count=1)
    assert_same(first, take(mix, tok, 5, process_index=0, process_count=1))
    with make_mixture(mix, tok, process_index=0, process_count=1) as it:
        for _ in range(2):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
    assert sorted(state["sources"]) == ["captions", "vqa"]
    with make_mixture(mix, tok, process_index=0, process_count=1) as it:
        it.set_state(state)
        assert_same([next(it) for _ in range(3)], first[2:])
    with make_mixture(mix, tok, rows=slice(0, 4)) as it, pytest.raises(ValueError, match="rows"):
        it.set_state(state)


@pytest.mark.parametrize("cuts", [(0, 4, 8), (0, 1, 3, 8), (0, 2, 8)])
def test_host_rows_assemble_the_global_batch(env, cuts):
    mix, tok, *_ = env
    whole = take(mix, tok, 2, rows=slice(0, B))
    parts = [take(mix, tok, 2, rows=slice(a, b)) for a, b in itertools.pairwise(cuts)]
    for k in range(2):
        joined = {key: np.concatenate([p[k][key] for p in parts]) for key in whole[k]}
        assert_same([joined], [whole[k]])
    with make_mixture(mix, tok, rows=slice(3, 6)) as it:  # a host inside the vqa block only
        assert list(it.get_state()["sources"]) == ["vqa"]
        assert next(it)["text_maskable"].shape == (3, 48)


def test_config_errors(env):
    _, _, data_dir, _spec, _ = env
    with pytest.raises(ValueError, match="needs a weight"):
        MixtureConfig.from_dict({"a": {"dataset": "shapes"}}, B)
    with pytest.raises(ValueError, match="shared"):
        MixtureConfig.from_dict({"a": {"weight": 1.0, "text_length": 16}}, B)
    with pytest.raises(ValueError, match="mixture source 'a'.*not_a_dataset"):
        MixtureConfig.from_dict({"a": {"weight": 1.0, "dataset": "not_a_dataset"}}, B)
    with pytest.raises(ValueError, match="every source needs one row"):
        MixtureConfig.from_dict({"a": {"weight": 0.01}, "b": {"weight": 1.0}}, 4)
    with pytest.raises(ValueError, match="pre-tokenized"):
        MixtureConfig.from_dict({"a": {"weight": 1.0}, "b": {
            "weight": 1.0, "dataset": "pretokenized", "options": {"path": data_dir}}}, B)


def trainer_config(spec, data_dir, tok_path, **loss):
    c = base_config()
    c.data.kind, c.data.tokenizer, c.data.data_dir = "mixture", str(tok_path), data_dir
    c.data.global_batch, c.data.grid, c.data.text_length = B, 4, 48
    c.data.text_maskable = True
    c.data.mixture = spec
    for k, v in loss.items():
        c.loss[k] = v
    return c


def test_trainer_factory(env):
    mix, tok, data_dir, spec, tok_path = env
    c = trainer_config(spec, data_dir, tok_path, t2i_fraction=0.25)
    c.seed = 5
    factory = dataset_factory(c, 8)
    with factory(slice(0, B)) as it:
        batch = next(it)
    assert_same([batch], take(mix, tok, 1, rows=slice(0, B)))
    with pytest.raises(ValueError, match="VQA rows would be T2I"):
        dataset_factory(trainer_config(spec, data_dir, tok_path), 8)  # t2i_fraction 0.5 > 0.25
    c = trainer_config(spec, data_dir, tok_path, t2i_fraction=0.25)
    c.data.text_maskable = False
    with pytest.raises(ValueError, match="text_maskable must be True"):
        dataset_factory(c, 8)
    c.data.mixture = {}
    with pytest.raises(ValueError, match="needs data.mixture"):
        dataset_factory(c, 8)


def test_data_seed_sets_the_batches_apart_from_the_run_seed(env):
    """``data.seed`` draws the batches whatever the run's ``seed`` (which keeps the init); -1
    falls back to the run's seed; below -1 fails naming the field."""
    mix, tok, data_dir, spec, tok_path = env
    c = trainer_config(spec, data_dir, tok_path, t2i_fraction=0.25)
    c.seed, c.data.seed = 9, 5
    assert data_seed(c) == 5
    with dataset_factory(c, 8)(slice(0, B)) as it:
        batch = next(it)
    assert_same([batch], take(mix, tok, 1, rows=slice(0, B)))  # the env's mixture has seed 5
    c.data.seed = -1
    assert data_seed(c) == 9
    with dataset_factory(c, 8)(slice(0, B)) as it:
        assert not np.array_equal(next(it)["text_ids"], batch["text_ids"])
    c.data.seed = -2
    with pytest.raises(ValueError, match=r"data.seed=-2: use -1"):
        dataset_factory(c, 8)


def test_trainer_throughput_fields_reach_every_source(env):
    _, _, data_dir, spec, tok_path = env
    c = trainer_config({**spec, "vqa": {**spec["vqa"], "read_threads": 3}}, data_dir, tok_path,
                       t2i_fraction=0.25)
    c.data.update(read_threads=1, prefetch=16, workers=2)
    got = {s.name: (s.config.read_threads, s.config.prefetch, s.config.workers)
           for s in mixture_config(c, 8).sources}
    assert got == {"captions": (1, 16, 2), "vqa": (3, 16, 2)}  # a source's own value wins
    c.data.update(kind="dataset", task="caption", text_maskable=False, workers=0)
    c.data.options = SHAPES
    with dataset_factory(c, 8)(slice(0, B)) as it:
        assert (it.config.read_threads, it.config.prefetch, it.config.workers) == (1, 16, 0)
