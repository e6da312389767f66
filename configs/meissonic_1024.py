"""Meissonic-1024: text-to-image only, 1024 px (64 x 64 codes, 32 x 32 = 1024 image tokens after
the MM-DiT's 2x down-sampling), for TPU pods / GPU nodes.

    muddit-train --config configs/meissonic_1024.py --workdir gs://BUCKET/meissonic_1024 \
      --config.data.options.path=/data/codes_1024 --config.data.tokenizer=/ckpt/tokenizer

The Muddit-512 networks without the text head (``presets.meissonic_1024``), every row a T2I row
(``loss.t2i_fraction=1``, no text loss), pre-tokenized codes, CLIP text tower frozen, bf16 with
remat and scanned blocks, FSDP layout.
"""

from muddit_jax.train.config import base_config


def get_config(arg: str | None = None):
    del arg
    c = base_config()
    c.model.update(preset="meissonic_1024", dtype="bfloat16", remat=True,
                   remat_policy="dots_with_no_batch_dims_saveable", scan_layers=True)
    c.data.update(kind="dataset", dataset="pretokenized", task="caption", global_batch=256,
                  grid=64, text_length=77, images=False)
    c.data.options = dict(path="")
    c.loss.update(text_loss_weight=0.0, t2i_fraction=1.0, cond_dropout=0.1, mode="split")
    c.optim.update(lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.01,
                   clip_norm=10.0)
    c.train.update(steps=100_000, trainable="mmdit")
    c.checkpoint.update(every=1000, keep=3)
    c.log.update(every=50)
    c.mesh.update(data=1, fsdp=-1, tensor=1, dcn_data=-1, rules="fsdp")
    return c
