"""Forward (masking) process: draw mask ratios and mask an exact number of tokens per row.

Follows Muddit's ``train/train_unified.py`` (and Meissonic's ``train/train_meissonic.py``):
``u ~ U(0, 1)``, ``r = max(r(u), min_rate)``, then exactly ``max(1, round(n * r))`` positions
per row are masked, chosen by ranking i.i.d. uniform scores (a random permutation). Here ``n``
counts only the *maskable* positions (``valid``), so padding is never masked unless the caller
says so.

Answer-only masking (VQA / instruction tuning): with ``valid`` = :func:`text_targets` of a
``question answer`` row, only the answer region is masked, ``n = min(answer_len, max(1,
round(answer_len * r)))`` positions drawn uniformly inside it; question tokens are never masked
and, since the loss only scores masked positions, never targets.
Static shapes throughout: jittable and vmappable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from muddit_jax.diffusion.schedule import Schedule

Array = jax.Array


def sample_mask_ratio(
    rng: Array, batch: int, *, schedule: Schedule, min_rate: float = 0.0
) -> tuple[Array, Array]:
    """Draw ``u ~ U(0, 1)`` and the clipped mask ratio ``r = max(r(u), min_rate)``, both ``[b]``."""
    u = jax.random.uniform(rng, (batch,), jnp.float32)
    r = jnp.maximum(schedule.mask_ratio(u), min_rate)
    return u, r


def num_to_mask(n_valid: Array, ratio: Array, *, min_masked: int = 1) -> Array:
    """``clip(round(n_valid * ratio), min_masked, n_valid)`` per row; ``[b]`` int32.

    ``round`` is round-half-to-even, like ``torch.round`` upstream.
    """
    n_valid = n_valid.astype(jnp.int32)
    k = jnp.round(n_valid.astype(jnp.float32) * ratio).astype(jnp.int32)
    return jnp.minimum(jnp.maximum(k, min_masked), n_valid)


def text_targets(
    text_valid: Array, text_maskable: Array | None = None, *, pad_is_target: bool | Array = False
) -> Array:
    """Text positions that may be masked (hence be targets), ``[b, l]`` bool.

    Args:
      text_valid: ``[b, l]`` bool, non-padding positions (bos .. eos).
      text_maskable: ``[b, l]`` bool answer region of ``question answer`` rows (True from the
        first answer token on, padding included); ``None``: the whole row (captions).
      pad_is_target: keep the padding after the eos (upstream masks the whole padded region);
        False drops it, so only ``text_valid`` positions are ever masked. A ``[b, 1]`` bool
        array decides per row.
    """
    region = jnp.ones_like(text_valid, bool) if text_maskable is None else text_maskable
    return region.astype(bool) & (text_valid.astype(bool) | pad_is_target)


def random_mask(
    rng: Array,
    valid: Array,
    ratio: Array,
    *,
    min_masked: int = 1,
    min_rate: float = 0.0,
) -> Array:
    """Mask exactly ``clip(round(n_valid * max(ratio, min_rate)), min_masked, n_valid)`` positions.

    Args:
      rng: PRNG key.
      valid: ``[b, l]`` bool, positions that may be masked (False: never masked, e.g. padding).
      ratio: ``[b]`` float mask ratio per row.
      min_masked: lower bound on the count (upstream clamps to 1); rows without any valid
        position get no mask.
      min_rate: minimum masking rate applied to ``ratio``.
    Returns:
      ``[b, l]`` bool mask (True = masked), always a subset of ``valid``.
    """
    valid = valid.astype(bool)
    ratio = jnp.maximum(jnp.asarray(ratio, jnp.float32), min_rate)
    k = num_to_mask(valid.sum(-1), ratio, min_masked=min_masked)
    # Invalid positions get a score above every valid one, so they rank last.
    scores = jnp.where(valid, jax.random.uniform(rng, valid.shape, jnp.float32), 2.0)
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    return (ranks < k[:, None]) & valid


def apply_mask(ids: Array, mask: Array, mask_id: int) -> Array:
    """``ids`` with masked positions replaced by ``mask_id`` (any shape, same as ``mask``)."""
    return jnp.where(mask, jnp.asarray(mask_id, ids.dtype), ids)
