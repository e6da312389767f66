"""The trainer end to end (subprocesses running ``muddit-train`` / the runner): exact resume
after SIGKILL mid-save and after SIGTERM, the non-finite guard, raw images through the frozen VQ,
metrics files; plus params-only loading from a ``muddit-convert`` folder (in-process)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import pytest

from muddit_jax.cli.train import main as train_main
from muddit_jax.train import config as C
from muddit_jax.train.checkpoint import load_params
from muddit_jax.train.metrics import read_jsonl
from muddit_jax.train.state import Networks
from tests.train_runner import CLI_OVERRIDES, REPO, TINY, env, launch

STEPS, EVERY = 40, 4
TMP_DIR = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "jax_cache"


def cli(workdir: Path, cache: Path, *extra: str) -> subprocess.Popen:
    """``muddit-train`` on the micro config (1 device), stdout+stderr piped."""
    args = [sys.executable, "-m", "muddit_jax.cli.train", "--config", f"{TINY}:micro",
            "--workdir", str(workdir), f"--config.train.steps={STEPS}",
            f"--config.checkpoint.every={EVERY}", "--config.checkpoint.keep=20",
            *CLI_OVERRIDES, *extra]
    return subprocess.Popen(args, cwd=REPO, env=env(1, cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def steps_on_disk(workdir: Path) -> tuple[list[int], list[int]]:
    """(complete steps, steps with an unfinished temporary folder)."""
    names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
    done = sorted(int(n) for n in names if n.isdigit())
    tmp = sorted(int(m.group(1)) for n in names if (m := TMP_DIR.match(n)))
    return done, tmp


def kill_mid_save(proc: subprocess.Popen, workdir: Path, min_step: int) -> int:
    """SIGKILL ``proc`` while a save of a step >= ``min_step`` is in flight; returns that step.

    On seeing a temporary checkpoint folder the process is frozen (SIGSTOP) and the folder
    checked again, so the kill is known to land before that save was finalized."""
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, "the run finished before it could be killed mid-save"
        _, tmp = steps_on_disk(workdir)
        pending = [s for s in tmp if s >= min_step]
        if pending:
            os.kill(proc.pid, signal.SIGSTOP)
            done, tmp = steps_on_disk(workdir)
            if pending[0] in tmp and pending[0] not in done:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return pending[0]
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError(f"no save of step >= {min_step} seen")


def read_until(proc: subprocess.Popen, pattern: str) -> tuple[re.Match, str]:
    seen = ""
    for line in proc.stdout:
        seen += line
        if m := re.search(pattern, line):
            return m, seen
    raise AssertionError(f"{pattern!r} not in the output:\n{seen[-4000:]}")


def all_losses(path: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["step"], []).append(row["loss"])
    return out


def test_exact_resume_after_sigkill_mid_save_and_sigterm(tmp_path, cache, caplog) -> None:
    straight_dir, chain_dir = tmp_path / "straight", tmp_path / "chain"
    straight = cli(straight_dir, cache, "--config.log.peak_flops_per_device=1e12")
    killed = cli(chain_dir, cache)

    # 1. SIGKILL while the save of a step >= 8 is in flight: that step never becomes complete
    cut = kill_mid_save(killed, chain_dir, 2 * EVERY)
    done, tmp = steps_on_disk(chain_dir)
    assert cut in tmp and max(done) < cut and max(done) >= EVERY, (cut, done, tmp)

    # 2. resume (from the previous complete step), then SIGTERM: it must save where it stops
    resumed = cli(chain_dir, cache)
    m, _ = read_until(resumed, r"resumed at step (\d+)")
    assert int(m.group(1)) == max(done)
    read_until(resumed, r"^step \d+/")  # the loop is running
    os.kill(resumed.pid, signal.SIGSTOP)  # no progress between here and the signal
    os.kill(resumed.pid, signal.SIGTERM)
    os.kill(resumed.pid, signal.SIGCONT)
    m, _ = read_until(resumed, r"preempted at step (\d+)")
    stopped = int(m.group(1))
    assert resumed.wait(timeout=120) == 75
    assert stopped < STEPS and stopped in steps_on_disk(chain_dir)[0]
    assert not steps_on_disk(chain_dir)[1], "the interrupted temporary folder was cleaned up"

    # 3. resume to the end; everything equals the straight run
    final = cli(chain_dir, cache)
    m, _ = read_until(final, r"resumed at step (\d+)")
    assert int(m.group(1)) == stopped
    out = final.communicate(timeout=240)[0]
    assert final.returncode == 0, out[-4000:]
    straight_out = straight.communicate(timeout=240)[0]
    assert straight.returncode == 0, straight_out[-4000:]

    ref, chain = all_losses(straight_dir / "metrics.jsonl"), all_losses(chain_dir / "metrics.jsonl")
    assert sorted(ref) == sorted(chain) == list(range(1, STEPS + 1))
    for step, losses in chain.items():
        assert losses == [ref[step][0]] * len(losses), (step, losses, ref[step])
    with caplog.at_level(logging.WARNING):
        a, b = load_params(straight_dir / "checkpoints"), load_params(chain_dir / "checkpoints")
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # e.g. orbax's metadata

    # observability of the straight run
    assert list((straight_dir / "tensorboard").glob("events.out.tfevents.*"))
    row = read_jsonl(straight_dir / "metrics.jsonl")[STEPS]
    for key in ("loss", "image_loss", "text_loss", "grad_norm", "lr", "steps_per_sec",
                "tokens_per_sec", "eta_sec", "mfu"):
        assert key in row, key
    assert re.search(r"step 40/40 \[#{20}\] \| loss \d+\.\d+ \| .* steps/s \| .* tok/s \| MFU .*% \| ETA",
                     straight_out)


def test_nonfinite_guard_stops_and_keeps_last_good_checkpoint(tmp_path, cache) -> None:
    """Bad batch 3 (isolated), then batches 6, 7, 8 (0-based 2 and 5-7); every=2, K=3."""
    r = launch("nan", dict(out=str(tmp_path / "nan.json"), workdir=str(tmp_path / "run"),
                           bad=[2, 5, 6, 7]), 1, cache)
    assert r["status"] == "nonfinite" and r["exit_code"] == 65 and r["step"] == 8
    assert r["nonfinite_total"] == 4 and r["adam_count"] == 4  # 8 steps, 4 applied
    assert r["latest"] == 4  # step 6 (mid-streak) was not saved, step 8 stopped the run
    skipped = {int(k): v for k, v in r["skipped"].items()}
    assert [s for s, v in skipped.items() if v] == [3, 6, 7, 8]
    streak = {int(k): v for k, v in r["streak"].items()}
    assert [streak[s] for s in range(1, 9)] == [0, 0, 1, 0, 0, 1, 2, 3]
    assert r["finite_params"]


def test_raw_images_are_encoded_by_the_frozen_vq(tmp_path, cache) -> None:
    r = launch("images", dict(out=str(tmp_path / "images.json")), 1, cache)
    assert r["frozen_names"] == ["text_encoder", "vq"]
    assert r["vq_unchanged"] and not r["opt_has_vq"]
    assert 0 <= r["codes_range"][0] <= r["codes_range"][1] < 16
    assert abs(r["loss_images"] - r["loss_codes"]) <= 1e-6
    assert r["params_changed"]


def test_load_params_from_converted_folder(tmp_path) -> None:
    from muddit_jax.port.convert import MANIFEST, save_component

    cfg = C.model_config(C.base_config())
    nets = Networks.build(cfg, with_vq=True)
    abstract = nn.unbox(jax.eval_shape(lambda: nets.init(jax.random.PRNGKey(0), 4, 8)))
    params = jax.tree.map(lambda x: np.full(x.shape, 0.5, x.dtype), abstract)
    dst = tmp_path / "converted"
    save_component("transformer", cfg.mmdit, params["mmdit"], dst / "transformer")
    save_component("text_encoder", cfg.text, params["text_encoder"], dst / "text_encoder")
    save_component("vqvae", cfg.vq, params["vq"], dst / "vqvae")
    (dst / MANIFEST).write_text(json.dumps({"components": ["transformer", "text_encoder",
                                                           "vqvae"]}))
    loaded = load_params(dst)
    assert sorted(loaded) == ["mmdit", "text_encoder", "vq"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, params)
    # and the run config can be built from that folder
    c = C.base_config()
    c.model.preset, c.train.init_from = "pretrained", str(dst)
    assert C.model_config(c) == cfg


def test_step_seed_draws_the_steps_apart_from_the_init(tmp_path) -> None:
    """``train.step_seed`` sets the steps' base key (masks, dropout) and keeps ``seed``'s params;
    -1 falls back to ``seed``; below -1 fails naming the field."""
    from muddit_jax.train.checkpoint import Checkpointer
    from muddit_jax.train.run import build_run, init_state
    from tests.train_runner import _config

    def start(seed: int, step_seed: int) -> Any:
        c = _config()
        c.seed, c.train.step_seed = seed, step_seed
        run = build_run(c)
        state, resumed = init_state(run, Checkpointer(tmp_path / f"{seed}_{step_seed}"), None)
        assert not resumed
        return jax.device_get(state)

    base, mixed, other = start(0, -1), start(0, 3), start(3, -1)
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)  # noqa: E731
    same(mixed.params, base.params)
    np.testing.assert_array_equal(mixed.rng, other.rng)
    assert not np.array_equal(mixed.rng, base.rng)
    assert not np.array_equal(np.asarray(jax.tree.leaves(other.params)[0]),
                              np.asarray(jax.tree.leaves(base.params)[0]))
    with pytest.raises(ValueError, match=r"train.step_seed=-2: use -1"):
        start(0, -2)


def test_cli_requires_config_and_workdir(capsys) -> None:
    assert train_main(["--workdir", "x"]) == 2
    assert "--config and --workdir are required" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--stepz=3"], "Unknown command line flag 'stepz'"),
    (["--config.train.stepz=3"], 'no such config field in a --config.<field> override: \'stepz\' '
                                 'Did you mean "steps"'),
    (["--config.train.steps=abc"], "flag --config.train.steps=abc: invalid literal"),
])
def test_cli_bad_flags_name_the_flag_without_a_traceback(capsys, tmp_path, extra, message) -> None:
    from muddit_jax.cli.eval import main as eval_main

    for main in (train_main, eval_main):
        argv = ["--config", "configs/shapes_tiny.py", "--workdir", str(tmp_path / "w"), *extra]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_cli_config_file_bug_keeps_its_own_traceback(tmp_path) -> None:
    """An AttributeError raised while running the config file is not reported as a bad
    ``--config.<field>`` override."""
    cfg = tmp_path / "broken.py"
    cfg.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                   "    return ml_collections.ConfigDict().no_such_field\n")
    with pytest.raises(AttributeError, match="no_such_field"):
        train_main(["--config", str(cfg), "--workdir", str(tmp_path / "w")])


def test_cli_help_lists_the_flags_and_exits_0(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        train_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: muddit-train --config") and "--workdir" in out and "--stage" in out


def test_progress_line_shows_a_bar_rates_and_eta() -> None:
    from muddit_jax.train.metrics import progress_line

    line = progress_line(25, 100, {"loss": 2.5, "steps_per_sec": 2.0, "tokens_per_sec": 1500.0,
                                   "eta_sec": 37.5})
    assert line.startswith("step 25/100 [#####---------------]")
    assert "loss 2.5000" in line and "2.00 steps/s" in line and "1.5k tok/s" in line
    assert line.endswith("ETA 0:00:38") or line.endswith("ETA 0:00:37")


def test_t2i_stop_gradient_on_the_real_model() -> None:
    """``loss.t2i_stop_gradient`` names real parameter paths: with the text term weighted 0 the
    matched dual-stream blocks get no gradient while the single-stream blocks do."""
    from muddit_jax.train.config import loss_config
    from muddit_jax.train.run import build_run
    from muddit_jax.train.step import muddit_loss_fn
    from muddit_jax.train.synthetic import SyntheticData
    from tests.train_runner import _config

    c = _config(loss=dict(text_loss_weight=0.0))
    run = build_run(c)
    state = jax.device_get(run.setup.init(c.seed))
    batch = SyntheticData(run.model, global_batch=8, grid=4, text_length=8).global_batch_at(0)

    def grads(patterns: str) -> dict[str, float]:
        c.loss.t2i_stop_gradient = patterns
        loss_fn = muddit_loss_fn(run.nets, loss_config(c, run.model))
        g = jax.grad(lambda p: loss_fn(p, state.frozen, batch, jax.random.PRNGKey(0))[0])(
            state.params)
        return {k: float(sum(np.abs(x).sum() for x in jax.tree.leaves(v)))
                for k, v in g["mmdit"].items()}

    off, on = grads(""), grads("@dual_blocks")
    dual = [k for k in off if k.startswith("transformer_blocks_")]
    single = [k for k in off if k.startswith("single_transformer_blocks_")]
    assert dual and single
    assert all(off[k] > 0 and on[k] == 0 for k in dual)
    assert all(on[k] > 0 and abs(on[k] - off[k]) <= 1e-4 * off[k] for k in single)
