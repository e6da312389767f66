"""Conditioning embeddings of the MM-DiT generator: sinusoidal timestep / micro-condition
features, the small MLP embedders built on them, and the multi-axis rotary position embedding.

Conventions follow diffusers (``get_timestep_embedding``, ``TimestepEmbedding``,
``PixArtAlphaTextProjection``, ``FluxPosEmbed`` / ``apply_rotary_emb``): sinusoidal features are
computed in float32, RoPE frequencies use interleaved (real, imag) pairs.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muddit_jax.models import layers

Dtype = Any

TIMESTEP_FEATURES = 256  # sinusoidal width of the timestep and of each micro-condition
NUM_MICRO_CONDS = 5  # (width, height, crop x, crop y, aesthetic score)


def timestep_embedding(
    t: jax.Array,
    dim: int = TIMESTEP_FEATURES,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal features of ``t`` ``[n]`` -> ``[n, dim]`` float32 (``[cos, sin]`` if flipped)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp(exponent / (half - downscale_freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def micro_cond_embedding(micro_conds: jax.Array, dim: int = TIMESTEP_FEATURES) -> jax.Array:
    """``[b, k]`` micro-conditions -> ``[b, k * dim]``: one sinusoid per value, concatenated."""
    b, k = micro_conds.shape
    return timestep_embedding(micro_conds.reshape(b * k), dim).reshape(b, k * dim)


class MLPEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2``.

    Same as diffusers ``TimestepEmbedding`` / ``PixArtAlphaTextProjection`` (silu).
    """

    hidden: int
    out: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.dense(self.hidden, ("cond", "mlp"), name="linear_1", **kw)(x)
        return layers.dense(self.out, ("mlp", "cond"), name="linear_2", **kw)(jax.nn.silu(x))


class TimestepTextEmbedding(nn.Module):
    """``time_text_embed``: MLP(sinusoid(t)) + MLP(pooled) -> ``[b, dim]``.

    ``t`` is the raw timestep (the caller applies Muddit's ``* 1000``).
    """

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array, pooled: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t_emb = MLPEmbedding(self.dim, self.dim, name="timestep_embedder", **kw)(
            timestep_embedding(t).astype(self.dtype)
        )
        p_emb = MLPEmbedding(self.dim, self.dim, name="text_embedder", **kw)(pooled)
        return t_emb + p_emb


# ---------------------------------------------------------------------------------------------
# rotary position embedding


def rope_ids(text_len: int, height: int, width: int) -> np.ndarray:
    """Position ids ``[text_len + height * width, 3]``: zeros for text, ``(0, row, col)`` for image.

    Image ids are row-major over the (post-downsampling) token grid, text first.
    """
    img = np.zeros((height, width, 3), np.float32)
    img[..., 1] = np.arange(height, dtype=np.float32)[:, None]
    img[..., 2] = np.arange(width, dtype=np.float32)[None, :]
    return np.concatenate([np.zeros((text_len, 3), np.float32), img.reshape(-1, 3)], axis=0)


def rope_cos_sin(
    ids: np.ndarray, axes_dims: Sequence[int], theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
    """RoPE tables for static ``ids`` ``[s, n_axes]`` -> ``(cos, sin)``, each ``[s, sum(axes)]``.

    Each axis ``i`` contributes ``axes_dims[i]`` channels; every frequency is repeated twice
    (interleaved pairs), matching diffusers' ``FluxPosEmbed``. Computed in float64 with numpy (the
    ids depend only on shapes), returned as float32 constants.
    """
    ids = np.asarray(ids, np.float64)
    cos, sin = [], []
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64)[: d // 2] / d))
        ang = ids[:, i : i + 1] * freqs[None, :]  # [s, d/2]
        cos.append(np.repeat(np.cos(ang), 2, axis=-1))
        sin.append(np.repeat(np.sin(ang), 2, axis=-1))
    return (
        np.concatenate(cos, axis=-1).astype(np.float32),
        np.concatenate(sin, axis=-1).astype(np.float32),
    )


def per_head_rope(cos: np.ndarray, sin: np.ndarray, heads: int, free: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Tables ``[s, d]`` -> ``[s, heads, d]`` whose last ``free`` heads do not rotate."""
    cos, sin = (np.repeat(a[:, None], heads, axis=1) for a in (cos, sin))
    cos[:, heads - free:], sin[:, heads - free:] = 1.0, 0.0
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``[b, s, h, d]`` by ``cos``/``sin`` ``[s, d]`` (every head alike) or
    ``[s, h, d]`` (per head, :func:`per_head_rope`), in float32.

    Rotated pairs are adjacent channels ``(x[2i], x[2i+1])`` (diffusers ``use_real_unbind_dim=-1``).
    """
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    if cos.ndim == 2:
        cos, sin = cos[:, None], sin[:, None]
    out = xf * cos[None] + rotated * sin[None]
    return out.astype(x.dtype)
