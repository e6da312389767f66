"""Generic PyTorch <-> Flax parameter conversion driven by an explicit key map.

A key map is a list of :class:`ParamMap` entries, one per PyTorch tensor, each naming the Flax
parameter path it fills and the layout transform between the two (``linear``: ``[out, in]`` ->
``[in, out]``; ``conv``: ``OIHW`` -> ``HWIO``; ...). Each model module builds its own key map from
its config; this module does the checking and moving, so that unknown, missing and mis-shaped keys
are always reported together in one :class:`PortError` (nothing is skipped silently) and export is
the exact inverse of import.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

FlaxPath = tuple[str, ...]
Array = np.ndarray


class PortError(ValueError):
    """A checkpoint does not match the expected layout; the message lists every offending key."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """A pair of inverse layout functions (PyTorch -> Flax, Flax -> PyTorch)."""

    to_flax: Callable[[Array], Array]
    to_torch: Callable[[Array], Array]


def _identity(x: Array) -> Array:
    return x


TRANSFORMS: dict[str, Transform] = {
    "plain": Transform(_identity, _identity),
    # torch Linear weight [out, in] <-> flax Dense kernel [in, out]
    "linear": Transform(lambda x: x.T, lambda x: x.T),
    # torch Conv2d weight [O, I, kh, kw] <-> flax Conv kernel [kh, kw, I, O]
    "conv": Transform(
        lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)
    ),
    # torch 1x1 Conv2d weight [O, I, 1, 1] <-> flax Dense kernel [I, O]
    "conv1x1_as_linear": Transform(
        lambda x: x[:, :, 0, 0].T, lambda x: x.T[:, :, None, None]
    ),
}


def register_transform(name: str, to_flax: Callable, to_torch: Callable) -> None:
    """Add a named per-parameter hook pair (for layouts that are not a plain transpose)."""
    TRANSFORMS[name] = Transform(to_flax, to_torch)


@dataclasses.dataclass(frozen=True)
class ParamMap:
    """One PyTorch tensor ``torch_key`` stored at Flax path ``flax_path`` via ``transform``."""

    torch_key: str
    flax_path: FlaxPath
    transform: str = "plain"


def linear(torch_prefix: str, flax_prefix: FlaxPath, bias: bool = True) -> list[ParamMap]:
    """Entries for a ``nn.Linear`` (``weight``/``bias``) -> ``nn.Dense`` (``kernel``/``bias``)."""
    out = [ParamMap(f"{torch_prefix}.weight", flax_prefix + ("kernel",), "linear")]
    if bias:
        out.append(ParamMap(f"{torch_prefix}.bias", flax_prefix + ("bias",)))
    return out


def conv2d(torch_prefix: str, flax_prefix: FlaxPath, bias: bool = True) -> list[ParamMap]:
    """Entries for a ``nn.Conv2d`` -> ``nn.Conv``."""
    out = [ParamMap(f"{torch_prefix}.weight", flax_prefix + ("kernel",), "conv")]
    if bias:
        out.append(ParamMap(f"{torch_prefix}.bias", flax_prefix + ("bias",)))
    return out


def norm(
    torch_prefix: str, flax_prefix: FlaxPath, scale: bool = True, bias: bool = True
) -> list[ParamMap]:
    """Entries for a LayerNorm/GroupNorm/RMSNorm (``weight``/``bias`` -> ``scale``/``bias``)."""
    out = []
    if scale:
        out.append(ParamMap(f"{torch_prefix}.weight", flax_prefix + ("scale",)))
    if bias:
        out.append(ParamMap(f"{torch_prefix}.bias", flax_prefix + ("bias",)))
    return out


def embedding(torch_prefix: str, flax_prefix: FlaxPath) -> list[ParamMap]:
    """Entries for a ``nn.Embedding`` -> ``nn.Embed``."""
    return [ParamMap(f"{torch_prefix}.weight", flax_prefix + ("embedding",))]


# ---------------------------------------------------------------------------------------------
# tree helpers


def flatten(tree: Mapping[str, Any], prefix: FlaxPath = ()) -> dict[FlaxPath, Any]:
    """Nested dict -> ``{path: leaf}``."""
    flat: dict[FlaxPath, Any] = {}
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[FlaxPath, Any]) -> dict[str, Any]:
    """``{path: leaf}`` -> nested dict."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _fmt(items: Iterable[str], limit: int = 40) -> str:
    items = sorted(items)
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


# ---------------------------------------------------------------------------------------------
# conversion


def torch_to_flax(
    state_dict: Mapping[str, Array],
    key_map: Sequence[ParamMap],
    target: Mapping[str, Any],
    *,
    ignore: Sequence[str] = (),
    what: str = "checkpoint",
) -> dict[str, Any]:
    """Convert a PyTorch ``state_dict`` into a Flax params tree shaped like ``target``.

    Args:
      state_dict: ``{torch_key: array}`` (numpy or torch tensors).
      key_map: one entry per expected PyTorch tensor.
      target: the Flax params tree (arrays or ``jax.ShapeDtypeStruct``) the result must match;
        its dtypes are used for the result.
      ignore: glob patterns of PyTorch keys that are allowed to be present and are dropped
        (non-parameter buffers such as ``position_ids``).
      what: name of the checkpoint for error messages.

    Raises:
      PortError: listing every unknown, missing and mis-shaped key, and every Flax parameter the
        key map leaves unfilled.
    """
    flat_target = flatten(target)
    by_key = {m.torch_key: m for m in key_map}
    if len(by_key) != len(key_map):
        raise PortError(f"{what}: key map lists a PyTorch key twice (bug in the key map)")
    unknown = [
        k for k in state_dict if k not in by_key and not any(fnmatch.fnmatch(k, p) for p in ignore)
    ]
    missing = [k for k in by_key if k not in state_dict]
    misshaped, unmapped = [], []
    out: dict[FlaxPath, Array] = {}
    for key, entry in by_key.items():
        if key not in state_dict:
            continue
        if entry.flax_path not in flat_target:
            unmapped.append(f"{key} -> {'/'.join(entry.flax_path)}")
            continue
        value = TRANSFORMS[entry.transform].to_flax(_to_numpy(state_dict[key]))
        want = flat_target[entry.flax_path]
        if tuple(value.shape) != tuple(want.shape):
            misshaped.append(
                f"{key}: got {tuple(value.shape)} (as Flax), expected {tuple(want.shape)}"
                f" for {'/'.join(entry.flax_path)}"
            )
            continue
        out[entry.flax_path] = np.asarray(value, dtype=want.dtype)
    unfilled = [] if (missing or misshaped or unmapped) else [
        "/".join(p) for p in flat_target if p not in out
    ]
    problems = []
    if unknown:
        problems.append(f"unknown keys (not in the expected layout):{_fmt(unknown)}")
    if missing:
        problems.append(f"missing keys:{_fmt(missing)}")
    if misshaped:
        problems.append(f"mis-shaped keys:{_fmt(misshaped)}")
    if unmapped or unfilled:
        problems.append(f"key map does not match the Flax model:{_fmt(unmapped + unfilled)}")
    if problems:
        raise PortError(
            f"{what} does not match the expected layout; fix the checkpoint path or the config "
            "(config.json) it was loaded with.\n  " + "\n  ".join(problems)
        )
    return unflatten(out)


def flax_to_torch(params: Mapping[str, Any], key_map: Sequence[ParamMap]) -> dict[str, Array]:
    """Export a Flax params tree to a PyTorch-layout ``{key: np.ndarray}`` (inverse of import)."""
    flat = flatten(params)
    missing = [m.torch_key for m in key_map if m.flax_path not in flat]
    if missing:
        raise PortError(f"params lack the Flax paths for these PyTorch keys:{_fmt(missing)}")
    return {
        m.torch_key: np.ascontiguousarray(
            TRANSFORMS[m.transform].to_torch(np.asarray(flat[m.flax_path]))
        )
        for m in key_map
    }


def _to_numpy(value: Any) -> Array:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch.Tensor, including bfloat16
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)
