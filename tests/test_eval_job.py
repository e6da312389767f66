"""The sharded, resumable evaluation loop (muddit_jax.eval.base) with the caption/VQA tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import muddit_jax.eval.tasks  # noqa: F401  (registers the tasks)
from muddit_jax.eval.base import Evaluator, example_seeds, get_evaluator
from tests.helpers import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def caption_examples(n: int = 12) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        dict(id=f"img{i}", image=rng.integers(0, 256, (16, 16, 3), np.uint8),
             captions=["a red circle.", "a small red circle to the left of a blue square."])
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tok"))


def test_caption_eval_writes_predictions_and_scores(pipe, tmp_path):
    ev = get_evaluator("caption", caption_examples(10), batch_size=2, shard_size=4, steps=3)
    metrics = ev.run(pipe, tmp_path)
    assert set(metrics) == {"cider_d", "bleu4"} and all(np.isfinite(list(metrics.values())))
    saved = json.loads((tmp_path / "caption.json").read_text())
    assert sorted(saved["predictions"]) == sorted(f"img{i}" for i in range(10))
    assert len(list((tmp_path / "shards").iterdir())) == 3


def test_resume_skips_finished_shards_and_reproduces(pipe, tmp_path, monkeypatch):
    ev = get_evaluator("caption", caption_examples(8), batch_size=2, shard_size=4, steps=3)
    ev.run(pipe, tmp_path)
    first = json.loads((tmp_path / "caption.json").read_text())
    (tmp_path / "shards" / "caption-00001.json").unlink()  # as if preempted mid-run
    calls = []
    real = Evaluator._predict_shard
    monkeypatch.setattr(
        Evaluator, "_predict_shard", lambda self, p, shard: calls.append(len(shard)) or real(self, p, shard)
    )
    ev.run(pipe, tmp_path)
    assert calls == [4], "finished shards were recomputed"
    assert json.loads((tmp_path / "caption.json").read_text()) == first


def test_processes_split_shards_and_only_process_zero_scores(pipe, tmp_path):
    ev = get_evaluator("caption", caption_examples(8), batch_size=2, shard_size=2, steps=2)
    assert ev.run(pipe, tmp_path, process_index=1, process_count=2) == {}
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "caption-00001.json", "caption-00003.json"]
    with pytest.raises(RuntimeError, match="missing"):
        ev.run(pipe, tmp_path / "other", process_index=0, process_count=2)
    assert ev.run(pipe, tmp_path, process_index=0, process_count=2)


def test_same_predictions_on_one_and_eight_devices(pipe, tmp_path):
    """Per-example seeds + padding: an 8-device mesh (batch 8) equals one device (batch 2)."""
    ev = get_evaluator("caption", caption_examples(), batch_size=2, shard_size=4, steps=3)
    ev.run(pipe, tmp_path / "one")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "tests.eval_runner", str(tmp_path / "eight"), "8"],
                   check=True, cwd=ROOT, env=env, timeout=300)
    one = json.loads((tmp_path / "one" / "caption.json").read_text())["predictions"]
    eight = json.loads((tmp_path / "eight" / "caption.json").read_text())["predictions"]
    assert one == eight


def test_vqa_scoring_and_bad_config(pipe, tmp_path):
    rng = np.random.default_rng(1)
    examples = [dict(id=i, image=rng.integers(0, 256, (16, 16, 3), np.uint8),
                     question="a red circle", answers=["red"] * 10) for i in range(4)]
    ev = get_evaluator("vqa", examples, batch_size=2, shard_size=2, steps=2)
    assert 0.0 <= ev.run(pipe, tmp_path)["vqa_accuracy"] <= 1.0
    assert ev.score({str(i): "Red" for i in range(4)}, examples) == {"vqa_accuracy": 1.0}
    with pytest.raises(ValueError, match="unknown evaluation task"):
        get_evaluator("fid", examples)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        get_evaluator("vqa", examples, batch_size=3, shard_size=4)
    with pytest.raises(ValueError, match="not unique"):
        get_evaluator("vqa", examples + examples[:1])
    assert example_seeds(["a", "b"], 0) == example_seeds(["a", "b"], 0) != example_seeds(["a", "b"], 1)


def test_vqa_accuracy_per_answer_and_question_type():
    """With VQAv2's type fields the score breaks down by type (official-style), each type the
    mean of its questions' accuracies; examples without types report the overall only."""
    from muddit_jax.eval.tasks import metric_slug

    kinds = [("yes/no", "is there"), ("yes/no", "is there"), ("number", "how many"),
             ("other", "what color is")]
    examples = [dict(id=i, question="q", answers=[a] * 10, answer_type=at, question_type=qt)
                for i, ((at, qt), a) in enumerate(zip(kinds, ["yes", "no", "2", "red"]))]
    preds = {"0": "yes", "1": "yes", "2": "two", "3": "blue"}
    ev = get_evaluator("vqa", examples, batch_size=1, shard_size=1)
    assert ev.score(preds, examples) == {
        "vqa_accuracy": 0.5, "answer_type/yes_no": 0.5, "answer_type/number": 1.0,
        "answer_type/other": 0.0, "question_type/is_there": 0.5, "question_type/how_many": 1.0,
        "question_type/what_color_is": 0.0}
    plain = [{k: v for k, v in e.items() if "type" not in k} for e in examples]
    assert ev.score(preds, plain) == {"vqa_accuracy": 0.5}
    assert metric_slug(" what is the ") == "what_is_the"


def test_rerun_with_other_settings_recomputes_instead_of_reusing(pipe, tmp_path, monkeypatch):
    """Shards remember what they were predicted under: other steps, seed, options or examples
    never reuse stale predictions (same settings do, see the resume test)."""
    examples = caption_examples(4)
    get_evaluator("caption", examples, batch_size=2, shard_size=4, steps=2).run(pipe, tmp_path)
    calls = []
    real = Evaluator._predict_shard
    monkeypatch.setattr(
        Evaluator, "_predict_shard", lambda self, p, shard: calls.append(len(shard)) or real(self, p, shard)
    )
    for changed in (dict(steps=3), dict(steps=2, seed=1), dict(steps=2, guidance_scale=2.0)):
        ev = get_evaluator("caption", examples, batch_size=2, shard_size=4, **changed)
        ev.run(pipe, tmp_path)
        saved = json.loads((tmp_path / "shards" / "caption-00000.json").read_text())
        assert saved["settings"] == ev.settings(examples)
    get_evaluator("caption", examples[:2], batch_size=2, shard_size=4, steps=2).run(pipe, tmp_path)
    assert calls == [4, 4, 4, 2]
    ev = get_evaluator("caption", examples[:2], batch_size=2, shard_size=4, steps=2)
    ev.run(pipe, tmp_path)  # unchanged: reused
    assert calls == [4, 4, 4, 2]
    two = tmp_path / "two"
    get_evaluator("caption", examples, batch_size=2, shard_size=2, steps=2).run(pipe, two)
    with pytest.raises(RuntimeError, match="other evaluation settings"):  # shard 1: process 1's
        get_evaluator("caption", examples, batch_size=2, shard_size=2, steps=5).run(
            pipe, two, process_index=0, process_count=2)
