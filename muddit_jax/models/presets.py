"""Released model configurations, in one place (benchmarks, AOT compile checks and training configs
reuse them).

``muddit_512`` is the released Muddit 512-px network (``MeissonFlow/Muddit``, folder ``512/``),
which is Meissonic's generator plus a text head:

* ``transformer/config.json`` (``SymmetricTransformer2DModel``): 14 dual-stream + 28
  single-stream blocks, 8 heads x 128 (width 1024), ``joint_attention_dim`` =
  ``pooled_projection_dim`` = 1024, RoPE axes (16, 56, 56), ``vocab_size`` 8256 (8192 codes + 64
  special ids, mask = 8255), ``codebook_size`` 8192, ``tokenizer_vocab_size`` 49408, 2x
  ``downsample`` / ``upsample``, no T5 adapter. Meissonic's ``Transformer2DModel`` config is the
  same minus ``tokenizer_vocab_size``.
* ``text_encoder/config.json``: CLIP ViT-H/14 text tower (``CLIPTextModelWithProjection``):
  24 layers, width 1024, 16 heads, MLP 4096, exact GELU, projection 1024, 77 positions, vocab
  49408, pad/bos/eos ids 1/0/2 (eos 2 = transformers' legacy argmax pooling).
* ``vqvae/config.json`` (amused/Meissonic ``VQModel``): channels (128, 256, 256, 512, 768), 2
  layers per block, 64 latent channels, 8192 codes, no mid-block attention, codebook lookup;
  factor 16: a 512-px image is a 32 x 32 code grid, 16 x 16 = 256 image tokens after the MM-DiT's
  2x downsampling, next to 77 text tokens.

Muddit appends a learned ``<mask>`` row to the CLIP vocabulary at load time (see
``muddit_jax.port.clip_text``); ``muddit_512()`` describes the checkpoint as shipped,
``muddit_512(mask_token=True)`` the network that trains (49409 text ids, mask = 49408).

``meissonic_1024`` is Meissonic's 1024-px text-to-image generator: the same MM-DiT without the
text head (64 x 64 codes, 32 x 32 = 1024 image tokens after the 2x downsampling).
"""

from __future__ import annotations

import dataclasses

from muddit_jax.models.mmdit import MMDiTConfig
from muddit_jax.models.muddit import MudditConfig
from muddit_jax.models.text_encoder import CLIPTextConfig
from muddit_jax.models.vq import DOWN_BLOCK, UP_BLOCK, VQConfig

RESOLUTION_512 = 512
RESOLUTION_1024 = 1024
TEXT_LENGTH = 77


def clip_vit_h14_text() -> CLIPTextConfig:
    """The CLIP ViT-H/14 (LAION-2B) text tower of Meissonic / Muddit."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        projection_dim=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=TEXT_LENGTH,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def meissonic_vq() -> VQConfig:
    """The 16x VQ tokenizer (8192 codes) shared by aMUSEd-512, Meissonic and Muddit."""
    return VQConfig(
        block_out_channels=(128, 256, 256, 512, 768),
        down_block_types=(DOWN_BLOCK,) * 5,
        up_block_types=(UP_BLOCK,) * 5,
        layers_per_block=2,
        latent_channels=64,
        num_vq_embeddings=8192,
        norm_num_groups=32,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        force_upcast=True,
        scaling_factor=0.18215,
    )


def muddit_512_mmdit() -> MMDiTConfig:
    """The ~1B-parameter MM-DiT generator of Muddit-512 (with its text head)."""
    return MMDiTConfig(
        num_layers=14,
        num_single_layers=28,
        attention_head_dim=128,
        num_attention_heads=8,
        joint_attention_dim=1024,
        pooled_projection_dim=1024,
        axes_dims_rope=(16, 56, 56),
        vocab_size=8256,
        codebook_size=8192,
        tokenizer_vocab_size=49408,
        downsample=True,
        upsample=True,
    )


def muddit_512(mask_token: bool = False) -> MudditConfig:
    """Muddit-512: CLIP ViT-H/14 text tower + 1B MM-DiT + 16x VQ (512 px -> 32 x 32 codes);
    ``mask_token`` adds the ``<mask>`` row to the text vocabulary (and the text head)."""
    cfg = MudditConfig(text=clip_vit_h14_text(), vq=meissonic_vq(), mmdit=muddit_512_mmdit())
    if not mask_token:
        return cfg
    vocab = cfg.text.vocab_size + 1
    return dataclasses.replace(
        cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab),
        mmdit=dataclasses.replace(cfg.mmdit, tokenizer_vocab_size=vocab),
    )


def meissonic_1024() -> MudditConfig:
    """Meissonic-1024: the Muddit-512 networks without the text head (text-to-image only)."""
    cfg = muddit_512()
    return dataclasses.replace(cfg, mmdit=dataclasses.replace(cfg.mmdit, tokenizer_vocab_size=None))
