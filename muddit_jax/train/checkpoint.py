"""The one checkpoint wrapper over orbax, and params-only loading.

:class:`Checkpointer` owns an ``ocp.CheckpointManager`` whose steps hold three items:
``state`` (the whole :class:`~muddit_jax.train.state.TrainState`, sharded arrays), ``data_iter``
(every process's data-iterator ``get_state()``, gathered: ``{"processes": [s_0, s_1, ...]}``,
JSON) and ``config`` (the run config, JSON). Saves are
asynchronous and atomic: orbax writes into a temporary folder and renames it when every process
has finished, so a run killed mid-save restarts from the previous complete step. Restores take
an abstract state whose leaves carry the target shardings, so a checkpoint written on one mesh
restores onto another (different device count or layout).

:func:`load_params` reads only the network params, from a training checkpoint (trainable, EMA
or frozen parts; no optimizer state is read) or from a ``muddit-convert`` output folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from muddit_jax.train.state import TrainState

ITEMS = ("state", "data_iter", "config")
CONVERTED_NAMES = {"transformer": "mmdit", "text_encoder": "text_encoder", "vqvae": "vq"}


@dataclasses.dataclass
class Restored:
    """A restored step: ``state`` on the target shardings, the iterator state, the config."""

    step: int
    state: TrainState
    data_iter: dict[str, Any]
    config: dict[str, Any] | None


class Checkpointer:
    """``save`` / ``restore_or_none`` / ``wait`` / ``close`` over one checkpoint folder.

    Every process must call ``save`` and ``restore_or_none`` (orbax coordinates them; each
    writes its own shards, process 0 the metadata and JSON items).

    The writer (``read_only=False``, the training run) deletes unfinished saves left in the
    folder by a killed run. Anything else that reads a folder a run may be writing into (an
    evaluation job, a sampler) must pass ``read_only=True``: it then neither creates the folder
    nor deletes the running save's temporary folder (orbax's clean-up would, and that save
    would fail).
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
            cleanup_tmp_directories=not read_only, read_only=read_only,
        )
        self.directory, self.read_only = as_path(directory), read_only
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        """The newest complete (finalized) step, or ``None``."""
        return self.manager.latest_step()

    def save(
        self, step: int, state: TrainState, data_iter: Mapping[str, Any],
        config: Mapping[str, Any] | None = None,
    ) -> bool:
        """Start an (async) save of ``step``; a step that already exists is not rewritten."""
        if self.read_only:  # orbax would skip the save with only a log line
            raise ValueError(f"Checkpointer({self.directory}) is read_only: it cannot save")
        if step in self.manager.all_steps():
            return False
        items = dict(
            state=ocp.args.StandardSave(state),
            data_iter=ocp.args.JsonSave({"processes": _gather_json(dict(data_iter))}),
            config=ocp.args.JsonSave(_jsonable(config or {})),
        )
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_or_none(self, abstract: TrainState, step: int | None = None) -> Restored | None:
        """Restore ``step`` (default: latest) onto the shardings in ``abstract``; ``None`` if
        there is no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data_iter=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        return Restored(step, out.state, _own_iterator_state(out.data_iter or {}), out.config)

    def saved_config(self, step: int | None = None) -> tuple[int, dict[str, Any]] | None:
        """``(step, config)`` saved with ``step`` (default: latest), without reading the state;
        ``None`` if there is no checkpoint; a ``step`` not kept fails naming the kept ones."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        _step_dir(as_path(self.manager.directory), step)  # a step not kept fails naming them
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return step, dict(out.config or {})

    def wait(self) -> None:
        """Block until pending async saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _gather_json(value: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process's ``value`` (a JSON object), in process order."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    padded = np.zeros(size, np.uint8)
    padded[: raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, size)
    return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]


def _own_iterator_state(saved: Mapping[str, Any]) -> dict[str, Any]:
    """This process's entry of a saved ``data_iter`` item."""
    states = list(saved.get("processes", []))
    if not states:
        return {}
    if len(states) == jax.process_count():
        return dict(states[jax.process_index()])
    if all(s == states[0] for s in states):
        return dict(states[0])
    raise ValueError(
        f"the checkpoint holds data-iterator states of {len(states)} processes, this run has "
        f"{jax.process_count()}; restart with the same process count or params only "
        "(train.init_from)"
    )


def as_path(directory: str | Path) -> epath.Path:
    """A local path made absolute, or a cloud path (``gs://...``) as is."""
    text = str(directory)
    return epath.Path(text if "://" in text else Path(text).absolute())


def _jsonable(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_json"):
        return json.loads(config.to_json())
    return json.loads(json.dumps(dict(config), default=str))


def _step_dir(directory: epath.Path, step: int | None) -> epath.Path:
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint step in {directory}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"step {step} not in {directory} (have {steps})")
    return directory / str(step)


def load_params(
    path: str | Path, *, step: int | None = None, ema: bool = False,
    shardings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Network params ``{"text_encoder", "mmdit"[, "vq"]}`` from ``path``.

    ``path`` is a ``muddit-convert`` folder (has ``manifest.json``), a checkpoint folder written
    by :class:`Checkpointer` (latest or given ``step``), or one step folder of it. From a
    checkpoint only ``params`` (or ``ema_params`` with ``ema``) and ``frozen`` are read.
    ``shardings`` (``{name: tree of NamedSharding}``, e.g. ``StateSetup.param_shardings``) places
    a checkpoint's arrays directly on their shards; other arrays land on one local device.
    """
    from muddit_jax.port.convert import (
        MANIFEST,
        array_restore_args,
        converted_pipeline,
        load_converted,
    )

    path = as_path(path)
    if (path / MANIFEST).exists():
        names = set(json.loads((path / MANIFEST).read_text())["components"])
        if names >= set(CONVERTED_NAMES):  # a whole pipeline (with Muddit's <mask> text row)
            return converted_pipeline(str(path))[2]
        return {CONVERTED_NAMES[name]: p for name, (_, p) in load_converted(str(path)).items()}
    if not (path / "state").is_dir():
        path = _step_dir(path, step)
    # the item's handler reads it directly: a Checkpointer would look for a step-level
    # _CHECKPOINT_METADATA inside the item folder and warn that it is missing
    handler = ocp.PyTreeCheckpointHandler()
    state_dir = epath.Path(path / "state")
    tree = handler.metadata(state_dir).tree
    trained = "ema_params" if ema else "params"
    if ema and not tree.get("ema_params"):
        raise ValueError(f"{path} has no EMA params (train.ema_decay was 0)")
    item = {trained: tree[trained], "frozen": tree.get("frozen") or {}}
    item = {k: v for k, v in item.items() if v}

    restore_args = {}
    for part, subtree in item.items():
        restore_args[part] = {}
        for name, sub in subtree.items():
            placed = (shardings or {}).get(name)
            if placed is not None and jax.tree.structure(placed) != jax.tree.structure(sub):
                placed = None  # e.g. a scanned checkpoint for an unscanned run: place later
            restore_args[part][name] = jax.tree.map(array_restore_args, sub,
                                                    *([placed] if placed else []))
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), item)
    out = handler.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True),
    )
    return {**out.get("frozen", {}), **out[trained]}
