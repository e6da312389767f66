"""The trainer's input: the registered datasets through the grain pipeline (``data.kind``).

``data.kind="synthetic"`` keeps the built-in random token batches (throughput runs, tests);
``data.kind="dataset"`` reads ``data.dataset`` / ``data.split`` through
:func:`muddit_jax.data.pipeline.make_iterator` with the tokenizer at ``data.tokenizer``: raw
images (``data.images=True``, encoded by the frozen VQ inside the step) or pre-tokenized codes
(``data.dataset="pretokenized"``, ``data.options.path=...``). ``data.kind="mixture"`` mixes the
sources of ``data.mixture`` (``{name: {weight, dataset, task, options, ...}}``) with a fixed
number of rows each per batch (:mod:`muddit_jax.data.mixture`; caption rows first, so with
``loss.mode="split"`` the caption rows must cover the ``loss.t2i_fraction`` T2I rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from muddit_jax.train.config import sub_seed

KINDS = ("synthetic", "dataset", "mixture")


def image_size(config: ml_collections.ConfigDict, vq_factor: int) -> int:
    """Pixel resolution of training images: the code grid times the VQ factor."""
    return int(config.data.grid) * vq_factor


def data_seed(config: ml_collections.ConfigDict) -> int:
    """The seed of the batches' order and draws: ``data.seed``, or the run's ``seed`` at -1."""
    return sub_seed(config, "data.seed")


def dataset_factory(
    config: ml_collections.ConfigDict, vq_factor: int
) -> Callable[[slice], Any] | None:
    """``rows -> iterator`` over this host's rows of each global batch, or ``None`` (synthetic)."""
    d = config.data
    if d.kind not in KINDS:
        raise ValueError(f"data.kind={d.kind!r}: use one of {KINDS}")
    if d.kind == "synthetic":
        return None
    if not d.tokenizer:
        raise ValueError(f"data.kind={d.kind!r} needs data.tokenizer (a SentencePiece .model file "
                         "or a CLIP tokenizer folder)")
    from muddit_jax.models.tokenizers import load_tokenizer

    if d.kind == "mixture":
        return _mixture_factory(config, vq_factor, load_tokenizer(d.tokenizer, add_mask_token=True))
    if (d.task == "vqa") != bool(d.text_maskable):
        raise ValueError("data.text_maskable must be True exactly when data.task='vqa' (the "
                         "question prefix is never masked)")
    from muddit_jax.data.pipeline import DataConfig, make_iterator

    tokenizer = load_tokenizer(d.tokenizer, add_mask_token=True)
    data_config = DataConfig(
        dataset=d.dataset, split=d.split, data_dir=d.data_dir or None,
        options=dict(d.options), resolution=image_size(config, vq_factor),
        text_length=d.text_length, global_batch_size=d.global_batch, task=d.task,
        seed=data_seed(config), resolution_multiple=vq_factor, **throughput(config),
    )
    return lambda rows: make_iterator(data_config, tokenizer, rows=rows)


def throughput(config: ml_collections.ConfigDict) -> dict[str, int]:
    """``data.read_threads`` / ``prefetch`` / ``workers`` where set (else the DataConfig
    defaults): host input speed only, the batches are the same."""
    from muddit_jax.data.pipeline import THROUGHPUT_FIELDS

    return {k: int(config.data[k]) for k in THROUGHPUT_FIELDS if k in config.data}


def mixture_config(config: ml_collections.ConfigDict, vq_factor: int) -> Any:
    """The :class:`~muddit_jax.data.mixture.MixtureConfig` of ``data.mixture``, checked against
    ``data.text_maskable`` and the loss's T2I rows."""
    from muddit_jax.data.mixture import MixtureConfig

    d = config.data
    if not d.get("mixture"):
        raise ValueError("data.kind='mixture' needs data.mixture = {name: {weight, dataset, task, "
                         "options, ...}, ...}")
    mix = MixtureConfig.from_dict(
        d.mixture, d.global_batch, split=d.split, data_dir=d.data_dir or None,
        resolution=image_size(config, vq_factor), text_length=d.text_length,
        seed=data_seed(config), resolution_multiple=vq_factor, **throughput(config),
    )
    if mix.has_vqa != bool(d.text_maskable):
        raise ValueError(f"data.text_maskable must be {mix.has_vqa}: True exactly when a "
                         "data.mixture source has task='vqa'")
    if config.loss.mode == "split":
        t2i = round(d.global_batch * float(config.loss.get("t2i_fraction", 0.5)))
        captions = sum(b - a for s, a, b in mix.layout() if s.config.task == "caption")
        if captions < t2i:
            raise ValueError(
                f"loss.mode='split' makes the first {t2i} rows T2I but data.mixture has only "
                f"{captions} caption rows, so VQA rows would be T2I rows; raise the caption "
                "weights or lower loss.t2i_fraction to the caption share")
    return mix


def _mixture_factory(config: ml_collections.ConfigDict, vq_factor: int,
                     tokenizer: Any) -> Callable[[slice], Any]:
    from muddit_jax.data.mixture import make_mixture

    mix = mixture_config(config, vq_factor)
    return lambda rows: make_mixture(mix, tokenizer, rows=rows)
