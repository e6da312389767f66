"""What the benchmarks probing a trained ``shapes`` run share: loading it, its generator, the VQ
codes of its scenes, and which of those codes cover objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from muddit_jax.data import shapes
from muddit_jax.models import vq


def load(workdir: Path, needs: str, step: int | None = None
         ) -> tuple[Any, Any, shapes.ShapesConfig]:
    """``(saved config, MudditPipeline, ShapesConfig)`` of the run in ``workdir`` at checkpoint
    ``step`` (the latest by default); a run not trained on ``shapes`` fails naming ``needs``
    (what the benchmark reads from the dataset)."""
    from muddit_jax.eval.job import pipeline_from_workdir

    config, pipe = pipeline_from_workdir(workdir, step)
    if config.data.dataset != "shapes":
        raise ValueError(f"data.dataset={config.data.dataset!r}: this benchmark needs {needs} "
                         "of 'shapes'; point --workdir at a run trained on shapes")
    return config, pipe, shapes.ShapesConfig(**dict(config.data.options))


def generator(pipe: Any) -> tuple[Any, dict[str, Any]]:
    """``(Muddit module, its params without the VQ)``: what ``model.apply`` scores with."""
    from muddit_jax.models.muddit import Muddit

    return Muddit(pipe.config), {k: v for k, v in pipe.params.items() if k != "vq"}


def scene_codes(pipe: Any, examples: list) -> np.ndarray:
    """``int [n, grid, grid]``: the run's VQ codes of the examples' (or scenes') images."""
    images = np.stack([e.image for e in examples]).astype(np.float32) / 255
    return np.asarray(vq.encode(pipe.params["vq"], pipe.config.vq, jnp.asarray(images)))


def object_codes(options: shapes.ShapesConfig, examples: list, grid: int) -> np.ndarray:
    """``bool [n, grid, grid]``: codes whose patch holds a pixel of some object."""
    r = options.resolution
    f = r // grid
    masks = np.stack([np.any([shapes.object_mask(o, r) for o in e.scene.objects]
                             or [np.zeros((r, r), bool)], axis=0) for e in examples])
    return masks.reshape(len(examples), grid, f, grid, f).any(axis=(2, 4))
