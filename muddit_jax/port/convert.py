"""Whole-checkpoint conversion: PyTorch folders -> orbax checkpoints + JSON configs.

Input is either one component folder (a diffusers ``VQModel`` or Muddit transformer folder, or a
transformers CLIP text folder) or a whole Muddit/Meissonic pipeline folder with the subfolders
``transformer/``, ``vqvae/``, ``text_encoder/`` and ``tokenizer/``. Output layout::

    DST/<component>/config.json   upstream config + {"_muddit_component": <component>}
    DST/<component>/params/       orbax (StandardCheckpointer) params tree
    DST/tokenizer/                copied unchanged (vocab/merges or sentencepiece files)
    DST/manifest.json             written last: the list of converted components

Everything is written into a temporary sibling folder that is renamed to ``DST`` only once it is
complete, so a crashed conversion never leaves a half-written ``DST``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from muddit_jax.port import io
from muddit_jax.port.mapping import PortError

# component name -> (port module, config class path)
COMPONENTS: dict[str, tuple[str, str]] = {
    "transformer": ("muddit_jax.port.mmdit", "muddit_jax.models.mmdit:MMDiTConfig"),
    "vqvae": ("muddit_jax.port.vq", "muddit_jax.models.vq:VQConfig"),
    "text_encoder": ("muddit_jax.port.clip_text", "muddit_jax.models.text_encoder:CLIPTextConfig"),
}
TRANSFORMER_CLASSES = {"SymmetricTransformer2DModel", "Transformer2DModel", "MMDiT"}
COPIED_FOLDERS = ("tokenizer",)
MANIFEST = "manifest.json"


def detect_component(config: dict[str, Any]) -> str:
    """Which component a ``config.json`` describes (``transformer``/``vqvae``/``text_encoder``)."""
    cls = config.get("_class_name", "")
    if cls in TRANSFORMER_CLASSES:
        return "transformer"
    if cls == "VQModel":
        return "vqvae"
    archs = config.get("architectures") or []
    if config.get("model_type") == "clip_text_model" or any(a.startswith("CLIPText") for a in archs):
        return "text_encoder"
    raise PortError(
        f"cannot tell which component this config.json describes (_class_name={cls!r}, "
        f"model_type={config.get('model_type')!r}); expected a Muddit transformer, a VQModel or a "
        "CLIP text model, or pass --component"
    )


def _load_component(name: str, path: Path) -> tuple[Any, dict[str, Any]]:
    module = importlib.import_module(COMPONENTS[name][0])
    return module.load_pretrained(path)


def _config_class(name: str) -> Any:
    module, cls = COMPONENTS[name][1].split(":")
    return getattr(importlib.import_module(module), cls)


def save_component(name: str, config: Any, params: dict[str, Any], folder: Path) -> None:
    """Write one converted component (config JSON + orbax params) into ``folder``."""
    import orbax.checkpoint as ocp

    hf = dict(config.to_hf_config(), _muddit_component=name)
    io.write_json_atomic(hf, folder / "config.json")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((folder / "params").absolute(), params)
        ckptr.wait_until_finished()


def load_component_config(folder: str | os.PathLike) -> tuple[str, Any]:
    """The ``(name, config)`` of a component written by :func:`save_component`."""
    hf = io.load_config(Path(folder))
    name = hf.pop("_muddit_component", None) or detect_component(hf)
    return name, _config_class(name).from_hf_config(hf)


def array_restore_args(meta: Any, sharding: Any = None) -> Any:
    """orbax restore args of one saved array: onto ``sharding``, by default this process's first
    device. A restore without such targets reuses the writer's topology, which the other
    processes of a multi-host job do not have."""
    import orbax.checkpoint as ocp

    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=meta.shape, dtype=meta.dtype)


def load_component(folder: str | os.PathLike) -> tuple[str, Any, dict[str, Any]]:
    """Read a component written by :func:`save_component` -> ``(name, config, params)``."""
    import orbax.checkpoint as ocp

    from etils import epath

    folder = Path(folder)
    name, config = load_component_config(folder)
    handler = ocp.PyTreeCheckpointHandler()
    path = epath.Path((folder / "params").absolute())
    meta = handler.metadata(path).tree
    restore_args = jax.tree.map(array_restore_args, meta)
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
    params = handler.restore(path, args=ocp.args.PyTreeRestore(item=abstract,
                                                               restore_args=restore_args))
    return name, config, params


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, component: str | None = None,
            overwrite: bool = False) -> list[str]:
    """Convert a component or pipeline folder at ``src`` into ``dst``; returns the components."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise PortError(f"--src {src} does not exist")
    if dst.exists() and not overwrite:
        raise PortError(f"--dst {dst} already exists; remove it or pass --overwrite")
    if component is not None and component not in COMPONENTS:
        raise PortError(f"--component must be one of {sorted(COMPONENTS)}, got {component!r}")
    sub = [c for c in COMPONENTS if (src / c / "config.json").is_file()] if src.is_dir() else []
    if sub and component is None:
        jobs = [(c, src / c) for c in sub]
    else:
        jobs = [(component or detect_component(io.load_config(src)), src)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        for name, path in jobs:
            config, params = _load_component(name, path)
            save_component(name, config, params, tmp / name)
        for folder in COPIED_FOLDERS:
            if sub and (src / folder).is_dir():
                shutil.copytree(src / folder, tmp / folder)
        extra = _mask_embedding(src) if sub else None
        if extra is not None:
            np.save(tmp / "text_encoder" / "mask_token_embedding.npy", extra)
        names = [name for name, _ in jobs]
        io.write_json_atomic({"components": names}, tmp / MANIFEST)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


def _mask_embedding(src: Path) -> np.ndarray | None:
    """Muddit ships the learned ``<mask>`` text embedding beside the pipeline folders."""
    from muddit_jax.port.clip_text import load_mask_embedding

    for candidate in (src / "mask_token_embedding.pth", src / "text_encoder" / "mask_token_embedding.pth"):
        if candidate.is_file():
            return load_mask_embedding(candidate)
    return None


def load_converted(dst: str | os.PathLike) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Load every component of a converted folder -> ``{name: (config, params)}``."""
    dst = Path(dst)
    if not (dst / MANIFEST).is_file():
        raise PortError(f"{dst} is not a muddit-convert output (no {MANIFEST}); run muddit-convert")
    names = _read_json(dst / MANIFEST)["components"]
    return {name: load_component(dst / name)[1:] for name in names}


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def converted_pipeline(dst: str | os.PathLike, seed: int = 0, *, params: bool = True
                       ) -> tuple[Any, Any, dict[str, Any] | None]:
    """``(MudditConfig, tokenizer, params)`` of a converted whole pipeline, as Muddit runs it:
    the CLIP tokenizer (``None`` without ``tokenizer/``) gets ``<mask>`` and the text tower its
    row (from
    ``text_encoder/mask_token_embedding.npy`` when the release ships it, else initialised as
    transformers' ``resize_token_embeddings`` does, with ``seed``). ``params=False`` reads only
    the configs (``params`` is then ``None``); params are ``{"text_encoder", "mmdit", "vq"}``."""
    import dataclasses

    import jax

    from muddit_jax.models.muddit import MudditConfig
    from muddit_jax.models.text_encoder import add_mask_token
    from muddit_jax.models.tokenizers import load_tokenizer

    dst = Path(dst)
    if not (dst / MANIFEST).is_file():
        raise PortError(f"{dst} is not a muddit-convert output (no {MANIFEST}); run muddit-convert")
    names = set(_read_json(dst / MANIFEST)["components"])
    missing = {"transformer", "vqvae", "text_encoder"} - names
    if missing:
        raise ValueError(
            f"{dst} lacks {sorted(missing)}; convert the whole pipeline folder (transformer/, "
            "vqvae/, text_encoder/, tokenizer/) with muddit-convert")
    tok = None  # without tokenizer/ the text tower is taken as is (no <mask> row added)
    if (dst / "tokenizer").is_dir():
        tok = load_tokenizer(dst / "tokenizer", add_mask_token=True)
    if not params:
        cfgs = {n: load_component_config(dst / n)[1]
                for n in ("transformer", "vqvae", "text_encoder")}
        text = cfgs["text_encoder"]
        if tok is not None:
            text = dataclasses.replace(text, vocab_size=max(text.vocab_size, tok.mask_id + 1))
        return MudditConfig(text, cfgs["vqvae"], cfgs["transformer"]), tok, None
    parts = load_converted(dst)
    text_cfg, text_params = parts["text_encoder"]
    if tok is not None:
        mask_file = dst / "text_encoder" / "mask_token_embedding.npy"
        text_cfg, text_params, _ = add_mask_token(
            text_cfg, text_params, jax.random.key(seed), mask_id=tok.mask_id,
            mask_embedding=np.load(mask_file) if mask_file.is_file() else None)
    config = MudditConfig(text_cfg, parts["vqvae"][0], parts["transformer"][0])
    return config, tok, {"text_encoder": text_params, "mmdit": parts["transformer"][1],
                         "vq": parts["vqvae"][1]}
