"""A deterministic synthetic data iterator (token batches or raw images) for tests and smoke runs.

Batch ``i`` of the global batch depends only on ``(seed, i)``; each process draws the whole
global batch and keeps its rows (``rows``), so any process layout sees the same global batch.
Like grain's iterators it has ``get_state()`` / ``set_state()`` (JSON-serialisable), which the
checkpoint saves beside the model.

Text rows are ``<bos> tokens <eos> <pad>...`` with random lengths; ``text_valid`` marks
``<bos>..<eos>``. Token ids avoid the special ids and the ``<mask>`` id (``vocab - 1``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from muddit_jax.models.muddit import MudditConfig


class SyntheticData:
    """Iterator of local batches ``dict(image_ids | images, text_ids, text_valid, micro_conds)``.

    Args:
      model: the model config (vocabularies, special ids, VQ factor).
      global_batch: rows of the global batch.
      grid: code grid side ``h = w``.
      text_length: ``l``.
      rows: rows of the global batch this process feeds (default: all).
      seed: data seed.
      images: yield raw images ``[b, grid * f, grid * f, 3]`` in [0, 1] instead of ``image_ids``.
    """

    def __init__(
        self, model: MudditConfig, *, global_batch: int, grid: int, text_length: int,
        rows: slice | None = None, seed: int = 0, images: bool = False,
    ):
        self.model, self.global_batch, self.grid = model, global_batch, grid
        self.text_length, self.seed, self.images = text_length, seed, images
        self.rows = rows or slice(0, global_batch)
        self.index = 0
        if text_length < 3:
            raise ValueError(f"data.text_length must be >= 3 (<bos> x <eos>), got {text_length}")

    def __iter__(self) -> SyntheticData:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.global_batch_at(self.index)
        self.index += 1
        return {k: v[self.rows] for k, v in batch.items()}

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index, "seed": self.seed}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"iterator state is for seed {state['seed']}, this run uses {self.seed}"
            )
        self.index = int(state["index"])

    def global_batch_at(self, index: int) -> dict[str, np.ndarray]:
        """The whole global batch number ``index``."""
        rng = np.random.default_rng([self.seed, index])
        b, g, l = self.global_batch, self.grid, self.text_length
        text_cfg = self.model.text
        lo = max(text_cfg.bos_token_id, text_cfg.eos_token_id, text_cfg.pad_token_id) + 1
        hi = text_cfg.vocab_size - 1  # exclusive: vocab - 1 is the <mask> id
        lengths = rng.integers(1, l - 1, b)
        pos = np.arange(l)[None, :]
        text = rng.integers(lo, hi, (b, l))
        text = np.where(pos == 0, text_cfg.bos_token_id, text)
        text = np.where(pos == lengths[:, None] + 1, text_cfg.eos_token_id, text)
        valid = pos <= lengths[:, None] + 1
        text = np.where(valid, text, text_cfg.pad_token_id)
        size = g * self.model.vq.downsample_factor
        micro = np.tile(np.array([[size, size, 0.0, 0.0, 6.0]], np.float32), (b, 1))
        out = {
            "text_ids": text.astype(np.int32),
            "text_valid": valid,
            "micro_conds": micro,
        }
        if self.images:
            coarse = rng.random((b, g, g, 3), np.float32)
            f = self.model.vq.downsample_factor
            out["images"] = np.repeat(np.repeat(coarse, f, axis=1), f, axis=2)
        else:
            out["image_ids"] = rng.integers(0, self.model.mmdit.codebook_size, (b, g, g)).astype(
                np.int32
            )
        return out
