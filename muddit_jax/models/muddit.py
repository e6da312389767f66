"""Muddit's unified network: the text encoder feeding the MM-DiT generator.

``Muddit(config)(image_ids, text_ids, timestep, micro_conds) -> (image_logits, text_logits)`` is
the ``forward_fn`` the diffusion loss and the I2T sampler use: (possibly masked) text ids are
re-encoded by the text encoder on every call, as in Muddit. For T2I, where the text is fixed,
:meth:`Muddit.encode_text` runs once and :meth:`Muddit.denoise` runs per step. The VQ tokenizer is
not part of this module: images enter as codes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from muddit_jax.models.mmdit import MMDiT, MMDiTConfig
from muddit_jax.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
from muddit_jax.models.vq import DOWN_BLOCK, UP_BLOCK, VQConfig

Dtype = Any


@dataclasses.dataclass(frozen=True)
class MudditConfig:
    """The three networks' configs, checked for compatibility.

    ``mask_text_padding`` (not upstream: False) makes visible text padding (ids equal to
    ``text.pad_token_id``) no attention key in the MM-DiT: the padding's states then inform no
    other position. Masked padding (a target) stays a key. No params change.
    """

    text: CLIPTextConfig
    vq: VQConfig
    mmdit: MMDiTConfig
    mask_text_padding: bool = False

    def __post_init__(self) -> None:
        t, v, m = self.text, self.vq, self.mmdit
        problems = []
        if (m.t5_dim or m.joint_attention_dim) != t.hidden_size:
            problems.append(
                f"mmdit.joint_attention_dim ({m.joint_attention_dim}) must equal text.hidden_size "
                f"({t.hidden_size})"
            )
        if m.pooled_projection_dim != t.projection_dim:
            problems.append(
                f"mmdit.pooled_projection_dim ({m.pooled_projection_dim}) must equal "
                f"text.projection_dim ({t.projection_dim})"
            )
        if m.codebook_size != v.num_vq_embeddings:
            problems.append(
                f"mmdit.codebook_size ({m.codebook_size}) must equal vq.num_vq_embeddings "
                f"({v.num_vq_embeddings})"
            )
        if m.tokenizer_vocab_size not in (None, t.vocab_size):
            problems.append(
                f"mmdit.tokenizer_vocab_size ({m.tokenizer_vocab_size}) must equal "
                f"text.vocab_size ({t.vocab_size})"
            )
        if problems:
            raise ValueError("invalid MudditConfig: " + "; ".join(problems))

    @classmethod
    def tiny(cls, text_vocab_size: int, *, codebook_size: int = 64, width: int = 64,
             head_dim: int = 16) -> "MudditConfig":
        """A small CPU-sized model (2+2 MM-DiT blocks of ``width // head_dim`` heads, 4x-downsampling
        VQ). ``head_dim`` is a multiple of 16 dividing ``width``; the rotary channels split
        1:3:3 over (text, row, column) as Flux's (16, 56, 56) does."""
        if head_dim < 16 or head_dim % 16 or width % head_dim:
            raise ValueError(f"head_dim={head_dim} must be a multiple of 16 that divides "
                             f"width={width}")
        text = CLIPTextConfig.tiny(text_vocab_size, hidden_size=width, projection_dim=width,
                                   intermediate_size=2 * width, max_position_embeddings=16)
        vq = VQConfig(
            block_out_channels=(32, 32, 64), down_block_types=(DOWN_BLOCK,) * 3,
            up_block_types=(UP_BLOCK,) * 3, latent_channels=8, norm_num_groups=8,
            num_vq_embeddings=codebook_size, mid_block_add_attention=False,
        )
        mmdit = MMDiTConfig(
            num_layers=2, num_single_layers=2, attention_head_dim=head_dim,
            num_attention_heads=width // head_dim, joint_attention_dim=width,
            pooled_projection_dim=width,
            axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
            vocab_size=codebook_size + 1, codebook_size=codebook_size,
            tokenizer_vocab_size=text_vocab_size,
        )
        return cls(text=text, vq=vq, mmdit=mmdit)


def text_keys(config: MudditConfig, text_ids: jax.Array) -> jax.Array | None:
    """``[b, l]`` bool, False at the text positions the MM-DiT must not attend to (visible padding
    when ``config.mask_text_padding``); ``None`` when every position is a key."""
    if not config.mask_text_padding:
        return None
    return text_ids != config.text.pad_token_id


class Muddit(nn.Module):
    """Text encoder + MM-DiT. Params: ``{"text_encoder": ..., "mmdit": ...}``.

    ``remat`` / ``remat_policy`` / ``scan_layers`` / ``attention_impl`` are MM-DiT options (the
    77-token CLIP tower keeps JAX's default attention).
    """

    config: MudditConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    remat_policy: str | None = None
    attention_impl: str | None = None

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_encoder = CLIPTextEncoder(self.config.text, **kw)
        self.mmdit = MMDiT(
            self.config.mmdit, remat=self.remat, scan_layers=self.scan_layers,
            remat_policy=self.remat_policy, attention_impl=self.attention_impl, **kw,
        )

    def encode_text(self, text_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``text_ids [b, l]`` -> ``(context [b, l, d], pooled [b, p])``."""
        out = self.text_encoder(text_ids)
        return out.context, out.pooled

    def denoise(
        self,
        image_ids: jax.Array,
        context: jax.Array,
        pooled: jax.Array,
        timestep: jax.Array,
        micro_conds: jax.Array,
        text_keys: jax.Array | None = None,
        generated_rows: int | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """MM-DiT on encoded text: ``(image_logits [b, h, w, K], text_logits [b, l, V] | None)``;
        ``text_keys`` is :func:`text_keys` of the encoded ids; ``generated_rows`` as in
        :class:`~muddit_jax.models.mmdit.MMDiT`."""
        return self.mmdit(image_ids, context, pooled, timestep, micro_conds, text_keys,
                          generated_rows)

    def __call__(
        self,
        image_ids: jax.Array,
        text_ids: jax.Array,
        timestep: jax.Array,
        micro_conds: jax.Array,
        generated_rows: int | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Full forward: ``image_ids [b, h, w]``, ``text_ids [b, l]``, ``timestep [b]`` in [0, 1],
        ``micro_conds [b, 5]`` -> ``(image_logits, text_logits)``; ``generated_rows`` (static)
        as in :class:`~muddit_jax.models.mmdit.MMDiT`."""
        context, pooled = self.encode_text(text_ids)
        return self.denoise(image_ids, context, pooled, timestep, micro_conds,
                            text_keys(self.config, text_ids), generated_rows)
