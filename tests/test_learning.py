"""The model learns to use each modality as the condition of the other (a behavioural check of
the whole text <-> image path: encoder, joint attention, both heads, the loss and its masking).

A toy pairing where one modality fully determines the other: the image is ``k`` everywhere
(plus an uninformative bit), the text is ``<bos> word_k <eos>``. After 200 Adam steps
on :func:`diffusion_loss`, generating one modality from the other with it fully masked must be
right almost always; an untrained model is at chance (1/8). If the text never reached the image
stream (or the image never reached the text head) the accuracy would stay at chance.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from muddit_jax.diffusion.loss import LossConfig, diffusion_loss
from muddit_jax.models.muddit import Muddit, MudditConfig

CLASSES, GRID, LENGTH, BATCH = 8, 4, 8, 16
BOS, EOS, FIRST_WORD = 2, 3, 10


def _model(downsample: bool) -> Muddit:
    cfg = MudditConfig.tiny(32, codebook_size=2 * CLASSES, width=32)
    mmdit = dataclasses.replace(cfg.mmdit, num_layers=1, num_single_layers=1,
                                downsample=downsample, upsample=downsample)
    text = dataclasses.replace(cfg.text, num_hidden_layers=1, max_position_embeddings=LENGTH)
    return Muddit(dataclasses.replace(cfg, mmdit=mmdit, text=text))


def _batch(rng: np.random.Generator) -> dict[str, jax.Array]:
    k = rng.integers(0, CLASSES, BATCH)
    image = k[:, None, None] + CLASSES * rng.integers(0, 2, (BATCH, GRID, GRID))
    text = np.zeros((BATCH, LENGTH), np.int32)
    text[:, 0], text[:, 1], text[:, 2] = BOS, FIRST_WORD + k, EOS
    return dict(image_ids=jnp.asarray(image, jnp.int32), text_ids=jnp.asarray(text),
                text_valid=jnp.asarray(text != 0), micro_conds=jnp.full((BATCH, 5), 16.0))


@pytest.mark.parametrize("downsample", [False, True])
def test_each_modality_is_learned_from_the_other(downsample: bool) -> None:
    net = _model(downsample)
    mask_image, mask_text = 2 * CLASSES, 31
    config = LossConfig(image_mask_id=mask_image, text_mask_id=mask_text,
                        empty_text_ids=(BOS, EOS) + (0,) * (LENGTH - 2), cond_dropout=0.0,
                        text_pad_is_target=False)
    rng = np.random.default_rng(0)
    probe = _batch(rng)
    params = net.init(jax.random.key(0), probe["image_ids"], probe["text_ids"],
                      jnp.ones((BATCH,)), probe["micro_conds"])["params"]
    tx = optax.adam(3e-3)

    def forward(p, *args, generated_rows=None):
        return net.apply({"params": p}, *args, generated_rows=generated_rows)

    @jax.jit
    def step(params, opt, batch, key):
        grads, _ = jax.grad(lambda p: diffusion_loss(forward_fn=forward, params=p, batch=batch,
                                                     rng=key, config=config), has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    @jax.jit
    def accuracy(params, batch):
        ones = jnp.ones((BATCH,))
        blank_image = jnp.full_like(batch["image_ids"], mask_image)
        image_logits, _ = forward(params, blank_image, batch["text_ids"], ones,
                                  batch["micro_conds"])
        t2i = jnp.mean(jnp.argmax(image_logits, -1) % CLASSES == batch["image_ids"] % CLASSES)
        blank_word = batch["text_ids"].at[:, 1].set(mask_text)
        _, text_logits = forward(params, batch["image_ids"], blank_word, ones,
                                 batch["micro_conds"])
        i2t = jnp.mean(jnp.argmax(text_logits[:, 1], -1) == batch["text_ids"][:, 1])
        return t2i, i2t

    before = [float(a) for a in accuracy(params, probe)]
    opt = tx.init(params)
    for i in range(200):
        params, opt = step(params, opt, _batch(rng), jax.random.key(i))
    t2i, i2t = (float(a) for a in accuracy(params, probe))
    assert max(before) < 0.5, before
    assert t2i >= 0.9 and i2t >= 0.9, (t2i, i2t)
