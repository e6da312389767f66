"""Shared building blocks with logical-axis annotations on every parameter.

Every model in ``muddit_jax.models`` builds its parameters through these helpers so that each
parameter carries logical axis names (see ``muddit_jax.parallel.rules`` for the one table that
maps them to mesh axes). Modules never see the mesh.

Conventions:
  * ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of parameters.
  * Dense kernels are ``[in, out]``; conv kernels are ``[kh, kw, in, out]`` (channels-last).
  * Parameter names follow Flax defaults (``kernel``, ``bias``, ``scale``, ``embedding``), which
    the PyTorch port (``muddit_jax.port``) relies on.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

DEFAULT_KERNEL_INIT = nn.initializers.lecun_normal()


def _part(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    return nn.with_logical_partitioning(init, tuple(axes))


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Initializer = DEFAULT_KERNEL_INIT,
    name: str | None = None,
) -> nn.Dense:
    """A ``nn.Dense`` whose kernel is annotated ``axes`` = (in, out) and bias ``(out,)``."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_part(kernel_init, axes),
        bias_init=_part(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int,
    *,
    strides: int = 1,
    padding: int | str = 0,
    use_bias: bool = True,
    in_axis: str | None = "conv_in",
    out_axis: str | None = "conv_out",
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Initializer = DEFAULT_KERNEL_INIT,
    name: str | None = None,
) -> nn.Conv:
    """A channels-last 2D ``nn.Conv`` with PyTorch-style symmetric integer padding."""
    pad = padding if isinstance(padding, str) else [(padding, padding), (padding, padding)]
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=pad,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_part(kernel_init, (None, None, in_axis, out_axis)),
        bias_init=_part(nn.initializers.zeros_init(), (out_axis,)),
        name=name,
    )


class DepthwiseConv(nn.Module):
    """A ``same``-padded depthwise ``kernel x kernel`` conv on ``[b, h, w, c]`` (PyTorch
    ``Conv2d(c, c, k, padding=k // 2, groups=c)``; params ``kernel [k, k, 1, c]``, ``bias [c]``).

    Computed as a sum of ``k^2`` shifted, per-channel-scaled copies of the input: XLA's CPU
    backend runs the grouped convolution about 2x slower, forward and backward.
    """

    kernel_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, (h, w, c) = self.kernel_size, x.shape[1:]
        kernel = self.param("kernel", _part(DEFAULT_KERNEL_INIT, (None, None, None, "conv_out")),
                            (k, k, 1, c), self.param_dtype).astype(self.dtype)
        bias = self.param("bias", _part(nn.initializers.zeros_init(), ("conv_out",)), (c,),
                          self.param_dtype).astype(self.dtype)
        p = k // 2
        xp = jnp.pad(x.astype(self.dtype), ((0, 0), (p, p), (p, p), (0, 0)))
        out = bias
        for i in range(k):
            for j in range(k):
                out = out + xp[:, i : i + h, j : j + w] * kernel[i, j, 0]
        return out


def embed(
    num_embeddings: int,
    features: int,
    *,
    axes: tuple[str | None, str | None] = ("vocab", "embed"),
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Embed:
    """A ``nn.Embed`` table ``[num_embeddings, features]`` annotated ``axes``."""
    return nn.Embed(
        num_embeddings,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=_part(nn.initializers.normal(stddev=0.02), axes),
        name=name,
    )


def rms_norm(
    *,
    eps: float = 1e-6,
    use_scale: bool = True,
    axis_name: str | None = "norm",
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.RMSNorm:
    """RMSNorm over the last axis (statistics in float32, like PyTorch's ``RMSNorm``)."""
    return nn.RMSNorm(
        epsilon=eps,
        use_scale=use_scale,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=_part(nn.initializers.ones_init(), (axis_name,)),
        name=name,
    )


def layer_norm(
    *,
    eps: float = 1e-5,
    use_scale: bool = True,
    use_bias: bool = True,
    axis_name: str | None = "norm",
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.LayerNorm:
    """LayerNorm over the last axis; ``use_scale=use_bias=False`` is the no-affine variant."""
    return nn.LayerNorm(
        epsilon=eps,
        use_scale=use_scale,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=_part(nn.initializers.ones_init(), (axis_name,)),
        bias_init=_part(nn.initializers.zeros_init(), (axis_name,)),
        name=name,
    )


def group_norm(
    num_groups: int,
    *,
    eps: float = 1e-6,
    axis_name: str | None = "norm",
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.GroupNorm:
    """GroupNorm over channels-last inputs (PyTorch ``nn.GroupNorm`` semantics)."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=_part(nn.initializers.ones_init(), (axis_name,)),
        bias_init=_part(nn.initializers.zeros_init(), (axis_name,)),
        name=name,
    )


ATTENTION_IMPLS = (None, "xla", "cudnn")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention on ``[b, l, heads, head_dim]`` (``jax.nn.dot_product_attention``);
    ``bias`` (additive) and ``mask`` (boolean, True = attend) broadcast to ``[b, heads, q, k]``.
    ``implementation``: ``None`` lets JAX pick (XLA on CPU/TPU), ``"xla"`` forces the XLA einsum
    path, ``"cudnn"`` the cuDNN fused (flash) kernel on NVIDIA GPUs (fp16/bf16 only; raises where
    unsupported)."""
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}")
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                        implementation=implementation)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (PyTorch ``approximate="tanh"``)."""
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, PyTorch's default ``nn.GELU()``."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_exact,
    "gelu_tanh": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Look up an activation by its PyTorch/transformers config name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None
