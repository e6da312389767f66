"""A from-scratch run in stages (``muddit-train --stage vq|mmdit|all``), all in one workdir::

    WORKDIR/tokenizer.model     data.tokenizer="auto": SentencePiece trained on the split's texts
                                (fine-tuning a converted pipeline: its tokenizer/ instead)
    WORKDIR/vq/                 stage 1 (vq): checkpoints/, metrics.jsonl, eval.json, recon.png
    WORKDIR/codes/              data.pretokenize=True: the training images as VQ codes, encoded
                                once before stage 2 (muddit_jax/train/codes_stage.py)
    WORKDIR/checkpoints/ ...    stage 2 (mmdit): the MM-DiT (+ text encoder) with the ELBO, the
                                VQ frozen and read from stage 1 (train.vq_from="auto")

Each stage resumes from its own checkpoints; a finished stage is skipped on rerun.
:func:`resolve` turns the ``"auto"`` fields into paths (the trainer, ``muddit-eval`` and
``muddit-sample --workdir`` all call it, so they agree on the files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from muddit_jax.files import write_json_atomic
from muddit_jax.parallel import distributed
from muddit_jax.parallel.sharding import global_batch
from muddit_jax.train import artifacts
from muddit_jax.train import config as C
from muddit_jax.train.checkpoint import Checkpointer
from muddit_jax.train.metrics import MetricWriter, Throughput, progress_line

STAGES = ("vq", "mmdit", "all")
TOKENIZER_TYPES = ("bpe", "unigram", "word", "char")
AUTO = "auto"
TOKENIZER_FILE = "tokenizer.model"


def resolve(config: ml_collections.ConfigDict, workdir: str | Path, *,
            train_missing: bool = True) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``"auto"`` fields made concrete: ``data.tokenizer`` is the
    converted pipeline's ``tokenizer/`` (``model.preset="pretrained"``) or
    ``WORKDIR/tokenizer.model`` (trained first if missing and ``train_missing``);
    ``train.vq_from`` is ``WORKDIR/vq/checkpoints``."""
    config = ml_collections.ConfigDict(config.to_dict())
    workdir = Path(workdir).absolute()
    if config.data.tokenizer == AUTO and config.model.preset == "pretrained":
        config.data.tokenizer = str(Path(config.train.init_from) / "tokenizer")
    if config.data.tokenizer == AUTO:
        path = workdir / TOKENIZER_FILE
        if not path.exists():
            if not train_missing:
                raise FileNotFoundError(f"{path} is missing: run muddit-train on this workdir "
                                        "first (data.tokenizer='auto' trains it)")
            train_tokenizer(config, path)
        config.data.tokenizer = str(path)
    if config.train.vq_from == AUTO:
        config.train.vq_from = str(workdir / "vq" / "checkpoints")
    return config


def train_tokenizer(config: ml_collections.ConfigDict, path: Path) -> None:
    """SentencePiece (``data.tokenizer_type``) of at most ``model.text_vocab_size`` pieces on
    ``data.dataset/split``'s texts (process 0 writes it, the others wait for it)."""
    from muddit_jax.data.registry import data_source
    from muddit_jax.data.text import dataset_texts
    from muddit_jax.data.text import train_tokenizer as train_sp

    if jax.process_index() == 0:
        d = config.data
        source = data_source(d.dataset, d.split, d.data_dir or None, build=True,
                             **dict(d.options))
        tok = train_sp(dataset_texts([source]), int(config.model.text_vocab_size), path,
                       model_type=d.tokenizer_type)
        print(f"muddit-train: trained a {tok.vocab_size}-piece tokenizer -> {path}", flush=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("tokenizer")


def _image_iterator(config: ml_collections.ConfigDict, resolution: int, rows: slice) -> Any:
    from muddit_jax.data.pipeline import DataConfig, make_iterator
    from muddit_jax.models.tokenizers import load_tokenizer

    d = config.data
    data_config = DataConfig(
        dataset=d.dataset, split=d.split, data_dir=d.data_dir or None, options=dict(d.options),
        resolution=resolution, text_length=d.text_length, global_batch_size=config.vq.global_batch,
        task="caption", seed=config.seed + 1, resolution_multiple=1,
    )
    return make_iterator(data_config, load_tokenizer(d.tokenizer, add_mask_token=True), rows=rows)


def recon_detector_score(examples: list[dict[str, Any]], recon: np.ndarray) -> float | None:
    """With ``shapes`` ground truth (``objects``), the compositional T2I detector's overall
    verdict on the VQ's reconstructions ``uint8 [N, R, R, 3]``: the T2I score a generator that
    drew every held-out image's exact codes would get (``None`` for datasets without
    ``objects``)."""
    if not examples or not all("objects" in e for e in examples):
        return None
    from muddit_jax.eval.compositional import category_scores, judge

    verdicts = [judge(img, e["objects"], object_scale=e.get("object_scale", 1.0))
                for img, e in zip(recon, examples)]
    return category_scores(verdicts)["overall"]


def train_vq(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Stage 1 (see :mod:`muddit_jax.train.vq_stage`); returns the held-out metrics."""
    from muddit_jax.train import vq_stage

    v, out = config.vq, vq_stage.vq_workdir(workdir)
    model_cfg = C.model_config(config).vq
    resolution = int(config.data.grid) * model_cfg.downsample_factor
    run = vq_stage.build(config, model_cfg, resolution)
    rows = vq_stage.host_batch_rows(run)
    data = _image_iterator(config, resolution, rows)
    ckpt = Checkpointer(out / "checkpoints", keep=2, async_save=False)
    restored = ckpt.restore_or_none(run.abstract)
    if restored is not None:
        state = restored.state
        data.set_state(restored.data_iter)
    else:
        state = run.init(config.seed)
    step, total = int(jax.device_get(state.step)), int(v.steps)
    writer = MetricWriter(out, enabled=jax.process_index() == 0, tensorboard=config.log.tensorboard)
    rate = Throughput(total_steps=total, tokens_per_step=v.global_batch, flops_per_step=0.0,
                      peak_flops_total=None)
    if jax.process_index() == 0:
        grid = resolution // model_cfg.downsample_factor
        print(f"muddit-train: stage vq | {resolution}px -> {grid}^2 codes of "
              f"{model_cfg.num_vq_embeddings} | codebook={v.codebook} | "
              f"{'resumed at' if restored else 'starting at'} step {step}", flush=True)
    try:
        while step < total:
            batch = next(data)
            images = {"images": batch["images"]}
            state, metrics = run.step(state, global_batch(images, run.batch_shardings,
                                                           int(v.global_batch)))
            step += 1
            if step % v.log_every == 0 or step == total:
                m = {k: float(x) for k, x in jax.device_get(metrics).items()}
                m.update(rate.update(step))
                writer.write(step, m)
                if jax.process_index() == 0:
                    print(progress_line(step, total, m) + f" | psnr {m['psnr']:.2f} | usage "
                          f"{m['usage']:.2f} | active {m['active']:.2f}", flush=True)
            if step % v.checkpoint_every == 0 or step == total:
                ckpt.save(step, state, data.get_state(), config)
    finally:
        ckpt.close()
        writer.close()
    params = jax.device_get(state.params["vq"])
    from muddit_jax.eval.job import split_examples

    examples = split_examples(config, "caption", resolution, int(v.eval_images))
    pixels = np.stack([e["image"] for e in examples])  # uint8
    metrics, recon = vq_stage.evaluate(run.model, params, pixels.astype(np.float32) / 255.0)
    recon = np.round(recon * 255).astype(np.uint8)  # evaluate() clips to [0, 1]
    detector = recon_detector_score(examples, recon)
    if detector is not None:
        metrics["recon_detector_overall"] = detector
    if jax.process_index() == 0:
        n = min(16, len(recon))
        artifacts.save_png(artifacts.stacked_rows([pixels[:n], recon[:n]]), out / "recon.png")
        write_json_atomic({"step": step, **metrics}, out / "eval.json")
        print(f"muddit-train: VQ held-out ({int(metrics['images'])} images): PSNR "
              f"{metrics['psnr']:.2f} dB, codebook usage {metrics['usage']:.1%}, perplexity "
              f"{metrics['perplexity']:.1f}" + ("" if detector is None else
              f", T2I detector on reconstructions {detector:.3f}"), flush=True)
    return metrics


def run_stages(config: ml_collections.ConfigDict, workdir: str | Path, stage: str = "all") -> Any:
    """Tokenizer (if ``"auto"``), then stage 1 and/or 2; returns stage 2's ``TrainResult`` (or
    stage 1's metrics for ``stage="vq"``)."""
    from muddit_jax.train.loop import train

    if stage not in STAGES:
        raise ValueError(f"--stage={stage!r}: use one of {STAGES}")
    if stage in ("vq", "all") and config.vq.steps > 0 and not config.data.images:
        raise ValueError("the VQ stage (vq.steps > 0) trains on images: set data.images=True")
    if stage == "vq" and config.vq.steps == 0:
        raise ValueError("--stage=vq needs vq.steps > 0")
    from muddit_jax.train.codes_stage import check as check_codes
    from muddit_jax.train.vq_stage import validate as validate_vq

    validate_vq(config.vq)  # fail before any slow work (tokenizer, compiles)
    check_codes(config)
    if config.data.tokenizer == AUTO and config.data.tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"data.tokenizer_type={config.data.tokenizer_type!r}: use one of "
                         f"{TOKENIZER_TYPES}")
    C.trainable(config)
    if config.model.preset != "pretrained":
        C.model_config(config)
    distributed.initialize(config.distributed)
    config = resolve(config, workdir)
    vq_metrics = None
    if stage in ("vq", "all") and config.vq.steps > 0:
        vq_metrics = train_vq(config, workdir)
    if stage == "vq":
        return vq_metrics
    return train(config, workdir)


def with_defaults(values: dict) -> ml_collections.ConfigDict:
    """Today's :func:`~muddit_jax.train.config.base_config` with the saved ``values`` (a nested
    dict) written over it; ``ConfigDict.update`` merges section by section, so a field missing
    from ``values`` keeps its default."""
    config = C.base_config()
    config.update(values)
    return config


def saved_config(workdir: str | Path, step: int | None = None
                 ) -> tuple[ml_collections.ConfigDict, int]:
    """``(config, step)`` of the latest (or ``step``) stage-2 checkpoint of ``workdir``, with
    the tokenizer re-pointed to ``WORKDIR/tokenizer.model`` when the run trained one (so a moved
    workdir still loads). The saved values are laid over today's defaults, so a run saved before
    a field existed loads with that field's default."""
    workdir = Path(workdir)
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)  # a run may be writing there
    try:
        saved = ckpt.saved_config(step)
    finally:
        ckpt.close()
    if saved is None:
        raise ValueError(f"no checkpoint in {workdir / 'checkpoints'}; train first (muddit-train)")
    step, values = saved
    if not values:
        raise ValueError(f"checkpoint step {step} in {workdir} has no saved config")
    config = with_defaults(values)
    if (workdir / TOKENIZER_FILE).is_file():
        config.data.tokenizer = str(workdir / TOKENIZER_FILE)
    return config, step
