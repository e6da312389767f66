"""Benchmark 3: compile time and compiled memory of the train step, traced abstractly (no params
are ever allocated: ``jax.eval_shape`` + ``.lower()`` on ``jax.ShapeDtypeStruct`` inputs).

* Compile seconds, unrolled vs ``nn.scan`` MM-DiT blocks, as the depth grows to Muddit-512's
  14 dual + 28 single blocks (1:2 ratio kept), at a small width (128) so only depth matters.
* ``compiled.memory_analysis()`` of the bf16-compute / fp32-param train step at the Muddit-512
  shapes (``muddit_jax.models.presets.muddit_512``: 1.06B MM-DiT + 354M CLIP text tower, 32x32
  codes + 77 text tokens), with and without remat of the MM-DiT blocks. CPU buffer assignment
  stands in for the accelerator's; the step is the stand-in of ``bench.train_step``.

``python -m bench.compile_memory [--smoke] [--json PATH] [--batch 8]``
"""

from __future__ import annotations

import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bench import common
from bench.train_step import make_jax_step
from muddit_jax.models.muddit import Muddit
from muddit_jax.models.presets import RESOLUTION_512, TEXT_LENGTH, muddit_512

DEPTHS = ((2, 4), (7, 14), (14, 28))
GiB = 2**30


def abstract_step_args(size: common.BenchSize, tx, scan_layers: bool) -> tuple:
    """Shape/dtype stand-ins for ``(params, opt_state, batch, rng, step)`` of the train step."""
    model = Muddit(size.config, scan_layers=scan_layers)
    dummy = (
        jnp.zeros((1, size.grid, size.grid), jnp.int32),
        jnp.zeros((1, size.text_len), jnp.int32),
        jnp.zeros((1,), jnp.float32),
        jnp.zeros((1, 5), jnp.float32),
    )
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *dummy))["params"]
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in common.make_batch(size).items()
    }
    rng = jax.eval_shape(lambda: jax.random.key(0))
    return params, jax.eval_shape(tx.init, params), batch, rng, jax.ShapeDtypeStruct((), jnp.int32)


def lower_step(size: common.BenchSize, **options: Any):
    """``(lowered, lower_seconds)`` of the train step for ``size`` without allocating anything."""
    step, tx = make_jax_step(size, **options)
    args = abstract_step_args(size, tx, options.get("scan_layers", False))
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    return lowered, time.perf_counter() - t0


@functools.lru_cache(maxsize=None)
def compile_step(size: common.BenchSize, **options: Any) -> tuple[Any, float, float]:
    """``(compiled, lower_s, compile_s)``, cached so that equal requests compile once."""
    lowered, t_lower = lower_step(size, **options)
    compiled, t_compile = common.timed_compile(lowered)
    return compiled, t_lower, t_compile


def sweep_size(dual: int, single: int) -> common.BenchSize:
    cfg = common.muddit_config(
        width=128, heads=2, dual=dual, single=single, text_layers=2, text_width=128,
        text_vocab=1024, codebook=256,
    )
    return common.BenchSize(f"w128 {dual}+{single}", cfg, batch=2, grid=8, text_len=8)


def compile_sweep(depths: tuple[tuple[int, int], ...]) -> list[common.Row]:
    rows = []
    for dual, single in depths:
        row: common.Row = dict(dual=dual, single=single)
        for scan in (False, True):
            _, t_lower, t_compile = compile_step(sweep_size(dual, single), scan_layers=scan)
            key = "scan" if scan else "unrolled"
            row[f"{key}_lower_s"], row[f"{key}_compile_s"] = t_lower, t_compile
        row["unrolled_vs_scan"] = row["unrolled_compile_s"] / row["scan_compile_s"]
        rows.append(row)
    return rows


def memory_rows(size: common.BenchSize, dtype: Any) -> list[common.Row]:
    """Compiled memory of the scanned train step without / with remat of the MM-DiT blocks."""
    rows = []
    for remat in (False, True):
        options = dict(remat=remat, scan_layers=True)
        if dtype != jnp.float32:
            options["dtype"] = dtype
        compiled, _, t_compile = compile_step(size, **options)
        m = compiled.memory_analysis()
        rows.append(
            dict(
                config=size.name, batch=size.batch, compute=jnp.dtype(dtype).name,
                params="float32", remat=remat, scan=True,
                arguments_GiB=m.argument_size_in_bytes / GiB,
                temp_GiB=m.temp_size_in_bytes / GiB,
                output_GiB=m.output_size_in_bytes / GiB,
                aliased_GiB=m.alias_size_in_bytes / GiB,
                peak_GiB=(m.argument_size_in_bytes + m.temp_size_in_bytes
                          + m.output_size_in_bytes - m.alias_size_in_bytes) / GiB,
                compile_s=t_compile,
            )
        )
    return rows


def muddit_512_size(batch: int) -> common.BenchSize:
    cfg = muddit_512()
    grid = RESOLUTION_512 // cfg.vq.downsample_factor
    return common.BenchSize("muddit-512", cfg, batch=batch, grid=grid, text_len=TEXT_LENGTH)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="per-device batch at 512 px")
    args = p.parse_args(argv)
    sweep = compile_sweep(((1, 1),) if args.smoke else DEPTHS)
    if args.smoke:  # shares the sweep's scanned compile for remat=False
        memory = memory_rows(sweep_size(1, 1), jnp.float32)
    else:
        memory = memory_rows(muddit_512_size(args.batch), jnp.bfloat16)
    saved = memory[0]["temp_GiB"] / max(memory[1]["temp_GiB"], 1e-12)
    return common.finish(
        "compile_memory",
        args,
        {
            "train-step compile seconds vs depth (width 128)": (sweep, None),
            "compiled memory of the train step (per device)": (memory, None),
        },
        remat_temp_reduction=saved,
    )


if __name__ == "__main__":
    common.reexec_with_host_env("bench.compile_memory")
    main()
