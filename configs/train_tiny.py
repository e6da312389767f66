"""Tiny CPU training run (random-init tiny Muddit on synthetic token batches).

``arg`` (comma separated): ``images`` feeds raw images through the frozen VQ; ``micro`` shrinks
the model to one block of each kind and a one-layer text tower (fast tests).
"""

from muddit_jax.train.config import base_config


def get_config(arg: str | None = None):
    flags = set((arg or "").split(","))
    c = base_config()
    c.model.update(text_vocab_size=64, codebook_size=16, width=32)
    c.data.update(global_batch=8, grid=4, text_length=8, images="images" in flags)
    c.optim.update(lr=1e-3, warmup_steps=2, schedule="cosine")
    c.train.update(steps=20, max_nonfinite=3)
    c.checkpoint.update(every=5, keep=3)
    c.log.update(every=1)
    if "micro" in flags:
        c.model.update(dual_layers=1, single_layers=1, text_layers=1)
    return c
