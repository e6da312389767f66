"""Stage 1 of a from-scratch run: train the VQ image tokenizer (``muddit-train --stage vq``).

Objective per batch of images ``x`` in [0, 1] with reconstruction ``x^``:
``l1_weight * |x - x^| + l2_weight * (x - x^)^2 + beta * commitment`` plus, for a learned
codebook, the codebook term ``(sg(z) - z_q)^2`` (straight-through gradients to the encoder).

Codebook (``vq.codebook``):
  * ``"ema"``: k-means-style updates. Per code, EMA counts ``N`` and EMA sums ``m`` of the latents
    assigned to it (decay ``vq.ema_decay``); the codebook row is ``m / N`` (Laplace-smoothed
    counts). The codebook gets no gradient and no optimizer update.
  * ``"learned"``: the codebook is a parameter trained by AdamW through the codebook term.

Dead-code restart: ``idle`` counts the steps since each code was last chosen; every
``vq.restart_every`` steps the codes idle for ``vq.dead_after`` steps or more are re-seeded from
encoder latents of the current batch (at step 0 every code is seeded uniformly, so the codebook
starts on the data). ``vq.restart_from``: ``"random"`` draws them uniformly, ``"error"`` in
proportion to their squared quantization error (see :func:`restart_draw`).

Metrics: ``psnr``, ``usage`` (fraction of codes chosen in the batch), ``active`` (fraction chosen
within the last ``dead_after`` steps), ``perplexity``, ``restarted``. Files in ``WORKDIR/vq/``:
``checkpoints/``, ``metrics.jsonl``, ``eval.json`` (held-out PSNR and codebook usage) and
``recon.png``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from muddit_jax.models.vq import VQConfig, VQModel, vector_quantize
from muddit_jax.parallel.mesh import MeshConfig, create_mesh
from muddit_jax.parallel.rules import get_rules
from muddit_jax.parallel.sharding import (
    batch_shardings,
    host_rows,
    logical_shardings,
    sharding_context,
)
from muddit_jax.train.optimizer import make_optimizer
from muddit_jax.train.state import optimizer_shardings, with_shardings

CODEBOOKS = ("ema", "learned")
RESTART_FROM = ("random", "error")
SMOOTHING = 1e-5  # Laplace smoothing of the EMA counts


@struct.dataclass
class VQTrainState:
    """Stage-1 state; ``params = {"vq": ...}`` so :func:`load_params` reads it like a run's."""

    step: jax.Array
    params: dict[str, Any]
    opt_state: Any
    cluster_size: jax.Array  # [n] EMA code counts
    embed_sum: jax.Array  # [n, d] EMA sums of assigned latents
    idle: jax.Array  # [n] int32 steps since each code was last chosen
    rng: jax.Array


def validate(v: ml_collections.ConfigDict) -> None:
    """Clear errors for bad ``config.vq`` fields."""
    problems = []
    if v.codebook not in CODEBOOKS:
        problems.append(f"vq.codebook={v.codebook!r}: use one of {CODEBOOKS}")
    if not 0.0 <= v.ema_decay < 1.0:
        problems.append(f"vq.ema_decay={v.ema_decay} must be in [0, 1)")
    if v.restart_from not in RESTART_FROM:
        problems.append(f"vq.restart_from={v.restart_from!r}: use one of {RESTART_FROM}")
    if v.restart_every < 0 or v.dead_after < 1:
        problems.append("vq.restart_every must be >= 0 (0 = never) and vq.dead_after >= 1")
    if v.global_batch < 1 or v.steps < 0:
        problems.append("vq.global_batch must be >= 1 and vq.steps >= 0")
    if problems:
        raise ValueError("invalid VQ stage config: " + "; ".join(problems))


def code_stats(codes: jax.Array, latents: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Per-code counts ``[n]`` and sums of assigned latents ``[n, d]`` (latents ``[m, d]``)."""
    flat = codes.reshape(-1)
    counts = jax.ops.segment_sum(jnp.ones_like(flat, jnp.float32), flat, num_segments=n)
    sums = jax.ops.segment_sum(latents.astype(jnp.float32), flat, num_segments=n)
    return counts, sums


def ema_codebook(cluster_size: jax.Array, embed_sum: jax.Array) -> jax.Array:
    """Codebook rows ``m / N`` with Laplace-smoothed counts ``N``."""
    n = cluster_size.shape[0]
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + SMOOTHING) / (total + n * SMOOTHING) * total
    return embed_sum / jnp.maximum(smoothed, SMOOTHING)[:, None]


def restart_draw(key: jax.Array, latents: jax.Array, assigned: jax.Array, n: int,
                 by_error: jax.Array | bool) -> jax.Array:
    """``n`` row indices into ``latents [m, d]`` for re-seeding dead codes: uniform, or with
    ``by_error`` drawn with probability proportional to each latent's squared distance to its
    assigned code ``assigned [m, d]`` (k-means++ seeding). Uniform draws follow the data's mass,
    so on images that are mostly flat background they mostly split the background into
    synonymous codes; error-weighted draws go to the patches the codebook represents worst."""
    d2 = jnp.sum((latents - assigned) ** 2, axis=-1)
    weights = jnp.where(by_error, d2 + 1e-12, 1.0)
    # inverse-CDF sampling: O(m + n log m); a Gumbel-max categorical would draw n * m numbers
    cdf = jnp.cumsum(weights)
    u = jax.random.uniform(key, (n,), dtype=cdf.dtype) * cdf[-1]
    return jnp.minimum(jnp.searchsorted(cdf, u, side="right"), latents.shape[0] - 1)


def make_step(model: VQModel, v: ml_collections.ConfigDict, tx: optax.GradientTransformation,
              schedule: Any) -> Callable[[VQTrainState, dict], tuple[VQTrainState, dict]]:
    """The pure stage-1 step ``(state, {"images"}) -> (state, metrics)``."""
    n = model.config.num_vq_embeddings
    learned = v.codebook == "learned"
    sg = jax.lax.stop_gradient

    def loss_fn(params, images):
        p = params["vq"]
        z = model.apply({"params": p}, images, method=VQModel.encode_latents)
        book = p["codebook"]["embedding"]
        z_q, codes, losses = vector_quantize(z, book if learned else sg(book), v.beta)
        recon = model.apply({"params": p}, z_q, method=VQModel.decode_latents)
        err = recon.astype(jnp.float32) - images
        l1, mse = jnp.mean(jnp.abs(err)), jnp.mean(err**2)
        loss = v.l1_weight * l1 + v.l2_weight * mse + v.beta * losses.commitment
        if learned:
            loss = loss + losses.codebook
        return loss, (sg(z), codes, dict(loss=loss, l1=l1, mse=mse,
                                         commitment=losses.commitment))

    def step(state: VQTrainState, batch: dict) -> tuple[VQTrainState, dict]:
        images = batch["images"]
        (_, (z, codes, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, images)
        if not learned:  # exact zeros: AdamW's moments and update of the codebook stay 0
            cb = grads["vq"]["codebook"]
            grads = {"vq": {**grads["vq"], "codebook": jax.tree.map(jnp.zeros_like, cb)}}
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        latents = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
        counts, sums = code_stats(codes, latents, n)
        decay = v.ema_decay
        cluster = decay * state.cluster_size + (1 - decay) * counts
        esum = decay * state.embed_sum + (1 - decay) * sums
        book = params["vq"]["codebook"]["embedding"]
        if not learned:
            book = ema_codebook(cluster, esum).astype(book.dtype)
        idle = jnp.where(counts > 0, 0, state.idle + 1)
        # dead-code restart from latents of this batch (uniformly or by quantization error)
        due = (v.restart_every > 0) & (state.step % max(v.restart_every, 1) == 0)
        dead = (due & (idle >= v.dead_after)) | (state.step == 0)
        key = jax.random.fold_in(state.rng, state.step)
        old_book = state.params["vq"]["codebook"]["embedding"].astype(jnp.float32)
        fresh = latents[restart_draw(key, latents, old_book[codes.reshape(-1)], n,
                                     by_error=(v.restart_from == "error") & (state.step > 0))]
        book = jnp.where(dead[:, None], fresh.astype(book.dtype), book)
        esum = jnp.where(dead[:, None], fresh, esum)
        cluster = jnp.where(dead, 1.0, cluster)
        idle = jnp.where(dead, 0, idle)
        params = {"vq": {**params["vq"], "codebook": {"embedding": book}}}
        probs = counts / jnp.sum(counts)
        metrics = {
            **metrics,
            "psnr": -10.0 * jnp.log10(jnp.maximum(metrics["mse"], 1e-10)),
            "usage": jnp.mean(counts > 0),
            "active": jnp.mean(idle < v.dead_after),
            "perplexity": jnp.exp(-jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0))),
            "restarted": jnp.sum(dead),
            "grad_norm": optax.global_norm(grads),
            "lr": jnp.asarray(schedule(state.step)),
        }
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            cluster_size=cluster, embed_sum=esum, idle=idle)
        return new, {k: jnp.asarray(x, jnp.float32) for k, x in metrics.items()}

    return step


@dataclasses.dataclass
class VQRun:
    """Mesh, model, abstract state + shardings and the jitted step of stage 1."""

    config: ml_collections.ConfigDict
    model: VQModel
    mesh: Any
    abstract: VQTrainState
    shardings: VQTrainState
    batch_shardings: dict[str, NamedSharding]
    init: Callable[[int], VQTrainState]
    step: Any


def build(config: ml_collections.ConfigDict, vq_config: VQConfig, resolution: int) -> VQRun:
    """Everything stage 1 needs before data and checkpoints (see :class:`VQRun`)."""
    v = config.vq
    validate(v)
    mesh = create_mesh(MeshConfig.from_config(config.mesh))
    rules = get_rules(config.mesh.rules)
    model = VQModel(vq_config)
    # with an EMA codebook the step zeroes the codebook's gradient, so AdamW leaves it alone
    tx, schedule = make_optimizer(v, int(v.steps))
    n, d = vq_config.num_vq_embeddings, vq_config.embed_dim
    f = vq_config.downsample_factor

    def boxed_params(rng):
        return {"vq": model.init(rng, jnp.zeros((1, f, f, 3), jnp.float32))["params"]}

    def new_state(params, rng):
        return VQTrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
            cluster_size=jnp.zeros((n,), jnp.float32), embed_sum=jnp.zeros((n, d), jnp.float32),
            idle=jnp.zeros((n,), jnp.int32), rng=rng,
        )

    rep = NamedSharding(mesh, PartitionSpec())
    with sharding_context(mesh, rules):
        boxed = jax.eval_shape(boxed_params, jax.random.PRNGKey(0))
    param_sh = logical_shardings(boxed, mesh, rules)
    abstract = jax.eval_shape(new_state, nn.unbox(boxed), jax.random.PRNGKey(0))
    opt_sh = optimizer_shardings(tx, abstract.opt_state, param_sh, mesh)
    shardings = VQTrainState(step=rep, params=param_sh, opt_state=opt_sh, cluster_size=rep,
                             embed_sum=rep, idle=rep, rng=rep)
    abstract = with_shardings(abstract, shardings)
    batch_abs = {"images": jax.ShapeDtypeStruct((v.global_batch, resolution, resolution, 3),
                                                jnp.float32)}
    batch_sh = batch_shardings(mesh, rules, batch_abs)

    def init(seed: int) -> VQTrainState:
        k_params, k_state = jax.random.split(jax.random.PRNGKey(seed))
        with sharding_context(mesh, rules):
            fn = jax.jit(lambda a, b: new_state(nn.unbox(boxed_params(a)), b),
                         out_shardings=shardings)
            return fn(k_params, k_state)

    with sharding_context(mesh, rules):
        step = jax.jit(make_step(model, v, tx, schedule), in_shardings=(shardings, batch_sh),
                       out_shardings=(shardings, rep), donate_argnums=0
                       ).lower(abstract, batch_abs).compile()
    return VQRun(config, model, mesh, abstract, shardings, batch_sh, init, step)


def host_batch_rows(run: VQRun) -> slice:
    """This process's rows of each global stage-1 batch."""
    return host_rows(run.batch_shardings["images"], int(run.config.vq.global_batch))


def evaluate(model: VQModel, params: Any, images: np.ndarray, batch: int = 64
             ) -> tuple[dict[str, float], np.ndarray]:
    """Held-out metrics of ``images [N, H, W, 3]`` in [0, 1]: mean per-image ``psnr`` (clipped
    reconstructions), codebook ``usage`` (distinct codes / codebook size) and ``perplexity`` of
    the code histogram. Also returns every (clipped) reconstruction, ``[N, H, W, 3]``."""
    n = model.config.num_vq_embeddings

    @jax.jit
    def run(x):
        codes = model.apply({"params": params}, x, method=VQModel.encode)
        return codes, jnp.clip(model.apply({"params": params}, codes, method=VQModel.decode), 0, 1)

    psnrs, counts, recons = [], np.zeros(n), []
    for i in range(0, len(images), batch):
        x = np.asarray(images[i : i + batch], np.float32)
        codes, recon = jax.device_get(run(x))
        recons.append(recon)
        mse = np.mean((recon - x) ** 2, axis=(1, 2, 3))
        psnrs.append(-10 * np.log10(np.maximum(mse, 1e-10)))
        counts += np.bincount(np.asarray(codes).ravel(), minlength=n)
    p = counts / counts.sum()
    perplexity = float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
    metrics = dict(psnr=float(np.mean(np.concatenate(psnrs))), usage=float(np.mean(counts > 0)),
                   perplexity=perplexity, images=float(len(images)))
    return metrics, np.concatenate(recons)


def vq_workdir(workdir: str | Path) -> Path:
    """Stage-1 files live in ``WORKDIR/vq``."""
    return Path(workdir) / "vq"
