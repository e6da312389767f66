"""``data.pretokenize``: the mixture's images encoded once (``codes_stage``) give the batches the
step's in-graph encode gives; a rerun reuses the codes; codes of another VQ are refused; the
config errors; the step is compiled for codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from muddit_jax.data import registry, text
from muddit_jax.data.mixture import make_mixture
from muddit_jax.models import vq
from muddit_jax.models.tokenizers import load_tokenizer
from muddit_jax.port.convert import MANIFEST, save_component
from muddit_jax.train import codes_stage
from muddit_jax.train import config as C
from muddit_jax.train.data import mixture_config
from muddit_jax.train.run import abstract_batch
from tests.helpers import loopback_address

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"num_train": 24, "num_validation": 4, "num_test": 4}
B, GRID = 8, 8


def save_vq(folder, config, params) -> str:
    save_component("vqvae", config, params, folder / "vqvae")
    (folder / MANIFEST).write_text(json.dumps({"components": ["vqvae"]}))
    return str(folder)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("codes")
    c = C.base_config()
    vq_config = C.model_config(c).vq
    resolution = GRID * vq_config.downsample_factor
    data_dir = str(root / "data")
    source = registry.data_source("shapes", "train", data_dir, resolution=resolution, **SHAPES)
    text.train_tokenizer(text.dataset_texts([source]), 128, root / "tok.model")
    params = nn.unbox(vq.init_params(vq_config, jax.random.PRNGKey(0)))["params"]
    c.data.update(kind="mixture", tokenizer=str(root / "tok.model"), data_dir=data_dir,
                  global_batch=B, grid=GRID, text_length=48, text_maskable=True, images=True,
                  pretokenize=True)
    c.data.mixture = {
        "captions": {"weight": 0.5, "dataset": "shapes", "task": "caption", "options": SHAPES},
        "vqa": {"weight": 0.5, "dataset": "shapes", "task": "vqa", "options": SHAPES},
    }
    c.train.vq_from = save_vq(root / "vq", vq_config, params)
    return root, c, vq_config, params


def batches(config, n=3):
    factor = C.model_config(config).vq.downsample_factor
    tok = load_tokenizer(config.data.tokenizer, add_mask_token=True)
    with make_mixture(mixture_config(config, factor), tok, rows=slice(0, B)) as it:
        return [next(it) for _ in range(n)]


def test_codes_give_the_batches_of_the_in_step_encode(env):
    root, c, vq_config, params = env
    logs = []
    coded = codes_stage.pretokenize_sources(c, root / "run", log=logs.append)
    folder = str(root / "run" / "codes" / "captions")  # one folder: same dataset and options
    assert {s.dataset for s in coded.data.mixture.values()} == {"pretokenized"}
    assert {s.options.path for s in coded.data.mixture.values()} == {folder}
    assert len(logs) == 1 and "24 records" in logs[0] and "1 shards written" in logs[0]
    raw = c.copy_and_resolve_references()
    raw.data.pretokenize = False
    for a, b in zip(batches(raw), batches(coded)):
        assert set(a) - {"images"} == set(b) - {"image_ids"}
        for k in set(a) - {"images"}:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        want = np.asarray(vq.encode(params, vq_config, a["images"]))
        np.testing.assert_array_equal(b["image_ids"], want)
        assert len(np.unique(want)) > 1  # not a constant that any encoder would match
    # the step is compiled for codes, not pixels
    model = C.model_config(coded)
    assert "image_ids" in abstract_batch(coded, model)
    assert "images" not in abstract_batch(coded, model)
    assert "images" in abstract_batch(raw, model)


def test_rerun_reuses_the_codes_and_another_vq_is_refused(env):
    root, c, vq_config, params = env
    coded = codes_stage.pretokenize_sources(c, root / "run")
    assert codes_stage.pretokenize_sources(coded, root / "run") is coded  # already codes
    shards = (root / "run" / "codes").rglob("pretokenized-*")
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    assert stamps
    logs = []
    codes_stage.pretokenize_sources(c, root / "run", log=logs.append)
    assert "0 shards written, 1 reused" in logs[0]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    other = c.copy_and_resolve_references()
    other.train.vq_from = save_vq(root / "vq2", vq_config,
                                  jax.tree.map(lambda x: np.asarray(x) * 0.5, params))
    with pytest.raises(ValueError, match="different pre-tokenization job.*vq"):
        codes_stage.pretokenize_sources(other, root / "run")


def test_unchanged_without_the_flag_and_config_errors(env):
    root, c, _, _ = env
    off = c.copy_and_resolve_references()
    off.data.pretokenize = False
    assert codes_stage.pretokenize_sources(off, root / "unused") is off
    assert not (root / "unused").exists()
    for field, value, match in [("data.kind", "dataset", "needs data.kind='mixture'"),
                                ("data.images", False, "set data.images=True"),
                                ("train.vq_from", "", "set train.vq_from")]:
        bad = c.copy_and_resolve_references()
        group, key = field.split(".")
        bad[group][key] = value
        with pytest.raises(ValueError, match=match):
            codes_stage.check(bad)
    assert codes_stage.PRETOKENIZED == registry.PRETOKENIZED


WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from muddit_jax.parallel import distributed  # stops the runtime in order at exit
distributed.initialize({"coordinator_address": sys.argv[1], "num_processes": 2,
                        "process_id": int(sys.argv[2])})
import ml_collections
from muddit_jax.train import codes_stage
from tests.test_codes_stage import batches
codes_stage.EXAMPLES_PER_SHARD = 8  # 24 records: shards 0, 2 on host 0 and shard 1 on host 1
config = ml_collections.ConfigDict(json.loads(sys.argv[3]))
coded = codes_stage.pretokenize_sources(config, sys.argv[4], log=lambda _: None)
print(json.dumps([b["image_ids"].tolist() for b in batches(coded)]))
"""


def test_two_processes_share_the_shards(env, tmp_path):
    """Real 2-process JAX (CPU, gloo, loopback): each host encodes its shards, the metadata is
    written once all exist, and both hosts then read the codes one process writes."""
    root, c, _, _ = env
    address = loopback_address()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env_vars = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, str(script), address, str(p), c.to_json(),
                               str(tmp_path / "run")], env=env_vars, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    errors = "".join(f"process {i}: {err[-2000:]}" for i, (_, err) in enumerate(outs))
    assert [p.returncode for p in procs] == [0, 0], errors
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    single = codes_stage.pretokenize_sources(c, root / "single", log=lambda _: None)
    assert got[0] == got[1] == [b["image_ids"].tolist() for b in batches(single)]
    shards = tmp_path / "run" / "codes" / "captions" / "shards"
    assert sorted(p.name for p in shards.glob("train-*.json")) == [
        "train-00000.json", "train-00001.json", "train-00002.json"]
