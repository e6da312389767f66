"""The LLaVA-format instruction reader on a tiny fake tree (multi-turn, ``<image>`` stripped, bad
records skipped and counted), through the grain pipeline, and the shapes -> LLaVA round trip."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from muddit_jax.data import llava, registry, text
from muddit_jax.data.pipeline import DataConfig, make_iterator
from muddit_jax.data.schema import SkippedExamplesWarning, as_str
from muddit_jax.data.shapes import ShapesConfig, generate
from muddit_jax.data.shapes_llava import write_shapes_llava


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


RECORDS = [
    {"id": "a", "image": "coco/a.png", "conversations": [
        turn("human", "<image>\nWhat is shown?"), turn("gpt", "A cat."),
        turn("human", "What colour is it?"), turn("gpt", "Black."),
        turn("human", "Is it big?"), turn("gpt", "No.")]},
    {"id": "b", "image": "b.png", "conversations": [
        turn("human", "Describe it.\n<image>"), turn("gpt", "Noise.")]},
    {"id": "missing", "image": "nope.png", "conversations": [
        turn("human", "<image>\nq"), turn("gpt", "a")]},
    {"id": "no_gpt", "image": "b.png", "conversations": [turn("human", "<image>\nq")]},
    {"id": "text_only", "conversations": [turn("human", "hi"), turn("gpt", "hello")]},
    {"id": "broken", "image": "b.png", "conversations": "not a list"},
    {"id": "a", "image": "b.png", "conversations": [turn("human", "<image> again?"),
                                                    turn("gpt", "yes")]},
]


def fake_tree(root: Path) -> Path:
    for name, seed in (("coco/a.png", 0), ("b.png", 1)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png(seed))
    (root / "llava_instruct.json").write_text(json.dumps(RECORDS))
    return root


def build(data_dir: Path, **options):
    with pytest.warns(SkippedExamplesWarning, match="skipped") as warned:
        builder = registry.prepare("llava", data_dir, **options)
    return builder, " ".join(str(w.message) for w in warned)


def qa(record) -> list[tuple[str, str]]:
    vqa = record["vqa"]
    return [(as_str(q), as_str(a)) for q, a in zip(vqa["question"], vqa["multiple_choice_answer"])]


def test_strip_and_pairs():
    assert llava.strip_image_token("<image>\nWhat is it?\n") == "What is it?"
    assert llava.strip_image_token("Look:\n<image>\nnow") == "Look: now"
    conv = [turn("human", "q1"), turn("human", "<image>q2"), turn("gpt", "a2"),
            turn("gpt", "extra"), turn("human", "q3"), turn("gpt", "a3"), turn("human", "q4")]
    assert llava.qa_pairs(conv) == [("q2", "a2"), ("q3", "a3")]
    assert llava.qa_pairs(conv, "prefix") == [("q2", "a2"), ("q2 a2 q3", "a3")]
    with pytest.raises(TypeError):
        llava.qa_pairs([{"from": "human"}])


@pytest.mark.parametrize("multi_turn", ["flatten", "prefix"])
def test_reader_parses_the_public_format(tmp_path, multi_turn):
    src = fake_tree(tmp_path / "src")
    builder, warned = build(tmp_path / "data", source_dir=src, multi_turn=multi_turn)
    assert list(builder.info.splits) == ["train"]
    recs = {as_str(r["image_id"]): r for r in builder.as_data_source("train")}
    assert sorted(recs) == ["a", "a#2", "b"]
    if multi_turn == "flatten":
        assert qa(recs["a"]) == [("What is shown?", "A cat."), ("What colour is it?", "Black."),
                                 ("Is it big?", "No.")]
    else:
        assert qa(recs["a"]) == [("What is shown?", "A cat."),
                                 ("What is shown? A cat. What colour is it?", "Black."),
                                 ("What is shown? A cat. What colour is it? Black. Is it big?", "No.")]
    assert qa(recs["b"]) == [("Describe it.", "Noise.")]
    assert qa(recs["a#2"]) == [("again?", "yes")]
    assert recs["a"]["image"] == png(0) and recs["a#2"]["image"] == png(1)
    assert [as_str(a) for a in recs["a"]["vqa"]["answers"][1]] == ["Black."] * 10
    ids = [int(q) for r in (recs["a"], recs["b"], recs["a#2"]) for q in r["vqa"]["question_id"]]
    assert len(set(ids)) == 5 and [int(q) for q in recs["a"]["vqa"]["question_id"]] == [0, 1, 2]
    assert builder.info.metadata["skipped"] == {"train": {
        "missing_image": 1, "no_gpt_turn": 1, "no_image": 1, "bad_record": 1}}
    assert "skipped 4 example(s)" in warned


def test_split_files_and_annotation_option(tmp_path):
    src = fake_tree(tmp_path / "src")
    (src / "extra.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="annotation"):
        registry.prepare("llava", tmp_path / "d0", source_dir=src)
    builder, _ = build(tmp_path / "d1", source_dir=src, annotation="llava_instruct.json")
    assert len(builder.as_data_source("train")) == 3
    (src / "train.json").write_text(json.dumps(RECORDS[:2]))
    (src / "test.json").write_text(json.dumps(RECORDS[1:2]))
    builder = registry.prepare("llava", tmp_path / "d2", source_dir=src)
    assert sorted(builder.info.splits) == ["test", "train"]
    assert len(builder.as_data_source("test")) == 1
    with pytest.raises(ValueError, match="multi_turn"):
        registry.get_builder("llava", tmp_path, source_dir=src, multi_turn="all")


def test_shapes_llava_round_trip_through_the_pipeline(tmp_path):
    config = ShapesConfig(resolution=32, num_train=6, num_validation=2, num_test=3)
    counts = write_shapes_llava(tmp_path / "src", config, splits=("train", "test"))
    assert counts == {"train": 6, "test": 3}
    assert json.loads((tmp_path / "src" / "test.json").read_text())[0]["conversations"][0][
        "value"].startswith("<image>\n")
    builder = registry.prepare("llava", tmp_path / "data", source_dir=tmp_path / "src")
    for split, n in counts.items():
        recs = {as_str(r["image_id"]): r for r in builder.as_data_source(split)}
        assert sorted(recs) == [f"{split}/{index:08d}" for index in range(n)]
        for index in range(n):
            rec, ex = recs[f"{split}/{index:08d}"], generate(config, split, index)
            assert qa(rec) == [(q.question, q.answer) for q in ex.qa]
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rec["image"]))),
                                          ex.image)
    source = builder.as_data_source("train")
    tok = text.train_tokenizer(text.dataset_texts([source]), 64, tmp_path / "tok.model")
    cfg = DataConfig(dataset="llava", data_dir=str(tmp_path / "data"),
                     options={"source_dir": str(tmp_path / "src")}, resolution=32,
                     text_length=64, global_batch_size=3, task="vqa", num_epochs=1)
    with make_iterator(cfg, tok, process_index=0, process_count=1) as it:
        batches = list(it)
    assert len(batches) == 2
    for batch in batches:
        assert batch["images"].shape == (3, 32, 32, 3) and batch["text_maskable"].any(-1).all()
        for row in range(3):
            rec = source[int(batch["index"][row])]
            ids, maskable = batch["text_ids"][row], batch["text_maskable"][row]
            start, end = int(np.argmax(maskable)), int(batch["text_valid"][row].sum())
            pair = (tok.decode(ids[None, :start])[0], tok.decode(ids[None, start:end])[0])
            assert pair in qa(rec)
    with pytest.raises(ValueError, match="shapes splits"):
        write_shapes_llava(tmp_path / "x", config, splits=("dev",))
