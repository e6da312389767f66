"""The CLIP text tower (``transformers.CLIPTextModelWithProjection`` semantics) and vocab growth.

Owns :class:`CLIPTextConfig`, the :class:`CLIPTextEncoder` module and the helpers that grow the
token-embedding table (Muddit appends a learned ``<mask>`` token to the CLIP vocabulary).

Muddit conditions its generator on two outputs:
  * ``context``: the penultimate hidden states ``hidden_states[-2]`` ``[b, l, d]`` (output of layer
    ``n - 1``, *not* final-layer-normed);
  * ``pooled``: the projected pooled embedding ``text_embeds`` ``[b, p]`` (final-layer-normed
    hidden state at the EOS position, times ``text_projection``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from muddit_jax.models import layers

Dtype = Any

# transformers' rule: configs written before its PR #24773 carry eos_token_id == 2 and pool at the
# argmax of the ids (the EOS token had the highest id in the original CLIP vocabulary).
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of the CLIP text tower (names as in transformers' ``CLIPTextConfig``)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        layers.activation(self.hidden_act)  # fail early on an unknown activation

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        """Build from a transformers ``CLIPTextConfig`` dict (or a ``CLIPConfig`` dict)."""
        if "text_config" in d and isinstance(d["text_config"], Mapping):
            d = {"projection_dim": d.get("projection_dim"), **d["text_config"]}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.CLIPTextModelWithProjection`` loads."""
        return {
            "architectures": ["CLIPTextModelWithProjection"],
            "model_type": "clip_text_model",
            "attention_dropout": 0.0,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            **dataclasses.asdict(self),
        }

    @classmethod
    def tiny(cls, vocab_size: int = 1000, **overrides: Any) -> "CLIPTextConfig":
        """A small from-scratch preset (2 layers, width 64, 4 heads).

        Special ids default to the layout of
        :class:`~muddit_jax.models.tokenizers.SentencePieceTokenizer` (pad 0, bos 2, eos 3);
        override them to match another tokenizer.
        """
        base = dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=256,
            projection_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="gelu",
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        return cls(**{**base, **overrides})


@flax.struct.dataclass
class CLIPTextOutput:
    """Outputs of :class:`CLIPTextEncoder`.

    Attributes:
      context: penultimate hidden states ``[b, l, d]`` (Muddit's text context).
      pooled: projected pooled embedding ``[b, p]`` (transformers' ``text_embeds``).
      last_hidden_state: final-layer-normed last hidden states ``[b, l, d]``.
      hidden_states: embeddings and every layer's output (``n + 1`` arrays ``[b, l, d]``) when
        requested, else ``None``.
    """

    context: jax.Array
    pooled: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


def pool_index(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Position ``[b]`` whose final hidden state is pooled (transformers' EOS rule)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with an additive mask ``[b, 1, l, l]``."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        cfg = self.config
        b, l, d = x.shape
        proj = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def heads(name: str) -> jax.Array:
            y = layers.dense(d, ("embed", "heads"), name=name, **proj)(x)
            return y.reshape(b, l, cfg.num_attention_heads, cfg.head_dim)

        q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
        out = layers.attention(q, k, v, bias=bias.astype(q.dtype)).reshape(b, l, d)
        return layers.dense(d, ("heads", "embed"), name="out_proj", **proj)(out)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + fc2(act(fc1(ln2(x))))``."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.layer_norm(eps=cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(cfg, name="self_attn", **kw)(h, bias)
        h = layers.layer_norm(eps=cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        h = layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(h)
        h = layers.activation(cfg.hidden_act)(h)
        h = layers.dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)
        return x + h


class CLIPTextEncoder(nn.Module):
    """``CLIPTextModelWithProjection``: ids ``[b, l]`` -> :class:`CLIPTextOutput`.

    Param tree: ``token_embedding``, ``position_embedding``, ``layers_{i}``
    (``self_attn/{q,k,v,out}_proj``, ``layer_norm1``, ``fc1``, ``fc2``, ``layer_norm2``),
    ``final_layer_norm``, ``text_projection``.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        """Encode ``input_ids [b, l]``; ``attention_mask [b, l]`` (1 = keep) masks padded keys."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, l = input_ids.shape
        if l > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {l} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        tok = layers.embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding", **kw)
        pos = layers.embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            axes=(None, "embed"),
            name="position_embedding",
            **kw,
        )
        x = tok(input_ids) + pos(jnp.arange(l))[None]

        keep = jnp.tril(jnp.ones((l, l), bool))[None, None]  # [1, 1, q, k]
        if attention_mask is not None:
            keep = keep & attention_mask.astype(bool)[:, None, None, :]
        bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)

        hidden = [x]
        for i in range(cfg.num_hidden_layers):
            x = CLIPEncoderLayer(cfg, name=f"layers_{i}", **kw)(x, bias)
            hidden.append(x)
        last = layers.layer_norm(eps=cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)
        idx = pool_index(input_ids, cfg.eos_token_id)
        pooled = jnp.take_along_axis(last, idx[:, None, None], axis=1)[:, 0]
        text_embeds = layers.dense(
            cfg.projection_dim, ("embed", "cond"), use_bias=False, name="text_projection", **kw
        )(pooled)
        return CLIPTextOutput(
            context=hidden[-2],
            pooled=text_embeds,
            last_hidden_state=last,
            hidden_states=tuple(hidden) if output_hidden_states else None,
        )


# ---------------------------------------------------------------------------------------------
# vocabulary growth (Muddit's ``<mask>`` token); params may be boxed (``nn.Partitioned``) or not


def _table(params: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(nn.unbox(params["token_embedding"]["embedding"]))


def _with_table(params: Mapping[str, Any], table: np.ndarray) -> dict[str, Any]:
    leaf = params["token_embedding"]["embedding"]
    if isinstance(leaf, nn.meta.AxisMetadata):
        table = leaf.replace_boxed(table)
    return {**params, "token_embedding": {**params["token_embedding"], "embedding": table}}


def resize_token_embeddings(
    config: CLIPTextConfig,
    params: Mapping[str, Any],
    new_vocab_size: int,
    rng: jax.Array,
    *,
    mean_resizing: bool = True,
) -> tuple[CLIPTextConfig, dict[str, Any]]:
    """Grow the token table to ``new_vocab_size`` rows, keeping the old rows bit-exact.

    New rows follow ``transformers``' ``resize_token_embeddings``: with ``mean_resizing`` they are
    drawn from ``N(mean, 1e-9 * cov)`` of the old rows, otherwise from ``N(0, 0.02^2)``.
    """
    table = _table(params)
    old, width = table.shape
    added = new_vocab_size - old
    if added < 0:
        raise ValueError(f"cannot shrink the token table from {old} to {new_vocab_size} rows")
    rows = np.asarray(jax.random.normal(rng, (added, width), jnp.float32), np.float64)
    if mean_resizing:
        ref = table.astype(np.float64)
        mean = ref.mean(axis=0)
        # mean + sqrt(eps / n) * centered^T z with z ~ N(0, I_n) has covariance
        # eps * centered^T centered / n: transformers' distribution without a Cholesky.
        z = np.asarray(jax.random.normal(jax.random.fold_in(rng, 1), (added, old)), np.float64)
        rows = mean + np.sqrt(1e-9 / old) * (z @ (ref - mean))
    else:
        rows = 0.02 * rows
    new_table = np.concatenate([table, rows.astype(table.dtype)], axis=0)
    return dataclasses.replace(config, vocab_size=new_vocab_size), _with_table(params, new_table)


def add_mask_token(
    config: CLIPTextConfig,
    params: Mapping[str, Any],
    rng: jax.Array,
    *,
    mask_id: int | None = None,
    mask_embedding: np.ndarray | None = None,
) -> tuple[CLIPTextConfig, dict[str, Any], int]:
    """Make room for Muddit's ``<mask>`` token; returns ``(config, params, mask_id)``.

    Mirrors Muddit's ``tokenizer.add_tokens("<mask>")`` followed by
    ``text_encoder.resize_token_embeddings(len(tokenizer))``: ``mask_id`` defaults to the current
    vocabulary size (one new row); a ``mask_id`` already inside the table (a checkpoint saved
    after resizing) grows nothing. ``mask_embedding`` ``[d]`` (e.g. Muddit's
    ``mask_token_embedding.pth``) overwrites the row when given.
    """
    mask_id = config.vocab_size if mask_id is None else int(mask_id)
    if mask_id > config.vocab_size:
        raise ValueError(
            f"mask id {mask_id} would leave a gap after the {config.vocab_size}-row token table"
        )
    if mask_id == config.vocab_size:
        config, params = resize_token_embeddings(config, params, config.vocab_size + 1, rng)
    if mask_embedding is not None:
        table = np.array(_table(params))
        vec = np.asarray(mask_embedding, table.dtype).reshape(-1)
        if vec.shape != (table.shape[1],):
            raise ValueError(f"mask embedding has {vec.size} values, expected {table.shape[1]}")
        table[mask_id] = vec
        params = _with_table(params, table)
    return config, dict(params), mask_id
