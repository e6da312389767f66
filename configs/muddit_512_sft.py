"""Muddit-512 instruction tuning (stage 2): VQA / multimodal-understanding SFT with T2I kept in
the mix, fine-tuning from a ported release or from an own pretraining checkpoint.

    muddit-train --config configs/muddit_512_sft.py:converted --workdir runs/muddit_sft \
      --config.train.init_from=/ckpt/muddit_converted \
      --config.data.mixture.captions.options.source_dir=/data/sft_captions \
      --config.data.mixture.instruct.options.source_dir=/data/llava \
      --config.data.mixture.instruct.options.image_root=/data/coco/train2017

``arg``: ``converted`` (default) starts from a ``muddit-convert`` folder of a whole Muddit
pipeline (networks, ``<mask>`` row and CLIP tokenizer read from it: ``model.preset="pretrained"``,
``data.tokenizer="auto"``); ``own`` starts from a ``configs/muddit_512.py`` run's checkpoint
(``train.init_from=WORKDIR/checkpoints``, set ``data.tokenizer`` to its CLIP tokenizer). Only
params are restored (orbax params-only); optimizer state, step and data position start fresh in
this run's own workdir.

Data (``data.kind="mixture"``, ``muddit_jax/data/mixture.py``), per global batch of 256: 128
caption rows (``image_folder`` of curated image-caption pairs; the first 64 rows are T2I, the next
64 captioning) and 128 instruction rows (LLaVA-format JSON, ``muddit_jax/data/llava.py``;
question visible, answer-only masking). Same ELBO weighting and ``text_loss_weight`` (0.6) as
pretraining; padding after the answer is a masked target as in the reference
(``loss.text_pad_is_target``), so the model learns where answers end. Images are raw and encoded
by the frozen VQ inside the step.
"""

from muddit_jax.train.config import base_config

INIT = ("converted", "own")


def get_config(arg: str | None = None):
    init = arg or "converted"
    if init not in INIT:
        raise ValueError(f"configs/muddit_512_sft.py:{arg}: use one of {INIT}")
    c = base_config()
    c.model.update(preset="pretrained" if init == "converted" else "muddit_512",
                   dtype="bfloat16", remat=True,
                   remat_policy="dots_with_no_batch_dims_saveable", scan_layers=True)
    c.data.update(kind="mixture", tokenizer="auto" if init == "converted" else "",
                  global_batch=256, grid=32, text_length=77, images=True, text_maskable=True)
    c.data.mixture = dict(
        captions=dict(weight=0.5, dataset="image_folder", task="caption",
                      options=dict(source_dir="", config="sft_captions")),
        instruct=dict(weight=0.5, dataset="llava", task="vqa",
                      options=dict(source_dir="", annotation="llava_instruct_150k.json",
                                   image_root="", multi_turn="flatten")),
    )
    c.loss.update(text_loss_weight=0.6, cond_dropout=0.1, mode="split", weighting="muddit",
                  t2i_fraction=0.25, text_pad_is_target=True)
    c.optim.update(lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.01,
                   clip_norm=10.0)
    c.train.update(steps=20_000, trainable="mmdit", init_from="")
    c.checkpoint.update(every=1000, keep=3)
    c.eval.update(tasks="vqa,caption", dataset="vqav2", split="validation", limit=5000)
    c.eval.options = dict(source_dir="")  # the VQAv2 files (muddit_jax/data/vqav2.py)
    c.log.update(every=50)
    c.mesh.update(data=1, fsdp=-1, tensor=1, dcn_data=-1, rules="fsdp")
    return c
