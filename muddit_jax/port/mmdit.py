"""PyTorch <-> Flax port of Muddit's MM-DiT generator (upstream ``SymmetricTransformer2DModel``).

The key map lists every tensor of the official diffusers checkpoint and where it lives in the
*unrolled* Flax params (``transformer_blocks_{i}``); ``convert`` / ``export`` stack / unstack the
block params for the ``scan_layers`` layout (see ``muddit_jax.models.mmdit.stack_block_params``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muddit_jax.models.mmdit import (
    DUAL,
    SINGLE,
    MMDiT,
    MMDiTConfig,
    dummy_inputs,
    stack_block_params,
    unstack_block_params,
)
from muddit_jax.port import io
from muddit_jax.port.mapping import (
    ParamMap,
    embedding,
    flax_to_torch,
    linear,
    norm,
    register_transform,
    torch_to_flax,
)

# torch ConvTranspose2d weight [in, out, kh, kw] <-> Flax kernel [kh, kw, in, out] (an involution)
register_transform(
    "conv_transpose", lambda x: x.transpose(2, 3, 0, 1), lambda x: x.transpose(2, 3, 0, 1)
)


def _cfg(config: MMDiTConfig | Mapping[str, Any]) -> MMDiTConfig:
    return config if isinstance(config, MMDiTConfig) else MMDiTConfig.from_hf_config(config)


def _conv1x1(torch_prefix: str, flax_prefix: tuple[str, ...]) -> list[ParamMap]:
    return [ParamMap(f"{torch_prefix}.weight", flax_prefix + ("kernel",), "conv1x1_as_linear")]


def _rms(torch_prefix: str, flax_prefix: tuple[str, ...]) -> list[ParamMap]:
    return norm(torch_prefix, flax_prefix, bias=False)


def _attn_stream(t: str, f: tuple[str, ...], names: tuple[str, ...], torch_names: tuple[str, ...]):
    out: list[ParamMap] = []
    for fn, tn in zip(names, torch_names, strict=True):
        if fn.startswith("norm"):
            out += _rms(f"{t}.{tn}", f + (fn,))
        else:
            out += linear(f"{t}.{tn}", f + (fn,))
    return out


def _dual_block(i: int) -> list[ParamMap]:
    t, f = f"{DUAL}.{i}", (f"{DUAL}_{i}",)
    out = linear(f"{t}.norm1.linear", f + ("norm1", "linear"))
    out += linear(f"{t}.norm1_context.linear", f + ("norm1_context", "linear"))
    img = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
    ctx = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
    out += _attn_stream(f"{t}.attn", f + ("attn",), img, img)
    out += _attn_stream(f"{t}.attn", f + ("attn",), ctx, ctx)
    out += linear(f"{t}.attn.to_out.0", f + ("attn", "to_out"))
    out += linear(f"{t}.attn.to_add_out", f + ("attn", "to_add_out"))
    for ff in ("ff", "ff_context"):
        out += linear(f"{t}.{ff}.net.0.proj", f + (ff, "proj_in"))
        out += linear(f"{t}.{ff}.net.2", f + (ff, "proj_out"))
    return out


def _single_block(i: int) -> list[ParamMap]:
    t, f = f"{SINGLE}.{i}", (f"{SINGLE}_{i}",)
    out = linear(f"{t}.norm.linear", f + ("norm", "linear"))
    out += linear(f"{t}.proj_mlp", f + ("proj_mlp",))
    out += linear(f"{t}.proj_out", f + ("proj_out",))
    names = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
    return out + _attn_stream(f"{t}.attn", f + ("attn",), names, names)


def key_map(config: MMDiTConfig | Mapping[str, Any]) -> list[ParamMap]:
    """Every tensor of the official checkpoint -> its path in the unrolled Flax params."""
    cfg = _cfg(config)
    if cfg.resample_levels != 1 and (cfg.downsample or cfg.upsample):
        raise ValueError(f"resample_levels={cfg.resample_levels}: upstream's layout has one "
                         "down/up-sampling level; only resample_levels=1 can be ported")
    if cfg.conv_blocks:
        raise ValueError(f"conv_blocks={cfg.conv_blocks}: upstream's layout has no ConvNeXt "
                         "blocks; only conv_blocks=0 can be ported")
    if cfg.rope_free_heads:
        raise ValueError(f"rope_free_heads={cfg.rope_free_heads}: upstream rotates every head; "
                         "only rope_free_heads=0 can be ported")
    if cfg.rope_scope != "all":
        raise ValueError(f"rope_scope={cfg.rope_scope!r}: upstream rotates every score; only "
                         "rope_scope='all' can be ported")
    if cfg.text_registers:
        raise ValueError(f"text_registers={cfg.text_registers}: upstream has no register tokens; "
                         "only text_registers=0 can be ported")
    if cfg.condition_image_input:
        raise ValueError("condition_image_input=True: upstream has one image input path; only "
                         "condition_image_input=False can be ported")
    if cfg.condition_image_isolated:
        raise ValueError("condition_image_isolated=True: upstream's image tokens attend to the "
                         "text; only condition_image_isolated=False can be ported")
    out: list[ParamMap] = []
    for sub in ("timestep_embedder", "text_embedder"):
        for lin in ("linear_1", "linear_2"):
            out += linear(f"time_text_embed.{sub}.{lin}", ("time_text_embed", sub, lin))
    for lin in ("linear_1", "linear_2"):
        out += linear(f"cond_embed.{lin}", ("cond_embed", lin), bias=False)
    if cfg.t5_dim is not None:
        out += linear("adapter.1", ("adapter",), bias=False)
    out += linear("context_embedder", ("context_embedder",))
    out += _rms("encoder_proj_layer_norm", ("encoder_proj_layer_norm",))
    out += embedding("embed.embeddings", ("embed", "embeddings"))
    out += _rms("embed.layer_norm", ("embed", "layer_norm"))
    out += _conv1x1("embed.conv", ("embed", "conv"))
    if cfg.downsample:
        out += _rms("down_block.downsample.norm", ("down_block", "norm"))
        out.append(
            ParamMap("down_block.downsample.conv.weight", ("down_block", "conv", "kernel"), "conv")
        )
    out += _rms("project_to_hidden_norm", ("project_to_hidden_norm",))
    out += linear("project_to_hidden", ("project_to_hidden",), bias=False)
    for i in range(cfg.num_layers):
        out += _dual_block(i)
    for i in range(cfg.num_single_layers):
        out += _single_block(i)
    out += _rms("project_from_hidden_norm", ("project_from_hidden_norm",))
    out += linear("project_from_hidden", ("project_from_hidden",), bias=False)
    if cfg.upsample:
        out += _rms("up_block.upsample.norm", ("up_block", "norm"))
        out.append(
            ParamMap("up_block.upsample.conv.weight", ("up_block", "kernel"), "conv_transpose")
        )
    out += _conv1x1("mlm_layer.conv1", ("mlm_layer", "conv1"))
    out += _rms("mlm_layer.layer_norm", ("mlm_layer", "layer_norm"))
    out += _conv1x1("mlm_layer.conv2", ("mlm_layer", "conv2"))
    if cfg.tokenizer_vocab_size is not None:
        out += linear("text_decoder.1", ("text_decoder",), bias=False)
    return out


def target_params(config: MMDiTConfig, param_dtype: Any = jnp.float32) -> dict[str, Any]:
    """Shape/dtype tree (``jax.ShapeDtypeStruct``) of the unrolled params, without allocating."""
    model = MMDiT(config, param_dtype=param_dtype)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(config))
    return nn.unbox(shapes)["params"]


def convert(
    state_dict: Mapping[str, Any],
    config: MMDiTConfig | Mapping[str, Any],
    scan_layers: bool = False,
    param_dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """Official ``state_dict`` -> Flax params (numpy leaves; stacked blocks if ``scan_layers``).

    Raises:
      PortError: naming every unknown, missing or mis-shaped key.
    """
    cfg = _cfg(config)
    params = torch_to_flax(
        state_dict, key_map(cfg), target_params(cfg, param_dtype), what="MM-DiT checkpoint"
    )
    return stack_block_params(params) if scan_layers else params


def export(
    params: Mapping[str, Any], config: MMDiTConfig | Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Flax params (unrolled or scanned) -> official ``{torch_key: np.ndarray}`` state dict."""
    return flax_to_torch(unstack_block_params(params), key_map(_cfg(config)))


def load_pretrained(
    path: str | os.PathLike, **model_kwargs: Any
) -> tuple[MMDiTConfig, dict[str, Any]]:
    """Read a diffusers folder (``config.json`` + weights) -> ``(config, params)``.

    ``model_kwargs`` are the :class:`MMDiT` options the params are meant for: ``scan_layers``
    picks the layout and ``param_dtype`` the leaf dtype; others (``dtype``, ``remat``) are accepted
    and ignored. Build the model with ``MMDiT(config, **model_kwargs)``.
    """
    unknown = set(model_kwargs) - {"dtype", "param_dtype", "remat", "scan_layers"}
    if unknown:
        raise TypeError(f"load_pretrained got unexpected MMDiT options {sorted(unknown)}")
    config = MMDiTConfig.from_hf_config(io.load_config(path))
    params = convert(
        io.load_state_dict(path),
        config,
        scan_layers=bool(model_kwargs.get("scan_layers", False)),
        param_dtype=model_kwargs.get("param_dtype", jnp.float32),
    )
    return config, params
