"""PyTorch reference of Muddit's ``SymmetricTransformer2DModel`` with the official key layout.

Assembled from diffusers' Flux blocks (``FluxTransformerBlock``, ``FluxSingleTransformerBlock``,
``FluxPosEmbed``, ``CombinedTimestepTextProjEmbeddings``, ``TimestepEmbedding``, ``RMSNorm``,
``Downsample2D``, ``Upsample2D``); the UViT conv embed, the MLM head and the down/up wrappers are
written here. Inputs/outputs follow upstream: ``hidden_states`` ``[b, h, w]`` token ids, image
logits ``[b, codebook, h, w]`` (NCHW), text logits ``[b, l, tokenizer_vocab_size]`` or ``None``.

Needs the ``torch`` extra (torch + diffusers). Used by the parity tests and, with weights from
:func:`muddit_jax.port.mmdit.export`, as the PyTorch side of the benchmarks in ``bench/``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from diffusers.models.embeddings import (
    CombinedTimestepTextProjEmbeddings,
    TimestepEmbedding,
    get_timestep_embedding,
)
from diffusers.models.normalization import RMSNorm
from diffusers.models.resnet import Downsample2D, Upsample2D
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

EPS = 1e-6
MICRO_COND_DIM = 256
NUM_MICRO_CONDS = 5


class UVit2DConvEmbed(nn.Module):
    """``embeddings`` -> RMSNorm -> 1x1 conv (no bias); ``[b, h, w]`` ids -> ``[b, c, h, w]``."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, dim)
        self.layer_norm = RMSNorm(dim, EPS, True)
        self.conv = nn.Conv2d(dim, dim, kernel_size=1, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(self.embeddings(ids))
        return self.conv(x.permute(0, 3, 1, 2))


class ConvMlmLayer(nn.Module):
    """1x1 conv -> RMSNorm (over channels) -> 1x1 conv to codebook logits."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.layer_norm = RMSNorm(dim, EPS, True)
        self.conv2 = nn.Conv2d(dim, codebook_size, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(x)


class SimpleUVitBlock(nn.Module):
    """Optional ``downsample`` (RMSNorm + 2x2/2 conv), ``upsample`` (RMSNorm + 2x2/2 deconv)."""

    def __init__(self, dim: int, downsample: bool, upsample: bool):
        super().__init__()
        norm = dict(norm_type="rms_norm", eps=EPS, elementwise_affine=True, bias=False)
        self.downsample = (
            Downsample2D(dim, use_conv=True, padding=0, name="Conv2d_0", kernel_size=2, **norm)
            if downsample
            else None
        )
        self.upsample = (
            Upsample2D(
                dim,
                use_conv_transpose=True,
                kernel_size=2,
                padding=0,
                name="conv",
                interpolate=False,
                **norm,
            )
            if upsample
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class SymmetricTransformer2DModel(nn.Module):
    """Reference generator; constructor arguments are the upstream ``config.json`` keys."""

    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, ...] = (16, 56, 56),
        vocab_size: int = 8256,
        codebook_size: int = 8192,
        tokenizer_vocab_size: int | None = None,
        t5_dim: int | None = None,
        downsample: bool = False,
        upsample: bool = False,
        **ignored: Any,
    ):
        super().__init__()
        assert not guidance_embeds
        dim = num_attention_heads * attention_head_dim
        self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=list(axes_dims_rope))
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=dim, pooled_projection_dim=pooled_projection_dim
        )
        self.adapter = (
            nn.Sequential(
                nn.LayerNorm(t5_dim, elementwise_affine=False, eps=EPS),
                nn.Linear(t5_dim, joint_attention_dim, bias=False),
            )
            if t5_dim is not None
            else None
        )
        self.context_embedder = nn.Linear(joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, num_attention_heads, attention_head_dim)
            for _ in range(num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, num_attention_heads, attention_head_dim)
            for _ in range(num_single_layers)
        )
        self.embed = UVit2DConvEmbed(dim, vocab_size)
        self.mlm_layer = ConvMlmLayer(dim, codebook_size)
        self.cond_embed = TimestepEmbedding(
            NUM_MICRO_CONDS * MICRO_COND_DIM + pooled_projection_dim, dim, sample_proj_bias=False
        )
        self.encoder_proj_layer_norm = RMSNorm(dim, EPS, True)
        self.project_to_hidden_norm = RMSNorm(dim, EPS, True)
        self.project_to_hidden = nn.Linear(dim, dim, bias=False)
        self.project_from_hidden_norm = RMSNorm(dim, EPS, True)
        self.project_from_hidden = nn.Linear(dim, dim, bias=False)
        self.down_block = SimpleUVitBlock(dim, downsample, False)
        self.up_block = SimpleUVitBlock(dim, False, upsample)
        self.text_decoder = (
            nn.Sequential(
                nn.LayerNorm(dim, elementwise_affine=False, eps=EPS),
                nn.Linear(dim, tokenizer_vocab_size, bias=False),
            )
            if tokenizer_vocab_size is not None
            else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        micro_conds: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = hidden_states.shape[0]
        micro = get_timestep_embedding(
            micro_conds.flatten(), MICRO_COND_DIM, flip_sin_to_cos=True, downscale_freq_shift=0
        ).reshape(b, -1)
        cond = self.cond_embed(torch.cat([pooled_projections, micro], dim=1))

        x = self.embed(hidden_states)
        if self.adapter is not None:
            encoder_hidden_states = self.adapter(encoder_hidden_states)
        txt = self.encoder_proj_layer_norm(self.context_embedder(encoder_hidden_states))
        x = self.down_block(x)
        _, c, h, w = x.shape
        img = self.project_to_hidden(
            self.project_to_hidden_norm(x.permute(0, 2, 3, 1).reshape(b, h * w, c))
        )

        temb = self.time_text_embed(timestep.to(img.dtype) * 1000, cond)
        rope = self.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
        for block in self.transformer_blocks:
            txt, img = block(img, txt, temb, rope)
        for block in self.single_transformer_blocks:
            txt, img = block(img, txt, temb, rope)

        text_logits = self.text_decoder(txt) if self.text_decoder is not None else None
        img = self.project_from_hidden(self.project_from_hidden_norm(img))
        x = self.up_block(img.reshape(b, h, w, c).permute(0, 3, 1, 2))
        return self.mlm_layer(x), text_logits


def prepare_ids(text_len: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream RoPE ids on the post-downsampling grid: ``img_ids [h*w, 3]``, ``txt_ids [l, 3]``."""
    img = torch.zeros(height, width, 3)
    img[..., 1] += torch.arange(height)[:, None]
    img[..., 2] += torch.arange(width)[None, :]
    return img.reshape(height * width, 3), torch.zeros(text_len, 3)


def save_reference(model: nn.Module, config: dict[str, Any], folder: str | os.PathLike) -> None:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers folder)."""
    import diffusers
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    cfg = {
        "_class_name": "SymmetricTransformer2DModel",
        "_diffusers_version": diffusers.__version__,
    }
    cfg.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
