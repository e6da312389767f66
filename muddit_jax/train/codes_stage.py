"""Between the stages (``data.pretokenize=True``): training images -> VQ codes once.

The frozen VQ (``train.vq_from``, else ``train.init_from``) encodes every raw-image source of
``data.mixture`` into ``WORKDIR/codes/<source>/`` with :mod:`muddit_jax.data.pretokenize`
(atomic shards, resumable, host-sharded), and the MM-DiT stage reads the codes instead of running
the VQ encoder in every step. Sources over the same dataset, split and options share one folder.
The VQ stays in the train state: evaluation and artifacts decode with it. A folder written by
another VQ or tokenizer is refused (the job fingerprints differ), never silently reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import jax
import ml_collections

CODES_DIR = "codes"
PRETOKENIZED = "pretokenized"  # muddit_jax.data.registry.PRETOKENIZED (not imported: tfds)
ENCODE_BATCH = 64
EXAMPLES_PER_SHARD = 1024  # shard i is written by host i mod process_count


def check(config: ml_collections.ConfigDict) -> None:
    """Clear errors for a ``data.pretokenize`` the run cannot honour."""
    d = config.data
    if not d.get("pretokenize", False):
        return
    if d.kind != "mixture":
        raise ValueError(f"data.pretokenize=True needs data.kind='mixture' (got {d.kind!r}): "
                         "set data.pretokenize=False, or list the dataset as the one source of "
                         "data.mixture")
    if not d.images:
        raise ValueError("data.pretokenize=True encodes images with the VQ: set data.images=True")
    if not (config.train.vq_from or config.train.init_from):
        raise ValueError("data.pretokenize=True needs the VQ that encodes the images: set "
                         "train.vq_from (or train.init_from with a VQ)")


def pretokenize_sources(config: ml_collections.ConfigDict, workdir: str | Path,
                        log: Callable[[str], None] = print) -> ml_collections.ConfigDict:
    """Encode the mixture's raw-image sources (see the module docstring); returns a copy of
    ``config`` whose sources read ``WORKDIR/codes/<name>/``. Without ``data.pretokenize`` (or
    with the sources already pre-tokenized) ``config`` is returned unchanged."""
    check(config)
    d = config.data
    if not d.get("pretokenize", False):
        return config
    from muddit_jax.data import pretokenize as pt
    from muddit_jax.data import registry
    from muddit_jax.data.text import fingerprint
    from muddit_jax.models.tokenizers import load_tokenizer
    from muddit_jax.train import config as C
    from muddit_jax.train.checkpoint import load_params
    from muddit_jax.train.data import mixture_config

    vq_config = C.model_config(config).vq
    # the sources' DataConfigs with the mixture's shared fields (split, data_dir, resolution,
    # text_length) filled in; a mixture is all pre-tokenized or all raw (MixtureConfig checks)
    sources = mixture_config(config, vq_config.downsample_factor).sources
    if sources[0].config.dataset == PRETOKENIZED:
        return config
    vq_path = config.train.vq_from or config.train.init_from
    params = load_params(vq_path).get("vq")
    if params is None:
        raise ValueError(f"data.pretokenize=True: {vq_path} holds no VQ params")
    resolution = sources[0].config.resolution
    grid = resolution // vq_config.downsample_factor
    tokenizer = load_tokenizer(d.tokenizer, add_mask_token=True)
    vq_id = pt.vq_fingerprint(vq_config, params)
    encode = pt.make_encoder(vq_config, params, ENCODE_BATCH)
    out = ml_collections.ConfigDict(config.to_dict())
    folders: dict[str, Path] = {}
    for source in sources:
        data = source.config
        key = json.dumps([data.dataset, data.split, data.data_dir, dict(data.options)],
                         sort_keys=True, default=str)
        if key not in folders:
            folders[key] = Path(workdir).absolute() / CODES_DIR / source.name
            options = data.source_options()
            records = registry.data_source(data.dataset, data.split, data.data_dir, build=True,
                                           **options)
            job = pt.Job(data.dataset, options, resolution, d.text_length,
                         fingerprint(tokenizer), vq_id, (grid, grid), EXAMPLES_PER_SHARD)
            try:
                summary = pt.pretokenize(records, data.split, folders[key], job, encode,
                                         tokenizer, batch_size=ENCODE_BATCH, log=lambda _: None)
            except ValueError as e:  # written for another VQ / tokenizer / dataset options
                raise ValueError(f"data.pretokenize: {e}. Delete {folders[key]} to encode the "
                                 "images again with this run's VQ") from e
            if jax.process_index() == 0:
                log(f"muddit-train: codes of {data.dataset}/{data.split} ({len(records)} records, "
                    f"{len(summary['written'])} shards written, {len(summary['already_done'])} "
                    f"reused) -> {folders[key]}")
        out.data.mixture[source.name].dataset = PRETOKENIZED
        out.data.mixture[source.name].options = {"path": str(folders[key])}
    if jax.process_count() > 1:  # no host reads before every host has written
        from jax.experimental import multihost_utils

        # each host writes its shards' sidecars, then (pt.finalize) the metadata if every
        # sidecar exists: the host that checks last sees them all, so it is written by then
        multihost_utils.sync_global_devices("pretokenize")
    return out

