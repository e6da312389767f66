"""The VQ image tokenizer: diffusers' ``VQModel`` (aMUSEd / Meissonic / Muddit) in Flax.

Owns the config (:class:`VQConfig`), the encoder / decoder stacks (ResNet blocks, single-head
mid-block attention, down/up samplers, optional spatial norm), the nearest-neighbour vector
quantizer with its training losses (:func:`vector_quantize`) and the tokenizer API on
:class:`VQModel`:

  * ``encode(images [b, H, W, 3] in [0, 1]) -> codes [b, h, w] int32``;
  * ``decode(codes [b, h, w]) -> images [b, H, W, 3]`` (not clipped; pipelines clip to [0, 1]);
  * ``encode_latents``, ``quantize``, ``lookup``, ``decode_latents`` and ``__call__`` for training.

Pixel range: aMUSEd / Meissonic feed the VQ **[0, 1]** pixels (``VaeImageProcessor(
do_normalize=False)``; training uses ``ToTensor()`` without normalisation) and clip decoded
images to [0, 1]. Channels-last throughout; ``h = H / downsample_factor``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muddit_jax.models.layers import Dtype, activation, attention, conv, dense, embed, group_norm

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
NETWORKS = ("diffusers", "patch")  # VQConfig.encoder / decoder
SPATIAL_NORM_GROUPS = 32  # hard-coded in diffusers' SpatialNorm
EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """Hyper-parameters of diffusers' ``VQModel`` plus the quantizer loss knobs.

    ``beta`` / ``legacy_loss`` are not upstream config fields (``VQModel`` hard-codes 0.25 and
    the legacy loss form); they are kept out of :meth:`to_hf_config`. ``encoder`` / ``decoder``
    are not upstream either: ``"diffusers"`` is ``VQModel``'s network; ``"patch"`` is
    :class:`PatchEncoder` / :class:`PatchDecoder`, whose receptive field is exactly one code and
    its ``f x f`` pixels, so a code is a function of the pixels it covers and decodes to the same
    pixels wherever it stands (a per-patch VQ-VAE). Such a model cannot be exported to diffusers.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 3
    sample_size: int | tuple[int, ...] = 32
    num_vq_embeddings: int = 256
    norm_num_groups: int = 32
    vq_embed_dim: int | None = None
    scaling_factor: float = 0.18215
    norm_type: str = "group"
    mid_block_add_attention: bool = True
    lookup_from_codebook: bool = False
    force_upcast: bool = False
    beta: float = 0.25
    legacy_loss: bool = True
    encoder: str = "diffusers"
    decoder: str = "diffusers"

    def __post_init__(self) -> None:
        chans = self.block_out_channels
        n = len(chans)
        problems = []
        if n == 0:
            problems.append("block_out_channels is empty")
        if tuple(self.down_block_types) != (DOWN_BLOCK,) * n:
            problems.append(f"down_block_types must be {n} x {DOWN_BLOCK!r}")
        if tuple(self.up_block_types) != (UP_BLOCK,) * n:
            problems.append(f"up_block_types must be {n} x {UP_BLOCK!r}")
        if self.norm_type not in ("group", "spatial"):
            problems.append(f"norm_type must be 'group' or 'spatial', got {self.norm_type!r}")
        if any(c % self.norm_num_groups for c in chans):
            problems.append(f"block_out_channels {chans} not divisible by norm_num_groups")
        if self.norm_type == "spatial":
            if any(c % SPATIAL_NORM_GROUPS for c in chans):
                problems.append("norm_type='spatial' needs block_out_channels divisible by 32")
            if self.embed_dim != self.latent_channels:
                problems.append("norm_type='spatial' needs vq_embed_dim == latent_channels")
        for field in ("encoder", "decoder"):
            if getattr(self, field) not in NETWORKS:
                problems.append(f"{field} must be one of {NETWORKS}, got {getattr(self, field)!r}")
        patch_only = self.encoder == self.decoder == "patch"
        if self.layers_per_block < (0 if patch_only else 1):
            problems.append("layers_per_block must be >= 1 (>= 0 when encoder and decoder are "
                            "both 'patch')")
        activation(self.act_fn)  # raises ValueError on an unknown name
        if problems:
            raise ValueError("invalid VQConfig: " + "; ".join(problems))

    @property
    def embed_dim(self) -> int:
        """Codebook vector width (``vq_embed_dim``, defaulting to ``latent_channels``)."""
        return self.latent_channels if self.vq_embed_dim is None else self.vq_embed_dim

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> "VQConfig":
        """Build from a diffusers ``config.json`` dict (``_``-prefixed keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
        if unknown:
            warnings.warn(f"VQConfig.from_hf_config ignores unknown keys {unknown}", stacklevel=2)
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        """An upstream-compatible ``config.json`` dict for diffusers' ``VQModel``."""
        if (self.encoder, self.decoder) != ("diffusers", "diffusers"):
            raise ValueError(f"a VQ with encoder={self.encoder!r}, decoder={self.decoder!r} has no "
                             "diffusers equivalent; only 'diffusers' networks export to PyTorch")
        out: dict[str, Any] = {"_class_name": "VQModel"}
        for f in dataclasses.fields(self):
            if f.name in ("beta", "legacy_loss", "encoder", "decoder"):
                continue
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# ---------------------------------------------------------------------------------------------
# quantizer


class VQLosses(NamedTuple):
    """Quantizer losses (scalars, float32).

    ``commitment`` = mean((z - sg(z_q))^2) trains the encoder, ``codebook`` =
    mean((sg(z) - z_q)^2) trains the codebook; ``loss`` is upstream's total: legacy
    ``commitment + beta * codebook`` (``VQModel``'s default), else ``beta * commitment +
    codebook``. Both terms have the same value; they differ in where gradients flow.
    """

    loss: jax.Array
    codebook: jax.Array
    commitment: jax.Array


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the L2-nearest codebook row for ``z [..., d]`` (ties -> lowest index).

    Computed in float32 at highest matmul precision as ``argmin ||e||^2 - 2 z.e``.
    """
    z32 = z.astype(jnp.float32)
    e32 = codebook.astype(jnp.float32)
    dots = jnp.einsum("...d,nd->...n", z32, e32, precision=jax.lax.Precision.HIGHEST)
    dist = jnp.sum(e32 * e32, axis=-1) - 2.0 * dots
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def vector_quantize(
    z: jax.Array, codebook: jax.Array, beta: float = 0.25, legacy: bool = True
) -> tuple[jax.Array, jax.Array, VQLosses]:
    """Quantize ``z [b, h, w, d]`` against ``codebook [n, d]``.

    Returns ``(z_q_st, codes [b, h, w] int32, losses)`` where ``z_q_st = z + sg(z_q - z)`` has
    the value of the codebook vectors and an identity gradient w.r.t. ``z``.
    """
    codes = nearest_codes(jax.lax.stop_gradient(z), codebook)
    z_q = jnp.take(codebook, codes, axis=0).astype(z.dtype)
    sg = jax.lax.stop_gradient
    z32, zq32 = z.astype(jnp.float32), z_q.astype(jnp.float32)
    commitment = jnp.mean((z32 - sg(zq32)) ** 2)
    codebook_loss = jnp.mean((sg(z32) - zq32) ** 2)
    if legacy:
        loss = commitment + beta * codebook_loss
    else:
        loss = beta * commitment + codebook_loss
    z_q_st = z + sg(z_q - z)
    return z_q_st, codes, VQLosses(loss, codebook_loss, commitment)


# ---------------------------------------------------------------------------------------------
# building blocks


def _nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PyTorch ``F.interpolate(mode="nearest")`` on ``[b, h, w, c]`` to spatial ``size``."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    rows = np.minimum(np.floor(np.arange(size[0]) * (h / size[0])).astype(np.int32), h - 1)
    cols = np.minimum(np.floor(np.arange(size[1]) * (w / size[1])).astype(np.int32), w - 1)
    return x[:, rows][:, :, cols]


class SpatialNorm(nn.Module):
    """``GroupNorm(32)(f) * conv_y(zq) + conv_b(zq)`` with ``zq`` resized to ``f`` (MoVQ)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, f: jax.Array, zq: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        zq = _nearest_resize(zq, f.shape[1:3])
        normed = group_norm(SPATIAL_NORM_GROUPS, eps=EPS, name="norm_layer", **kw)(f)
        scale = conv(self.features, 1, name="conv_y", **kw)(zq)
        shift = conv(self.features, 1, name="conv_b", **kw)(zq)
        return normed * scale + shift


def _norm(
    name: str, x: jax.Array, zq: jax.Array | None, groups: int, spatial: bool, dtype, param_dtype
) -> jax.Array:
    """GroupNorm (``spatial=False``) or SpatialNorm conditioned on ``zq``, as submodule ``name``."""
    if spatial:
        if zq is None:
            raise ValueError("spatial norm needs the quantized latents zq")
        return SpatialNorm(x.shape[-1], dtype=dtype, param_dtype=param_dtype, name=name)(x, zq)
    return group_norm(groups, eps=EPS, dtype=dtype, param_dtype=param_dtype, name=name)(x)


class ResnetBlock(nn.Module):
    """Pre-norm ResNet block (diffusers ``ResnetBlock2D`` / ``ResnetBlockCondNorm2D``)."""

    features: int
    groups: int
    act_fn: str = "silu"
    spatial: bool = False
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = activation(self.act_fn)
        h = act(_norm("norm1", x, zq, self.groups, self.spatial, **kw))
        h = conv(self.features, 3, padding=1, name="conv1", **kw)(h)
        h = act(_norm("norm2", h, zq, self.groups, self.spatial, **kw))
        h = conv(self.features, 3, padding=1, name="conv2", **kw)(h)
        if x.shape[-1] != self.features:
            x = conv(self.features, 1, name="conv_shortcut", **kw)(x)
        return (x + h) / self.output_scale_factor


class Attention(nn.Module):
    """Single-head self-attention over ``[b, h, w, c]`` with pre-norm and residual."""

    groups: int
    spatial: bool = False
    rescale_output_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, c = x.shape
        name = "spatial_norm" if self.spatial else "group_norm"
        h = _norm(name, x, zq, self.groups, self.spatial, **kw).reshape(b, height * width, c)
        q = dense(c, ("embed", "heads"), name="to_q", **kw)(h)
        k = dense(c, ("embed", "heads"), name="to_k", **kw)(h)
        v = dense(c, ("embed", "heads"), name="to_v", **kw)(h)
        out = attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]
        out = dense(c, ("heads", "embed"), name="to_out", **kw)(out)
        return (out.reshape(x.shape) + x) / self.rescale_output_factor


class Downsample(nn.Module):
    """Zero-pad bottom/right by one, then a 3x3 stride-2 conv (``Downsample2D``, padding 0)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(
            self.features, 3, strides=2, padding=0, name="conv",
            dtype=self.dtype, param_dtype=self.param_dtype,
        )(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv (``Upsample2D``)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(
            self.features, 3, padding=1, name="conv",
            dtype=self.dtype, param_dtype=self.param_dtype,
        )(x)


class ResnetStack(nn.Module):
    """``num_layers`` ResNet blocks then an optional resampler (``DownEncoderBlock2D`` /
    ``UpDecoderBlock2D``); ``resample`` is ``"down"``, ``"up"`` or ``None``."""

    features: int
    num_layers: int
    groups: int
    act_fn: str
    resample: str | None = None
    spatial: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock(
                self.features, self.groups, self.act_fn, self.spatial, name=f"resnets_{i}", **kw
            )(x, zq)
        if self.resample == "down":
            x = Downsample(self.features, name="downsample", **kw)(x)
        elif self.resample == "up":
            x = Upsample(self.features, name="upsample", **kw)(x)
        return x


class MidBlock(nn.Module):
    """ResNet, optional attention, ResNet (``UNetMidBlock2D`` with one layer)."""

    groups: int
    act_fn: str
    add_attention: bool = True
    spatial: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, self.act_fn, self.spatial, name="resnets_0", **kw)(x, zq)
        if self.add_attention:
            x = Attention(self.groups, self.spatial, name="attentions_0", **kw)(x, zq)
        return ResnetBlock(c, self.groups, self.act_fn, self.spatial, name="resnets_1", **kw)(x, zq)


class Encoder(nn.Module):
    """Images ``[b, H, W, in_channels]`` -> latents ``[b, h, w, latent_channels]``."""

    config: VQConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        x = conv(chans[0], 3, padding=1, name="conv_in", **kw)(x)
        for i, c in enumerate(chans):
            down = "down" if i < len(chans) - 1 else None
            x = ResnetStack(
                c, cfg.layers_per_block, groups, cfg.act_fn, down, name=f"down_blocks_{i}", **kw
            )(x)
        x = MidBlock(groups, cfg.act_fn, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        x = activation(cfg.act_fn)(group_norm(groups, eps=EPS, name="conv_norm_out", **kw)(x))
        return conv(cfg.latent_channels, 3, padding=1, name="conv_out", **kw)(x)


class PatchEncoder(nn.Module):
    """Images -> latents with a receptive field of one code: an MLP on each ``f x f`` patch with
    ``layers_per_block`` hidden layers of the widest channel count (0 = one linear map), the
    first one a stride-``f`` conv (patchify + linear). No norm spans the image, so a code depends
    on its own pixels only (flat synthetic scenes then get one code per distinct patch instead of
    context-dependent synonyms)."""

    config: VQConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        f = cfg.downsample_factor
        widths = (cfg.block_out_channels[-1],) * cfg.layers_per_block + (cfg.latent_channels,)
        x = conv(widths[0], f, strides=f, name="conv_in", **kw)(x)
        return _pointwise_mlp(x, widths[1:], cfg.act_fn, kw)


def _pointwise_mlp(x: jax.Array, widths: tuple[int, ...], act_fn: str, kw: dict) -> jax.Array:
    """``act -> 1x1 conv`` for each of ``widths`` (``layers_{i}``, the last ``conv_out``)."""
    act = activation(act_fn)
    for i, width in enumerate(widths):
        name = "conv_out" if i == len(widths) - 1 else f"layers_{i}"
        x = conv(width, 1, name=name, **kw)(act(x))
    return x


class PatchDecoder(nn.Module):
    """Latents -> images one code at a time: the mirror of :class:`PatchEncoder` (an MLP with
    ``layers_per_block`` hidden layers to ``f * f * out_channels`` values, then depth-to-space)."""

    config: VQConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array | None = None) -> jax.Array:
        del zq  # no spatial norm: nothing spans the image
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        f, c = cfg.downsample_factor, cfg.out_channels
        widths = (cfg.block_out_channels[-1],) * cfg.layers_per_block + (f * f * c,)
        x = conv(widths[0], 1, name="conv_in", **kw)(x)
        x = _pointwise_mlp(x, widths[1:], cfg.act_fn, kw)
        b, h, w, _ = x.shape
        x = x.reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h * f, w * f, c)


class Decoder(nn.Module):
    """Latents ``[b, h, w, latent_channels]`` -> images ``[b, H, W, out_channels]``.

    ``zq`` (the quantized latents) conditions every norm when ``norm_type == "spatial"``.
    """

    config: VQConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array | None = None) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        spatial, groups = cfg.norm_type == "spatial", cfg.norm_num_groups
        chans = tuple(reversed(cfg.block_out_channels))
        x = conv(chans[0], 3, padding=1, name="conv_in", **kw)(x)
        x = MidBlock(
            groups, cfg.act_fn, cfg.mid_block_add_attention, spatial, name="mid_block", **kw
        )(x, zq)
        for i, c in enumerate(chans):
            up = "up" if i < len(chans) - 1 else None
            x = ResnetStack(
                c, cfg.layers_per_block + 1, groups, cfg.act_fn, up, spatial,
                name=f"up_blocks_{i}", **kw,
            )(x, zq)
        x = activation(cfg.act_fn)(_norm("conv_norm_out", x, zq, groups, spatial, **kw))
        return conv(cfg.out_channels, 3, padding=1, name="conv_out", **kw)(x)


class VQModel(nn.Module):
    """The VQ tokenizer. Call methods through ``model.apply(params, x, method=...)``.

    With ``config.force_upcast`` a float16 ``dtype`` is computed in float32 (what diffusers'
    pipelines do). Code search always runs in float32.
    """

    config: VQConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def compute_dtype(self) -> Dtype:
        if self.config.force_upcast and jnp.dtype(self.dtype) == jnp.float16:
            return jnp.float32
        return self.dtype

    def setup(self) -> None:
        cfg = self.config
        kw = dict(dtype=self.compute_dtype, param_dtype=self.param_dtype)
        self.encoder = (PatchEncoder if cfg.encoder == "patch" else Encoder)(cfg, **kw)
        self.quant_conv = conv(cfg.embed_dim, 1, **kw)
        self.codebook = embed(cfg.num_vq_embeddings, cfg.embed_dim, **kw)
        self.post_quant_conv = conv(cfg.latent_channels, 1, **kw)
        self.decoder = (PatchDecoder if cfg.decoder == "patch" else Decoder)(cfg, **kw)

    def encode_latents(self, images: jax.Array) -> jax.Array:
        """Images ``[b, H, W, 3]`` in [0, 1] -> continuous latents ``[b, h, w, embed_dim]``."""
        return self.quant_conv(self.encoder(images.astype(self.compute_dtype)))

    def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array, VQLosses]:
        """``z [b, h, w, d]`` -> ``(z_q straight-through, codes [b, h, w], losses)``."""
        cfg = self.config
        return vector_quantize(z, self.codebook.embedding, cfg.beta, cfg.legacy_loss)

    def encode(self, images: jax.Array) -> jax.Array:
        """Images ``[b, H, W, 3]`` in [0, 1] -> codes ``[b, h, w]`` int32."""
        return nearest_codes(self.encode_latents(images), self.codebook.embedding)

    def lookup(self, codes: jax.Array) -> jax.Array:
        """Codes ``[b, h, w]`` -> codebook vectors ``[b, h, w, embed_dim]``."""
        return jnp.take(self.codebook.embedding, codes, axis=0).astype(self.compute_dtype)

    def decode_latents(self, z_q: jax.Array) -> jax.Array:
        """Quantized latents ``[b, h, w, embed_dim]`` -> images ``[b, H, W, 3]``."""
        zq = z_q if self.config.norm_type == "spatial" else None
        return self.decoder(self.post_quant_conv(z_q), zq)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Codes ``[b, h, w]`` -> images ``[b, H, W, 3]`` (unclipped; ~[0, 1])."""
        return self.decode_latents(self.lookup(codes))

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, VQLosses]:
        """Training forward: ``(reconstruction [b, H, W, 3], codes [b, h, w], losses)``."""
        z_q, codes, losses = self.quantize(self.encode_latents(images))
        return self.decode_latents(z_q), codes, losses


def init_params(
    config: VQConfig, rng: jax.Array, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32
) -> dict[str, Any]:
    """Boxed (logically annotated) random params ``{"params": ...}`` for ``VQModel(config)``."""
    s = config.downsample_factor
    x = jnp.zeros((1, s, s, config.in_channels), jnp.float32)
    return VQModel(config, dtype, param_dtype).init(rng, x)


def abstract_params(config: VQConfig, param_dtype: Dtype = jnp.float32) -> dict[str, Any]:
    """Unboxed ``jax.ShapeDtypeStruct`` params tree (the port's conversion target)."""
    shapes = jax.eval_shape(
        lambda: init_params(config, jax.random.PRNGKey(0), param_dtype=param_dtype)
    )
    return nn.unbox(shapes)["params"]


def encode(params: Any, config: VQConfig, images: jax.Array) -> jax.Array:
    """:meth:`VQModel.encode` with the (unboxed) ``params`` tree, fp32 compute."""
    return VQModel(config).apply({"params": params}, images, method=VQModel.encode)


def decode(params: Any, config: VQConfig, codes: jax.Array) -> jax.Array:
    """:meth:`VQModel.decode` with the (unboxed) ``params`` tree, fp32 compute."""
    return VQModel(config).apply({"params": params}, codes, method=VQModel.decode)
