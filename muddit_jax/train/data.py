"""The trainer's input: the registered datasets through the grain pipeline (``data.kind``).

``data.kind="synthetic"`` keeps the built-in random token batches (throughput runs, tests);
``data.kind="dataset"`` reads ``data.dataset`` / ``data.split`` through
:func:`muddit_jax.data.pipeline.make_iterator` with the tokenizer at ``data.tokenizer``: raw
images (``data.images=True``, encoded by the frozen VQ inside the step) or pre-tokenized codes
(``data.dataset="pretokenized"``, ``data.options.path=...``).
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

KINDS = ("synthetic", "dataset")


def image_size(config: ml_collections.ConfigDict, vq_factor: int) -> int:
    """Pixel resolution of training images: the code grid times the VQ factor."""
    return int(config.data.grid) * vq_factor


def dataset_factory(
    config: ml_collections.ConfigDict, vq_factor: int
) -> Callable[[slice], Any] | None:
    """``rows -> iterator`` over this host's rows of each global batch, or ``None`` (synthetic)."""
    d = config.data
    if d.kind not in KINDS:
        raise ValueError(f"data.kind={d.kind!r}: use one of {KINDS}")
    if d.kind == "synthetic":
        return None
    if (d.task == "vqa") != bool(d.text_maskable):
        raise ValueError("data.text_maskable must be True exactly when data.task='vqa' (the "
                         "question prefix is never masked)")
    if not d.tokenizer:
        raise ValueError("data.kind='dataset' needs data.tokenizer (a SentencePiece .model file "
                         "or a CLIP tokenizer folder)")
    from muddit_jax.data.pipeline import DataConfig, make_iterator
    from muddit_jax.models.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(d.tokenizer)
    data_config = DataConfig(
        dataset=d.dataset, split=d.split, data_dir=d.data_dir or None,
        options=dict(d.options), resolution=image_size(config, vq_factor),
        text_length=d.text_length, global_batch_size=d.global_batch, task=d.task,
        seed=config.seed, resolution_multiple=vq_factor,
    )
    return lambda rows: make_iterator(data_config, tokenizer, rows=rows)
