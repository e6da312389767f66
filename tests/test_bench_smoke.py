"""Smoke runs of every benchmark (``--smoke``: tiny sizes, T=2): they run and write the JSON
fields the tables and BENCHMARKS.md rely on. Speed is not asserted here."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _run(module, tmp_path, *extra: str) -> dict:
    path = tmp_path / "out.json"
    module.main(["--smoke", "--json", str(path), *extra])
    out = json.loads(path.read_text())
    assert out["smoke"] is True and out["machine"]["cores"] >= 1
    return out


def _rows(out: dict, index: int = 0) -> list[dict]:
    return list(out["tables"].values())[index]


def test_train_step(tmp_path):
    from bench import train_step

    out = _run(train_step, tmp_path)
    rows = _rows(out)
    assert {r["impl"].split()[0] for r in rows} == {"torch", "jax"}
    for r in rows:
        assert r["best_s"] > 0 and r["examples_s"] > 0 and r["tokens_s"] > 0
    jax_row = next(r for r in rows if r["impl"] == "jax fp32")
    assert jax_row["compiles"] == 1 and jax_row["vs_torch_fp32"] > 0
    assert set(out["speedup_fp32"]) == {"tiny"}


def test_sampler(tmp_path):
    from bench import sampler

    out = _run(sampler, tmp_path)
    rows = _rows(out)
    assert {r["task"] for r in rows} == {"t2i", "i2t"}
    for r in rows:
        assert r["T"] == 2 and min(r["scan_s"], r["loop_s"], r["torch_s"], r["forward_s"]) > 0
        assert r["loop_equals_scan"] is True  # the Python-loop baseline decodes the same tokens
    assert out["i2t_text_encoder_in_compiled_loop"] == {"tiny": True}


def test_codes_step(tmp_path):
    from bench import codes_step

    out = _run(codes_step, tmp_path, "--t2i-stop-gradient", "mmdit/transformer_blocks_.*")
    pixels, codes, apart, ratio, apart_ratio = _rows(out)
    assert [r["step on"] for r in (pixels, codes, apart, ratio, apart_ratio)] == [
        "pixels", "codes", "codes, T2I apart", "pixels / codes", "T2I apart / codes"]
    assert min(pixels["median ms"], codes["median ms"], apart["median ms"]) > 0
    assert ratio["median ms"] == out["speedup"] > 0
    product = apart_ratio["median ms"] * codes["median ms"]
    assert abs(product - apart["median ms"]) <= 1e-6 * apart["median ms"]
    keys = out["batch_keys"]
    assert "images" in keys["pixels"] and "image_ids" not in keys["pixels"]
    assert "image_ids" in keys["codes"] and "images" not in keys["codes"]


def test_model_width(tmp_path):
    from bench import model_width

    out = _run(model_width, tmp_path)
    rows = _rows(out)
    assert [r["width"] for r in rows] == [16, 32] and out["default_width"] == 32
    assert rows[0]["trainable params"] < rows[1]["trainable params"]
    assert rows[1]["steps per default step"] == 1.0 and rows[0]["steps per default step"] > 0


def test_compile_memory(tmp_path):
    from bench import compile_memory

    out = _run(compile_memory, tmp_path)
    (sweep,) = _rows(out, 0)
    assert sweep["unrolled_compile_s"] > 0 and sweep["scan_compile_s"] > 0
    memory = _rows(out, 1)
    assert [r["remat"] for r in memory] == [False, True]
    assert all(r["temp_GiB"] > 0 and r["arguments_GiB"] > 0 for r in memory)


def test_scaling(tmp_path):
    from bench import scaling

    out = _run(scaling, tmp_path)
    (sim,) = _rows(out, 0)
    assert sim["name"] == "fsdp" and sim["per_device_MiB"] > 0 and sim["best_s"] > 0
    (check,) = _rows(out, 2)
    assert 0.8 < check["analytic_over_xla"] < 1.2  # the MFU formula tracks XLA's count


def test_gpu_skips_cleanly_without_gpu(tmp_path):
    import jax

    from bench import gpu

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present; the full benchmark is not a smoke test")
    out = _run(gpu, tmp_path)
    assert out["skipped"] is True and out["reason"].startswith("no GPU: skipped")


@pytest.mark.slow
def test_gpu_code_path_on_cpu(tmp_path):
    from bench import gpu

    out = _run(gpu, tmp_path, "--allow-cpu")
    assert out["skipped"] is False and _rows(out, 0)[0]["step_s"] > 0
    assert _rows(out, 1)[0]["latency_s"] > 0


def test_run_collects_results(tmp_path):
    from bench import run

    out = run.main(["--smoke", "--only", "gpu", "--out", str(tmp_path / "r"),
                    "--json", str(tmp_path / "all.json")])
    assert [r["benchmark"] for r in _rows(out)] == ["gpu"]
    assert "gpu" in json.loads((tmp_path / "all.json").read_text())["results"]


def test_binding(tmp_path):
    from bench import binding

    rows = _rows(_run(binding, tmp_path))
    assert [r["task"] for r in rows] == ["copy", "image", "bind", "bind", "bind", "bind",
                                         "bind (plain transformer baseline)"]
    assert [r["ratio_floor"] for r in rows] == [1e-3, 1e-3, 1e-3, 0.2, 1e-3, 1e-3, None]
    assert [r["weighting"] for r in rows] == ["muddit"] * 4 + ["count", "count", None]
    assert [r["spatial_rope"] for r in rows] == [True] * 5 + [False, None]
    assert [r["toy"] for r in rows] == ["original"] * 6 + [None]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 5 for r in rows)
    assert [r["chance"] for r in rows] == [1 / 8] + [0.5] * 6


def test_binding_batches_pose_the_three_tasks():
    """The toy's ground truth: ``bind`` answers yes exactly when the asked colour is in the
    image, ``image`` always asks about colour 0, ``copy`` answers with the asked colour's word."""
    import numpy as np

    from bench import binding as b

    rng = np.random.default_rng(0)
    for task in b.TASKS:
        batch = {k: np.asarray(v) for k, v in b.make_batch(task, 3, rng).items()}
        text, image = batch["text_ids"], batch["image_ids"].reshape(b.BATCH, -1)
        asked = text[:, 2] - b.COLOUR_WORD
        assert ((image > 0).sum(1) == 2).all()
        present = (image == asked[:, None] + 1).any(1)
        if task == "copy":
            np.testing.assert_array_equal(text[:, b.ANSWER], b.COPY_WORD + asked)
        else:
            np.testing.assert_array_equal(text[:, b.ANSWER] == b.YES, present)
            assert 0 < present.mean() < 1
        assert (asked == 0).all() == (task == "image")


def test_binding_bridge_batches_keep_the_ground_truth():
    """Each step toward shapes (objects of k x k codes, several ids per colour, answer padding
    as targets) keeps ``bind``'s answer: yes exactly when an object has the asked colour."""
    import numpy as np

    from bench import binding as b

    rng = np.random.default_rng(0)
    toy = b.Toy(objects=3, codes=4, length=12, pad_targets=True)
    batch = {k: np.asarray(v) for k, v in b.make_batch("bind", 10, rng, toy).items()}
    text, image = batch["text_ids"], batch["image_ids"].reshape(b.BATCH, -1)
    asked = text[:, 2] - b.COLOUR_WORD
    colour = np.where(image > 0, (image - 1) // toy.codes, -1)
    assert ((image > 0).sum(1) == 2 * 9).all() and image.max() < toy.codebook
    assert len(np.unique(image[image > 0])) > b.COLOURS  # several ids per colour
    with pytest.raises(ValueError, match="Toy.objects"):
        b.make_batch("bind", 5, rng, toy)
    present = (colour == asked[:, None]).any(1)
    np.testing.assert_array_equal(text[:, b.ANSWER] == b.YES, present)
    assert batch["text_maskable"][:, b.ANSWER:].all() and not batch["text_maskable"][:, :3].any()
    blank = np.asarray(b.blank_answer(batch))
    assert (blank[:, b.ANSWER:] == b.MASK).all() and (blank[:, :3] == text[:, :3]).all()

def test_binding_bridge(tmp_path, monkeypatch):
    """``--bridge`` trains the count / no-spatial-RoPE ``bind`` row once per toy; one toy with
    every step toward shapes at once (one compile) stands in for the nine."""
    from bench import binding

    assert [binding._changed(t) for t, _ in binding.BRIDGE] == [
        "original", "objects=3", "objects=6, downsample=True", "codes=8", "length=32",
        "length=32, pad_targets=True", "length=32, pad_targets=True, separate_pads=True",
        "length=32, pad_targets=True, pad_weight=0.1", "deep=True"]
    assert [scale for _, scale in binding.BRIDGE] == [1, 1, 2, 1, 1, 1, 1, 1, 1]
    every = binding.Toy(objects=2, codes=2, length=12, pad_targets=True, separate_pads=True,
                        pad_weight=0.5, downsample=True, deep=True)
    monkeypatch.setattr(binding, "BRIDGE", ((every, 2),))
    (row,) = _rows(_run(binding, tmp_path, "--bridge", "--grid", "3"))
    assert row["grid"] == 6 and row["toy"] == binding._changed(every)
    assert row["task"] == "bind" and row["weighting"] == "count" and not row["spatial_rope"]
    assert 0.0 <= row["accuracy"] <= 1.0


def test_code_probe(tmp_path):
    from bench import code_probe

    rows = _rows(_run(code_probe, tmp_path, "--config", "configs/shapes_tiny.py:smoke"))
    assert [r["inputs"] for r in rows] == ["scratch", "codebook"]
    assert all(r["steps"] == 3 and 0.0 <= r["held_out_pairs"] <= 1.0 for r in rows)


def test_code_probe_splits_separate_seen_and_held_out_pairs():
    """With one object per image, every ``test`` object is a held-out (colour, shape) pair and
    no ``validation`` object is: the probe's two columns measure exactly that."""
    from muddit_jax.data import shapes

    options = shapes.ShapesConfig(resolution=32, max_objects=1, object_scale=1.5)
    for split, held in (("test", True), ("validation", False)):
        for i in range(64):
            (obj,) = shapes.generate(options, split, i).scene.objects
            assert ((obj.color, obj.shape) in shapes.HELD_OUT) is held


def test_code_probe_linear_probe_fits_and_transfers():
    """The block probe's softmax regression separates linearly separable classes and scores
    held-out points by the learnt direction, not by memory."""
    import numpy as np

    from bench.code_probe import linear_probe

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = np.eye(3)[y] * 4 + rng.normal(0, 0.5, (300, 3))
    x = np.concatenate([x, rng.normal(0, 1, (300, 5))], axis=1)  # + nuisance features
    y2 = rng.integers(0, 3, 100)
    x2 = np.concatenate([np.eye(3)[y2] * 4 + rng.normal(0, 0.5, (100, 3)),
                         rng.normal(0, 1, (100, 5))], axis=1)
    fit, held = linear_probe(x, y, [(x, y), (x2, y2)])
    assert fit > 0.97 and held > 0.95
    assert linear_probe(x, y, [(x2, rng.permutation(y2))])[0] < 0.6


def test_t2i_settings_parse():
    from bench.t2i_settings import parse_setting

    base = {"guidance_scale": 4.0, "steps": 16}
    assert parse_setting("g=none,steps=64", base) == {"guidance_scale": None, "steps": 64}
    assert parse_setting("g=1.5,temp=0:0,sampling=argmax", base) == {
        "guidance_scale": 1.5, "steps": 16, "temperature": (0.0, 0.0), "sampling": "argmax"}
    assert parse_setting("g=4,sched=linear", base)["guidance_schedule"] == "linear"
    assert parse_setting("g=4,plaus=0.1", base)["guidance_plausibility"] == 0.1
    assert parse_setting("", base) == base
    for bad, fragment in [("g", "key=value"), ("cfg=2", "key=value"), ("steps=x", "steps"),
                          ("temp=1", "temp")]:
        with pytest.raises(ValueError, match=fragment):
            parse_setting(bad, base)


def test_image_paths(tmp_path):
    from bench import image_paths

    out = _run(image_paths, tmp_path)
    each, both, ratio = _rows(out)
    assert [r["image input"] for r in (each, both, ratio)] == [
        "each row's path", "both paths on every row", "both / each row's"]
    assert min(each["median ms"], both["median ms"]) > 0 and ratio["median ms"] == out["speedup"]
    # the same loss and gradient either way (float32 reduction order aside)
    assert out["loss_diff"] < 1e-5 and out["max_grad_diff"] < 1e-5
