"""The pure, jittable train step: ``train_step(state, batch) -> (state, metrics)``.

One step: the step key is ``fold_in(state.rng, state.step)``; raw ``images`` (if the batch has
them) are encoded to ``image_ids`` by the frozen VQ; gradients of the trainable params are
averaged over ``accum_steps`` micro-batches (``lax.scan``; micro-batch ``j`` takes rows
``j, j + k, j + 2k, ...`` so every device keeps its own rows, and gets key ``fold_in(key, j)``);
then clipping + AdamW (inside ``tx``) and the optional EMA. A non-finite loss or gradient norm
skips the whole update (params, optimizer state and EMA keep their values), increments
``nonfinite_streak`` / ``nonfinite_total``; a finite step resets the streak. Metrics are flat
float32 scalars.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from muddit_jax.diffusion.loss import LossConfig, diffusion_loss
from muddit_jax.models.vq import VQModel
from muddit_jax.parallel.sharding import BATCH_AXIS
from muddit_jax.train.state import Networks, TrainState

Batch = Mapping[str, jax.Array]
# loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)
LossFn = Callable[[Any, Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
EncodeFn = Callable[[Any, Batch], Batch]


def muddit_loss_fn(nets: Networks, config: LossConfig, per_row_paths: bool = True) -> LossFn:
    """Muddit's diffusion loss over ``{**frozen, **trainable}`` (the VQ is not used here).

    ``per_row_paths=False`` drops the loss's ``generated_rows``, so that every row runs both
    image input paths (the model's fallback; ``bench.image_paths`` compares the two).
    """

    def forward(params, image_ids, text_ids, timestep, micro_conds, generated_rows=None):
        return nets.muddit.apply({"params": params}, image_ids, text_ids, timestep, micro_conds,
                                 generated_rows if per_row_paths else None)

    def loss_fn(trainable, frozen, batch, rng):
        params = {**{k: v for k, v in frozen.items() if k != "vq"}, **trainable}
        return diffusion_loss(
            forward_fn=forward, params=params, batch=batch, rng=rng, config=config
        )

    return loss_fn


def vq_encode_fn(nets: Networks) -> EncodeFn:
    """Replace ``images [b, H, W, 3]`` in [0, 1] by ``image_ids [b, h, w]`` (frozen VQ)."""

    def encode(frozen, batch):
        if "images" not in batch:
            return batch
        if nets.vq is None:
            raise ValueError("the batch has raw images but data.images=False (no VQ in the state)")
        batch = dict(batch)
        images = nn.with_logical_constraint(batch.pop("images"), (BATCH_AXIS, None, None, None))
        codes = nets.vq.apply({"params": frozen["vq"]}, images, method=VQModel.encode)
        batch["image_ids"] = jax.lax.stop_gradient(codes)
        return batch

    return encode


def _micro_batches(batch: Batch, k: int) -> Batch:
    """``[b, ...] -> [k, b / k, ...]``; micro-batch ``j`` holds rows ``j, j + k, ...``."""

    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, BATCH_AXIS) + (None,) * (x.ndim - 2))

    return {name: split(x) for name, x in batch.items()}


def accumulate_gradients(
    loss_fn: LossFn, params: Any, frozen: Any, batch: Batch, rng: jax.Array, accum_steps: int
) -> tuple[Any, dict[str, jax.Array]]:
    """Gradients and metrics averaged over ``accum_steps`` micro-batches (see module doc)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (_, metrics), grads = grad_fn(params, frozen, batch, rng)
        return grads, metrics

    def body(carry, inputs):
        micro, j = inputs
        (_, metrics), grads = grad_fn(params, frozen, micro, jax.random.fold_in(rng, j))
        return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    micro = _micro_batches(batch, accum_steps)
    first = jax.tree.map(lambda x: x[0], micro)
    metrics_shape = jax.eval_shape(lambda: loss_fn(params, frozen, first, rng)[1])
    zeros = jax.tree.map(
        lambda x: jnp.zeros(x.shape, jnp.float32), (params, metrics_shape)
    )
    total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
    return jax.tree.map(lambda x: x / accum_steps, total)


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    schedule: optax.Schedule | None = None,
    accum_steps: int = 1,
    ema_decay: float = 0.0,
    encode_fn: EncodeFn | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure ``train_step(state, batch) -> (state, metrics)``; see the module docstring."""
    if accum_steps < 1:
        raise ValueError(f"train.grad_accum must be >= 1, got {accum_steps}")

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        if encode_fn is not None:
            batch = encode_fn(state.frozen, batch)
        grads, metrics = accumulate_gradients(
            loss_fn, state.params, state.frozen, batch, rng, accum_steps
        )
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = optax.incremental_update(params, ema, 1.0 - ema_decay)

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        applied = state.step - state.nonfinite_total  # updates applied so far
        streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            ema_params=None if ema is None else keep(ema, state.ema_params),
            nonfinite_streak=streak,
            nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32),
        )
        metrics = {
            **metrics,
            "grad_norm": grad_norm,
            "param_norm": optax.global_norm(new_state.params),
            "skipped": (~ok).astype(jnp.float32),
            "nonfinite_streak": streak.astype(jnp.float32),
        }
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(applied), jnp.float32)
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return train_step
