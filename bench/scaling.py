"""Benchmark 4: scaling simulation and the analytic memory / FLOPs model behind it.

* Simulated: the train step (``bench.train_step`` stand-in) on an 8-device CPU mesh
  (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, run in a subprocess) with the params
  and optimizer state laid out by ``muddit_jax.parallel.rules.DEFAULT_RULES`` for the ``data``,
  ``fsdp``, ``tensor`` and hybrid meshes: step time and per-device compiled memory
  (``memory_analysis`` of the SPMD program). 8 fake devices share this machine's cores, so the
  times show relative communication/partitioning overhead, not speed-ups.
* Analytic: per-device memory of Muddit-512 training (params fp32 + grads fp32 + AdamW 2x fp32,
  fully sharded over all chips, + a bf16 activation estimate) on v4-8 / v5e-16 / v5p-128 style
  meshes, and the model-FLOPs formula used for MFU (``muddit_jax.train.flops``) cross-checked
  against ``jax.jit(step).lower(...).cost_analysis()["flops"]`` on small unrolled configs.

``python -m bench.scaling [--smoke] [--json PATH]``
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from bench.compile_memory import abstract_step_args
from bench.train_step import jax_step_fn
from muddit_jax.models.muddit import Muddit, MudditConfig
from muddit_jax.models.presets import RESOLUTION_512, TEXT_LENGTH, muddit_512
from muddit_jax.train.flops import train_step_flops

DEVICES = 8
LAYOUTS = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8), "2x2x2": (2, 2, 2)}
GiB = 2**30
# chips, HBM per chip (GiB), peak dense bf16 FLOP/s per chip
TOPOLOGIES = {
    "v4-8": (4, 32, 275e12),
    "v5e-16": (16, 16, 197e12),
    "v5p-128": (64, 95, 459e12),
}
STATE_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 params + fp32 grads + AdamW mu, nu
MARKER = "SCALING_JSON:"

# ---------------------------------------------------------------------------------------------
# analytic model


def param_counts(config: MudditConfig) -> dict[str, int]:
    """Parameters of each sub-network (abstract init, nothing allocated)."""
    size = common.BenchSize("p", config, 1, 2, 8)
    params, *_ = abstract_step_args(size, jax_step_fn(size)[1], scan_layers=False)
    return {k: common.param_count(v) for k, v in params.items()}


def activation_bytes(config: MudditConfig, batch: int, grid: int, text_len: int, remat: bool) -> float:
    """bf16 activations kept for the backward pass, per device (an estimate).

    Per transformer block and example, ``s d (34 + 5 a s / d)`` bytes (Korthikanti et al. 2022,
    16-bit activations, attention scores materialised) over the ``s`` joint tokens; with full
    remat only each block's input (``2 s d``) plus one block's working set. Plus the fp32 logits
    (x3: logits, softmax, grad) of both heads and the CLIP tower's layers.
    """
    m, t = config.mmdit, config.text
    d, a = m.inner_dim, m.num_attention_heads
    n = grid * grid // (4 if m.downsample else 1)
    s = n + text_len
    block = s * d * (34 + 5 * a * s / d)
    layers = m.num_layers + m.num_single_layers
    mmdit = (layers * 2 * s * d + block) if remat else layers * block
    clip = t.num_hidden_layers * text_len * t.hidden_size * (
        34 + 5 * t.num_attention_heads * text_len / t.hidden_size
    )
    logits = 3 * 4 * (grid * grid * m.codebook_size + text_len * (m.tokenizer_vocab_size or 0))
    return batch * (mmdit + clip + logits)


def analytic_rows(per_device_batch: int) -> list[common.Row]:
    cfg = muddit_512()
    grid = RESOLUTION_512 // cfg.vq.downsample_factor
    n_params = sum(param_counts(cfg).values())
    flops = train_step_flops(
        cfg, batch=per_device_batch, grid=grid, text_len=TEXT_LENGTH,
        trainable=("mmdit", "text_encoder"),
    )
    rows = []
    for name, (chips, hbm, peak) in TOPOLOGIES.items():
        state = STATE_BYTES_PER_PARAM * n_params / chips
        for remat in (False, True):
            act = activation_bytes(cfg, per_device_batch, grid, TEXT_LENGTH, remat)
            total = (state + act) / GiB
            rows.append(
                dict(
                    mesh=name, chips=chips, hbm_GiB=hbm, per_chip_batch=per_device_batch,
                    global_batch=per_device_batch * chips, remat=remat,
                    state_GiB=state / GiB, activations_GiB=act / GiB, total_GiB=total,
                    fits=total < 0.9 * hbm, step_s_at_40pct_mfu=flops / (0.4 * peak),
                )
            )
    return rows


def flops_crosscheck(names: tuple[str, ...]) -> list[common.Row]:
    """Analytic train-step FLOPs vs XLA's cost analysis of the (unrolled) lowered step."""
    rows = []
    for name in names:
        size = common.SIZES[name]
        step, tx = jax_step_fn(size)
        args = abstract_step_args(size, tx, scan_layers=False)
        xla = jax.jit(step).lower(*args).cost_analysis()["flops"]
        ours = train_step_flops(
            size.config, batch=size.batch, grid=size.grid, text_len=size.text_len,
            trainable=("mmdit", "text_encoder"),
        )
        rows.append(dict(size=name, analytic_GFLOP=ours / 1e9, xla_GFLOP=xla / 1e9,
                         analytic_over_xla=ours / xla))
    return rows


# ---------------------------------------------------------------------------------------------
# simulation (runs in a subprocess that sees 8 CPU devices)


def _fit(sharding, shape: tuple[int, ...]):
    """Replicate the dimensions whose mesh axes do not divide them (e.g. a 1025-row codebook)."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh, spec = sharding.mesh, list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, entry in enumerate(spec):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        if shape[i] % math.prod(mesh.shape[a] for a in axes):
            spec[i] = None
    return NamedSharding(mesh, PartitionSpec(*spec))


def measure_layout(size: common.BenchSize, layout: tuple[int, int, int], iters: int) -> common.Row:
    import flax.linen as nn
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from muddit_jax.parallel.rules import DEFAULT_RULES, MESH_AXES

    mesh = Mesh(np.asarray(jax.devices()[: math.prod(layout)]).reshape(layout), MESH_AXES)
    step, tx = jax_step_fn(size)
    params_abs, o_abs, batch_abs, rng_abs, i_abs = abstract_step_args(size, tx, False)
    dummy = (
        jnp.zeros((1, size.grid, size.grid), jnp.int32),
        jnp.zeros((1, size.text_len), jnp.int32),
        jnp.zeros((1,)),
        jnp.zeros((1, 5)),
    )
    boxed = jax.eval_shape(Muddit(size.config).init, jax.random.key(0), *dummy)["params"]
    with nn.logical_axis_rules(DEFAULT_RULES):
        p_specs = nn.get_partition_spec(boxed)
        o_specs = nn.get_partition_spec(jax.eval_shape(tx.init, boxed))
        p_shard = nn.logical_to_mesh_sharding(p_specs, mesh, DEFAULT_RULES)
        o_shard = nn.logical_to_mesh_sharding(o_specs, mesh, DEFAULT_RULES)
    p_shard = jax.tree.map(lambda s, a: _fit(s, a.shape), p_shard, params_abs)
    o_shard = jax.tree.map(lambda s, a: _fit(s, a.shape), o_shard, o_abs)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    b_shard = {k: _fit(rows, v.shape) for k, v in batch_abs.items()}
    rep = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        step,
        in_shardings=(p_shard, o_shard, b_shard, rep, rep),
        out_shardings=(p_shard, o_shard, rep),
        donate_argnums=(0, 1),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        compiled = jitted.lower(params_abs, o_abs, batch_abs, rng_abs, i_abs).compile()
    params = jax.jit(lambda: common.init_params(size), out_shardings=p_shard)()
    opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
    batch = {k: jax.device_put(v, b_shard[k]) for k, v in common.make_batch(size).items()}
    rng = jax.device_put(jax.random.key(0), rep)
    state = [params, opt_state, 0]

    def call():
        state[0], state[1], metrics = compiled(state[0], state[1], batch, rng, jnp.int32(state[2]))
        state[2] += 1
        return metrics["loss"]

    timing = common.time_calls(call, iters)
    m = compiled.memory_analysis()
    return dict(
        layout="x".join(map(str, layout)), name=[k for k, v in LAYOUTS.items() if v == layout][0],
        step_s=timing.median, best_s=timing.best,
        args_MiB=m.argument_size_in_bytes / 2**20, temp_MiB=m.temp_size_in_bytes / 2**20,
        per_device_MiB=(m.argument_size_in_bytes + m.temp_size_in_bytes) / 2**20,
    )


def simulate(size_name: str, layouts: list[str], iters: int) -> list[common.Row]:
    """Run :func:`measure_layout` in a subprocess with 8 host devices; returns its rows."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
    ).strip()
    env.update(common.HOST_ENV)
    cmd = [sys.executable, "-m", "bench.scaling", "--child", size_name, ",".join(layouts),
           str(iters)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith(MARKER)]
    if out.returncode or not lines:
        raise RuntimeError(f"scaling child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARKER):])


def child(size_name: str, layouts: str, iters: str) -> None:
    assert jax.device_count() >= DEVICES, jax.devices()
    size = common.SIZES[size_name]
    rows = [measure_layout(size, LAYOUTS[name], int(iters)) for name in layouts.split(",")]
    print(MARKER + json.dumps(rows))


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", default="small", help="model simulated on the 8-device mesh")
    p.add_argument("--batch", type=int, default=8, help="per-chip batch of the analytic table")
    args = p.parse_args(argv)
    layouts = ["fsdp"] if args.smoke else list(LAYOUTS)
    sim = simulate("tiny" if args.smoke else args.size, layouts, 1 if args.smoke else 2)
    check = flops_crosscheck(("tiny",) if args.smoke else ("tiny", "small"))
    analytic = [] if args.smoke else analytic_rows(args.batch)
    return common.finish(
        "scaling",
        args,
        {
            f"simulated 8-device CPU mesh ({'tiny' if args.smoke else args.size} model)": (sim, None),
            "analytic per-chip memory, Muddit-512 training (all params trained)": (analytic, None),
            "train-step FLOPs: analytic formula vs XLA cost analysis": (check, None),
        },
        flops_formula="muddit_jax.train.flops.train_step_flops: 2*M*N*K per matmul/conv, x3 for "
        "trainable sub-networks (fwd + bwd), remat not counted; MFU = flops / (step_s * peak)",
        muddit_512_params=param_counts(muddit_512()) if not args.smoke else None,
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
    else:
        common.reexec_with_host_env("bench.scaling")
        main()
