"""The deterministic, checkpointable, host-sharded input pipeline (grain over TFDS ArrayRecord).

Stream: source records -> global shuffle (reseeded every epoch) -> repeat -> the
:class:`~muddit_jax.data.preprocess.Preprocessor` at each global position ``g`` (its randomness
depends on ``g`` only). Global batch ``k`` is positions ``[k*B, (k+1)*B)`` in order, ``B =
global_batch_size``; a host owns a contiguous block of its rows (``rows``, by default
``[p*B/P, (p+1)*B/P)`` for process ``p`` of ``P``) and reads and preprocesses only those. So
host blocks are disjoint, together cover every epoch, and the assembled global batch
(:func:`to_global`) is the same, row for row, whatever the host count. Only whole global
batches are produced (a finite epoch drops its last ``len % B`` records).

State: :meth:`DataIterator.get_state` is a JSON-able dict (grain's iterator state, the offset
into a partly used block, skip counts, a fingerprint of everything that fixes the stream);
:meth:`DataIterator.set_state` on a fresh iterator continues with exactly the batches the saved
one would have produced, and refuses a state from a different stream (other dataset / seed /
rows / batch size ...) or from another ``workers`` count (grain's state differs). A skipped
record is replaced by the next one of the host's own stream, so with skips host streams stay
deterministic but no longer line up position for position.

Throughput knobs (same batches whatever their values): ``read_threads`` (grain prefetch threads
in this process; Pillow releases the GIL while decoding), ``prefetch`` and ``workers`` (grain
worker processes). The trainer sets them from ``data.read_threads`` / ``prefetch`` /
``workers``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np

from muddit_jax.data import registry, text
from muddit_jax.data.preprocess import (
    DEFAULT_AESTHETIC,
    TASKS,
    Preprocessor,
    Skipped,
    to_unit,
)
from muddit_jax.data.schema import SkipCounter
from muddit_jax.models.tokenizers import Tokenizer, load_tokenizer

STATE_VERSION = 1
# DataConfig fields that set host input speed only: not part of the stream's fingerprint
THROUGHPUT_FIELDS = ("read_threads", "prefetch", "workers")
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything that defines a host's batch stream (``options`` go to the dataset builder).

    ``num_epochs=None`` repeats forever (training); a finite value ends the stream after the
    last whole global batch. ``prefetch`` counts examples (rounded up to whole host batches,
    at least two); prefetched images stay ``uint8`` until a batch is stacked.
    ``question_types`` (VQA only): each row draws its question among the record's questions of
    these ``question_type`` s (``()`` = all); a record with none of them is skipped.
    """

    dataset: str = "shapes"
    split: str = "train"
    data_dir: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    resolution: int = 64
    text_length: int = 77
    global_batch_size: int = 8
    task: str = "caption"
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    random_crop: bool = False
    aesthetic_score: float = DEFAULT_AESTHETIC
    question_types: tuple[str, ...] = ()
    resolution_multiple: int = 8
    build: bool = True
    read_threads: int = 4
    prefetch: int = 64
    workers: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.dataset not in registry.DATASETS:
            problems.append(f"dataset={self.dataset!r} is not one of {registry.DATASETS}")
        if (not isinstance(self.resolution, int) or self.resolution < self.resolution_multiple
                or self.resolution % self.resolution_multiple):
            problems.append(f"resolution={self.resolution!r} must be a positive multiple of "
                            f"resolution_multiple={self.resolution_multiple}")
        if self.text_length < 4:
            problems.append(f"text_length={self.text_length} must be >= 4")
        if self.global_batch_size < 1:
            problems.append(f"global_batch_size={self.global_batch_size} must be >= 1")
        if self.task not in TASKS:
            problems.append(f"task={self.task!r} is not one of {TASKS}")
        object.__setattr__(self, "question_types", tuple(self.question_types))
        if self.question_types and (self.task != "vqa" or not all(
                isinstance(t, str) and t for t in self.question_types)):
            problems.append(f"question_types={self.question_types!r} must be () or names of "
                            "question types (e.g. ('exists', 'relation')), with task='vqa'")
        if self.num_epochs is not None and self.num_epochs < 1:
            problems.append(f"num_epochs={self.num_epochs} must be None (forever) or >= 1")
        problems += [f"{f}={getattr(self, f)!r} must be an int >= 0" for f in THROUGHPUT_FIELDS
                     if not isinstance(getattr(self, f), int) or getattr(self, f) < 0]
        if problems:
            raise ValueError("invalid DataConfig: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataConfig":
        """From a dict / ``ml_collections.ConfigDict``; unknown keys are an error."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DataConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    def source_options(self) -> dict[str, Any]:
        """Builder options; ``shapes`` is generated at ``resolution`` unless told otherwise."""
        options = dict(self.options)
        if self.dataset == "shapes":
            options.setdefault("resolution", self.resolution)
        return options


class DataIterator:
    """This host's batches (``rows`` of every global batch) with JSON-able state."""

    def __init__(self, config: DataConfig, blocks: grain.MapDataset, fingerprint: dict[str, Any]):
        self.config = config
        self.fingerprint = fingerprint
        start, stop = fingerprint["rows"]
        self.batch_size = stop - start
        # grain reads with at most prefetch_buffer_size threads (and warns when it is lower)
        buffer = max(2, config.read_threads, -(-config.prefetch // self.batch_size))
        iter_ds = blocks.to_iter_dataset(
            grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=buffer))
        if config.workers:
            _absl_flags_parsed()
            iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.workers))
        self._iter = iter(iter_ds)
        self._pending: list[Any] = []  # the rest of the current block
        self._block_state: dict[str, Any] = {}  # grain state before the current block
        self._offset = 0  # examples of the current block already used
        self._skips = SkipCounter(f"{config.dataset}/{config.split} (rows {start}:{stop})")

    def __iter__(self) -> "DataIterator":
        return self

    def __enter__(self) -> "DataIterator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop prefetch threads / worker processes (also done when garbage-collected)."""
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()

    def _next_example(self) -> Any:
        if not self._pending:
            self._block_state = self._iter.get_state()
            self._pending = list(next(self._iter))
            self._offset = 0
        self._offset += 1
        return self._pending.pop(0)

    def __next__(self) -> Batch:
        rows: list[dict[str, np.ndarray]] = []
        run = 0  # consecutive skips: a whole epoch of them means nothing is usable
        while len(rows) < self.batch_size:
            example = self._next_example()
            if isinstance(example, Skipped):
                self._skips.add(example.reason, f"record {example.index}")
                run += 1
                if run > self.fingerprint["num_records"]:
                    raise RuntimeError(f"{self._skips.where}: every record is skipped "
                                       f"({self.skipped}); check the dataset / task")
            else:
                run = 0
                rows.append(example)
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        if "images" in batch:
            batch["images"] = to_unit(batch["images"])
        return batch

    @property
    def skipped(self) -> dict[str, int]:
        """Records dropped so far on this host, by reason."""
        return dict(self._skips.counts)

    def get_state(self) -> dict[str, Any]:
        if self._pending:
            grain_state, offset = self._block_state, self._offset
        else:
            grain_state, offset = self._iter.get_state(), 0
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint,
                "grain": _jsonable(grain_state), "offset": offset, "skipped": self.skipped,
                "workers": self.config.workers}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r} != "
                             f"{STATE_VERSION}; it was written by another muddit_jax version")
        saved = state["fingerprint"]
        diff = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"data iterator state is from a different stream: (saved, now) = "
                             f"{diff}; restore with the same data config and rows")
        saved_workers = state.get("workers", self.config.workers)  # older states: unchecked
        if saved_workers != self.config.workers:
            raise ValueError(
                f"data iterator state was saved with workers={saved_workers}, this iterator has "
                f"workers={self.config.workers}: grain's state depends on the worker-process "
                f"count; resume with workers={saved_workers} (data.workers in a training config)")
        self._iter.set_state(_jsonable(state["grain"]))
        self._pending, self._offset = [], 0
        if state["offset"]:
            self._next_example()
            self._pending = self._pending[state["offset"] - 1 :]
            self._offset = state["offset"]
        self._skips.counts.clear()
        self._skips.counts.update(state["skipped"])


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app nobody parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def resolve_tokenizer(tokenizer: Tokenizer | str | None) -> Tokenizer | None:
    """A tokenizer object, or one loaded from a ``.model`` file / CLIP tokenizer folder."""
    return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer


def check_pretokenized(config: DataConfig, tokenizer: Tokenizer | None) -> None:
    """Fail fast when a pre-tokenized folder does not match the config / tokenizer."""
    from muddit_jax.data.pretokenize import read_job

    path = Path(config.options["path"]).expanduser()
    job = read_job(path)
    for field in ("resolution", "text_length"):
        if getattr(config, field) != job[field]:
            raise ValueError(
                f"DataConfig.{field}={getattr(config, field)} but {path} was pre-tokenized with "
                f"{field}={job[field]}; set {field}={job[field]} or re-run muddit-pretokenize"
            )
    if tokenizer is not None and text.fingerprint(tokenizer) != job["tokenizer"]:
        raise ValueError(f"the tokenizer differs from the one {path} was pre-tokenized with; "
                         "pass that tokenizer or re-run muddit-pretokenize")


def host_block(global_batch_size: int, process_index: int | None = None,
               process_count: int | None = None) -> tuple[int, int]:
    """The rows ``[start, stop)`` process ``p`` of ``P`` owns by default: its equal share."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not 0 <= pi < pc or global_batch_size % pc:
        raise ValueError(f"global_batch_size={global_batch_size} must split evenly over "
                         f"process_count={pc} (process_index={pi})")
    per = global_batch_size // pc
    return pi * per, (pi + 1) * per


def row_block(global_batch_size: int, rows: slice | None, process_index: int | None = None,
              process_count: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of the rows this host feeds: ``rows`` (checked) or its
    :func:`host_block`."""
    if rows is None:
        return host_block(global_batch_size, process_index, process_count)
    start, stop, step = rows.indices(global_batch_size)
    if step != 1 or stop <= start:
        raise ValueError(f"rows={rows} must be a non-empty contiguous slice of the "
                         f"global_batch_size={global_batch_size} rows")
    return start, stop


def make_iterator(config: DataConfig | Mapping[str, Any],
                  tokenizer: Tokenizer | str | None = None, *,
                  process_index: int | None = None, process_count: int | None = None,
                  rows: slice | None = None,
                  source: Sequence[Mapping[str, Any]] | None = None) -> DataIterator:
    """This host's :class:`DataIterator` for ``config``.

    ``tokenizer`` (object or path) is needed unless the data is pre-tokenized captions.
    ``rows``: the rows of each global batch this host feeds (e.g. the trainer's
    ``muddit_jax.parallel.sharding.host_rows``); default :func:`host_block` of
    ``process_index`` / ``process_count`` (JAX's when omitted). ``source`` replaces the dataset
    lookup with any random-access sequence of records in the common schema.
    """
    if not isinstance(config, DataConfig):
        config = DataConfig.from_dict(config)
    tokenizer = resolve_tokenizer(tokenizer)
    big = config.global_batch_size
    start, stop = row_block(big, rows, process_index, process_count)
    pretokenized = config.dataset == registry.PRETOKENIZED
    if pretokenized:
        check_pretokenized(config, tokenizer)
    if tokenizer is None and (config.task == "vqa" or not pretokenized):
        raise ValueError(f"dataset {config.dataset!r} with task={config.task!r} needs a tokenizer")
    preprocess = Preprocessor(config.resolution, config.text_length, tokenizer, config.task,
                              config.seed, config.random_crop, config.aesthetic_score,
                              config.question_types)
    if source is None:
        source = registry.data_source(config.dataset, config.split, config.data_dir,
                                      build=config.build, fields=preprocess.fields(pretokenized),
                                      **config.source_options())
    if len(source) < big:
        raise ValueError(f"{config.dataset}/{config.split} has {len(source)} records, fewer than "
                         f"global_batch_size={big}")
    if config.task == "vqa" and "vqa" not in source[0]:
        raise ValueError(f"task='vqa' needs VQA fields, which {config.dataset!r} lacks "
                         "(use vqav2, llava, shapes or data pre-tokenized from them)")
    ds = grain.MapDataset.source(source).map_with_index(RecordIndex(len(source)))
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(config.num_epochs).map_with_index(preprocess)
    num_batches = len(ds) // big
    blocks = grain.experimental.ZipMapDataset(
        parents=[ds[start + j :: big][:num_batches] for j in range(stop - start)])
    fingerprint = {
        "dataset": config.dataset, "split": config.split, "options": _jsonable(config.options),
        "num_records": len(source), "seed": config.seed, "shuffle": config.shuffle,
        "num_epochs": config.num_epochs, "resolution": config.resolution,
        "text_length": config.text_length, "task": config.task,
        "random_crop": config.random_crop, "global_batch_size": big, "rows": [start, stop],
    }
    if config.question_types:  # absent when unset, so states saved before the field resume
        fingerprint["question_types"] = list(config.question_types)
    return DataIterator(config, blocks, fingerprint)


@dataclasses.dataclass(frozen=True)
class RecordIndex:
    """``(position, record) -> (record index, record)``: pairs each record with its source index
    (grain passes later epochs' positions through, hence the modulo)."""

    num_records: int

    def __call__(self, position: int, record: Any) -> tuple[int, Any]:
        return position % self.num_records, record


def _jsonable(value: Any) -> Any:
    """A JSON round trip (plain dicts / lists; tuples and numpy scalars normalised)."""
    return json.loads(json.dumps(value, default=_json_default, sort_keys=True))


def _json_default(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


def to_global(batch: Mapping[str, np.ndarray],
              sharding: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding]
              ) -> dict[str, jax.Array]:
    """Host-local batch -> global ``jax.Array`` s (``jax.make_array_from_process_local_data``).

    ``sharding``: one ``Sharding`` for every key (typically ``NamedSharding(mesh, P(batch
    axes))``) or a mapping key -> ``Sharding``. Each host passes its own rows; they land on its
    addressable devices, so host ``p``'s rows fill the slice of the batch axis that the sharding
    gives host ``p``'s devices.
    """
    def one(key: str) -> jax.sharding.Sharding:
        return sharding[key] if isinstance(sharding, Mapping) else sharding

    return {k: jax.make_array_from_process_local_data(one(k), np.asarray(v))
            for k, v in batch.items()}
