"""Evaluators: the shared sharded / resumable / gathered evaluation loop, and the registry.

An evaluator owns one task: ``predict`` turns a batch of examples into per-example predictions
with a :class:`~muddit_jax.pipeline.MudditPipeline`, ``score`` turns all predictions into metrics.
:meth:`Evaluator.run` does the rest, identically inside the trainer and in ``muddit-eval``:

* the examples are cut into fixed shards; process ``i`` of ``n`` takes shards ``i, i+n, ...``;
* each example samples with its own seed (``crc32(seed, id)``), and batches are padded to a fixed
  size, so predictions do not depend on the device count, batch composition or host;
* each finished shard is written atomically to ``DIR/shards/<task>-<k>.json`` (with the
  settings it was predicted under: a rerun with other settings recomputes it) and skipped on a
  rerun (resume after preemption without recomputation);
* process 0 gathers every shard, scores once and writes ``DIR/<task>.json`` (per-example
  predictions) and returns the metrics.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from muddit_jax.port.io import write_json_atomic

Example = Mapping[str, Any]
REGISTRY: dict[str, type["Evaluator"]] = {}


def register(name: str) -> Callable[[type["Evaluator"]], type["Evaluator"]]:
    """Class decorator: make an evaluator available to :func:`get_evaluator` under ``name``."""

    def wrap(cls: type[Evaluator]) -> type[Evaluator]:
        REGISTRY[name] = cls
        cls.task = name
        return cls

    return wrap


def get_evaluator(name: str, examples: Sequence[Example], **cfg: Any) -> "Evaluator":
    """Instantiate the evaluator registered as ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown evaluation task {name!r}; expected one of {sorted(REGISTRY)}")
    return REGISTRY[name](examples, **cfg)


def example_seeds(ids: Sequence[Any], seed: int) -> list[int]:
    """Per-example sampling seeds derived from the example id (stable across runs and hosts)."""
    return [zlib.crc32(f"{seed}:{i}".encode()) for i in ids]


class Evaluator:
    """Base class; subclasses implement :meth:`predict` and :meth:`score`.

    Args:
      examples: the evaluation split, each a mapping with a unique ``"id"``.
      batch_size: examples per sampler call (pad target; a multiple of the local device count).
      shard_size: examples per resumable shard file (a multiple of ``batch_size``).
      steps: sampler steps.
      seed: base seed; example ``e`` samples with ``crc32(seed, e["id"])``.
    """

    task = "base"
    # ``config.eval`` fields the predictions depend on besides steps and seed; the eval job
    # passes exactly these as options (so they enter the shard settings of this task only).
    # ``timestep_mode`` acts through the pipeline (``build_pipeline``) and is recorded here.
    config_options: tuple[str, ...] = ("timestep_mode",)

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        batch_size: int = 8,
        shard_size: int = 64,
        steps: int = 16,
        seed: int = 0,
        **options: Any,
    ) -> None:
        if not examples:
            raise ValueError(f"{self.task}: no evaluation examples")
        ids = [e["id"] for e in examples]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.task}: example ids are not unique")
        if batch_size < 1 or shard_size % batch_size:
            raise ValueError(
                f"shard_size ({shard_size}) must be a positive multiple of batch_size ({batch_size})"
            )
        self.examples = list(examples)
        self.batch_size, self.shard_size, self.steps, self.seed = batch_size, shard_size, steps, seed
        self.options = options

    # --- to implement ---------------------------------------------------------------------

    def predict(self, pipe: Any, batch: Sequence[Example], seeds: Sequence[int]) -> list[Any]:
        """Predictions (JSON-able) for a full batch of ``batch_size`` examples."""
        raise NotImplementedError

    def score(self, predictions: Mapping[str, Any], examples: Sequence[Example]) -> dict[str, float]:
        """Metrics from ``{str(id): prediction}`` over all ``examples``."""
        raise NotImplementedError

    # --- shared loop ----------------------------------------------------------------------

    def shards(self) -> list[list[Example]]:
        n = self.shard_size
        return [self.examples[i : i + n] for i in range(0, len(self.examples), n)]

    def run(
        self,
        pipe: Any,
        out_dir: str | Path,
        *,
        process_index: int = 0,
        process_count: int = 1,
        barrier: Callable[[str], None] | None = None,
    ) -> dict[str, float]:
        """Predict this process's shards (skipping finished ones), then on process 0 gather,
        score and write ``<task>.json``; returns the metrics on process 0 (``{}`` elsewhere)."""
        out_dir = Path(out_dir)
        shards = self.shards()
        own: dict[int, dict[str, Any]] = {}  # this process's shards, kept for the gather
        for k, shard in enumerate(shards):
            if k % process_count != process_index:
                continue
            path = out_dir / "shards" / f"{self.task}-{k:05d}.json"
            own[k] = self._finished(path, shard)
            if own[k] is None:
                own[k] = self._predict_shard(pipe, shard)
                write_json_atomic({"settings": self.settings(shard), "predictions": own[k]}, path)
        if barrier is not None:
            barrier(f"eval-{self.task}")
        if process_index != 0:
            return {}
        predictions: dict[str, Any] = {}
        for k, shard in enumerate(shards):
            path = out_dir / "shards" / f"{self.task}-{k:05d}.json"
            if k not in own and not path.is_file():
                raise RuntimeError(f"shard {path} is missing after all processes finished")
            done = own[k] if k in own else self._finished(path, shard)
            if done is None:
                raise RuntimeError(f"shard {path} was written with other evaluation settings than "
                                   "this process's; run every process with the same config")
            predictions.update(done)
        metrics = self.score(predictions, self.examples)
        write_json_atomic({"predictions": predictions, "metrics": metrics}, out_dir / f"{self.task}.json")
        return metrics

    def settings(self, shard: Sequence[Example]) -> dict[str, Any]:
        """What a shard's predictions depend on (not the batch size: per-example seeds and
        padding make predictions batch-independent); stored with the shard and compared on
        resume, so a rerun with other steps / seed / options / examples recomputes it."""
        settings = dict(task=self.task, steps=self.steps, seed=self.seed, options=self.options,
                        ids=[str(e["id"]) for e in shard])
        return json.loads(json.dumps(settings, sort_keys=True, default=str))

    def _finished(self, path: Path, shard: Sequence[Example]) -> dict[str, Any] | None:
        """The shard's predictions if ``path`` holds them for this shard and these settings."""
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved.get("settings") != self.settings(shard):
            return None
        return saved["predictions"]

    def _predict_shard(self, pipe: Any, shard: Sequence[Example]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i in range(0, len(shard), self.batch_size):
            batch = list(shard[i : i + self.batch_size])
            real = len(batch)
            batch += [batch[-1]] * (self.batch_size - real)  # pad: fixed shapes, one compile
            ids = [e["id"] for e in batch]
            preds = self.predict(pipe, batch, example_seeds(ids, self.seed))
            out.update({str(e["id"]): p for e, p in zip(batch[:real], preds[:real])})
        return out


def stack_images(batch: Sequence[Example], key: str = "image") -> np.ndarray:
    """``[b, H, W, 3]`` uint8 from the examples' images."""
    return np.stack([np.asarray(e[key]) for e in batch])
