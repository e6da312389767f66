"""Benchmark 5: one NVIDIA H100/H200 at the Muddit-512 config: bf16 train-step MFU (target >= 40%)
and 512-px text-to-image latency (32 steps, CFG, VQ decode included) vs the paper's 1.49 s.

Without a GPU it prints ``no GPU: skipped`` and writes ``{"skipped": true, ...}`` (exit 0).
``--allow-cpu`` runs the same code on the default backend (with ``--smoke``: the tiny size), so
the path stays tested on machines without an accelerator.

MFU = ``muddit_jax.train.flops.train_step_flops`` (all parameters trained, remat not counted) /
step seconds / the device's dense bf16 peak (:data:`PEAK_BF16`).

``python -m bench.gpu [--smoke] [--json PATH] [--batch 8] [--allow-cpu]``
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bench import common
from bench.sampler import make_context, logits_fn, sampler_config, task_inputs
from bench.train_step import make_jax_step
from muddit_jax.diffusion.sampler import sample
from muddit_jax.models.muddit import Muddit
from muddit_jax.models.presets import RESOLUTION_512, TEXT_LENGTH, muddit_512
from muddit_jax.models.vq import VQModel
from muddit_jax.train.flops import train_step_flops

PAPER_T2I_S = 1.49  # Muddit paper: 512 px text-to-image latency
SAMPLER_STEPS = 32
# dense bf16 tensor-core peak FLOP/s by device_kind substring (first match wins)
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))


def peak_flops(kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16 if k in kind), None)


def train_rows(size: common.BenchSize, iters: int, variants: dict[str, dict]) -> list[common.Row]:
    """bf16-compute / fp32-param train steps (scanned blocks), timed, with MFU."""
    kind = jax.devices()[0].device_kind
    flops = train_step_flops(
        size.config, batch=size.batch, grid=size.grid, text_len=size.text_len,
        trainable=("mmdit", "text_encoder"),
    )
    rows = []
    for name, options in variants.items():
        row: common.Row = dict(variant=name, batch=size.batch, device=kind)
        try:
            step, tx = make_jax_step(size, dtype=jnp.bfloat16, scan_layers=True, **options)
            params = common.init_params(size, scan_layers=True)
            opt_state = jax.jit(tx.init)(params)
            batch = {k: jnp.asarray(v) for k, v in common.make_batch(size).items()}
            rng = jax.random.key(0)
            state = [params, opt_state, 0]

            def call():
                state[0], state[1], m = step(state[0], state[1], batch, rng, jnp.int32(state[2]))
                state[2] += 1
                return m["loss"]

            with common.CompileCounter() as cc:
                common.block(call())
            with common.no_recompiles(f"gpu train step {name}"):
                t = common.time_calls(call, iters).median
            peak = peak_flops(kind)
            row.update(step_s=t, TFLOP_step=flops / 1e12, TFLOPs=flops / t / 1e12,
                       mfu=None if peak is None else flops / t / peak, compiles=cc.count)
            del state[:]
        except Exception as e:  # e.g. cuDNN attention unsupported for a shape: report, go on
            row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
        rows.append(row)
    return rows


def t2i_latency(size: common.BenchSize, steps: int, iters: int) -> common.Row:
    """Prompt -> 512-px image: text encoding, ``steps`` guided MaskGIT steps, VQ decode."""
    model = Muddit(size.config, dtype=jnp.bfloat16)
    vq = VQModel(size.config.vq, dtype=jnp.bfloat16)
    cfg = sampler_config(size, "t2i", steps)
    fn, prepare = logits_fn(model, size, "t2i"), make_context(model, "t2i")
    pixels = size.grid * size.config.vq.downsample_factor
    vq_params = jax.jit(vq.init)(jax.random.key(1), jnp.zeros((1, pixels, pixels, 3)))["params"]

    @jax.jit
    def program(params, vq_params, x, rng):
        context, tokens, fixed = prepare(params, x)
        codes = sample(fn, context, tokens, fixed, rng, cfg).reshape(-1, size.grid, size.grid)
        return vq.apply({"params": vq_params}, codes, method=VQModel.decode)

    params = common.init_params(size)
    x = {k: jnp.asarray(v) for k, v in task_inputs(size, "t2i").items()}
    rng = jax.random.key(0)
    with common.CompileCounter() as cc:
        common.block(program(params, vq_params, x, rng))
    with common.no_recompiles("gpu t2i"):
        t = common.time_calls(lambda: program(params, vq_params, x, rng), iters).median
    return dict(task="t2i", pixels=pixels, steps=steps, batch=size.batch, latency_s=t,
                paper_s=PAPER_T2I_S, vs_paper=PAPER_T2I_S / t, compiles=cc.count)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="train batch (one GPU)")
    p.add_argument("--allow-cpu", action="store_true", help="run even without a GPU")
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu" and not args.allow_cpu:
        reason = f"no GPU: skipped (JAX backend is {jax.default_backend()!r})"
        print(reason)
        return common.finish("gpu", args, {}, skipped=True, reason=reason)
    if args.smoke:
        base = common.SIZES["tiny"]
        train = common.BenchSize("tiny", base.config, 2, base.grid, base.text_len)
        steps, iters, variants = 2, 1, {"xla attention": {"attention_impl": "xla"}}
    else:
        cfg = muddit_512()
        grid = RESOLUTION_512 // cfg.vq.downsample_factor
        train = common.BenchSize("muddit-512", cfg, args.batch, grid, TEXT_LENGTH)
        steps, iters = SAMPLER_STEPS, 5
        variants = {
            "xla attention": {"attention_impl": "xla"},
            "cudnn attention": {"attention_impl": "cudnn"},
            "cudnn attention + remat": {"attention_impl": "cudnn", "remat": True},
        }
    rows = train_rows(train, iters, variants)
    sample_size = common.BenchSize(train.name, train.config, 1, train.grid, train.text_len)
    latency = [t2i_latency(sample_size, steps, iters)]
    best = max((r.get("mfu") or 0.0 for r in rows), default=0.0)
    return common.finish(
        "gpu",
        args,
        {"bf16 train step, all params trained": (rows, None), "512-px T2I latency": (latency, None)},
        skipped=False,
        best_mfu=best,
        target="MFU >= 0.40; T2I latency vs paper 1.49 s",
        target_met=best >= 0.40,
    )


if __name__ == "__main__":
    common.reexec_with_host_env("bench.gpu")
    main()
