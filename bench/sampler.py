"""Benchmark 2: sampling latency (text encoding + T MaskGIT steps; VQ encode/decode excluded) of
the compiled ``lax.scan`` sampler vs (a) a Python loop over a jitted single step and (b) a
PyTorch loop of the reference, for T2I (classifier-free guidance: one doubled-batch forward per
step, text encoded once) and I2T (the masked text is re-encoded by the text tower every step).

The scan programs mirror ``MudditPipeline``'s T2I / I2T programs (``pipeline.py``) minus the VQ;
:func:`encoder_dots_in_loop` checks from the jaxpr that the I2T scan body holds the text tower.
Targets: scan <= 1.05 x T x one forward; scan >= 2x the PyTorch loop.

``python -m bench.sampler [--smoke] [--json PATH] [--sizes small] [--steps 16,32,64]``
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from muddit_jax.diffusion.sampler import (
    SamplerConfig,
    classifier_free_guidance,
    denoise_step,
    guidance_scale_at,
    model_timestep,
    sample,
)
from muddit_jax.models.muddit import Muddit

GUIDANCE = 9.0
TASKS = ("t2i", "i2t")
# op_name patterns of the parts of one sampling step (first match wins)
PROFILE_PARTS = (
    ("model forward", r"Muddit"),
    ("Gumbel noise (threefry)", r"gumbel|uniform|random_bits|threefry"),
    ("candidates (masking, argmax)", r"draw_candidates|filter_logits|prepare_logits"),
    ("re-masking (log-softmax, sort)", r"denoise_step|remask|log_softmax|sort|num_to_remask"),
    ("guidance combine", r"guided|classifier_free"),
    ("other", r"."),
)


def sampler_config(size: common.BenchSize, task: str, steps: int) -> SamplerConfig:
    if task == "t2i":
        m = size.config.mmdit
        return SamplerConfig(
            num_steps=steps, mask_id=m.mask_token_id, vocab_limit=m.codebook_size,
            guidance_scale=GUIDANCE,
        )
    return SamplerConfig(num_steps=steps, mask_id=size.mask_text_id)


def task_inputs(size: common.BenchSize, task: str) -> dict[str, np.ndarray]:
    """``b = size.batch`` prompts (T2I) or images as codes + ``<bos>`` prefixes (I2T)."""
    batch = common.make_batch(size, seed=1)
    empty = np.tile(np.asarray(common.empty_text_ids(size), np.int32), (size.batch, 1))
    fixed = np.zeros((size.batch, size.text_len), bool)
    fixed[:, 0] = True
    return dict(batch, empty_ids=empty, fixed=fixed)


# ---------------------------------------------------------------------------------------------
# JAX: logits functions and the two loop strategies


def logits_fn(model: Muddit, size: common.BenchSize, task: str) -> Callable:
    """``(context, tokens [b', n], t [b']) -> logits [b', n, V]`` as in ``pipeline.py``."""
    g = size.grid

    def t2i(context, tokens, t):
        params, ctx, pooled, micro = context
        logits, _ = model.apply(
            {"params": params}, tokens.reshape(-1, g, g), ctx, pooled, t, micro,
            method=Muddit.denoise,
        )
        return logits.reshape(tokens.shape[0], g * g, -1)

    def i2t(context, tokens, t):
        params, codes, micro = context
        return model.apply({"params": params}, codes, tokens, t, micro)[1]

    return t2i if task == "t2i" else i2t


def make_context(model: Muddit, task: str) -> Callable:
    """``(params, inputs) -> (context, tokens, fixed)``: the one-off work before the loop."""

    def prepare(params, x):
        if task == "i2t":
            return (params, x["image_ids"], x["micro_conds"]), x["text_ids"], x["fixed"]
        text = jnp.concatenate([x["text_ids"], x["empty_ids"]])
        ctx, pooled = model.apply({"params": params}, text, method=Muddit.encode_text)
        micro = jnp.concatenate([x["micro_conds"], x["micro_conds"]])
        b, n = x["image_ids"].shape[0], x["image_ids"].shape[1] * x["image_ids"].shape[2]
        return (params, ctx, pooled, micro), jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), bool)

    return prepare


def make_scan(model, size, task, cfg) -> Callable:
    """The whole sampling as one jitted program (``lax.scan`` over the steps)."""
    fn, prepare = logits_fn(model, size, task), make_context(model, task)

    def program(params, x, rng):
        context, tokens, fixed = prepare(params, x)
        return sample(fn, context, tokens, fixed, rng, cfg)

    return jax.jit(program)


def make_loop(model, size, task, cfg) -> Callable:
    """Baseline (a): jitted prepare + a Python loop over a jitted single step.

    The step mirrors the body of :func:`muddit_jax.diffusion.sampler.sample` (same noise from
    ``fold_in(rng, step)``), so its tokens must equal the scan's; the benchmark checks that.
    """
    fn, prepare = logits_fn(model, size, task), make_context(model, task)
    prepare = jax.jit(prepare)

    @jax.jit
    def step_fn(context, state, fixed, step, rng):
        b, n = state.shape
        unknown = (state == cfg.mask_id) & ~fixed
        t = jnp.full((b,), model_timestep(step, cfg), jnp.float32)
        if cfg.guidance_scale is None:
            logits = fn(context, state, t)
        else:
            logits = classifier_free_guidance(fn, guidance_scale_at(step, cfg), cfg)(context, state, t)
        k_sample, k_conf = jax.random.split(jax.random.fold_in(rng, step))
        vocab = min(cfg.vocab_limit or logits.shape[-1], logits.shape[-1])
        sample_gumbel = jax.random.gumbel(k_sample, (b, n, vocab), jnp.float32)
        conf_gumbel = jax.random.gumbel(k_conf, (b, n), jnp.float32)
        n_base = jnp.full((b,), n, jnp.int32)
        return denoise_step(logits, state, unknown, step, n_base, sample_gumbel, conf_gumbel, cfg)

    def program(params, x, rng):
        context, state, fixed = prepare(params, x)
        state = jnp.where(fixed, state, cfg.mask_id)
        for i in range(cfg.num_steps):
            state = step_fn(context, state, fixed, jnp.int32(i), rng)
        return state

    return program


def make_forward(model, size, task, cfg) -> Callable:
    """One model forward at the per-step batch (doubled under guidance), jitted."""
    fn, prepare = logits_fn(model, size, task), jax.jit(make_context(model, task))
    fwd = jax.jit(fn)

    def forward(params, x):
        context, tokens, _ = prepare(params, x)
        if cfg.guidance_scale is not None:
            tokens = jnp.concatenate([tokens, tokens])
        t = jnp.full((tokens.shape[0],), 0.5, jnp.float32)
        return lambda: fwd(context, tokens, t)

    return forward


# ---------------------------------------------------------------------------------------------
# structural check: is the text tower inside the compiled loop?


def _sub_jaxprs(eqn) -> list:
    out = []
    for v in eqn.params.values():
        for item in v if isinstance(v, (list, tuple)) else [v]:
            if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                out.append(item.jaxpr)
            elif hasattr(item, "eqns"):
                out.append(item)
    return out


def _count_dots(jaxpr, inside_scan: bool = False) -> tuple[int, int]:
    """(dot_generals anywhere, dot_generals inside a ``scan`` body) of a jaxpr, recursively."""
    total = in_scan = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            total += 1
            in_scan += inside_scan
        for sub in _sub_jaxprs(eqn):
            t, s = _count_dots(sub, inside_scan or eqn.primitive.name == "scan")
            total, in_scan = total + t, in_scan + s
    return total, in_scan


def encoder_dots_in_loop(model, size, params, x) -> dict[str, int]:
    """dot_generals in the I2T scan body vs in one full forward / one MM-DiT-only forward."""
    cfg = sampler_config(size, "i2t", 2)
    scan = make_scan(model, size, "i2t", cfg)
    _, body = _count_dots(jax.make_jaxpr(scan)(params, x, jax.random.key(0)).jaxpr)
    ctx = make_context(model, "i2t")(params, x)
    full, _ = _count_dots(jax.make_jaxpr(logits_fn(model, size, "i2t"))(
        ctx[0], ctx[1], jnp.zeros((size.batch,))).jaxpr)
    enc, _ = _count_dots(jax.make_jaxpr(
        lambda p, ids: model.apply({"params": p}, ids, method=Muddit.encode_text))(
        params, x["text_ids"]).jaxpr)
    return dict(scan_body=body, full_forward=full, text_encoder=enc)


# ---------------------------------------------------------------------------------------------
# PyTorch: the same step rule around the reference


def torch_denoise_step(logits, tokens, unknown, step: int, cfg: SamplerConfig, gen):
    """Torch transcription of :func:`denoise_step` (Gumbel-max sampling, multinomial mode)."""
    import torch

    def gumbel(shape):
        u = torch.rand(shape, generator=gen).clamp_(1e-20, 1.0)
        return -torch.log(-torch.log(u))

    logits = logits.float()
    if cfg.vocab_limit is not None:
        logits = logits[..., : cfg.vocab_limit]
    if 0 <= cfg.mask_id < logits.shape[-1]:
        logits[..., cfg.mask_id] = -math.inf
    cand = (logits + gumbel(logits.shape)).argmax(-1)
    cand = torch.where(unknown, cand, tokens)
    log_p = torch.log_softmax(logits, -1).gather(-1, cand[..., None])[..., 0]
    if step == cfg.num_steps - 1:
        return cand
    n = tokens.shape[1]
    target = math.floor(n * math.cos(0.5 * math.pi * (step + 1) / cfg.num_steps))
    mask_len = torch.clamp(torch.clamp(unknown.sum(-1) - 1, max=target), min=1)
    t0, t1 = cfg.temperature
    temp = t0 + (t1 - t0) * step / max(cfg.num_steps - 1, 1)
    conf = torch.where(unknown, log_p + temp * gumbel(log_p.shape), math.inf)
    cut = conf.sort(-1).values.gather(-1, mask_len.clamp(max=n - 1)[:, None])
    return torch.where(conf < cut, cfg.mask_id, cand)


def make_torch_loop(tm, size: common.BenchSize, task: str, cfg: SamplerConfig) -> Callable:
    """Baseline (b): the upstream-style Python loop over the torch reference (no_grad)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    g = size.grid

    @torch.no_grad()
    def run(x: dict) -> Any:
        b = x["text_ids"].shape[0]
        micro = x["micro_conds"]
        if task == "t2i":
            ctx, pooled = tm.encode_text(torch.cat([x["text_ids"], x["empty_ids"]]))
            micro2 = torch.cat([micro, micro])
            state = torch.full((b, g * g), cfg.mask_id, dtype=torch.long)
            fixed = torch.zeros_like(state, dtype=torch.bool)
        else:
            fixed = x["fixed"]
            state = torch.where(fixed, x["text_ids"], cfg.mask_id)
        for i in range(cfg.num_steps):
            unknown = (state == cfg.mask_id) & ~fixed
            t = torch.full((b,), (cfg.num_steps - 1 - i) / cfg.num_steps)
            if task == "t2i":
                both, _ = tm.denoise(
                    torch.cat([state, state]).view(2 * b, g, g), ctx, pooled, torch.cat([t, t]),
                    micro2,
                )
                both = both.flatten(2).transpose(1, 2)  # [2b, n, K]
                cond, uncond = both[:b], both[b:]
                logits = cond + (GUIDANCE - 1.0) * (cond - uncond)
            else:
                logits = tm(x["image_ids"], state, t, micro)[1]
            state = torch_denoise_step(logits, state, unknown, i, cfg, gen)
        return state

    return run


# ---------------------------------------------------------------------------------------------
# the benchmark


def bench(
    size: common.BenchSize, steps: list[int], iters: int, profile: bool
) -> tuple[list, list, dict]:
    import torch

    params = common.init_params(size)
    model = Muddit(size.config)
    tm = common.torch_muddit(size.config, params, size.grid)
    rows, prof, checks = [], [], {}
    for task in TASKS:
        x_np = task_inputs(size, task)
        x = {k: jnp.asarray(v) for k, v in x_np.items()}
        x_t = {k: torch.from_numpy(v) for k, v in x_np.items()}
        for k in ("image_ids", "text_ids", "empty_ids"):
            x_t[k] = x_t[k].long()
        fwd = make_forward(model, size, task, sampler_config(size, task, 1))(params, x)
        t_fwd = common.time_calls(fwd, max(3, iters)).best
        for T in steps:
            cfg = sampler_config(size, task, T)
            rng = jax.random.key(0)
            scan, loop = make_scan(model, size, task, cfg), make_loop(model, size, task, cfg)
            tloop = make_torch_loop(tm, size, task, cfg)
            fns = {
                "scan": lambda: scan(params, x, rng),
                "loop": lambda: loop(params, x, rng),
                **{
                    f"torch {n}T": common.with_torch_threads(lambda: tloop(x_t), n)
                    for n in common.torch_thread_counts()
                },
            }
            with common.CompileCounter() as cc:
                same = bool(np.array_equal(np.asarray(fns["scan"]()), np.asarray(fns["loop"]())))
            with common.no_recompiles(f"sampler {task} T={T}"):
                tm_ = common.time_interleaved(fns, iters, warmup=0)
            s, lo = tm_["scan"].best, tm_["loop"].best
            to = min(t.best for k, t in tm_.items() if k.startswith("torch"))  # faster threads
            rows.append(
                dict(
                    size=size.name, task=task, batch=size.batch, T=T, forward_s=t_fwd,
                    scan_s=s, loop_s=lo, torch_s=to, scan_per_step_s=s / T,
                    scan_vs_T_fwd=s / (T * t_fwd), loop_vs_scan=lo / s, torch_vs_scan=to / s,
                    loop_equals_scan=same, compiles_first_call=cc.count,
                )
            )
            if profile and T == steps[0]:
                hlo = scan.lower(params, x, rng).compile().as_text()
                prof += [
                    dict(size=size.name, task=task, T=T, **r)
                    for r in common.op_profile(fns["scan"], hlo, PROFILE_PARTS, top=4)
                    if r["group"] != "kind"
                ]
    checks["i2t_dots"] = encoder_dots_in_loop(
        model, size, params, {k: jnp.asarray(v) for k, v in task_inputs(size, "i2t").items()}
    )
    return rows, prof, checks


COLUMNS = [
    "size", "task", "batch", "T", "forward_s", "scan_s", "loop_s", "torch_s", "scan_per_step_s",
    "scan_vs_T_fwd", "loop_vs_scan", "torch_vs_scan", "loop_equals_scan", "compiles_first_call",
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="small")
    p.add_argument("--steps", default="16,32,64")
    args = p.parse_args(argv)
    names = ["tiny"] if args.smoke else args.sizes.split(",")
    steps = [2] if args.smoke else [int(s) for s in args.steps.split(",")]
    iters = 1 if args.smoke else 2
    rows, prof, checks = [], [], {}
    for name in names:
        size = common.SIZES[name]
        size = common.BenchSize(size.name, size.config, 1, size.grid, size.text_len)
        r, pr, c = bench(size, steps, iters, profile=not args.smoke)
        rows, prof, checks = rows + r, prof + pr, {**checks, name: c}
    dots = {k: v["i2t_dots"] for k, v in checks.items()}
    return common.finish(
        "sampler",
        args,
        {
            "sampling latency (best of round-robin calls; VQ excluded)": (rows, COLUMNS),
            "where the scan's time goes (XLA ops, profiler trace)": (prof, None),
        },
        i2t_text_encoder_in_compiled_loop={
            k: d["scan_body"] >= d["full_forward"] > d["full_forward"] - d["text_encoder"]
            for k, d in dots.items()
        },
        i2t_dot_counts=dots,
        target="scan <= 1.05 x T x forward; torch loop >= 2x scan",
        target_met={
            f"{r['size']} {r['task']} T={r['T']}": bool(
                r["scan_vs_T_fwd"] <= 1.05 and r["torch_vs_scan"] >= 2.0
            )
            for r in rows
        },
    )


if __name__ == "__main__":
    common.reexec_with_host_env("bench.sampler")
    main()
