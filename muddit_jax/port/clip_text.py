"""Port of ``transformers.CLIPTextModelWithProjection`` checkpoints to :class:`CLIPTextEncoder`.

Owns the key map for the CLIP text tower, conversion both ways, loading a transformers folder
(``config.json`` + weights written by ``save_pretrained``), writing one back, and reading Muddit's
separately saved ``<mask>`` token embedding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muddit_jax.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
from muddit_jax.port import io
from muddit_jax.port.mapping import (
    ParamMap,
    PortError,
    embedding,
    flax_to_torch,
    linear,
    norm,
    torch_to_flax,
)

# Non-parameter buffers that transformers may serialise.
IGNORE = ("text_model.embeddings.position_ids",)


def key_map(config: CLIPTextConfig) -> list[ParamMap]:
    """One entry per tensor of a ``CLIPTextModelWithProjection`` state dict."""
    tm = "text_model"
    out = embedding(f"{tm}.embeddings.token_embedding", ("token_embedding",))
    out += embedding(f"{tm}.embeddings.position_embedding", ("position_embedding",))
    for i in range(config.num_hidden_layers):
        src, dst = f"{tm}.encoder.layers.{i}", (f"layers_{i}",)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += linear(f"{src}.self_attn.{proj}", dst + ("self_attn", proj))
        out += norm(f"{src}.layer_norm1", dst + ("layer_norm1",))
        out += linear(f"{src}.mlp.fc1", dst + ("fc1",))
        out += linear(f"{src}.mlp.fc2", dst + ("fc2",))
        out += norm(f"{src}.layer_norm2", dst + ("layer_norm2",))
    out += norm(f"{tm}.final_layer_norm", ("final_layer_norm",))
    out += linear("text_projection", ("text_projection",), bias=False)
    return out


def target_params(config: CLIPTextConfig, param_dtype: Any = jnp.float32) -> dict[str, Any]:
    """The unboxed params tree of ``config`` as ``jax.ShapeDtypeStruct`` leaves (no allocation)."""
    model = CLIPTextEncoder(config, param_dtype=param_dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids))["params"]


def convert(
    state_dict: Mapping[str, Any],
    config: CLIPTextConfig,
    *,
    param_dtype: Any = jnp.float32,
    what: str = "CLIP text checkpoint",
) -> dict[str, Any]:
    """PyTorch state dict -> Flax params (raises :class:`PortError` listing every bad key)."""
    return torch_to_flax(
        state_dict, key_map(config), target_params(config, param_dtype), ignore=IGNORE, what=what
    )


def export(params: Mapping[str, Any], config: CLIPTextConfig) -> dict[str, np.ndarray]:
    """Flax params -> ``CLIPTextModelWithProjection`` state dict (inverse of :func:`convert`)."""
    return flax_to_torch(params, key_map(config))


def load_pretrained(
    path: str | os.PathLike, *, param_dtype: Any = jnp.float32
) -> tuple[CLIPTextConfig, dict[str, Any]]:
    """Load a transformers folder (``config.json`` + weights) as ``(config, params)``."""
    config = CLIPTextConfig.from_hf_config(io.load_config(path))
    params = convert(io.load_state_dict(path), config, param_dtype=param_dtype, what=str(path))
    return config, params


def save_pretrained(
    params: Mapping[str, Any], config: CLIPTextConfig, path: str | os.PathLike
) -> None:
    """Write a folder that ``transformers.CLIPTextModelWithProjection.from_pretrained`` loads."""
    path = Path(path)
    io.save_safetensors(export(params, config), path / "model.safetensors")
    io.write_json_atomic(config.to_hf_config(), path / "config.json")


def load_mask_embedding(path: str | os.PathLike) -> np.ndarray:
    """Read a single ``<mask>`` embedding vector ``[d]`` (Muddit's ``mask_token_embedding.pth``,
    or a ``.npy`` / one-tensor ``.safetensors`` file)."""
    path = Path(path)
    if path.suffix == ".npy":
        vec = np.load(path)
    elif path.suffix == ".safetensors":
        tensors = io.load_state_dict(path)
        if len(tensors) != 1:
            raise PortError(
                f"{path.name} holds {len(tensors)} tensors, expected one mask embedding"
            )
        vec = next(iter(tensors.values()))
    else:
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise PortError(
                f"{path.name} is a pickled tensor; install the torch extra or save it as .npy"
            ) from e
        vec = torch.load(str(path), map_location="cpu", weights_only=True)
        if not hasattr(vec, "detach"):
            raise PortError(f"{path.name} does not hold a tensor (got {type(vec).__name__})")
        vec = vec.detach().float().numpy()
    vec = np.asarray(vec, np.float32)
    if vec.ndim == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.ndim != 1:
        raise PortError(f"{path.name}: expected a vector [d], got shape {vec.shape}")
    return vec
