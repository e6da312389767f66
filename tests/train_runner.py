"""Subprocess side of the training tests (multi-device CPU runs need their own process).

``python -m tests.train_runner COMMAND ARGS_JSON``; results go to ``ARGS_JSON["out"]`` (JSON).
Commands: ``layouts`` (1 device vs 8-device meshes in every layout; saves a checkpoint),
``restore`` (re-shard that checkpoint onto 2 devices), ``images`` (VQ encoding inside the step),
``nan`` (the loop's non-finite guard). :func:`launch` starts it (and the CLI) with the
environment the tests use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import FAST_COMPILE_FLAGS, compile_cache_env

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "train_tiny.py")
LAYOUTS: dict[str, dict[str, Any]] = {
    "data": dict(mesh=dict(data=8, fsdp=1, tensor=1), rules="data"),
    "fsdp": dict(mesh=dict(data=1, fsdp=8, tensor=1), rules="fsdp"),
    "tensor": dict(mesh=dict(data=1, fsdp=1, tensor=8), rules="default"),
    "mixed": dict(mesh=dict(data=2, fsdp=2, tensor=2), rules="default"),
}
STEPS = 3
# what _config() sets, as muddit-train overrides (keeps the CLI runs' programs identical)
CLI_OVERRIDES = ("--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
                 "--config.optim.lr=0.001", "--config.optim.eps=1e-5",
                 "--config.train.ema_decay=0.9")
FF = ("mmdit", "transformer_blocks_0", "ff", "proj_in")  # kernel [embed, mlp], bias [mlp]
# the layouts' model: clean rows take their own image input path, so the sharded step slices
# the batch between the two paths (``generated_rows``)
LAYOUT_MODEL = dict(condition_image_input=True, condition_conv_blocks=1)


def env(devices: int, cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment of a CPU subprocess with ``devices`` devices (fast, unoptimised XLA codegen;
    a shared persistent compilation cache so repeated programs compile once per session)."""
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"
    e.update(JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONUNBUFFERED="1")
    if cache_dir:
        e.update(compile_cache_env(cache_dir, min_compile_s=0))
    return e


def start(command: str, args: dict[str, Any], devices: int,
          cache_dir: Any = None) -> subprocess.Popen:
    """Start a runner command in a subprocess (see :func:`finish`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.train_runner", command, json.dumps(args)], cwd=REPO,
        env=env(devices, cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> dict[str, Any]:
    """Wait for a :func:`start`-ed command; returns its JSON result."""
    out, err = proc.communicate(timeout=timeout)
    args = json.loads(proc.args[-1])
    assert proc.returncode == 0, f"{proc.args[3]} failed:\n{out[-3000:]}\n{err[-6000:]}"
    return json.loads(Path(args["out"]).read_text())


def launch(command: str, args: dict[str, Any], devices: int, cache_dir: Any = None,
           timeout: float = 300) -> dict[str, Any]:
    """Run a runner command in a subprocess; returns its JSON result."""
    return finish(start(command, args, devices, cache_dir), timeout)


# ---------------------------------------------------------------------------------------------
# subprocess side


def _config(arg: str = "micro", **sections: dict[str, Any]):
    """``configs/train_tiny.py:ARG`` with the test optimizer and EMA (the CLI tests pass the
    same values as overrides, so the 1-device programs are shared through the compile cache)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tiny", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    c.optim.update(schedule="constant", warmup_steps=0, lr=1e-3, eps=1e-5)
    c.train.update(ema_decay=0.9)
    for name, values in sections.items():
        c[name].update(values)
    return c


def _max_diff(a: Any, b: Any) -> float:
    import jax
    import numpy as np

    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64)
                                                           - np.asarray(y, np.float64)))), a, b)
    return max(jax.tree.leaves(diffs) + [0.0])


def _run_steps(run: Any, host_state: Any, batches: list) -> tuple[list[float], Any]:
    import jax

    state = jax.device_put(host_state, run.setup.shardings)
    compiled = run.compile()
    losses = []
    for b in batches:
        state, metrics = compiled(state, run.global_batch(b))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state)


def _spec(run: Any, *path: str) -> list:
    node = run.setup.param_shardings
    for p in path:
        node = node[p]
    return [None if a is None else a for a in node.spec]


def _save_flat(path: str, state: Any) -> None:
    """``state`` as an npz keyed by ``jax.tree_util.keystr`` paths."""
    import jax
    import numpy as np

    np.savez(path, **{jax.tree_util.keystr(p): np.asarray(x)
                      for p, x in jax.tree_util.tree_flatten_with_path(state)[0]})


def cmd_layouts(args: dict[str, Any]) -> dict[str, Any]:
    """3 steps from the same init and batches for each ``[name, grad_accum]`` in
    ``args["layouts"]`` (``name`` = ``reference`` is 1 device); saves each final state to
    ``{args["dir"]}/{name}.npz`` and reports losses and shardings. The ``mixed`` layout also
    reports activation constraints and frozen parts, and saves a checkpoint for ``restore``.

    Adam's ``eps`` is raised to 1e-5: with 1e-8, gradient entries of ~1e-8 (float32 noise level
    of a sum of O(0.1) terms) get O(lr) updates whose size depends on the reduction order, so
    params would differ by ~1e-4 between layouts although the gradients agree to 1e-9.
    """
    import jax

    from muddit_jax.train.checkpoint import Checkpointer
    from muddit_jax.train.run import build_run
    from muddit_jax.train.synthetic import SyntheticData

    devices = jax.devices()
    assert len(devices) == 8, devices
    out: dict[str, Any] = {}
    host0 = batches = None
    model = LAYOUT_MODEL
    for name, accum in args["layouts"]:
        train = dict(grad_accum=accum)
        if name == "reference":
            cfg = _config(mesh=dict(data=1), train=train, model=model)
            run = build_run(cfg, devices[:1])
        else:
            layout = LAYOUTS[name]
            cfg = _config(mesh=dict(layout["mesh"], rules=layout["rules"]), train=train,
                          model=model)
            run = build_run(cfg, devices)
        if host0 is None:  # the same init everywhere: made once, placed per layout
            init_run = run if name == "reference" else build_run(
                _config(mesh=dict(data=1), train=train, model=model), devices[:1])
            host0 = jax.device_get(init_run.setup.init(cfg.seed))
            data = SyntheticData(run.model, global_batch=8, grid=4, text_length=8)
            batches = [data.global_batch_at(i) for i in range(STEPS)]
        losses, state = _run_steps(run, host0, batches)
        key = f"{name}{accum}"
        _save_flat(f"{args['dir']}/{key}.npz", state)
        out[key] = dict(losses=losses, kernel_spec=_spec(run, *FF, "kernel"),
                        bias_spec=_spec(run, *FF, "bias"))
        if name != "mixed":
            continue
        with jax.set_mesh(run.mesh):  # the same step traced without the rules table
            plain = jax.jit(lambda s, b, fn=run.step_fn: fn(s, b)).lower(
                run.setup.abstract, run.batch_abstract)
        out["constraints_with_rules"] = run.lower().as_text().count("sharding_constraint")
        out["constraints_without_rules"] = plain.as_text().count("sharding_constraint")
        out["frozen_unchanged"] = _max_diff(state.frozen, host0.frozen) == 0.0
        out["frozen_names"] = sorted(state.frozen)
        ckpt = Checkpointer(args["ckpt"])
        ckpt.save(STEPS, jax.device_put(state, run.setup.shardings), {"index": STEPS}, cfg)
        ckpt.close()
    return out


def _diff_to_saved(tree: Any, saved: dict, prefix: Any = "") -> float:
    """Max |leaf - saved[prefix + keystr(path)]|; ``prefix`` may be a function of the path."""
    import jax
    import numpy as np

    worst = 0.0
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = (prefix(path) if callable(prefix) else prefix) + jax.tree_util.keystr(path)
        worst = max(worst, float(np.max(np.abs(np.asarray(x) - saved[key]), initial=0)))
    return worst


def cmd_restore(args: dict[str, Any]) -> dict[str, Any]:
    """Restore the 8-device checkpoint on 2 devices (fsdp layout), and params-only."""
    import jax
    import numpy as np

    from muddit_jax.train.checkpoint import Checkpointer, load_params
    from muddit_jax.train.run import build_run

    assert len(jax.devices()) == 2
    run = build_run(_config(mesh=dict(data=1, fsdp=2, tensor=1, rules="fsdp"),
                            model=LAYOUT_MODEL))
    restored = Checkpointer(args["ckpt"]).restore_or_none(run.setup.abstract)
    saved = dict(np.load(args["npz"]))  # the mixed layout's final state
    kernel = restored.state.params
    for p in FF + ("kernel",):
        kernel = kernel[p]
    params = load_params(args["ckpt"])
    ema = load_params(args["ckpt"], ema=True)
    # fine-tuning start: params-only, placed on this mesh, fresh optimizer state
    fresh = run.setup.init(0, load_params(args["ckpt"], shardings=run.setup.param_shardings))
    fresh_kernel = fresh.params
    for p in FF + ("kernel",):
        fresh_kernel = fresh_kernel[p]
    return dict(
        init_from_step=int(fresh.step), init_from_spec=list(fresh_kernel.sharding.spec),
        init_from_diff=_diff_to_saved(
            fresh.all_params(), saved,
            lambda path: ".params" if path[0].key == "mmdit" else ".frozen"),
        init_from_adam_zero=all(float(abs(x).max()) == 0 for x in jax.tree.leaves(
            fresh.opt_state) if np.ndim(x)),
        step=restored.step, data_iter=restored.data_iter,
        max_diff=_diff_to_saved(restored.state, saved),
        kernel_spec=list(kernel.sharding.spec), kernel_devices=len(kernel.sharding.device_set),
        kernel_shard_shape=list(kernel.addressable_shards[0].data.shape),
        params_names=sorted(params),
        params_diff=_diff_to_saved(
            params, saved, lambda path: ".params" if path[0].key == "mmdit" else ".frozen"),
        ema_diff=_diff_to_saved({"mmdit": ema["mmdit"]}, saved, ".ema_params"),
    )


def cmd_images(args: dict[str, Any]) -> dict[str, Any]:
    """A step on raw images (the frozen VQ encodes them) has the loss of the Muddit loss on the
    VQ codes of those images (same step key)."""
    import jax

    from muddit_jax.models.vq import VQModel
    from muddit_jax.train.config import loss_config
    from muddit_jax.train.run import build_run
    from muddit_jax.train.step import muddit_loss_fn
    from muddit_jax.train.synthetic import SyntheticData

    cfg = _config("micro,images")
    run = build_run(cfg)
    state = run.setup.init(cfg.seed)
    host0 = jax.device_get(state)
    batch = SyntheticData(run.model, global_batch=8, grid=4, text_length=8,
                          images=True).global_batch_at(0)
    vq = run.nets.vq
    codes = jax.jit(lambda p, x: vq.apply({"params": p}, x, method=VQModel.encode))(
        host0.frozen["vq"], batch["images"])
    ids_batch = {k: v for k, v in batch.items() if k != "images"} | {"image_ids": codes}
    loss_fn = muddit_loss_fn(run.nets, loss_config(cfg, run.model))
    loss_codes, _ = jax.jit(loss_fn)(host0.params, host0.frozen, ids_batch,
                                     jax.random.fold_in(host0.rng, 0))
    s_img, m_img = run.compile()(state, run.global_batch(batch))
    return dict(
        loss_images=float(m_img["loss"]), loss_codes=float(loss_codes),
        params_changed=_max_diff(s_img.params, host0.params) > 0,
        vq_unchanged=_max_diff(s_img.frozen["vq"], host0.frozen["vq"]) == 0.0,
        frozen_names=sorted(s_img.frozen), codes_range=[int(codes.min()), int(codes.max())],
        opt_has_vq=any("vq" in jax.tree_util.keystr(p) for p, _ in
                       jax.tree_util.tree_flatten_with_path(s_img.opt_state)[0]),
    )


class Poisoned:
    """Synthetic batches with NaN micro-conditions at the given batch indices."""

    def __init__(self, data: Any, bad: set[int]):
        self.data, self.bad = data, bad

    def __iter__(self):
        return self

    def __next__(self):
        index = self.data.index
        batch = next(self.data)
        if index in self.bad:
            batch["micro_conds"] = batch["micro_conds"] * float("nan")
        return batch

    def get_state(self):
        return self.data.get_state()

    def set_state(self, state):
        self.data.set_state(state)


def cmd_nan(args: dict[str, Any]) -> dict[str, Any]:
    """The loop with one isolated bad batch, then ``max_nonfinite`` bad batches in a row."""
    import jax

    from muddit_jax.train.checkpoint import Checkpointer
    from muddit_jax.train.config import model_config
    from muddit_jax.train.loop import train
    from muddit_jax.train.metrics import read_jsonl
    from muddit_jax.train.synthetic import SyntheticData

    cfg = _config(train=dict(steps=12, max_nonfinite=3), checkpoint=dict(every=2))
    def data(rows: slice) -> Poisoned:  # the trainer passes this process's rows
        synthetic = SyntheticData(model_config(cfg), global_batch=8, grid=4, text_length=8,
                                  rows=rows)
        return Poisoned(synthetic, bad=set(args["bad"]))

    result = train(cfg, args["workdir"], data=data)
    adam = result.state.opt_state[1][0]
    log = read_jsonl(Path(args["workdir"]) / "metrics.jsonl")
    return dict(
        status=result.status, exit_code=result.exit_code, step=result.step,
        nonfinite_total=int(result.state.nonfinite_total), adam_count=int(adam.count),
        latest=Checkpointer(Path(args["workdir"]) / "checkpoints").latest_step(),
        skipped={s: m["skipped"] for s, m in log.items()},
        streak={s: m["nonfinite_streak"] for s, m in log.items()},
        finite_params=all(bool(jax.numpy.isfinite(x).all())
                          for x in jax.tree.leaves(result.state.params)),
    )


COMMANDS = {"layouts": cmd_layouts, "restore": cmd_restore, "images": cmd_images,
            "nan": cmd_nan}

if __name__ == "__main__":
    command, raw = sys.argv[1], json.loads(sys.argv[2])
    result = COMMANDS[command](raw)
    Path(raw["out"]).write_text(json.dumps(result))
