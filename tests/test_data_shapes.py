"""The embedded ``shapes`` dataset: reproducible bytes, pixels / captions / VQA agree with the
object ground truth, the compositional split holds out its (colour, shape) pairs."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from muddit_jax.data import registry, shapes
from muddit_jax.data.pipeline import DataConfig

TINY = dict(num_train=12, num_validation=4, num_test=4)


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_byte_identical_across_processes(tmp_path):
    registry.prepare("shapes", tmp_path / "a", resolution=32, **TINY)
    code = ("import sys; from muddit_jax.data import registry; "
            f"registry.prepare('shapes', sys.argv[1], resolution=32, **{TINY!r})")
    env = dict(os.environ, PYTHONHASHSEED="12345")  # proto map order follows the hash seed
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], env=env, check=True,
                   capture_output=True, timeout=120)
    a, b = _file_hashes(tmp_path / "a"), _file_hashes(tmp_path / "b")
    assert any(".array_record-" in k for k in a) and "dataset_info.json" in "".join(a)
    assert a == b


def test_generate_is_pure_function_of_seed_split_index():
    cfg = shapes.ShapesConfig(resolution=32)
    one, two = shapes.generate(cfg, "train", 7), shapes.generate(cfg, "train", 7)
    assert np.array_equal(one.image, two.image) and one.captions == two.captions
    assert one.qa == two.qa and one.scene == two.scene
    other = shapes.generate(cfg, "validation", 7)
    assert not np.array_equal(one.image, other.image)
    reseeded = shapes.generate(shapes.ShapesConfig(resolution=32, seed=1), "train", 7)
    assert not np.array_equal(one.image, reseeded.image)


def test_stored_images_decode_to_the_generated_pixels(tmp_path):
    builder = registry.prepare("shapes", tmp_path, resolution=32, **TINY)
    source = builder.as_data_source("test")
    assert len(source) == 4
    cfg = builder.shapes
    for record in source:
        split, index = record["image_id"].decode().split("/")
        pixels = np.asarray(Image.open(io.BytesIO(record["image"])))
        example = shapes.generate(cfg, split, int(index))
        assert np.array_equal(pixels, example.image)
        assert [c.decode() for c in record["captions"]] == list(example.captions)
        boxes = [tuple(b) for b in record["objects"]["bbox"]]
        assert boxes == [o.bbox for o in example.scene.objects]
        assert all(len(a) == 10 for a in record["vqa"]["answers"])


@pytest.mark.parametrize("resolution", [32, 64, 256])
def test_pixels_agree_with_objects(resolution):
    cfg = shapes.ShapesConfig(resolution=resolution)
    margin, gap = shapes.margins(resolution)
    palette = np.array(list(shapes.COLORS.values()))
    n = 12 if resolution == 256 else 40
    for split, index in itertools.product(shapes.SPLITS, range(n)):
        ex = shapes.generate(cfg, split, index)
        img = ex.image.astype(int)
        outside = np.ones(img.shape[:2], bool)
        assert 1 <= len(ex.scene.objects) <= 4
        for obj in ex.scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert margin <= x0 < x1 <= resolution - margin
            assert margin <= y0 < y1 <= resolution - margin
            crop = img[y0:y1, x0:x1]
            is_obj = np.all(crop == shapes.COLORS[obj.color], axis=-1)
            fill = {"square": 0.99, "circle": 0.7, "triangle": 0.4}[obj.shape]
            assert is_obj.mean() >= fill, (split, index, obj)
            # everything else in the box is background: far from every palette colour
            rest = crop[~is_obj]
            if len(rest):
                d = np.linalg.norm(rest[:, None, :] - palette[None], axis=-1)
                assert d.min() > 60
            outside[y0:y1, x0:x1] = False
        d = np.linalg.norm(img[outside][:, None, :] - palette[None], axis=-1)
        assert d.min() > 60, (split, index)
        for a, b in itertools.combinations(ex.scene.objects, 2):
            assert shapes._separated(a.bbox, b.bbox, gap)


def _check_relation(a: shapes.ShapeObject, rel: str, b: shapes.ShapeObject) -> None:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    assert {"to the left of": ax1 <= bx0, "to the right of": bx1 <= ax0,
            "above": ay1 <= by0, "below": by1 <= ay0}[rel], (a, rel, b)


def test_captions_and_vqa_agree_with_objects():
    cfg = shapes.ShapesConfig(resolution=64)
    rel_pattern = "|".join(shapes.RELATION_WORD)
    seen_types, relations_checked = set(), 0
    for split, index in itertools.product(shapes.SPLITS, range(60)):
        ex = shapes.generate(cfg, split, index)
        objs = {o.name: o for o in ex.scene.objects}
        assert len(objs) == len(ex.scene.objects)  # (colour, shape) unique per image
        assert len(ex.captions) == 3
        for caption in ex.captions:
            for o in ex.scene.objects:
                assert o.phrase in caption, (caption, o)
            for a, rel, b in re.findall(
                    rf"(\w+ \w+) ({rel_pattern}) (?:a \w+|the) (\w+ \w+)", caption):
                _check_relation(objs[a], rel, objs[b])
                relations_checked += 1
            assert caption.count(" of ") + caption.count("above") + caption.count("below") >= \
                len(objs) - 1
        for qa in ex.qa:
            seen_types.add(qa.question_type)
            q, ans = qa.question, qa.answer
            if m := re.fullmatch(r"what color is the (?:(small|large) )?(\w+)\?", q):
                hits = [o for o in objs.values() if o.shape == m[2] and m[1] in (None, o.size)]
                assert [o.color for o in hits] == [ans]
            elif m := re.fullmatch(r"what shape is the (\w+) object\?", q):
                assert [o.shape for o in objs.values() if o.color == m[1]] == [ans]
            elif m := re.fullmatch(r"how many (\w+?)s are there\?", q):
                want = sum(m[1] in ("object", o.shape) for o in objs.values())
                assert ans == str(want)
            elif m := re.fullmatch(r"how many (\w+) objects are there\?", q):
                assert ans == str(sum(o.color == m[1] for o in objs.values()))
            elif m := re.fullmatch(r"where is the (\w+ \w+) relative to the (\w+ \w+)\?", q):
                assert ans == shapes.RELATION_WORD[shapes.relation(objs[m[1]], objs[m[2]])]
                rel = {v: k for k, v in shapes.RELATION_WORD.items()}[ans]
                _check_relation(objs[m[1]], rel, objs[m[2]])
            elif m := re.fullmatch(rf"is the (\w+ \w+) ({rel_pattern}) the (\w+ \w+)\?", q):
                truth = shapes.relation(objs[m[1]], objs[m[3]]) == m[2]
                assert ans == ("yes" if truth else "no")
            elif m := re.fullmatch(r"is there an? (\w+ \w+)\?", q):
                assert ans == ("yes" if m[1] in objs else "no")
            else:
                raise AssertionError(f"unparsed question {q!r}")
    assert relations_checked > 300
    assert seen_types == {"color", "shape", "count", "position", "relation", "exists"}


def test_held_out_pairs_only_in_test_split():
    cfg = shapes.ShapesConfig(resolution=32)
    held = [f"{c} {s}" for c, s in shapes.HELD_OUT]
    for split in shapes.SPLITS:
        for index in range(150):
            ex = shapes.generate(cfg, split, index)
            pairs = {(o.color, o.shape) for o in ex.scene.objects}
            texts = " ".join(ex.captions + tuple(q.question for q in ex.qa))
            if split == "test":
                assert pairs & set(shapes.HELD_OUT)
            else:
                assert not pairs & set(shapes.HELD_OUT)
                assert not any(h in texts for h in held), texts


def test_palette_is_detector_friendly():
    colors = np.array(list(shapes.COLORS.values()), float)
    backgrounds = np.array(list(shapes.BACKGROUNDS.values()), float)
    assert len(colors) >= 6 and len(shapes.SHAPES) >= 3 and len(shapes.SIZES) >= 2
    pair = np.linalg.norm(colors[:, None] - colors[None], axis=-1)
    assert pair[~np.eye(len(colors), dtype=bool)].min() >= 100
    to_bg = np.linalg.norm(colors[:, None] - backgrounds[None], axis=-1)
    assert to_bg.min() - shapes.TEXTURE_AMPLITUDE * np.sqrt(3) >= 100


@pytest.mark.parametrize("resolution", [16, 300])
def test_bad_resolution_fails_fast(tmp_path, resolution):
    with pytest.raises(ValueError, match="resolution"):
        registry.get_builder("shapes", tmp_path, resolution=resolution)


def test_bad_pipeline_resolution_names_the_field():
    with pytest.raises(ValueError, match="resolution=30"):
        DataConfig(resolution=30)


def test_textures_option_keeps_the_objects_and_flattens_the_background():
    full = shapes.ShapesConfig(resolution=32)
    plain = shapes.ShapesConfig(resolution=32, textures=["plain"])  # a list (from JSON) is fine
    assert plain.textures == ("plain",) and plain.name == full.name + "_plain"
    for i in range(20):
        a, b = shapes.generate(full, "train", i), shapes.generate(plain, "train", i)
        assert b.scene.texture == "plain" and a.scene.objects == b.scene.objects
        background = ~np.any([shapes.object_mask(o, 32) for o in b.scene.objects], axis=0)
        assert np.all(b.image[background] == shapes.BACKGROUNDS[b.scene.background])
    textures = {shapes.generate(full, "train", i).scene.texture for i in range(30)}
    assert textures == set(shapes.TEXTURES)  # the default draws all three


def test_object_scale_grows_every_object_and_keeps_the_scene_rules():
    base = shapes.ShapesConfig(resolution=32, max_objects=3)
    big = shapes.ShapesConfig(resolution=32, max_objects=3, object_scale=1.5)
    assert big.name == base.name + "_scale1.5"
    margin, gap = shapes.margins(32)
    sides = set()
    for i in range(60):
        scene = shapes.generate(big, "train", i).scene
        assert 1 <= len(scene.objects) <= 3
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert x1 - x0 == y1 - y0 == shapes.side(obj.size, 32, 1.5)
            assert margin <= min(x0, y0) and max(x1, y1) <= 32 - margin
            sides.add(x1 - x0)
        for a, b in itertools.combinations(scene.objects, 2):
            assert shapes._separated(a.bbox, b.bbox, gap)
    assert sides == {10, 15}  # 6 and 10 px at scale 1


def test_position_step_puts_every_corner_on_the_grid():
    """``position_step=4`` places bboxes on the MM-DiT's 4-px token grid; every other scene rule
    holds, the build gets its own name (step 1 keeps the old one), and free placement uses
    every offset."""
    opts = dict(resolution=32, max_objects=3, object_scale=1.5)
    free, snapped = shapes.ShapesConfig(**opts), shapes.ShapesConfig(**opts, position_step=4)
    assert snapped.name == free.name + "_step4"
    assert shapes.ShapesConfig(**opts, position_step=1).name == free.name
    margin, gap = shapes.margins(32)
    offsets = set()
    for i in range(60):
        scene = shapes.generate(snapped, "test", i).scene
        assert 1 <= len(scene.objects) <= 3
        assert (scene.objects[0].color, scene.objects[0].shape) in shapes.HELD_OUT
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert x0 % 4 == 0 and y0 % 4 == 0
            assert margin <= min(x0, y0) and max(x1, y1) <= 32 - margin
        for a, b in itertools.combinations(scene.objects, 2):
            assert shapes._separated(a.bbox, b.bbox, gap)
        offsets |= {o.bbox[0] % 4 for o in shapes.generate(free, "test", i).scene.objects}
    assert offsets == {0, 1, 2, 3}


@pytest.mark.parametrize("step", [0, -2, 2.0, 20])
def test_bad_position_step_names_the_field(step):
    with pytest.raises(ValueError, match="position_step"):
        shapes.ShapesConfig(resolution=32, object_scale=1.5, position_step=step)


@pytest.mark.parametrize("scale", [0, -1.0, 0.3, 3.5])
def test_bad_object_scale_names_the_field(scale):
    with pytest.raises(ValueError, match="object_scale"):
        shapes.ShapesConfig(resolution=32, object_scale=scale)


def test_bad_textures_name_the_field():
    with pytest.raises(ValueError, match="textures"):
        shapes.ShapesConfig(textures=("stripes",))
    with pytest.raises(ValueError, match="textures"):
        shapes.ShapesConfig(textures=())
