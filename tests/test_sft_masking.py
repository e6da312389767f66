"""Answer-only masking for instruction tuning: question tokens are never masked nor targets,
mask counts follow ``min(A, max(1, round(A * r)))``, positions are uniform in the answer, padding
follows ``text_pad_is_target``, and ``t2i_fraction`` moves the T2I / I2T boundary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muddit_jax.diffusion.loss import LossConfig, diffusion_loss
from muddit_jax.diffusion.masking import random_mask, text_targets

B, H, W, L = 4, 2, 2, 10
V_IMG, V_TXT = 6, 12
IMG_MASK, TXT_MASK = V_IMG, V_TXT
EMPTY = (1, 2) + (0,) * (L - 2)
# (question end, eos position): row r has question [0, q) (bos + question), answer [q, eos]
QUESTION_END = np.array([3, 2, 4, 5])
EOS_AT = np.array([6, 9, 5, 7])


def vqa_batch(seed: int = 0) -> dict[str, jnp.ndarray]:
    rng = np.random.default_rng(seed)
    pos = np.arange(L)[None, :]
    valid = pos <= EOS_AT[:, None]
    maskable = pos >= QUESTION_END[:, None]  # answer, eos and padding, as data/text.py writes
    text = np.where(valid, rng.integers(3, V_TXT, (B, L)), 0)
    return {
        "image_ids": jnp.asarray(rng.integers(0, V_IMG, (B, H, W)), jnp.int32),
        "text_ids": jnp.asarray(text, jnp.int32),
        "text_valid": jnp.asarray(valid),
        "text_maskable": jnp.asarray(maskable),
        "micro_conds": jnp.zeros((B, 5), jnp.float32),
    }


def config(**kw) -> LossConfig:
    # t2i_fraction=0: every row is an understanding (I2T) row
    base = {"image_mask_id": IMG_MASK, "text_mask_id": TXT_MASK, "empty_text_ids": EMPTY,
                "t2i_fraction": 0.0, "cond_dropout": 0.0}
    return LossConfig(**{**base, **kw})


def logits_forward(params, image_ids, text_ids, timestep, micro_conds, generated_rows=None):
    """The text logits are the parameters themselves: d loss / d logits shows the targets."""
    b = image_ids.shape[0]
    return jnp.zeros((b, H, W, V_IMG)), params + 0.0 * text_ids[..., None]


def token_ce(logits, ids) -> np.ndarray:
    """Each position's cross-entropy ``[b, l]``, recomputed outside the loss."""
    picked = jnp.take_along_axis(logits, ids[..., None], -1)[..., 0]
    return np.asarray(jax.nn.logsumexp(logits, -1) - picked)


def masked_inputs(batch, seed: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    """``(text input [b, l], timestep [b])`` the forward saw."""
    seen = {}

    def forward(params, image_ids, text_ids, timestep, micro_conds, generated_rows=None):
        seen["text"], seen["t"] = np.asarray(text_ids), np.asarray(timestep)
        return logits_forward(params, image_ids, text_ids, timestep, micro_conds)

    diffusion_loss(forward_fn=forward, params=jnp.zeros((B, L, V_TXT)), batch=batch,
                   rng=jax.random.PRNGKey(seed), config=config(**kw))
    return seen["text"], seen["t"]


def test_text_targets_regions():
    valid = jnp.array([[1, 1, 1, 0, 0]], bool)
    answer = jnp.array([[0, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(text_targets(valid), valid)
    np.testing.assert_array_equal(text_targets(valid, pad_is_target=True), np.ones((1, 5)))
    np.testing.assert_array_equal(text_targets(valid, answer), [[0, 1, 1, 0, 0]])
    np.testing.assert_array_equal(text_targets(valid, answer, pad_is_target=True), answer)


@pytest.mark.parametrize("pad_is_target", [False, True])
def test_question_never_masked_and_counts_follow_the_formula(pad_is_target: bool):
    batch = vqa_batch(1)
    pos = np.arange(L)[None, :]
    question = pos < QUESTION_END[:, None]
    pad = pos > EOS_AT[:, None]
    answer_len = (EOS_AT + 1 if not pad_is_target else L) - QUESTION_END
    pad_hits = 0
    for seed in range(60):
        txt_in, r = masked_inputs(batch, seed, text_pad_is_target=pad_is_target)
        masked = txt_in == TXT_MASK
        assert not (masked & question).any()
        np.testing.assert_array_equal(txt_in[question], np.asarray(batch["text_ids"])[question])
        n_drawn = np.round(answer_len * r.astype(np.float32))
        expected = np.minimum(answer_len, np.maximum(1, n_drawn))
        np.testing.assert_array_equal(masked.sum(-1), expected)
        pad_hits += int((masked & pad).sum())
    assert (pad_hits > 0) == pad_is_target


def test_question_positions_are_never_targets():
    """Loss and its gradient do not depend on the logits at question (or, by default, pad)
    positions, whatever the draw; answer positions do get gradient."""
    batch = vqa_batch(2)
    pos = np.arange(L)[None, :]
    question = pos < QUESTION_END[:, None]
    pad = pos > EOS_AT[:, None]

    @jax.jit
    def loss_and_grad(logits, rng):
        def f(p):
            return diffusion_loss(forward_fn=logits_forward, params=p, batch=batch, rng=rng,
                                  config=config())[0]
        return jax.value_and_grad(f)(logits)

    base = jax.random.normal(jax.random.PRNGKey(0), (B, L, V_TXT))
    noise = jax.random.normal(jax.random.PRNGKey(1), (B, L, V_TXT)) * 5.0
    perturbed = jnp.where(jnp.asarray(question | pad)[..., None], base + noise, base)
    answer_grad = np.zeros((B, L), bool)
    for seed in range(40):
        rng = jax.random.PRNGKey(seed)
        loss, grad = loss_and_grad(base, rng)
        loss2, _ = loss_and_grad(perturbed, rng)
        assert float(loss) == float(loss2)
        g = np.abs(np.asarray(grad)).sum(-1)
        assert (g[question] == 0).all() and (g[pad] == 0).all()
        answer_grad |= g > 0
    np.testing.assert_array_equal(answer_grad, ~question & ~pad)


def test_answer_positions_are_uniform():
    answer = jnp.asarray(np.arange(L)[None, :] >= QUESTION_END[:, None])
    n = 3000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    ratio = jnp.full((B,), 0.4)
    masks = np.asarray(jax.jit(jax.vmap(lambda k: random_mask(k, answer, ratio)))(keys))
    freq = masks.mean(0)  # [B, L]
    for row in range(B):
        a = L - QUESTION_END[row]
        k = min(a, max(1, round(a * 0.4)))
        inside = freq[row, QUESTION_END[row]:]
        assert (freq[row, : QUESTION_END[row]] == 0).all()
        # each answer position is masked with probability k / a (binomial std ~ 0.009)
        np.testing.assert_allclose(inside, k / a, atol=0.035)


def test_t2i_fraction_sets_the_split_rows():
    batch = vqa_batch(3)
    for frac, t2i in ((0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)):
        txt_in, _ = masked_inputs(batch, 0, t2i_fraction=frac)
        masked_rows = (txt_in == TXT_MASK).any(-1)
        np.testing.assert_array_equal(masked_rows, np.arange(B) >= t2i)
    with pytest.raises(ValueError, match="t2i_fraction"):
        masked_inputs(batch, 0, t2i_fraction=0.3)
    with pytest.raises(ValueError, match="t2i_fraction"):
        config(t2i_fraction=1.5)


def test_separate_pad_masking_counts_each_stratum():
    """``text_pad_masking="separate"``: ``max(1, round(A * r))`` of the answer (to the eos) and
    ``round(P * r)`` of the padding are masked, at the same ``r``; the question never."""
    batch = vqa_batch(4)
    pos = np.arange(L)[None, :]
    question = pos < QUESTION_END[:, None]
    pad = pos > EOS_AT[:, None]
    answer = ~question & ~pad
    n_answer, n_pad = answer.sum(-1), pad.sum(-1)
    for seed in range(40):
        txt_in, r = masked_inputs(batch, seed, text_pad_is_target=True,
                                  text_pad_masking="separate")
        masked = txt_in == TXT_MASK
        r = r.astype(np.float32)
        assert not (masked & question).any()
        np.testing.assert_array_equal((masked & answer).sum(-1),
                                      np.minimum(n_answer, np.maximum(1, np.round(n_answer * r))))
        np.testing.assert_array_equal((masked & pad).sum(-1), np.round(n_pad * r))


@pytest.mark.parametrize("pad_weight", [1.0, 0.25])
@pytest.mark.parametrize("masking", ["joint", "separate"])
@pytest.mark.parametrize("weighting", ["count", "muddit"])
def test_text_loss_weighs_answer_and_padding(weighting: str, masking: str, pad_weight: float):
    """Padding targets' CE is multiplied by ``text_pad_weight``. Count weights: the row's
    ``n / k`` (joint), or each stratum's CE sum times its own ``n / k`` (separate); other
    weightings keep the row weight. Checked against the loss recomputed from the inputs the
    model saw."""
    batch = vqa_batch(5)
    pos = np.arange(L)[None, :]
    pad = pos > EOS_AT[:, None]
    answer = (pos >= QUESTION_END[:, None]) & ~pad
    logits = jax.random.normal(jax.random.PRNGKey(3), (B, L, V_TXT))
    ce = token_ce(logits, batch["text_ids"])
    kw = dict(text_pad_is_target=True, text_pad_masking=masking, weighting=weighting,
              text_pad_weight=pad_weight)
    for seed in range(6):
        txt_in, r = masked_inputs(batch, seed, **kw)
        masked = txt_in == TXT_MASK
        loss, _ = diffusion_loss(forward_fn=logits_forward, params=logits, batch=batch,
                                 rng=jax.random.PRNGKey(seed), config=config(**kw))
        strata = (answer, pad) if masking == "separate" else (answer | pad,)
        row = 0.0
        for region in strata:
            k = (masked & region).sum(-1)
            w = region.sum(-1) / np.maximum(k, 1) if weighting == "count" else 1 / r
            row = row + (ce * masked * region * np.where(pad, pad_weight, 1.0)).sum(-1) * w
        np.testing.assert_allclose(float(loss), 0.6 * np.mean(row / L), rtol=1e-5)
        if pad_weight != 1.0:  # the weight changes the loss, never the masks
            same, _ = masked_inputs(batch, seed, **{**kw, "text_pad_weight": 1.0})
            np.testing.assert_array_equal(same, txt_in)


def test_answer_metrics_score_only_the_question_rows_answers():
    """``answer_ce``/``answer_acc`` average the masked answer words and eos of the rows with a
    question; caption rows, padding and question tokens never count."""
    batch = dict(vqa_batch(7))
    caption_row = 3
    batch["text_maskable"] = batch["text_maskable"].at[caption_row].set(True)
    pos = np.arange(L)[None, :]
    answer = (pos >= QUESTION_END[:, None]) & (pos <= EOS_AT[:, None])
    answer[caption_row] = False
    logits = jax.random.normal(jax.random.PRNGKey(4), (B, L, V_TXT))
    # make half of the question rows' answers right, so the accuracy is neither 0 nor 1
    logits = jnp.where(jnp.asarray(pos % 2 == 0)[..., None],
                       logits + 9.0 * jax.nn.one_hot(batch["text_ids"], V_TXT), logits)
    ce = token_ce(logits, batch["text_ids"])
    right = np.asarray(jnp.argmax(logits, -1) == batch["text_ids"])
    kw = dict(text_pad_is_target=True)
    accs = []
    for seed in range(6):
        txt_in, _ = masked_inputs(batch, seed, **kw)
        scored = (txt_in == TXT_MASK) & answer
        _, m = diffusion_loss(forward_fn=logits_forward, params=logits, batch=batch,
                              rng=jax.random.PRNGKey(seed), config=config(**kw))
        np.testing.assert_allclose(float(m["answer_ce"]), ce[scored].mean(), rtol=1e-5)
        np.testing.assert_allclose(float(m["answer_acc"]), right[scored].mean(), rtol=1e-6)
        accs.append(float(m["answer_acc"]))
    assert 0.0 < min(accs) < 1.0 or 0.0 < max(accs) < 1.0
    _, m = diffusion_loss(forward_fn=logits_forward, params=logits,
                          batch={k: v for k, v in batch.items() if k != "text_maskable"},
                          rng=jax.random.PRNGKey(0), config=config(**kw))
    assert "answer_ce" not in m and "answer_acc" not in m  # captions only: no answers


def test_text_pad_weight_is_validated():
    with pytest.raises(ValueError, match="text_pad_is_target=True"):
        config(text_pad_weight=0.1)
    with pytest.raises(ValueError, match="text_pad_weight=-1"):
        config(text_pad_is_target=True, text_pad_weight=-1.0)
    assert config(text_pad_is_target=True, text_pad_weight=0.0).text_pad_weight == 0.0


def test_separate_pad_masking_needs_padding_targets():
    with pytest.raises(ValueError, match="text_pad_is_target=True"):
        config(text_pad_masking="separate")
    with pytest.raises(ValueError, match="text_pad_masking must be one of"):
        config(text_pad_is_target=True, text_pad_masking="stratified")


def test_answer_padding_visible_keeps_question_rows_padding_unmasked():
    """``answer_padding_visible``: rows with a question prefix never mask their padding, a
    caption row (its whole text maskable, bos included) still does."""
    batch = dict(vqa_batch(6))
    maskable = np.asarray(batch["text_maskable"]).copy()
    maskable[0] = True  # row 0 is a caption row of a mixture
    batch["text_maskable"] = jnp.asarray(maskable)
    pad = np.arange(L)[None, :] > EOS_AT[:, None]
    hits = np.zeros(B, int)
    for seed in range(40):
        txt_in, _ = masked_inputs(batch, seed, text_pad_is_target=True,
                                  answer_padding_visible=True)
        hits += ((txt_in == TXT_MASK) & pad).sum(-1)
    assert hits[0] > 0 and (hits[1:] == 0).all()
