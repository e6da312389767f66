"""Reading and writing PyTorch checkpoints the way users have them.

Supported inputs:
  * a diffusers / transformers folder: ``config.json`` plus one weights file
    (``*.safetensors`` or ``*.bin``) or a sharded checkpoint with an ``*.index.json``;
  * a single weights file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, ``.ckpt``), optionally
    with a ``state_dict`` / ``module`` wrapper and a ``module.`` prefix from DDP.

Safetensors files are read with numpy (no torch needed); pickled files need the ``torch`` extra.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from muddit_jax.files import atomic_path, write_json_atomic  # noqa: F401  (re-exported)
from muddit_jax.port.mapping import PortError

WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
INDEX_NAMES = tuple(name + ".index.json" for name in WEIGHT_NAMES)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``config.json`` from a checkpoint folder (or the folder of a weights file)."""
    path = Path(path)
    cfg = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not cfg.is_file():
        raise PortError(
            f"no config.json at {cfg}; pass the checkpoint folder that holds config.json "
            "(diffusers/transformers layout)"
        )
    with open(cfg) as f:
        return json.load(f)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every tensor of a checkpoint folder or file as ``{key: np.ndarray}``."""
    path = Path(path)
    if not path.exists():
        raise PortError(f"checkpoint path {path} does not exist; pass --src with a real path")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _load_sharded(path)
        return _load_file(path)
    for name in INDEX_NAMES:
        if (path / name).is_file():
            return _load_sharded(path / name)
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return _load_file(path / name)
    candidates = sorted(path.glob("*.safetensors")) + sorted(
        p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES
    )
    if len(candidates) == 1:
        return _load_file(candidates[0])
    raise PortError(
        f"found no unique weights file in {path}: expected one of {WEIGHT_NAMES} or an "
        f"*.index.json, got {[p.name for p in candidates]}"
    )


def _load_sharded(index: Path) -> dict[str, np.ndarray]:
    with open(index) as f:
        weight_map: Mapping[str, str] = json.load(f)["weight_map"]
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise PortError(f"shard {shard_path} listed in {index.name} is missing")
        out.update(_load_file(shard_path))
    absent = sorted(set(weight_map) - set(out))
    if absent:
        raise PortError(f"{index.name} lists keys that no shard holds: {absent[:20]}")
    return out


def _load_file(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _load_pickle(path)
    raise PortError(
        f"unsupported checkpoint file {path.name}; expected .safetensors or one of {PICKLE_SUFFIXES}"
    )


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    except (TypeError, ValueError):  # bfloat16 etc.: numpy cannot hold it, go through torch
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key).float().numpy()
    return out


def _load_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise PortError(
            f"{path.name} is a pickled PyTorch checkpoint; install the torch extra "
            "(pip install -e '.[torch]') or convert it to safetensors"
        ) from e
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise PortError(f"{path.name} does not hold a state dict (got {type(obj).__name__})")
    out = {}
    for key, value in obj.items():
        if not hasattr(value, "detach"):
            continue
        key = key[len("module.") :] if key.startswith("module.") else key
        value = value.detach().cpu()
        out[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return out


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write ``state_dict`` as a safetensors file atomically."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(tmp))
