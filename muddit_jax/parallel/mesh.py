"""The device mesh: named axes ``data``, ``fsdp``, ``tensor`` built from config.

``MeshConfig`` holds the per-granule (ICI: one TPU slice, one GPU node) axis sizes and the
``dcn_*`` multipliers across granules (multi-slice TPU, multi-node GPU). ``-1`` fills the axis with
whatever devices remain; at most one ``-1`` per group. The final mesh axis size is
``ici * dcn``. :func:`create_mesh` uses ``jax.experimental.mesh_utils`` so that the device order
follows the physical topology (``create_device_mesh`` within a granule,
``create_hybrid_device_mesh`` across granules).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from muddit_jax.parallel.rules import MESH_AXES

GRANULES = ("auto", "slice", "process")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; ``-1`` = fill. See the module docstring.

    Attributes:
      data / fsdp / tensor: axis sizes within a granule (ICI).
      dcn_data / dcn_fsdp / dcn_tensor: multipliers across granules (DCN); their product is the
        number of granules.
      granule: what a DCN granule is: ``"slice"`` (TPU multi-slice: ``device.slice_index``),
        ``"process"`` (one process per node, e.g. SLURM ``--ntasks-per-node=1``), or ``"auto"``
        (slices on TPU, processes elsewhere).
      allow_split_physical_axes: let ``mesh_utils`` split a physical TPU axis across mesh axes.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    granule: str = "auto"
    allow_split_physical_axes: bool = True

    def __post_init__(self) -> None:
        for name in ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor"):
            v = getattr(self, name)
            if v == 0 or v < -1:
                raise ValueError(f"mesh.{name}={v}: use a positive size or -1 (fill)")
        if self.granule not in GRANULES:
            raise ValueError(f"mesh.granule={self.granule!r}: use one of {GRANULES}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> MeshConfig:
        """From ``config.mesh`` (extra keys such as ``rules`` are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(cfg).items() if k in names})

    @property
    def ici(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def dcn(self) -> tuple[int, int, int]:
        return (self.dcn_data, self.dcn_fsdp, self.dcn_tensor)


def fill_sizes(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
    """Replace the (single) ``-1`` in ``sizes`` so that their product is ``total``."""
    sizes = tuple(int(s) for s in sizes)
    holes = [i for i, s in enumerate(sizes) if s == -1]
    if len(holes) > 1:
        raise ValueError(f"{what} sizes {sizes}: at most one axis may be -1 (fill)")
    known = math.prod(s for s in sizes if s != -1)
    if holes:
        if total % known:
            raise ValueError(f"{what} sizes {sizes}: {total} devices are not divisible by {known}")
        sizes = tuple(total // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != total:
        named = dict(zip(MESH_AXES, sizes, strict=True))
        raise ValueError(
            f"{what} sizes {named} multiply to {math.prod(sizes)} but there are {total}; fix "
            "config.mesh (or set one axis to -1)"
        )
    return sizes


def _num_granules(devices: Sequence[Any], granule: str) -> tuple[int, bool]:
    """``(number of granules, process_is_granule)`` for ``devices``."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    tpu = all(d.platform == "tpu" for d in devices)
    if granule == "slice" or (granule == "auto" and tpu and None not in slices):
        if None in slices:
            raise ValueError("mesh.granule='slice' but the devices have no slice_index")
        return len(slices), False
    return len({d.process_index for d in devices}), True


def create_mesh(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    dcn_total = math.prod(abs(s) for s in config.dcn)
    if dcn_total == 1 and -1 not in config.dcn:
        ici = fill_sizes(config.ici, n, "mesh (data, fsdp, tensor)")
        grid = mesh_utils.create_device_mesh(
            ici, devices, allow_split_physical_axes=config.allow_split_physical_axes
        )
    else:
        granules, process_is_granule = _num_granules(devices, config.granule)
        dcn = fill_sizes(config.dcn, granules, "mesh dcn_(data, fsdp, tensor)")
        ici = fill_sizes(config.ici, n // granules, "mesh (data, fsdp, tensor) per granule")
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=process_is_granule,
            allow_split_physical_axes=config.allow_split_physical_axes,
        )
    return Mesh(np.asarray(grid), MESH_AXES)
