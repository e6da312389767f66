"""Port of diffusers ``VQModel`` checkpoints to/from :class:`muddit_jax.models.vq.VQModel`.

The key map mirrors the module tree one to one (``down_blocks.0.resnets.1.conv1`` <->
``down_blocks_0/resnets_1/conv1``, ``downsamplers.0.conv`` <-> ``downsample/conv``,
``to_out.0`` <-> ``to_out``, ``quantize.embedding`` <-> ``codebook``). Checkpoints saved with the
deprecated attention names (``query``/``key``/``value``/``proj_attn``) are renamed on import.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from muddit_jax.models.vq import VQConfig, abstract_params
from muddit_jax.port import io
from muddit_jax.port.mapping import (
    FlaxPath,
    ParamMap,
    conv2d,
    embedding,
    flax_to_torch,
    linear,
    norm,
    torch_to_flax,
)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_LEGACY_ATTN = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _norm(tp: str, fp: FlaxPath, spatial: bool) -> list[ParamMap]:
    if not spatial:
        return norm(tp, fp)
    return (
        norm(f"{tp}.norm_layer", fp + ("norm_layer",))
        + conv2d(f"{tp}.conv_y", fp + ("conv_y",))
        + conv2d(f"{tp}.conv_b", fp + ("conv_b",))
    )


def _resnet(tp: str, fp: FlaxPath, c_in: int, c_out: int, spatial: bool) -> list[ParamMap]:
    out = (
        _norm(f"{tp}.norm1", fp + ("norm1",), spatial)
        + conv2d(f"{tp}.conv1", fp + ("conv1",))
        + _norm(f"{tp}.norm2", fp + ("norm2",), spatial)
        + conv2d(f"{tp}.conv2", fp + ("conv2",))
    )
    if c_in != c_out:
        out += conv2d(f"{tp}.conv_shortcut", fp + ("conv_shortcut",))
    return out


def _mid(tp: str, fp: FlaxPath, c: int, attention: bool, spatial: bool) -> list[ParamMap]:
    out = _resnet(f"{tp}.resnets.0", fp + ("resnets_0",), c, c, spatial)
    if attention:
        at, af = f"{tp}.attentions.0", fp + ("attentions_0",)
        name = "spatial_norm" if spatial else "group_norm"
        out += _norm(f"{at}.{name}", af + (name,), spatial)
        for proj in ("to_q", "to_k", "to_v"):
            out += linear(f"{at}.{proj}", af + (proj,))
        out += linear(f"{at}.to_out.0", af + ("to_out",))
    return out + _resnet(f"{tp}.resnets.1", fp + ("resnets_1",), c, c, spatial)


def key_map(config: VQConfig) -> list[ParamMap]:
    """One :class:`ParamMap` per tensor of diffusers' ``VQModel(**config.to_hf_config())``."""
    chans, n = config.block_out_channels, len(config.block_out_channels)
    spatial = config.norm_type == "spatial"
    attn = config.mid_block_add_attention
    out = conv2d("encoder.conv_in", ("encoder", "conv_in"))
    c_prev = chans[0]
    for i, c in enumerate(chans):
        tp, fp = f"encoder.down_blocks.{i}", ("encoder", f"down_blocks_{i}")
        for j in range(config.layers_per_block):
            out += _resnet(f"{tp}.resnets.{j}", fp + (f"resnets_{j}",), c_prev, c, False)
            c_prev = c
        if i < n - 1:
            out += conv2d(f"{tp}.downsamplers.0.conv", fp + ("downsample", "conv"))
    out += _mid("encoder.mid_block", ("encoder", "mid_block"), chans[-1], attn, False)
    out += norm("encoder.conv_norm_out", ("encoder", "conv_norm_out"))
    out += conv2d("encoder.conv_out", ("encoder", "conv_out"))
    out += conv2d("quant_conv", ("quant_conv",))
    out += embedding("quantize.embedding", ("codebook",))
    out += conv2d("post_quant_conv", ("post_quant_conv",))
    out += conv2d("decoder.conv_in", ("decoder", "conv_in"))
    out += _mid("decoder.mid_block", ("decoder", "mid_block"), chans[-1], attn, spatial)
    rev = tuple(reversed(chans))
    c_prev = rev[0]
    for i, c in enumerate(rev):
        tp, fp = f"decoder.up_blocks.{i}", ("decoder", f"up_blocks_{i}")
        for j in range(config.layers_per_block + 1):
            out += _resnet(f"{tp}.resnets.{j}", fp + (f"resnets_{j}",), c_prev, c, spatial)
            c_prev = c
        if i < n - 1:
            out += conv2d(f"{tp}.upsamplers.0.conv", fp + ("upsample", "conv"))
    out += _norm("decoder.conv_norm_out", ("decoder", "conv_norm_out"), spatial)
    out += conv2d("decoder.conv_out", ("decoder", "conv_out"))
    return out


def rename_legacy_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename deprecated attention keys (``query``/``key``/``value``/``proj_attn``)."""
    return {
        _LEGACY_ATTN.sub(lambda m: f"{m.group(1)}{_LEGACY_NAMES[m.group(2)]}.", k): v
        for k, v in state_dict.items()
    }


def convert(state_dict: Mapping[str, Any], config: VQConfig) -> dict[str, Any]:
    """PyTorch ``VQModel`` state dict -> unboxed Flax params tree (raises ``PortError``)."""
    return torch_to_flax(
        rename_legacy_keys(state_dict),
        key_map(config),
        abstract_params(config),
        what="VQModel checkpoint",
    )


def export(params: Mapping[str, Any], config: VQConfig) -> dict[str, np.ndarray]:
    """Unboxed Flax params -> diffusers ``VQModel`` state dict ``{key: np.ndarray}``."""
    return flax_to_torch(params, key_map(config))


def load_pretrained(path: str | os.PathLike) -> tuple[VQConfig, dict[str, Any]]:
    """Load a diffusers ``VQModel`` folder (``config.json`` + weights) as ``(config, params)``."""
    config = VQConfig.from_hf_config(io.load_config(path))
    return config, convert(io.load_state_dict(path), config)


def save_pretrained(params: Mapping[str, Any], config: VQConfig, path: str | os.PathLike) -> None:
    """Write a diffusers-loadable folder (``config.json`` + ``WEIGHTS_NAME`` safetensors)."""
    path = Path(path)
    io.save_safetensors(export(params, config), path / WEIGHTS_NAME)
    io.write_json_atomic(config.to_hf_config(), path / "config.json")
