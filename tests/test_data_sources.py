"""COCO captions, VQAv2 and user-folder builders on tiny fake trees in the official formats:
they load, bad files are skipped and counted, missing folders fail fast."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from muddit_jax.data import registry
from muddit_jax.data.schema import SkippedExamplesWarning

CORRUPT = b"\xff\xd8\xff\xe0 this is not really a jpeg"


def jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write(path: Path, data: bytes | str | dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, dict):
        data = json.dumps(data)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def build(name: str, data_dir: Path, **options):
    with pytest.warns(SkippedExamplesWarning) as warned:
        builder = registry.prepare(name, data_dir, **options)
    return builder, " ".join(str(w.message) for w in warned)


def records(builder, split: str) -> dict[str, dict]:
    return {r["image_id"].decode(): r for r in builder.as_data_source(split)}


def captions_of(record: dict) -> list[str]:
    return [c.decode() for c in record["captions"]]


def coco_file(image_id: int, subset: str) -> str:
    return f"COCO_{subset}_{image_id:012d}.jpg"


@pytest.mark.parametrize("year", ["2014", "2017"])
def test_coco_official_layout(tmp_path, year):
    src = tmp_path / "coco"
    caps = {1: [f"caption {k} of one" for k in range(5)], 2: ["corrupt"], 3: ["missing"]}
    write(src / f"train{year}" / coco_file(1, f"train{year}"), jpeg(1))
    write(src / f"train{year}" / coco_file(2, f"train{year}"), CORRUPT)
    write(src / "annotations" / f"captions_train{year}.json", {
        "images": [{"id": i, "file_name": coco_file(i, f"train{year}"), "width": 40, "height": 30}
                   for i in (3, 1, 2)],
        "annotations": [{"id": 10 * i + k, "image_id": i, "caption": c}
                        for i, cs in caps.items() for k, c in enumerate(cs)],
    })
    write(src / f"val{year}" / coco_file(7, f"val{year}"), jpeg(7))
    write(src / f"val{year}" / coco_file(8, f"val{year}"), jpeg(8))
    write(src / "annotations" / f"captions_val{year}.json", {
        "images": [{"id": i, "file_name": coco_file(i, f"val{year}")} for i in (7, 8)],
        "annotations": [{"id": 1, "image_id": 7, "caption": "a val caption"},
                        {"id": 2, "image_id": 8, "caption": "   "}],
    })
    builder, warned = build("coco_captions", tmp_path / "data", source_dir=src, config=year)
    train, val = records(builder, "train"), records(builder, "validation")
    assert list(train) == ["1"] and captions_of(train["1"]) == caps[1]
    assert train["1"]["image"] == (src / f"train{year}" / coco_file(1, f"train{year}")).read_bytes()
    assert list(val) == ["7"] and captions_of(val["7"]) == ["a val caption"]
    assert builder.info.metadata["skipped"] == {
        "train": {"missing_image": 1, "undecodable_image": 1},
        "validation": {"empty_caption": 1},
    }
    assert "skipped 2 example(s)" in warned


def test_coco_karpathy_splits(tmp_path):
    src = tmp_path / "coco"
    images = []
    for cocoid, split in enumerate(["train", "restval", "val", "test", "test"], start=100):
        sub = "val2014" if split != "train" else "train2014"
        write(src / sub / coco_file(cocoid, sub), jpeg(cocoid))
        images.append({"filepath": sub, "filename": coco_file(cocoid, sub), "cocoid": cocoid,
                       "split": split, "sentences": [{"raw": f"{split} {cocoid} {k}",
                                                      "tokens": []} for k in range(5)]})
    write(src / "annotations" / "dataset_coco.json", {"images": images, "dataset": "coco"})
    builder = registry.prepare("coco_captions", tmp_path / "data", source_dir=src,
                               config="karpathy")
    assert sorted(records(builder, "train")) == ["100", "101"]
    assert sorted(records(builder, "validation")) == ["102"]
    test = records(builder, "test")
    assert sorted(test) == ["103", "104"] and len(test["103"]["captions"]) == 5


def test_vqav2_keeps_ten_answers(tmp_path):
    src = tmp_path / "vqa"
    write(src / "train2014" / coco_file(5, "train2014"), jpeg(5))
    write(src / "train2014" / coco_file(6, "train2014"), CORRUPT)
    questions = [{"image_id": 5, "question": "what color is it?", "question_id": 51},
                 {"image_id": 5, "question": "is it big?", "question_id": 50},
                 {"image_id": 6, "question": "how many?", "question_id": 60}]
    write(src / "v2_OpenEnded_mscoco_train2014_questions.json",
          {"questions": questions, "data_subtype": "train2014"})
    human = {51: ["red"] * 7 + ["dark red"] * 3, 50: ["yes"] * 9 + ["no"], 60: ["2"] * 10}
    write(src / "annotations" / "v2_mscoco_train2014_annotations.json", {"annotations": [
        {"question_id": q, "image_id": q // 10, "question_type": "what color",
         "answer_type": "other", "multiple_choice_answer": a[0],
         "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1}
                     for k, x in enumerate(a)]} for q, a in human.items()]})
    builder, warned = build("vqav2", tmp_path / "data", source_dir=src)
    assert list(builder.info.splits) == ["train"]
    (rec,) = builder.as_data_source("train")
    vqa = rec["vqa"]
    assert rec["image_id"] == b"5" and captions_of(rec) == []
    assert [int(q) for q in vqa["question_id"]] == [50, 51]
    assert [q.decode() for q in vqa["question"]] == ["is it big?", "what color is it?"]
    assert [[a.decode() for a in row] for row in vqa["answers"]] == [human[50], human[51]]
    assert [a.decode() for a in vqa["multiple_choice_answer"]] == ["yes", "red"]
    assert builder.info.metadata["skipped"] == {"train": {"undecodable_image": 1}}


def _folder_tree(root: Path, layout: str) -> None:
    """Four examples: two good, one empty caption, one corrupt image."""
    items = [("a/one.jpg", jpeg(1), "first caption"), ("two.png", jpeg(2), "second caption"),
             ("three.jpg", jpeg(3), ""), ("four.jpg", CORRUPT, "corrupt image")]
    if layout == "sidecar":
        for name, data, caption in items:
            write(root / name, data)
            write((root / name).with_suffix(".txt"), caption)
    elif layout == "jsonl":
        lines = []
        for name, data, caption in items:
            write(root / "img" / name, data)
            lines.append(json.dumps({"file_name": f"img/{name}", "text": caption}))
        write(root / "metadata.jsonl", "\n".join(lines + ["{not json"]) + "\n")
    else:
        for shard, part in enumerate([items[:2], items[2:]]):
            root.mkdir(parents=True, exist_ok=True)
            with tarfile.open(root / f"shard-{shard:04d}.tar", "w") as tar:
                for name, data, caption in part:
                    stem, ext = name.rsplit(".", 1)
                    meta = json.dumps({"caption": caption}).encode()
                    for member, payload in ((f"{stem}.{ext}", data), (f"{stem}.json", meta)):
                        info = tarfile.TarInfo(member)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("layout", ["sidecar", "jsonl", "webdataset"])
def test_image_folder_layouts(tmp_path, layout):
    src = tmp_path / "user"
    _folder_tree(src, layout)
    builder, _ = build("image_folder", tmp_path / "data", source_dir=src, config=layout)
    got = {k.split("/")[-1]: captions_of(r) for k, r in records(builder, "train").items()}
    keys = {"sidecar": ["one.jpg", "two.png"], "jsonl": ["one.jpg", "two.png"],
            "webdataset": ["one", "two"]}[layout]
    assert sorted(got) == keys
    assert sorted(got.values()) == [["first caption"], ["second caption"]]
    skipped = builder.info.metadata["skipped"]["train"]
    want = {"empty_caption": 1, "undecodable_image": 1}
    if layout == "jsonl":
        want["bad_manifest_line"] = 1
    assert skipped == want


def test_image_folder_split_subfolders(tmp_path):
    src = tmp_path / "user"
    for split, seed in (("train", 1), ("validation", 2)):
        write(src / split / "x.jpg", jpeg(seed))
        write(src / split / "x.txt", f"{split} caption")
    builder = registry.prepare("image_folder", tmp_path / "data", source_dir=src)
    assert sorted(builder.info.splits) == ["train", "validation"]
    assert captions_of(builder.as_data_source("validation")[0]) == ["validation caption"]


@pytest.mark.parametrize("name,options", [
    ("coco_captions", {"config": "2014"}),
    ("vqav2", {}),
    ("image_folder", {}),
])
def test_missing_source_dir_fails_fast(tmp_path, name, options):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        registry.prepare(name, tmp_path / "data", source_dir=missing, **options)


def test_unbuilt_dataset_fails_fast_without_build(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        registry.data_source("image_folder", "train", tmp_path, build=False, source_dir=tmp_path)


def test_coco_without_annotations_names_what_is_missing(tmp_path):
    (tmp_path / "coco").mkdir()
    with pytest.raises(FileNotFoundError, match="captions_"):
        registry.prepare("coco_captions", tmp_path / "data", source_dir=tmp_path / "coco")
