"""Sharded training on 8 CPU devices (subprocesses): every layout equals 1 device, activation
constraints apply, frozen parts stay out of the optimizer, a checkpoint from 8 devices restores
onto 2, and 2 processes x 4 devices equal 1 process x 8 devices (``launch/local.sh``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from muddit_jax.train.checkpoint import load_params
from muddit_jax.train.metrics import read_jsonl
from tests.train_runner import (CLI_OVERRIDES, LAYOUT_MODEL, LAYOUTS, REPO, TINY, env, finish,
                                launch, start)

TOL = 1e-5


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "jax_cache"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, cache):
    """Two concurrent 8-device processes, 3 compiles each: the 1-device reference, data, fsdp;
    mixed, tensor with 2 micro-batches, the 1-device reference with 2 micro-batches."""
    tmp = tmp_path_factory.mktemp("layouts")
    a = start("layouts", dict(out=str(tmp / "a.json"), dir=str(tmp),
                              layouts=[["reference", 1], ["data", 1], ["fsdp", 1]]), 8, cache)
    b = start("layouts", dict(out=str(tmp / "b.json"), dir=str(tmp), ckpt=str(tmp / "ckpt"),
                              layouts=[["mixed", 1], ["tensor", 2], ["reference", 2]]), 8, cache)
    return {**finish(a), **finish(b)}, tmp


def max_diffs(a: dict, b: dict) -> dict[str, float]:
    """Max |a - b| over params, optimizer state and EMA of two saved states."""
    groups = {"params": ".params", "opt_state": ".opt_state", "ema": ".ema_params"}
    out = {}
    for group, prefix in groups.items():
        keys = [k for k in a if k.startswith(prefix)]
        assert keys and sorted(keys) == sorted(k for k in b if k.startswith(prefix))
        out[group] = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]), initial=0))
                         for k in keys)
    return out


EXPECTED = {  # grad_accum; (kernel [embed, mlp], bias [mlp]) of an MM-DiT feed-forward layer
    "data": (1, [], []),
    "fsdp": (1, ["fsdp"], ["fsdp"]),
    "tensor": (2, [None, "tensor"], ["tensor"]),
    "mixed": (1, ["fsdp", "tensor"], ["tensor"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_device(layouts, name: str) -> None:
    results, tmp = layouts
    accum, kernel_spec, bias_spec = EXPECTED[name]
    r, ref = results[f"{name}{accum}"], results[f"reference{accum}"]
    np.testing.assert_allclose(r["losses"], ref["losses"], rtol=0, atol=TOL)
    diffs = max_diffs(dict(np.load(tmp / f"{name}{accum}.npz")),
                      dict(np.load(tmp / f"reference{accum}.npz")))
    assert max(diffs.values()) <= TOL, diffs
    assert (r["kernel_spec"], r["bias_spec"]) == (kernel_spec, bias_spec)
    assert ref["kernel_spec"] == [] and ref["bias_spec"] == []


def test_grad_accumulation_runs_micro_batches(layouts) -> None:
    """The accumulated reference differs from the one-pass one (two micro-batch keys)."""
    results, _ = layouts
    assert not np.allclose(results["reference2"]["losses"], results["reference1"]["losses"])


def test_activation_constraints_apply_under_rules(layouts) -> None:
    results, _ = layouts
    assert results["constraints_with_rules"] >= 8  # block boundaries of 1 + 1 MM-DiT blocks
    assert results["constraints_without_rules"] == 0


def test_frozen_text_encoder_unchanged_and_without_adam_state(layouts) -> None:
    results, tmp = layouts
    assert results["frozen_names"] == ["text_encoder"] and results["frozen_unchanged"]
    saved = np.load(tmp / "mixed1.npz")
    opt = [k for k in saved.files if k.startswith(".opt_state")]
    params = [k for k in saved.files if k.startswith(".params")]
    assert not [k for k in opt if "text_encoder" in k]
    assert sum(saved[k].ndim > 0 for k in opt) == 2 * len(params)  # Adam mu + nu


def test_restore_on_two_devices(layouts, cache) -> None:
    """Saved on 8 devices (mixed layout), restored onto 2 (fsdp layout), params-only, and as
    the pretrained start of a new run (``train.init_from``)."""
    _, tmp = layouts
    r = launch("restore", dict(out=str(tmp / "restore.json"), ckpt=str(tmp / "ckpt"),
                               npz=str(tmp / "mixed1.npz")), 2, cache)
    assert r["step"] == 3 and r["data_iter"] == {"index": 3}
    assert r["max_diff"] == 0.0
    assert r["kernel_spec"] == ["fsdp"] and r["kernel_devices"] == 2
    assert r["kernel_shard_shape"] == [16, 128]  # [32, 128] split over fsdp=2
    assert r["params_names"] == ["mmdit", "text_encoder"]
    assert r["params_diff"] == 0.0 and r["ema_diff"] == 0.0
    # train.init_from: params only, re-sharded, optimizer state and step fresh
    assert r["init_from_step"] == 0 and r["init_from_spec"] == ["fsdp"]
    assert r["init_from_diff"] == 0.0 and r["init_from_adam_zero"]


def _cli(workdir: Path, *overrides: str) -> list[str]:
    return ["--config", f"{TINY}:micro", "--workdir", str(workdir), *CLI_OVERRIDES, *overrides]


def test_two_processes_equal_one_process(layouts, tmp_path, cache) -> None:
    """2 processes x 4 devices (mesh data x fsdp x tensor = (1 x dcn 2) x 2 x 2, via
    ``launch/local.sh`` and ``muddit-train``) == the 1-process 8-device mixed run of ``layouts``
    (same init, model, batches and optimizer): losses and params after 3 steps."""
    results, layouts_tmp = layouts
    multi_env = env(4, cache)
    multi_env.update(NUM_PROCESSES="2", DEVICES_PER_PROCESS="", LOG_DIR=str(tmp_path / "logs"))
    multi = subprocess.run(
        ["bash", str(REPO / "launch" / "local.sh"),
         *_cli(tmp_path / "multi", "--config.train.steps=3", "--config.checkpoint.every=3",
               "--config.mesh.dcn_data=2", "--config.mesh.data=1", "--config.mesh.fsdp=2",
               "--config.mesh.tensor=2",
               *(f"--config.model.{k}={v}" for k, v in LAYOUT_MODEL.items()))],
        cwd=REPO, env=multi_env, capture_output=True, text=True, timeout=300, check=False)
    logs = "".join((tmp_path / "logs" / f"process_{i}.log").read_text()[-3000:] for i in (0, 1))
    assert multi.returncode == 0, logs
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in logs
    assert logs.count("muddit-train: done at step 3") == 2
    log = read_jsonl(tmp_path / "multi" / "metrics.jsonl")
    assert sorted(log) == [1, 2, 3]
    np.testing.assert_allclose([log[s]["loss"] for s in (1, 2, 3)],
                               results["mixed1"]["losses"], rtol=0, atol=TOL)
    saved = np.load(layouts_tmp / "mixed1.npz")
    params = load_params(tmp_path / "multi" / "checkpoints")
    import jax

    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        part = ".params" if path[0].key == "mmdit" else ".frozen"
        expect = saved[part + jax.tree_util.keystr(path)]
        assert np.max(np.abs(np.asarray(value) - expect)) <= TOL, jax.tree_util.keystr(path)
