"""A weighted mixture of input streams with a fixed number of rows per source in every batch.

Each global batch of ``B`` rows is cut into one contiguous block per source, ``n_s`` rows
(:func:`row_counts`: ``B * w_s / sum(w)`` rounded by largest remainder, at least one each).
Blocks are laid out caption sources first, then VQA sources (each group in the given order): with
``loss.mode="split"`` the first ``B * loss.t2i_fraction`` rows are T2I, so caption rows are the
T2I rows when ``t2i_fraction`` is their share, and any further caption rows are captioning (I2T)
rows. Source ``s`` is its own :func:`~muddit_jax.data.pipeline.make_iterator` stream with a
global batch of ``n_s`` rows, so the mixture is deterministic given the seeds, its ratio is exact
in every batch, and its state is the per-source states.

Batches carry the union of the sources' keys plus ``source`` (int32, the row's source index in
layout order). When any source is VQA, caption rows get ``text_maskable`` all True: the loss
then treats them exactly as captions (targets = valid text, or every position with
``text_pad_is_target``, :func:`muddit_jax.diffusion.masking.text_targets`).

Host sharding: a host's ``rows`` (a contiguous slice of the global batch) meet each block in a
contiguous slice, which is passed to that source's iterator as its own ``rows``; sources whose
block misses the host's rows are not read there.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np

from muddit_jax.data.pipeline import (
    Batch,
    DataConfig,
    DataIterator,
    make_iterator,
    resolve_tokenizer,
    row_block,
)
from muddit_jax.data.registry import PRETOKENIZED
from muddit_jax.models.tokenizers import Tokenizer

STATE_VERSION = 1
SHARED = ("global_batch_size", "resolution", "text_length", "resolution_multiple")


@dataclasses.dataclass(frozen=True)
class Source:
    """One stream of a mixture: a name, a positive weight and its :class:`DataConfig` (whose
    ``global_batch_size`` is replaced by the source's row count)."""

    name: str
    weight: float
    config: DataConfig


def row_counts(weights: Sequence[float], global_batch_size: int) -> list[int]:
    """Rows per source in each batch: ``B * w / sum(w)`` by largest remainder (ties: first)."""
    if not weights or any(not (w > 0 and np.isfinite(w)) for w in weights):
        raise ValueError(f"mixture weights {list(weights)} must be positive and finite")
    exact = np.asarray(weights, np.float64) * global_batch_size / float(np.sum(weights))
    counts = np.floor(exact + 1e-9).astype(int)
    rest = np.argsort(-(exact - counts), kind="stable")[: global_batch_size - counts.sum()]
    counts[rest] += 1
    return counts.tolist()


def derived_seed(seed: int, name: str) -> int:
    """A per-source seed (so sources over the same records do not shuffle in lockstep)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    """The sources and the global batch; see the module docstring for the row layout."""

    sources: tuple[Source, ...]
    global_batch_size: int

    def __post_init__(self) -> None:
        if self.global_batch_size < 1:
            raise ValueError(f"mixture global_batch_size={self.global_batch_size} must be >= 1")
        names = [s.name for s in self.sources]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"mixture sources need distinct names, got {names}")
        first = self.sources[0].config
        for s in self.sources[1:]:
            for f in SHARED[1:]:
                if getattr(s.config, f) != getattr(first, f):
                    raise ValueError(f"mixture source {s.name!r} has {f}="
                                     f"{getattr(s.config, f)}, {names[0]!r} has "
                                     f"{getattr(first, f)}; every source must use the same {f}")
        kinds = {s.config.dataset == PRETOKENIZED for s in self.sources}
        if len(kinds) > 1:
            raise ValueError("mixture sources mix pre-tokenized codes and raw images; batches "
                             "need one of them: pre-tokenize every source or none")
        counts = row_counts([s.weight for s in self.sources], self.global_batch_size)
        if min(counts) < 1:
            raise ValueError(f"global_batch_size={self.global_batch_size} gives the mixture rows "
                             f"{dict(zip(names, counts))}; every source needs one row: raise the "
                             "batch or the small weights")

    @property
    def has_vqa(self) -> bool:
        return any(s.config.task == "vqa" for s in self.sources)

    def layout(self) -> list[tuple[Source, int, int]]:
        """``(source, start, stop)`` row blocks of every global batch, in row order."""
        ordered = sorted(self.sources, key=lambda s: s.config.task != "caption")
        counts = row_counts([s.weight for s in ordered], self.global_batch_size)
        ends = np.cumsum(counts).tolist()
        return [(s, e - n, e) for s, n, e in zip(ordered, counts, ends)]

    @classmethod
    def from_dict(cls, mixture: Mapping[str, Mapping[str, Any]], global_batch_size: int,
                  **shared: Any) -> MixtureConfig:
        """From ``{name: {"weight": w, <DataConfig fields>...}}`` (e.g. a ConfigDict).

        ``shared`` sets defaults of every source (``resolution``, ``text_length``, ``seed``,
        ``split``, ``data_dir``, ...); a source without its own ``seed`` gets
        :func:`derived_seed`. ``global_batch_size`` is the mixture's, not a source field.
        """
        sources = []
        for name, spec in _plain(mixture).items():
            spec = dict(spec)
            if "weight" not in spec:
                raise ValueError(f"mixture source {name!r} needs a weight")
            weight = float(spec.pop("weight"))
            bad = sorted(set(spec) & set(SHARED))
            if bad:
                raise ValueError(f"mixture source {name!r} sets {bad}; these are shared: set "
                                 "them on the mixture (data.global_batch / grid / text_length)")
            fields = {**shared, "seed": derived_seed(int(shared.get("seed", 0)), name), **spec}
            try:
                config = DataConfig.from_dict(fields)
            except ValueError as e:
                raise ValueError(f"mixture source {name!r}: {e}") from None
            sources.append(Source(name, weight, config))
        return cls(tuple(sources), global_batch_size)


def _plain(d: Any) -> dict[str, Any]:
    return d.to_dict() if hasattr(d, "to_dict") else dict(d)


class MixtureIterator:
    """This host's rows of every mixed batch, with JSON-able ``get_state`` / ``set_state``."""

    def __init__(self, config: MixtureConfig, parts: list[tuple[int, Source, DataIterator]],
                 rows: tuple[int, int]):
        self.config = config
        self._parts = parts
        self.fingerprint = {
            "global_batch_size": config.global_batch_size, "rows": list(rows),
            "layout": [[s.name, a, b] for s, a, b in config.layout()],
        }

    def __iter__(self) -> Self:
        return self

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for _, _, it in self._parts:
            it.close()

    def __next__(self) -> Batch:
        batches = []
        for index, _, it in self._parts:
            batch = dict(next(it))
            if self.config.has_vqa and "text_maskable" not in batch:
                batch["text_maskable"] = np.ones_like(batch["text_valid"])
            batch["source"] = np.full(len(batch["text_ids"]), index, np.int32)
            batches.append(batch)
        keys = set(batches[0])
        for (_, source, _), batch in zip(self._parts, batches):
            if set(batch) != keys:
                raise ValueError(f"mixture source {source.name!r} yields keys {sorted(batch)}, "
                                 f"others {sorted(keys)}; use the same image input everywhere")
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    @property
    def skipped(self) -> dict[str, dict[str, int]]:
        """Records dropped so far on this host, per source and reason."""
        return {s.name: it.skipped for _, s, it in self._parts}

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint,
                "sources": {s.name: it.get_state() for _, s, it in self._parts}}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or "sources" not in state:
            raise ValueError(f"not a mixture iterator state (version {state.get('version')!r}, "
                             f"expected {STATE_VERSION}); restore with the same data.kind")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"mixture state is from a different mixture: saved "
                             f"{state['fingerprint']}, now {self.fingerprint}; restore with the "
                             "same sources, weights, batch and rows")
        for _, s, it in self._parts:
            it.set_state(state["sources"][s.name])


def make_mixture(config: MixtureConfig, tokenizer: Tokenizer | str | None = None, *,
                 rows: slice | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> MixtureIterator:
    """This host's :class:`MixtureIterator`; ``rows`` / ``process_*`` as in
    :func:`~muddit_jax.data.pipeline.make_iterator` (default: this process's equal share)."""
    start, stop = row_block(config.global_batch_size, rows, process_index, process_count)
    tokenizer = resolve_tokenizer(tokenizer)
    parts = []
    for index, (source, a, b) in enumerate(config.layout()):
        lo, hi = max(start, a), min(stop, b)
        if lo < hi:
            sub = dataclasses.replace(source.config, global_batch_size=b - a)
            parts.append((index, source,
                          make_iterator(sub, tokenizer, rows=slice(lo - a, hi - a))))
    return MixtureIterator(config, parts, (start, stop))
