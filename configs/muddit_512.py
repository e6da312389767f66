"""Muddit-512 pretraining at the released shapes, for TPU pods / GPU nodes.

    muddit-train --config configs/muddit_512.py:fsdp --workdir gs://BUCKET/muddit_512 \
      --config.data.options.path=/data/codes_512 --config.data.tokenizer=/ckpt/muddit/tokenizer \
      --config.train.init_from=/ckpt/meissonic_converted

Networks (``muddit_jax.models.presets.muddit_512``): the ~1B MM-DiT (14 dual + 28 single blocks,
width 1024, 2x down/up-sampling, text head), the CLIP ViT-H/14 text tower (frozen) with the
``<mask>`` row, the Meissonic 16x VQ (8192 codes; not used in the step: the data are
pre-tokenized codes, ``muddit-pretokenize``). Paper hyper-parameters: AdamW lr 1e-4 constant,
grad-norm clip 10, text loss weight 0.6, condition dropout 0.1, bf16 compute with fp32 master
params, 512 px -> 32 x 32 codes, 77 text tokens. Muddit starts from Meissonic's generator:
``train.init_from`` = a ``muddit-convert`` folder of Meissonic (or of a previous Muddit).

``arg`` (comma separated) picks the parallel layout (``muddit_jax/parallel/rules.py``):
``fsdp`` (default: ZeRO-3 over a slice / node, data parallel across), ``data`` (replicated
params), ``tensor`` (4-way tensor parallel inside a host); ``synthetic`` replaces the data by
random token batches of the same shapes (throughput / MFU runs, no dataset needed). Scale
``data.global_batch`` with the device count.
"""

from muddit_jax.train.config import base_config

LAYOUTS = {
    "fsdp": dict(data=1, fsdp=-1, tensor=1, dcn_data=-1, rules="fsdp"),
    "data": dict(data=-1, fsdp=1, tensor=1, rules="data"),
    "tensor": dict(data=-1, fsdp=1, tensor=4, rules="default"),
}


def get_config(arg: str | None = None):
    flags = [f for f in (arg or "").split(",") if f]
    layouts = [f for f in flags if f in LAYOUTS] or ["fsdp"]
    unknown = [f for f in flags if f not in LAYOUTS and f != "synthetic"]
    if unknown or len(layouts) > 1:
        raise ValueError(f"configs/muddit_512.py:{arg}: use one layout of {sorted(LAYOUTS)} "
                         "and optionally 'synthetic'")
    c = base_config()
    c.model.update(preset="muddit_512", dtype="bfloat16", remat=True,
                   remat_policy="dots_with_no_batch_dims_saveable", scan_layers=True)
    c.data.update(kind="dataset", dataset="pretokenized", task="caption", global_batch=256,
                  grid=32, text_length=77, images=False)
    c.data.options = dict(path="")  # a muddit-pretokenize output folder
    c.loss.update(text_loss_weight=0.6, cond_dropout=0.1, mode="split", weighting="muddit",
                  text_pad_is_target=True)
    c.optim.update(lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.01,
                   clip_norm=10.0)
    c.train.update(steps=100_000, trainable="mmdit", ema_decay=0.0)
    c.checkpoint.update(every=1000, keep=3)
    c.log.update(every=50)
    c.mesh.update(LAYOUTS[layouts[0]])
    if "synthetic" in flags:
        c.data.kind = "synthetic"
    return c
