"""Muddit's MM-DiT generator (upstream ``SymmetricTransformer2DModel``) in Flax.

Muddit extends Meissonic's ``Transformer2DModel`` (Flux-style dual/single-stream blocks around a
UViT conv embedding of VQ image tokens) with a text-decoder head over the text stream, so one
network predicts both image-token logits and text-token logits. Data flow of ``MMDiT.__call__``:

  cond  = cond_embed([pooled, sinusoid(micro_conds)])           # [b, D]
  temb  = time_text_embed(1000 t, cond)                          # [b, D]
  txt   = encoder_proj_layer_norm(context_embedder(text))        # [b, l, D]
  img   = embed(image_ids) -> down_block -> flatten -> project_to_hidden(_norm)   # [b, n, D]
          (a clean image takes the condition_* copy of this path with condition_image_input)
  (txt, img) = dual-stream blocks; x = single-stream blocks([txt, img])
  text_logits  = text_decoder(x[:, :l])                         # [b, l, tokenizer_vocab]
  image_logits = mlm_layer(up_block(project_from_hidden(_norm)(x[:, l:])))  # [b, h, w, codebook]

This module owns the config, the model and the unrolled <-> scanned parameter layout helpers.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muddit_jax.models import layers
from muddit_jax.models.embeddings import (
    NUM_MICRO_CONDS,
    MLPEmbedding,
    TimestepTextEmbedding,
    apply_rope,
    micro_cond_embedding,
    per_head_rope,
    rope_cos_sin,
    rope_ids,
)

Dtype = Any
ACT = ("act_batch", "act_len", "act_embed")
NORM_EPS = 1e-6
DUAL, SINGLE = "transformer_blocks", "single_transformer_blocks"
UPSTREAM_ROPE_THETA = 10000.0
# which attention scores RoPE rotates: every pair (upstream) or image query x image key only
ROPE_SCOPES = ("all", "image")
# module-name prefix of the image input path for clean images (``condition_image_input``)
CONDITION_PREFIX = "condition_"
# the top-level modules of the image input path (every one before the blocks)
IMAGE_INPUT_MODULES = (r"embed|down_convnext_\d+|down_block(_\d+)?|project_to_hidden(_norm)?"
                       r"|image_pos_embed")


def rope_axes_ok(axes: Sequence[Any], head_dim: int) -> bool:
    """Whether ``axes`` splits a head of ``head_dim`` channels over the 3 rotary id axes
    (text, row, column: :func:`rope_ids`): even non-negative ints summing to ``head_dim``."""
    return (len(axes) == 3 and sum(axes) == head_dim
            and all(isinstance(a, (int, np.integer)) and a >= 0 and a % 2 == 0 for a in axes))


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """Constructor arguments of upstream ``SymmetricTransformer2DModel`` (its ``config.json``).

    ``patch_size`` and ``in_channels`` are stored but unused (upstream ignores them too);
    ``block_out_channels`` (the UViT embed width) is always ``inner_dim`` upstream, so it may only
    be ``None`` or equal to it. ``vocab_size`` = codebook + special ids (mask id =
    ``vocab_size - 1``); ``tokenizer_vocab_size`` ``None`` = no text head; ``t5_dim`` adds the
    ``adapter`` (LayerNorm + Linear to ``joint_attention_dim``) in front of ``context_embedder``.
    ``rope_theta`` is not an upstream key (upstream fixes 10000; the config dict carries it only
    when different): small models on small grids lower it, since with few channels per axis 10000
    leaves one usable frequency, whose period (2 pi) aliases positions 6 apart.
    ``image_pos_embed`` (not upstream either) adds a learned absolute position embedding to the
    image tokens, so their values, not only their attention scores, know where they are.
    ``rope_free_heads`` (not upstream: 0) leaves the last that many heads of every block
    unrotated: their scores compare content alone (a text query finds an image key wherever it
    is), while the other heads keep Flux's relative positions (BENCHMARKS.md §1.20).
    ``rope_scope`` (not upstream: ``"all"``) ``"image"`` rotates only the scores of image
    queries on image keys: every score with a text (or register) token compares content alone,
    so image values need no position for the text to read them, while the image stream keeps
    relative positions among its own tokens (BENCHMARKS.md §1.29).
    ``resample_levels`` (not upstream: 1) stacks that many 2x ``downsample`` / ``upsample``
    levels, so the blocks see ``4^levels`` times fewer image tokens (level 0 keeps upstream's
    ``down_block`` / ``up_block`` names, deeper ones are ``down_block_1``, ...).
    ``conv_blocks`` (not upstream: 0) puts that many ConvNeXt blocks (amused's UViT
    ``ConvNextBlock``: depthwise ``conv_kernel`` conv, GRN MLP, conditioning scale/shift) on the
    code grid before the first down-sampling (``down_convnext_{i}``) and after the last
    up-sampling (``up_convnext_{i}``): local, translation-equivariant features of code
    neighbourhoods that the attention blocks otherwise have to build from RoPE scores.
    ``text_registers`` (not upstream: 0) appends that many learned tokens to the text stream
    (``text_registers [n, inner_dim]``, text RoPE ids 0): always visible and attention keys,
    never targets, no text logits (BENCHMARKS.md §1.23).
    ``condition_image_input`` (not upstream: False) gives images without a mask token (the
    condition of captioning and VQA) an image input path of their own (``condition_embed``,
    ``condition_project_to_hidden``, ...: every module before the blocks, same shapes), while
    images being generated (any mask token) keep upstream's; the blocks and heads are shared,
    so T2I rows send no gradient into the condition's path (BENCHMARKS.md §1.35).
    ``condition_image_isolated`` (not upstream: False) encodes images without a mask token
    apart from the text: their tokens attend to no text position or register in any block and
    the row's conditioning gets a zero pooled text embedding, so the condition's image features
    cannot depend on the question (as a VLM's image encoder); the text still attends to the
    image, and rows with a mask token are unchanged (BENCHMARKS.md §1.36).
    ``condition_conv_blocks`` (not upstream: 0; needs ``condition_image_input``) adds that many
    ConvNeXt blocks to the condition's path alone (``condition_down_convnext_{i}`` after its
    ``conv_blocks`` ones): local features of the image being read, without their cost to the
    all-masked start of T2I (BENCHMARKS.md §1.7, §1.37).
    """

    patch_size: int = 1
    in_channels: int = 64
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    vocab_size: int = 8256
    codebook_size: int = 8192
    tokenizer_vocab_size: int | None = None
    t5_dim: int | None = None
    downsample: bool = False
    upsample: bool = False
    block_out_channels: int | None = None
    rope_theta: float = UPSTREAM_ROPE_THETA
    image_pos_embed: bool = False
    rope_free_heads: int = 0
    rope_scope: str = "all"
    resample_levels: int = 1
    conv_blocks: int = 0
    conv_kernel: int = 3
    text_registers: int = 0
    condition_image_input: bool = False
    condition_image_isolated: bool = False
    condition_conv_blocks: int = 0

    def __post_init__(self):
        if not rope_axes_ok(self.axes_dims_rope, self.attention_head_dim):
            raise ValueError(
                f"axes_dims_rope {tuple(self.axes_dims_rope)} must be 3 even ints >= 0 (text, "
                f"row, column) summing to attention_head_dim {self.attention_head_dim}"
            )
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if self.pooled_projection_dim != self.inner_dim:
            raise ValueError(
                f"pooled_projection_dim ({self.pooled_projection_dim}) must equal "
                f"num_attention_heads * attention_head_dim ({self.inner_dim}): upstream feeds "
                "cond_embed's output (width inner_dim) to time_text_embed.text_embedder"
            )
        if self.guidance_embeds:
            raise ValueError("guidance_embeds=True is not supported (unused upstream)")
        if self.resample_levels < 1:
            raise ValueError(f"resample_levels={self.resample_levels} must be >= 1 (upstream: 1)")
        if self.conv_blocks < 0 or self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_blocks={self.conv_blocks} must be >= 0 and conv_kernel="
                             f"{self.conv_kernel} odd and >= 1 (upstream: no conv blocks)")
        if self.condition_conv_blocks < 0 or (self.condition_conv_blocks
                                              and not self.condition_image_input):
            raise ValueError(f"condition_conv_blocks={self.condition_conv_blocks} must be >= 0 "
                             "and needs condition_image_input=True (upstream: 0)")
        if self.text_registers < 0:
            raise ValueError(f"text_registers={self.text_registers} must be >= 0 (upstream: 0)")
        if not 0 <= self.rope_free_heads <= self.num_attention_heads:
            raise ValueError(f"rope_free_heads={self.rope_free_heads} must be in [0, "
                             f"num_attention_heads={self.num_attention_heads}] (upstream: 0)")
        if self.rope_scope not in ROPE_SCOPES:
            raise ValueError(f"rope_scope={self.rope_scope!r} must be one of {ROPE_SCOPES} "
                             "(upstream: 'all')")
        if not self.rope_theta > 1.0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 1 (upstream: 10000)")
        if self.block_out_channels not in (None, self.inner_dim):
            raise ValueError(
                f"block_out_channels={self.block_out_channels} but upstream always embeds at "
                f"inner_dim={self.inner_dim}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any]) -> MMDiTConfig:
        """Build from an upstream ``config.json`` dict (keys starting with ``_`` are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"unknown SymmetricTransformer2DModel config keys: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf_config(self) -> dict[str, Any]:
        """Upstream-compatible ``config.json`` dict (without ``_class_name``)."""
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        if d["block_out_channels"] is None:
            del d["block_out_channels"]
        if d["rope_theta"] == UPSTREAM_ROPE_THETA:  # upstream has no such key
            del d["rope_theta"]
        if not d["image_pos_embed"]:  # nor this one
            del d["image_pos_embed"]
        for key, upstream in (("resample_levels", 1), ("conv_blocks", 0), ("conv_kernel", 3),
                              ("rope_free_heads", 0), ("text_registers", 0),
                              ("rope_scope", "all"), ("condition_image_input", False),
                              ("condition_image_isolated", False),
                              ("condition_conv_blocks", 0)):
            if d[key] == upstream:  # nor these
                del d[key]
        return d

    @property
    def down_levels(self) -> int:
        """How many 2x down-sampling levels the image tokens pass before the blocks."""
        return self.resample_levels if self.downsample else 0

    @property
    def up_levels(self) -> int:
        """How many 2x up-sampling levels the image tokens pass after the blocks."""
        return self.resample_levels if self.upsample else 0

    @property
    def resample_factor(self) -> int:
        """How many code rows / columns one block token covers (per side)."""
        return 2 ** self.down_levels


# ---------------------------------------------------------------------------------------------
# building blocks


def _ln(dtype: Dtype, name: str) -> nn.LayerNorm:
    return layers.layer_norm(eps=NORM_EPS, use_scale=False, use_bias=False, dtype=dtype, name=name)


class AdaNormZero(nn.Module):
    """adaLN-zero: ``LN(x) * (1 + scale) + shift``, chunks from ``linear(silu(temb))``.

    ``chunks`` = 6 (dual-stream: shift, scale, gate_msa, shift_mlp, scale_mlp, gate_mlp) or 3
    (single-stream: shift, scale, gate). Chunks are ``[b, 1, d]``.
    """

    chunks: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        d = x.shape[-1]
        mod = layers.dense(
            self.chunks * d,
            ("cond", "embed"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="linear",
        )(jax.nn.silu(temb))
        shift, scale, *rest = jnp.split(mod[:, None, :], self.chunks, axis=-1)
        return _ln(self.dtype, "norm")(x) * (1 + scale) + shift, rest


class FeedForward(nn.Module):
    """``Linear(d, 4d) -> GELU(tanh) -> Linear(4d, d)`` (diffusers ``FeedForward`` gelu-approx.)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, kw = x.shape[-1], dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.dense(4 * d, ("embed", "mlp"), name="proj_in", **kw)(x)
        return layers.dense(d, ("mlp", "embed"), name="proj_out", **kw)(layers.gelu_tanh(h))


class Attention(nn.Module):
    """Flux attention with per-head QK RMSNorm and RoPE on the joint sequence ``[text, image]``.

    With ``context`` (dual-stream): ``(img, txt) -> (to_out(img part), to_add_out(txt part))``.
    Without (single-stream, ``pre_only``): ``x -> attention output [b, s, heads*head_dim]``.
    ``keys`` ``[b, 1, 1, s]`` bool (True = attend; ``None`` = all) masks joint-sequence keys.
    ``image_start`` (``None`` = RoPE on every score, upstream) is where the image tokens begin
    in the joint sequence: only image-image scores are then rotated (``rope_scope="image"``).
    """

    heads: int
    head_dim: int
    context: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    image_start: int | None = None

    def _qkv(self, x: jax.Array, names: tuple[str, ...]) -> list[jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = self.heads * self.head_dim
        q, k, v = (
            layers.dense(width, ("embed", "heads"), name=n, **kw)(x).reshape(
                *x.shape[:-1], self.heads, self.head_dim
            )
            for n in names[:3]
        )
        q = layers.rms_norm(eps=NORM_EPS, name=names[3], **kw)(q)
        k = layers.rms_norm(eps=NORM_EPS, name=names[4], **kw)(k)
        return [q, k, v]

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None, cos: jax.Array, sin: jax.Array,
        keys: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        qkv = self._qkv(x, ("to_q", "to_k", "to_v", "norm_q", "norm_k"))
        if self.context:
            ctx = self._qkv(
                context, ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
            )
            qkv = [jnp.concatenate([c, i], axis=1) for c, i in zip(ctx, qkv, strict=True)]
        q, k, v = qkv
        if self.image_start is None:
            out = layers.attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v,
                                   mask=keys, implementation=self.attention_impl)
        else:
            bias = _image_rope_bias(q, k, cos, sin, self.image_start)
            out = layers.attention(q, k, v, bias=bias, mask=keys,
                                   implementation=self.attention_impl)
        out = out.reshape(*out.shape[:2], self.heads * self.head_dim)
        if not self.context:
            return out
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n_txt = context.shape[1]
        img = layers.dense(x.shape[-1], ("heads", "embed"), name="to_out", **kw)(out[:, n_txt:])
        txt = layers.dense(context.shape[-1], ("heads", "embed"), name="to_add_out", **kw)(
            out[:, :n_txt]
        )
        return img, txt


def _image_rope_bias(q: jax.Array, k: jax.Array, cos: jax.Array, sin: jax.Array,
                     start: int) -> jax.Array:
    """Additive score bias ``[b, heads, s, s]`` that turns the unrotated scores of image queries
    on image keys (positions ``start:``) into rotated ones and leaves every other score as is."""
    def scores(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.einsum("bqhd,bkhd->bhqk", a.astype(jnp.float32), b.astype(jnp.float32))

    qi, ki = q[:, start:], k[:, start:]
    rot = scores(apply_rope(qi, cos[start:], sin[start:]), apply_rope(ki, cos[start:], sin[start:]))
    delta = (rot - scores(qi, ki)) / np.sqrt(q.shape[-1])
    return jnp.pad(delta, ((0, 0), (0, 0), (start, 0), (start, 0))).astype(q.dtype)


class DualStreamBlock(nn.Module):
    """Flux dual-stream (MM-DiT) block: ``((txt, img), temb, cos, sin, keys) -> ((txt, img),
    None)``."""

    config: MMDiTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    image_start: int | None = None

    @nn.compact
    def __call__(
        self, carry: tuple[jax.Array, jax.Array], temb: jax.Array, cos: jax.Array, sin: jax.Array,
        keys: jax.Array | None = None,
    ) -> tuple[tuple[jax.Array, jax.Array], None]:
        txt, img = carry
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n_img, (gate, shift2, scale2, gate2) = AdaNormZero(6, name="norm1", **kw)(img, temb)
        n_txt, (c_gate, c_shift2, c_scale2, c_gate2) = AdaNormZero(6, name="norm1_context", **kw)(
            txt, temb
        )
        a_img, a_txt = Attention(
            self.config.num_attention_heads,
            self.config.attention_head_dim,
            context=True,
            attention_impl=self.attention_impl,
            image_start=self.image_start,
            name="attn",
            **kw,
        )(n_img, n_txt, cos, sin, keys)
        img = img + gate * a_img
        img = img + gate2 * FeedForward(name="ff", **kw)(
            _ln(self.dtype, "norm2")(img) * (1 + scale2) + shift2
        )
        txt = txt + c_gate * a_txt
        txt = txt + c_gate2 * FeedForward(name="ff_context", **kw)(
            _ln(self.dtype, "norm2_context")(txt) * (1 + c_scale2) + c_shift2
        )
        txt = nn.with_logical_constraint(txt, ACT)
        img = nn.with_logical_constraint(img, ACT)
        return (txt, img), None


class SingleStreamBlock(nn.Module):
    """Flux single-stream block: parallel attention + MLP, fused ``proj_out``, gated residual."""

    config: MMDiTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    image_start: int | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array, cos: jax.Array, sin: jax.Array,
        keys: jax.Array | None = None,
    ) -> tuple[jax.Array, None]:
        d, kw = x.shape[-1], dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, (gate,) = AdaNormZero(3, name="norm", **kw)(x, temb)
        mlp = layers.gelu_tanh(layers.dense(4 * d, ("embed", "mlp"), name="proj_mlp", **kw)(h))
        attn = Attention(
            self.config.num_attention_heads,
            self.config.attention_head_dim,
            attention_impl=self.attention_impl,
            image_start=self.image_start,
            name="attn",
            **kw,
        )(h, None, cos, sin, keys)
        out = layers.dense(d, ("mlp", "embed"), name="proj_out", **kw)(
            jnp.concatenate([attn, mlp], axis=-1)
        )
        return nn.with_logical_constraint(x + gate * out, ACT), None


class ConvEmbed(nn.Module):
    """UViT conv embed: ``embeddings`` (vocab -> D) -> RMSNorm -> 1x1 conv (no bias)."""

    vocab_size: int
    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.embed(self.vocab_size, self.dim, name="embeddings", **kw)(ids)
        x = layers.rms_norm(eps=NORM_EPS, name="layer_norm", **kw)(x)
        return layers.dense(self.dim, ("conv_in", "conv_out"), use_bias=False, name="conv", **kw)(x)


class Downsample(nn.Module):
    """RMSNorm -> zero-pad bottom/right by 1 -> 2x2 stride-2 conv (diffusers ``Downsample2D``)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.rms_norm(eps=NORM_EPS, name="norm", **kw)(x)
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return layers.conv(x.shape[-1], 2, strides=2, use_bias=False, name="conv", **kw)(x)


class Upsample(nn.Module):
    """RMSNorm -> 2x2 stride-2 transposed conv (no bias): ``[b, h, w, c] -> [b, 2h, 2w, c]``.

    The kernel is ``[2, 2, in, out]``: output ``(2i + a, 2j + c)`` = ``x[i, j] @ kernel[a, c]``.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = layers.rms_norm(
            eps=NORM_EPS, name="norm", dtype=self.dtype, param_dtype=self.param_dtype
        )(x)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                layers.DEFAULT_KERNEL_INIT, (None, None, "conv_in", "conv_out")
            ),
            (2, 2, c, c),
            self.param_dtype,
        )
        y = jnp.einsum("bijc,akco->biajko", x, kernel.astype(self.dtype))
        return y.reshape(b, 2 * h, 2 * w, c)


class ConvNeXtBlock(nn.Module):
    """amused's UViT ``ConvNextBlock`` on ``[b, h, w, c]``: depthwise ``kernel`` conv -> RMSNorm
    -> Linear(4c) -> GELU -> global response norm -> Linear(c), plus the input; then
    ``x * (1 + scale) + shift`` from ``linear(silu(temb))`` (zero-initialised: identity at start).
    """

    kernel: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        c, kw = x.shape[-1], dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.DepthwiseConv(self.kernel, name="depthwise", **kw)(x)
        h = layers.rms_norm(eps=NORM_EPS, name="norm", **kw)(h)
        h = layers.gelu_exact(layers.dense(4 * c, ("conv_out", "mlp"), name="linear_1", **kw)(h))
        h = GlobalResponseNorm(name="grn", **kw)(h)
        x = x + layers.dense(c, ("mlp", "conv_out"), name="linear_2", **kw)(h)
        mod = layers.dense(2 * c, ("cond", "conv_out"), kernel_init=nn.initializers.zeros_init(),
                           name="cond_embeds_mapper", **kw)(jax.nn.silu(temb))
        scale, shift = jnp.split(mod[:, None, None, :], 2, axis=-1)
        return x * (1 + scale) + shift


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN: ``gamma * (x * n) + beta + x`` with ``n`` each channel's spatial L2 norm
    over the mean of those norms (``gamma``, ``beta`` start at 0: identity)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",))
        gamma = self.param("gamma", zeros, (c,), self.param_dtype).astype(self.dtype)
        beta = self.param("beta", zeros, (c,), self.param_dtype).astype(self.dtype)
        g = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2), keepdims=True))
        n = (g / (jnp.mean(g, axis=-1, keepdims=True) + 1e-6)).astype(self.dtype)
        return gamma * (x * n) + beta + x


class MlmHead(nn.Module):
    """``mlm_layer``: 1x1 conv -> RMSNorm -> 1x1 conv to ``codebook_size`` logits (no biases)."""

    codebook_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.dense(x.shape[-1], ("conv_in", "conv_out"), name="conv1", **kw)(x)
        x = layers.rms_norm(
            eps=NORM_EPS, name="layer_norm", dtype=self.dtype, param_dtype=self.param_dtype
        )(x)
        return layers.dense(self.codebook_size, ("conv_in", "vocab"), name="conv2", **kw)(x)


# ---------------------------------------------------------------------------------------------
# the model


class MMDiT(nn.Module):
    """Muddit's generator. See the module docstring for the data flow.

    Attributes:
      config: the upstream config.
      dtype / param_dtype: compute / storage dtypes (logits are returned in float32).
      remat: rematerialise each block in the backward pass (``nn.remat``).
      remat_policy: name of a ``jax.checkpoint_policies`` policy for ``remat`` (e.g.
        ``"dots_with_no_batch_dims_saveable"``); ``None`` saves nothing (full recompute).
      scan_layers: ``nn.scan`` over the dual blocks and over the single blocks; their params are
        stacked on a leading ``layers`` axis under ``transformer_blocks`` /
        ``single_transformer_blocks`` instead of ``transformer_blocks_{i}`` (see
        :func:`stack_block_params`).
      attention_impl: ``jax.nn.dot_product_attention`` implementation (``None``/``"xla"``/
        ``"cudnn"``, see :func:`muddit_jax.models.layers.attention`).
    """

    config: MMDiTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    remat_policy: str | None = None
    attention_impl: str | None = None

    def _blocks(self, cls: type[nn.Module], name: str, length: int, image_start: int | None,
                carry, *args):
        if length == 0:
            return carry
        kw = dict(
            config=self.config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_impl=self.attention_impl,
            image_start=image_start,
        )
        if self.remat:
            policy = None
            if self.remat_policy:
                policy = getattr(jax.checkpoint_policies, self.remat_policy)
            cls = nn.remat(cls, prevent_cse=not self.scan_layers, policy=policy)
        if self.scan_layers:
            scanned = nn.scan(
                cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * len(args),
                length=length,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            return scanned(name=name, **kw)(carry, *args)[0]
        for i in range(length):
            carry = cls(name=f"{name}_{i}", **kw)(carry, *args)[0]
        return carry

    def _image_input(self, image_ids: jax.Array, temb: jax.Array, prefix: str
                     ) -> tuple[jax.Array, tuple[int, int]]:
        """Code ids ``[b, h, w]`` -> block tokens ``[b, n, D]`` and the block grid: the UViT
        embed, ConvNeXt blocks, down-sampling, projection and position table, their module
        names prefixed by ``prefix`` (``""``: upstream's names)."""
        cfg, b, d = self.config, image_ids.shape[0], self.config.inner_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvEmbed(cfg.vocab_size, d, name=prefix + "embed", **kw)(image_ids)
        for i in range(cfg.conv_blocks + (cfg.condition_conv_blocks if prefix else 0)):
            x = ConvNeXtBlock(cfg.conv_kernel, name=f"{prefix}down_convnext_{i}", **kw)(x, temb)
        for level in range(cfg.down_levels):
            x = Downsample(name=prefix + _level_name("down_block", level), **kw)(x)
        gh, gw = x.shape[1:3]
        img = layers.rms_norm(eps=NORM_EPS, name=prefix + "project_to_hidden_norm", **kw)(
            x.reshape(b, gh * gw, d)
        )
        img = layers.dense(d, ("conv_in", "embed"), use_bias=False,
                           name=prefix + "project_to_hidden", **kw)(img)
        if cfg.image_pos_embed:
            table = self.param(
                prefix + "image_pos_embed",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                (gh * gw, d), self.param_dtype)
            img = img + jnp.asarray(table, self.dtype)[None]
        return img, (gh, gw)

    def _image_paths(self, image_ids: jax.Array, temb: jax.Array, is_condition: jax.Array,
                     generated_rows: int | None) -> tuple[jax.Array, tuple[int, int]]:
        """Block tokens of every row from upstream's image input path or, with
        ``condition_image_input``, the condition's for clean rows (see ``generated_rows`` in
        :meth:`__call__`)."""
        n, b = generated_rows, image_ids.shape[0]
        if n is not None and not 0 <= n <= b:
            raise ValueError(f"generated_rows={n} must be in [0, {b}] (the batch's rows)")
        if not self.config.condition_image_input:
            return self._image_input(image_ids, temb, "")
        if n is None:
            img, grid = self._image_input(image_ids, temb, "")
            cond = self._image_input(image_ids, temb, CONDITION_PREFIX)[0]
            return jnp.where(is_condition[:, None, None], cond, img), grid
        parts = []
        if n:
            parts.append(self._image_input(image_ids[:n], temb[:n], ""))
        if n < b:
            parts.append(self._image_input(image_ids[n:], temb[n:], CONDITION_PREFIX))
        return jnp.concatenate([p[0] for p in parts]), parts[0][1]

    @nn.compact
    def __call__(
        self,
        image_ids: jax.Array,
        text_states: jax.Array,
        pooled: jax.Array,
        timestep: jax.Array,
        micro_conds: jax.Array,
        text_keys: jax.Array | None = None,
        generated_rows: int | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Predict image-token and text-token logits.

        Args:
          image_ids: ``[b, h, w]`` int VQ token ids in ``[0, vocab_size)`` (mask id =
            ``vocab_size - 1``).
          text_states: ``[b, l, joint_attention_dim]`` text encoder hidden states
            (``[b, l, t5_dim]`` when ``t5_dim`` is set); upstream ``encoder_hidden_states`` (the
            CLIP penultimate layer).
          pooled: ``[b, pooled_projection_dim]`` pooled/projected text embedding (``text_embeds``).
          timestep: ``[b]`` float in ``[0, 1]`` (upstream passes ``step / num_steps``; scaled by
            1000 inside, as upstream).
          micro_conds: ``[b, 5]`` = (width, height, crop x, crop y, aesthetic score).
          text_keys: ``[b, l]`` bool, False where a text position is no attention key in any
            block (its state still updates but informs no other position); ``None`` = every
            position is a key (upstream).
          generated_rows: static ``n``, a promise that rows ``[0, n)`` hold images being
            generated and rows ``[n, b)`` clean condition images. With
            ``condition_image_input`` each row then runs only its own image input path (half
            the work in a split batch). ``None``: every row runs both paths and keeps the one
            its mask ids pick. The two agree on every row that keeps the promise; a generated
            row without a mask id (nothing to predict) takes upstream's path under the promise.

        Returns:
          ``image_logits`` ``[b, h, w, codebook_size]`` and ``text_logits``
          ``[b, l, tokenizer_vocab_size]`` (``None`` without a text head), both float32.
        """
        cfg, dt = self.config, self.dtype
        kw = dict(dtype=dt, param_dtype=self.param_dtype)
        d, b, n_txt = cfg.inner_dim, image_ids.shape[0], text_states.shape[1]
        if micro_conds.shape != (b, NUM_MICRO_CONDS):
            raise ValueError(
                f"micro_conds must be [{b}, {NUM_MICRO_CONDS}], got {micro_conds.shape}"
            )

        # a clean image is the condition (captioning / VQA); one being generated holds a mask id
        is_condition = ~jnp.any(image_ids == cfg.mask_token_id, axis=(1, 2))
        pooled = pooled.astype(jnp.float32)
        if cfg.condition_image_isolated:
            pooled = jnp.where(is_condition[:, None], 0.0, pooled)
        cond = jnp.concatenate([pooled, micro_cond_embedding(micro_conds)], axis=-1).astype(dt)
        cond = MLPEmbedding(d, d, use_bias=False, name="cond_embed", **kw)(cond)
        temb = TimestepTextEmbedding(d, name="time_text_embed", **kw)(
            timestep.astype(jnp.float32) * 1000.0, cond
        )

        txt = text_states.astype(dt)
        if cfg.t5_dim is not None:
            txt = layers.dense(
                cfg.joint_attention_dim, ("cond", None), use_bias=False, name="adapter", **kw
            )(_ln(dt, "adapter_norm")(txt))
        txt = layers.dense(d, ("cond", "embed"), name="context_embedder", **kw)(txt)
        txt = layers.rms_norm(eps=NORM_EPS, name="encoder_proj_layer_norm", **kw)(txt)
        if cfg.text_registers:
            registers = self.param(
                "text_registers",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                (cfg.text_registers, d), self.param_dtype)
            txt = jnp.concatenate(
                [txt, jnp.broadcast_to(jnp.asarray(registers, dt)[None], (b, *registers.shape))],
                axis=1)
        n_seq = txt.shape[1]  # text positions and registers

        img, (gh, gw) = self._image_paths(image_ids, temb, is_condition, generated_rows)

        cos, sin = rope_cos_sin(rope_ids(n_seq, gh, gw), cfg.axes_dims_rope, cfg.rope_theta)
        if cfg.rope_free_heads:
            cos, sin = per_head_rope(cos, sin, cfg.num_attention_heads, cfg.rope_free_heads)
        cos, sin = jnp.asarray(cos), jnp.asarray(sin)
        txt, img = nn.with_logical_constraint(txt, ACT), nn.with_logical_constraint(img, ACT)
        keys = None
        if text_keys is not None:
            if text_keys.shape != (b, n_txt):
                raise ValueError(f"text_keys must be [{b}, {n_txt}] (one flag per text position), "
                                 f"got {text_keys.shape}")
            keys = jnp.concatenate(  # registers and image tokens are always keys
                [text_keys.astype(bool), jnp.ones((b, n_seq - n_txt + img.shape[1]), bool)],
                axis=1)[:, None, None, :]
        if cfg.condition_image_isolated:
            keys = _isolate_condition(keys, is_condition, n_seq, n_seq + img.shape[1])
        blocks = (temb, cos, sin, keys)
        image_start = n_seq if cfg.rope_scope == "image" else None  # None: rotate every score
        txt, img = self._blocks(DualStreamBlock, DUAL, cfg.num_layers, image_start, (txt, img),
                                *blocks)
        x = self._blocks(
            SingleStreamBlock, SINGLE, cfg.num_single_layers, image_start,
            jnp.concatenate([txt, img], axis=1), *blocks,
        )
        txt, img = x[:, :n_txt], x[:, n_seq:]

        text_logits = None
        if cfg.tokenizer_vocab_size is not None:
            text_logits = layers.dense(
                cfg.tokenizer_vocab_size,
                ("embed", "vocab"),
                use_bias=False,
                name="text_decoder",
                **kw,
            )(_ln(dt, "text_decoder_norm")(txt)).astype(jnp.float32)

        img = layers.rms_norm(eps=NORM_EPS, name="project_from_hidden_norm", **kw)(img)
        img = layers.dense(
            d, ("embed", "conv_out"), use_bias=False, name="project_from_hidden", **kw
        )(img)
        x = img.reshape(b, gh, gw, d)
        for level in reversed(range(cfg.up_levels)):
            x = Upsample(name=_level_name("up_block", level), **kw)(x)
        for i in range(cfg.conv_blocks):
            x = ConvNeXtBlock(cfg.conv_kernel, name=f"up_convnext_{i}", **kw)(x, temb)
        logits = MlmHead(cfg.codebook_size, name="mlm_layer", **kw)(x).astype(jnp.float32)
        return logits, text_logits


def _isolate_condition(keys: jax.Array | None, is_condition: jax.Array, n_seq: int,
                       length: int) -> jax.Array:
    """Attention mask ``[b, 1, length, length]``: ``keys`` (``[b, 1, 1, length]`` or None = all)
    with the scores of image queries (positions ``n_seq:``) on text and register keys (``:n_seq``)
    removed in ``is_condition`` rows."""
    pos = jnp.arange(length)
    image_on_text = (pos[:, None] >= n_seq) & (pos[None, :] < n_seq)
    allowed = ~(is_condition[:, None, None, None] & image_on_text[None, None])
    return allowed if keys is None else allowed & keys


def _level_name(block: str, level: int) -> str:
    """Level 0 keeps upstream's name (``down_block`` / ``up_block``); deeper levels add ``_i``."""
    return block if level == 0 else f"{block}_{level}"


def codebook_init(params: Mapping[str, Any], codebook: jax.Array, key: jax.Array) -> dict:
    """``params`` (unboxed MM-DiT params) with the image-code rows of the input embedding and the
    MLM head's output columns set from the VQ ``codebook [K, d]`` instead of at random.

    The codebook is whitened per dimension and mapped to the model width by a random Gaussian
    projection (one for the input, one for the output), then scaled to the random init's
    standard deviation: codes whose patches look alike start alike, so rare codes get
    meaningful embeddings before the generator has seen them often. Other rows (mask and extra
    ids) keep their random init. A ``condition_embed`` (``condition_image_input``) gets the
    same rows.
    """
    k = codebook.shape[0]
    table = jnp.asarray(params["embed"]["embeddings"]["embedding"])
    kernel = jnp.asarray(params["mlm_layer"]["conv2"]["kernel"])
    if kernel.shape[1] != k or table.shape[0] < k:
        raise ValueError(f"codebook of {k} codes does not match the MM-DiT's codebook_size "
                         f"{kernel.shape[1]}")
    c = codebook.astype(jnp.float32)
    c = (c - c.mean(0)) / (c.std(0) + 1e-6)
    k_in, k_out = jax.random.split(key)

    def project(rng: jax.Array, width: int, like: jax.Array) -> jax.Array:
        x = c @ jax.random.normal(rng, (c.shape[1], width), jnp.float32)
        return (x * (jnp.std(like) / (jnp.std(x) + 1e-12))).astype(like.dtype)

    out = jax.tree.map(lambda x: x, dict(params))
    rows = project(k_in, table.shape[1], table)
    for embed in ("embed", CONDITION_PREFIX + "embed"):  # the condition's path starts alike
        if embed in out:
            own = jnp.asarray(out[embed]["embeddings"]["embedding"])
            out[embed]["embeddings"]["embedding"] = own.at[:k].set(rows)
    out["mlm_layer"]["conv2"]["kernel"] = project(k_out, kernel.shape[0], kernel).T
    return out


def add_condition_input(params: Mapping[str, Any]) -> dict[str, Any]:
    """(Unboxed, unrolled or scanned) params of an MM-DiT without ``condition_image_input`` ->
    params with it: the ``condition_*`` path starts as a copy of the trained image input path,
    so a model that reads images keeps reading them. Params that have the path pass through."""
    out = dict(params)
    if any(name.startswith(CONDITION_PREFIX) for name in params):
        return out
    for name, sub in params.items():
        if re.fullmatch(IMAGE_INPUT_MODULES, name):
            out[CONDITION_PREFIX + name] = jax.tree.map(jnp.copy, sub)
    return out


def dummy_inputs(config: MMDiTConfig, batch: int = 1, grid: int = 2, text_len: int = 1) -> tuple:
    """Smallest valid inputs (for ``init`` / ``eval_shape``)."""
    text_width = config.t5_dim or config.joint_attention_dim
    return (
        jnp.zeros((batch, grid, grid), jnp.int32),
        jnp.zeros((batch, text_len, text_width), jnp.float32),
        jnp.zeros((batch, config.pooled_projection_dim), jnp.float32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch, NUM_MICRO_CONDS), jnp.float32),
    )


# ---------------------------------------------------------------------------------------------
# unrolled <-> scanned parameter layouts


def _stack(xs: list[Any]) -> Any:
    return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)


def stack_block_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Unrolled (``transformer_blocks_{i}``) -> scanned layout (``transformer_blocks``, stacked).

    Works on unboxed params trees (numpy or jax leaves); other entries pass through.
    """
    out = dict(params)
    for name in (DUAL, SINGLE):
        pat = re.compile(rf"{name}_(\d+)$")
        idx = sorted(int(m.group(1)) for k in params if (m := pat.match(k)))
        if not idx:
            continue
        if idx != list(range(len(idx))):
            raise ValueError(f"{name}: non-contiguous block indices {idx}")
        blocks = [out.pop(f"{name}_{i}") for i in idx]
        out[name] = jax.tree.map(lambda *xs: _stack(list(xs)), *blocks)
    return out


def unstack_block_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned -> unrolled layout (inverse of :func:`stack_block_params`)."""
    out = dict(params)
    for name in (DUAL, SINGLE):
        if name not in out:
            continue
        stacked = out.pop(name)
        n = jax.tree.leaves(stacked)[0].shape[0]
        for i in range(n):
            out[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out
