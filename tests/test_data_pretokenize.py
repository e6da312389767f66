"""Offline pre-tokenization: codes read back equal ``vq.encode`` of the images, finished shards
are skipped on resume, hosts split the shards, two devices give the same bytes, the pipeline
reads codes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from muddit_jax.cli import pretokenize as cli
from muddit_jax.data import pretokenize, registry
from muddit_jax.data.pipeline import DataConfig, make_iterator
from muddit_jax.models import tokenizers, vq

SHAPES = ["--option", "num_train=20", "--option", "num_validation=4", "--option", "num_test=4"]


def run(out: Path, env_root: Path, *extra: str) -> dict:
    """``muddit-pretokenize`` in-process; returns its JSON summary."""
    argv = ["--vq", "random-tiny", "--dataset", "shapes", "--split", "train", "--out", str(out),
            "--data-dir", str(env_root / "data"), "--resolution", "32", "--text-length", "48",
            "--tokenizer", str(env_root / "tokenizer.model"), "--examples-per-shard", "8",
            "--batch-size", "4", *SHAPES, *extra]
    return _summary(lambda: cli.main(argv))


def _summary(fn) -> dict:
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert fn() == 0
    return json.loads(buf.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretok")
    cli.main(["--train-tokenizer", "--dataset", "shapes", "--data-dir", str(root / "data"),
              "--resolution", "32", "--out", str(root), "--vocab-size", "128", *SHAPES])
    summary = run(root / "out", root)
    return root, summary


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("pretokenized-*"))}


def test_codes_read_back_equal_vq_encode(env):
    root, summary = env
    assert summary["written"] == [0, 1, 2] and summary["complete_splits"] == ["train"]
    source = registry.data_source("shapes", "train", root / "data", resolution=32, num_train=20,
                                  num_validation=4, num_test=4)
    codes_ds = tfds.builder_from_directory(str(root / "out")).as_data_source("train")
    assert len(codes_ds) == len(source) == 20
    rows = sorted(codes_ds, key=lambda r: int(r["index"]))
    images = np.stack([np.asarray(Image.open(io.BytesIO(source[int(r["index"])]["image"])))
                       for r in rows]) / np.float32(255)
    config, params = cli.load_vq("random-tiny", 0)
    want = np.asarray(vq.encode(params, config, jnp.asarray(images)))
    got = np.stack([r["codes"] for r in rows])
    assert got.shape == (20, 8, 8) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    tok = tokenizers.load_tokenizer(root / "tokenizer.model")
    for r in rows:
        captions = [c.decode() for c in r["captions"]]
        assert captions == [c.decode() for c in source[int(r["index"])]["captions"]]
        np.testing.assert_array_equal(r["text_ids"], tok.encode(captions, 48))
        np.testing.assert_array_equal(r["micro_conds"], [32, 32, 0, 0, 6])


def test_resume_skips_finished_shards(env, tmp_path):
    root, _ = env
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    before = shard_files(out)
    victim = out / "pretokenized-train.array_record-00001-of-00003"
    victim.unlink()
    (out / "shards" / "train-00001.json").unlink()
    (out / "dataset_info.json").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("pretokenized-*")}
    summary = run(out, root)
    assert summary["written"] == [1] and summary["already_done"] == [0, 2]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("pretokenized-*")
            if p.name in stamps} == stamps
    assert shard_files(out) == before  # the redone shard is byte-identical
    assert (out / "dataset_info.json").is_file()


def test_hosts_split_the_shards(env, tmp_path):
    root, _ = env
    out = tmp_path / "out"
    first = run(out, root, "--process-index", "0", "--process-count", "2")
    assert first["written"] == [0, 2] and first["complete_splits"] == []
    assert not (out / "dataset_info.json").exists()
    second = run(out, root, "--process-index", "1", "--process-count", "2")
    assert second["written"] == [1] and second["complete_splits"] == ["train"]
    assert shard_files(out) == shard_files(root / "out")


def test_changed_job_is_refused(env, tmp_path):
    root, _ = env
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    with pytest.raises(ValueError, match="text_length"):
        run(out, root, "--text-length", "40")


def test_pipeline_reads_codes(env):
    root, _ = env
    tok = tokenizers.load_tokenizer(root / "tokenizer.model")
    config = DataConfig(dataset="pretokenized", options={"path": str(root / "out")},
                        resolution=32, text_length=48, global_batch_size=4)
    codes_ds = tfds.builder_from_directory(str(root / "out")).as_data_source("train")
    by_index = {int(r["index"]): r for r in codes_ds}
    with make_iterator(config, tok, process_index=0, process_count=1) as it:
        batch = next(it)
    assert "images" not in batch and batch["image_ids"].shape == (4, 8, 8)
    for row, index in enumerate(batch["index"]):
        record = by_index[int(index)]
        np.testing.assert_array_equal(batch["image_ids"][row], record["codes"])
        assert any(np.array_equal(batch["text_ids"][row], t) for t in record["text_ids"])
        assert batch["text_valid"][row].sum() in set(record["text_lengths"])
    with pytest.raises(ValueError, match="resolution=32"):
        make_iterator(DataConfig(dataset="pretokenized", options={"path": str(root / "out")},
                                 resolution=64, text_length=48), tok,
                      process_index=0, process_count=1)


def test_two_devices_write_the_same_bytes(env, tmp_path):
    root, _ = env
    out = tmp_path / "out"
    code = (
        "import jax, sys; from muddit_jax.cli import pretokenize as p; "
        "assert jax.local_device_count() == 2, jax.devices(); sys.exit(p.main(sys.argv[1:]))"
    )
    argv = ["--vq", "random-tiny", "--dataset", "shapes", "--split", "train", "--out", str(out),
            "--data-dir", str(root / "data"), "--resolution", "32", "--text-length", "48",
            "--tokenizer", str(root / "tokenizer.model"), "--examples-per-shard", "8",
            "--batch-size", "4", *SHAPES]
    env_vars = dict(os.environ, JAX_PLATFORMS="cpu",
                    XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env_vars,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard_files(out) == shard_files(root / "out")


def test_job_fingerprints(env):
    root, _ = env
    job = pretokenize.read_job(root / "out")
    assert job["resolution"] == 32 and job["codes_shape"] == [8, 8]
    config, params = cli.load_vq("random-tiny", 0)
    assert job["vq"] == pretokenize.vq_fingerprint(config, params)
    _, other = cli.load_vq("random-tiny", 1)
    assert pretokenize.vq_fingerprint(config, other) != job["vq"]


def test_vq_loads_from_a_converted_folder(tmp_path):
    from muddit_jax.port import io as port_io
    from muddit_jax.port.convert import MANIFEST, save_component

    config, params = cli.load_vq("random-tiny", 3)
    save_component("vqvae", config, params, tmp_path / "pipe" / "vqvae")
    port_io.write_json_atomic({"components": ["vqvae"]}, tmp_path / "pipe" / MANIFEST)
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "vqvae"):
        got_config, got_params = cli.load_vq(str(path), 0)
        assert got_config == config
        assert pretokenize.vq_fingerprint(got_config, got_params) == \
            pretokenize.vq_fingerprint(config, params)
    with pytest.raises(SystemExit, match="random-tiny"):
        cli.load_vq(str(tmp_path), 0)
