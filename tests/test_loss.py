"""Muddit loss: known answers with toy forwards, masking per split half, jit and gradients."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muddit_jax.diffusion.loss import LossConfig, diffusion_loss, make_loss_fn
from tests.helpers import assert_close

B, H, W, L = 4, 4, 4, 6
V_IMG, V_TXT = 10, 12
IMG_MASK, TXT_MASK = V_IMG, V_TXT  # like Muddit: the mask ids lie outside the predicted vocab
EMPTY = (1, 2, 0, 0, 0, 0)


def make_batch(seed: int = 0) -> dict[str, jnp.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.array([6, 4, 3, 5])
    valid = np.arange(L)[None, :] < lengths[:, None]
    text = np.where(valid, rng.integers(3, V_TXT, (B, L)), 0)
    return {
        "image_ids": jnp.asarray(rng.integers(0, V_IMG, (B, H, W)), jnp.int32),
        "text_ids": jnp.asarray(text, jnp.int32),
        "text_valid": jnp.asarray(valid),
        "micro_conds": jnp.zeros((B, 5), jnp.float32),
    }


def config(**kw) -> LossConfig:
    base = dict(image_mask_id=IMG_MASK, text_mask_id=TXT_MASK, empty_text_ids=EMPTY)
    return LossConfig(**{**base, **kw})


class Recorder:
    """A forward that records its (concrete) inputs and ``generated_rows`` and returns logits
    from ``logits_of``."""

    def __init__(self, logits_of):
        self.logits_of = logits_of
        self.calls: list[tuple[np.ndarray, ...]] = []
        self.rows: list[int | None] = []

    def __call__(self, params, image_ids, text_ids, timestep, micro_conds, generated_rows):
        self.calls.append(tuple(np.asarray(x) for x in (image_ids, text_ids, timestep)))
        self.rows.append(generated_rows)
        return self.logits_of(params, image_ids, text_ids, timestep)


def uniform_logits(params, image_ids, text_ids, timestep):
    b = image_ids.shape[0]
    return jnp.zeros((b, H, W, V_IMG)), jnp.zeros((b, L, V_TXT))


def run(forward, batch, seed=0, params=None, **kw):
    """Eager loss; ``forward`` is a Recorder or a 4-argument ``(params, image, text, t)`` toy."""
    fwd = forward if isinstance(forward, Recorder) else Recorder(forward)
    return diffusion_loss(
        forward_fn=fwd,
        params=params,
        batch=batch,
        rng=jax.random.PRNGKey(seed),
        config=config(**kw),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uniform_logits_exact_value(seed: int) -> None:
    batch = make_batch(seed)
    fwd = Recorder(uniform_logits)
    loss, m = run(fwd, batch, seed=seed, text_loss_weight=0.6)
    img_in, txt_in, t = fwd.calls[0]
    img_masked = (img_in == IMG_MASK).reshape(B, -1).sum(-1)
    txt_masked = (txt_in == TXT_MASK).sum(-1)
    r = np.maximum(t, 1e-3)
    img_per = math.log(V_IMG) * img_masked / (H * W) / r
    txt_per = math.log(V_TXT) * txt_masked / L / r
    exp_img, exp_txt = img_per[:2].mean(), txt_per[2:].mean()
    assert_close(m["image_loss"], exp_img, 1e-5)
    assert_close(m["text_loss"], exp_txt, 1e-5)
    assert_close(loss, exp_img + 0.6 * exp_txt, 1e-5)
    # exactly round(n * r) tokens masked, with n = h*w for images and n_valid for text
    n_valid = np.asarray(batch["text_valid"]).sum(-1)
    exp_img_n = np.maximum(np.round(np.float32(H * W) * t[:2]), 1)
    exp_txt_n = np.clip(np.round(n_valid[2:].astype(np.float32) * t[2:]), 1, n_valid[2:])
    np.testing.assert_array_equal(img_masked[:2], exp_img_n)
    np.testing.assert_array_equal(txt_masked[2:], exp_txt_n)
    assert_close(m["image_mask_ratio"], t[:2].mean(), 1e-6)
    assert_close(m["text_mask_ratio"], t[2:].mean(), 1e-6)


def test_perfect_prediction_gives_zero_and_full_accuracy() -> None:
    batch = make_batch()
    truth = (batch["image_ids"], batch["text_ids"])

    def perfect(params, image_ids, text_ids, timestep):
        img, txt = params
        return 1e4 * jax.nn.one_hot(img, V_IMG), 1e4 * jax.nn.one_hot(txt, V_TXT)

    loss, m = run(Recorder(perfect), batch, params=truth)
    assert float(loss) < 1e-6
    assert float(m["image_acc"]) == 1.0 and float(m["text_acc"]) == 1.0


def test_text_loss_weight_scales_linearly() -> None:
    batch = make_batch()
    rand = lambda p, i, t, ts: (  # noqa: E731
        jax.random.normal(jax.random.PRNGKey(7), (B, H, W, V_IMG)),
        jax.random.normal(jax.random.PRNGKey(8), (B, L, V_TXT)),
    )
    l0, m0 = run(rand, batch, text_loss_weight=0.0)
    l1, _ = run(rand, batch, text_loss_weight=1.0)
    l25, _ = run(rand, batch, text_loss_weight=2.5)
    assert float(m0["text_loss"]) > 0.1
    assert_close(l0, m0["image_loss"], 1e-6)
    assert_close(l1, m0["image_loss"] + m0["text_loss"], 1e-6)
    assert_close(l25, m0["image_loss"] + 2.5 * m0["text_loss"], 1e-6)


@pytest.mark.parametrize("mode", ["split", "joint"])
def test_visible_positions_never_contribute(mode: str) -> None:
    batch = make_batch(3)
    base_img = jax.random.normal(jax.random.PRNGKey(1), (B, H, W, V_IMG))
    base_txt = jax.random.normal(jax.random.PRNGKey(2), (B, L, V_TXT))
    other_img = 50.0 * jax.random.normal(jax.random.PRNGKey(3), (B, H, W, V_IMG))
    other_txt = 50.0 * jax.random.normal(jax.random.PRNGKey(4), (B, L, V_TXT))

    def fwd_a(p, img, txt, t):
        return base_img, base_txt

    def fwd_b(p, img, txt, t):  # different logits wherever the input is visible
        return (
            jnp.where((img == IMG_MASK)[..., None], base_img, other_img),
            jnp.where((txt == TXT_MASK)[..., None], base_txt, other_txt),
        )

    la, ma = run(fwd_a, batch, seed=5, mode=mode)
    lb, mb = run(fwd_b, batch, seed=5, mode=mode)
    assert_close(lb, la, 1e-6)
    for k in ("image_loss", "text_loss", "image_acc", "text_acc"):
        assert_close(mb[k], ma[k], 1e-6, what=k)
    # ... while changing a masked position's logits does change the loss
    lc, _ = run(lambda p, i, t, ts: (base_img, other_txt), batch, seed=5, mode=mode)
    assert abs(float(lc) - float(la)) > 1e-3


def test_split_halves_mask_the_right_modality() -> None:
    batch = make_batch(4)
    fwd = Recorder(uniform_logits)
    run(fwd, batch, seed=11, cond_dropout=0.0)
    img_in, txt_in, t = fwd.calls[0]
    img_m, txt_m = img_in == IMG_MASK, txt_in == TXT_MASK
    ids, txt = np.asarray(batch["image_ids"]), np.asarray(batch["text_ids"])
    valid = np.asarray(batch["text_valid"])
    # T2I half: image masked, text clean; I2T half: text masked (valid positions only), image clean
    assert img_m[:2].reshape(2, -1).sum(-1).min() >= 1 and not img_m[2:].any()
    assert not txt_m[:2].any() and txt_m[2:].sum(-1).min() >= 1
    assert not np.any(txt_m & ~valid)
    np.testing.assert_array_equal(txt_in[:2], txt[:2])
    np.testing.assert_array_equal(img_in[2:], ids[2:])
    np.testing.assert_array_equal(np.where(img_m, ids, img_in), ids)
    assert fwd.rows == [2]  # the model is told which rows generate their image
    np.testing.assert_array_equal(np.where(txt_m, txt, txt_in), txt)
    assert t.shape == (B,) and np.all((t >= 0) & (t <= 1))


@pytest.mark.parametrize("floor", [0.5, 1.0])
def test_image_min_mask_rate_floors_the_image_ratio_only(floor: float) -> None:
    """The image ratio (fed as the T2I rows' timestep) is floored; the text ratio is not: over
    seeds the I2T rows still mask fewer than half their text positions some of the time."""
    batch = make_batch(4)
    valid = np.asarray(batch["text_valid"])[2:]
    text_fractions = []
    for seed in range(12):
        fwd = Recorder(uniform_logits)
        _, m = run(fwd, batch, seed=seed, cond_dropout=0.0, image_min_mask_rate=floor)
        img_in, txt_in, t = fwd.calls[0]
        img_masked = (img_in[:2] == IMG_MASK).reshape(2, -1).mean(-1)
        assert np.all(t[:2] >= floor) and np.all(img_masked >= floor - 1 / (H * W))
        assert float(m["image_mask_ratio"]) >= floor
        if floor == 1.0:  # every seed, not only the last
            assert img_masked.tolist() == [1.0, 1.0]
        text_fractions += list((txt_in[2:] == TXT_MASK).sum(-1) / valid.sum(-1))
    assert min(text_fractions) < 0.5
    with pytest.raises(ValueError, match=r"image_min_mask_rate=1.5 must be in \[0, 1\]"):
        config(image_min_mask_rate=1.5)


def test_image_full_mask_prob_masks_whole_rows_and_keeps_the_other_draws() -> None:
    """Each T2I row masks its whole image (timestep 1) with the given probability; a row it
    leaves alone gets exactly the mask and timestep that the default draws, as do the I2T rows."""
    batch = make_batch(4)
    full_rows = []
    for seed in range(16):
        base, mixed = Recorder(uniform_logits), Recorder(uniform_logits)
        run(base, batch, seed=seed, cond_dropout=0.0)
        run(mixed, batch, seed=seed, cond_dropout=0.0, image_full_mask_prob=0.5)
        (img0, txt0, t0), (img1, txt1, t1) = base.calls[0], mixed.calls[0]
        full = t1[:2] == 1.0
        assert np.all(img1[:2][full] == IMG_MASK)
        np.testing.assert_array_equal(img1[:2][~full], img0[:2][~full])
        np.testing.assert_array_equal(t1[:2][~full], t0[:2][~full])
        np.testing.assert_array_equal(txt1, txt0)
        np.testing.assert_array_equal(img1[2:], img0[2:])
        full_rows += full.tolist()
    assert 0.25 < np.mean(full_rows) < 0.75
    every = Recorder(uniform_logits)
    run(every, batch, seed=0, cond_dropout=0.0, image_full_mask_prob=1.0)
    assert np.all(every.calls[0][0][:2] == IMG_MASK)
    with pytest.raises(ValueError, match=r"image_full_mask_prob=-0.1 must be in \[0, 1\]"):
        config(image_full_mask_prob=-0.1)
    for fully in ({"image_full_mask_prob": 0.5}, {"image_min_mask_rate": 1.0}):
        with pytest.raises(ValueError, match=r"weighting='elbo' .* which is 0"):
            config(weighting="elbo", **fully)
        config(weighting="elbo", schedule="linear", **fully)  # weight 1 at r = 1: allowed


def test_condition_dropout_only_on_t2i_rows() -> None:
    batch = make_batch(5)
    fwd = Recorder(uniform_logits)
    run(fwd, batch, seed=3, cond_dropout=1.0)
    _, txt_in, _ = fwd.calls[0]
    np.testing.assert_array_equal(txt_in[:2], np.array([EMPTY, EMPTY]))
    txt = np.asarray(batch["text_ids"])
    np.testing.assert_array_equal(np.where(txt_in[2:] == TXT_MASK, txt[2:], txt_in[2:]), txt[2:])
    # statistically: p = 0.5 drops about half of the T2I rows
    drops = []
    for s in range(60):
        f = Recorder(uniform_logits)
        run(f, batch, seed=s, cond_dropout=0.5)
        drops.append((f.calls[0][1][:2] == np.array(EMPTY)).all(-1))
    assert 0.3 < np.mean(drops) < 0.7


def test_pad_positions_are_targets_only_when_configured() -> None:
    batch = make_batch(6)
    pad = ~np.asarray(batch["text_valid"])
    hit_default, hit_flag = 0, 0
    for s in range(20):
        f = Recorder(uniform_logits)
        run(f, batch, seed=s)
        hit_default += int(((f.calls[0][1] == TXT_MASK) & pad).sum())
        g = Recorder(uniform_logits)
        run(g, batch, seed=s, text_pad_is_target=True)
        hit_flag += int(((g.calls[0][1] == TXT_MASK) & pad).sum())
    assert hit_default == 0 and hit_flag > 0


def test_elbo_weighting_relates_to_muddit_weighting() -> None:
    batch = make_batch(7)
    fm, fe = Recorder(uniform_logits), Recorder(uniform_logits)
    _, mm = run(fm, batch, seed=2)
    _, me = run(fe, batch, seed=2, weighting="elbo")
    img_in, txt_in, r = fm.calls[0]
    np.testing.assert_array_equal(fe.calls[0][0], img_in)  # same masks, only the weight differs
    # cosine: w_elbo = (pi/2) sqrt(1 - r^2) / r  vs  w_muddit = 1 / r
    w_e = (math.pi / 2) * np.sqrt(1 - r.astype(np.float64) ** 2) / np.maximum(r, 1e-3)
    per_img = math.log(V_IMG) * (img_in == IMG_MASK).reshape(B, -1).sum(-1) / (H * W)
    per_txt = math.log(V_TXT) * (txt_in == TXT_MASK).sum(-1) / L
    assert_close(me["image_loss"], (per_img * w_e)[:2].mean(), 1e-4)
    assert_close(me["text_loss"], (per_txt * w_e)[2:].mean(), 1e-4)
    assert_close(mm["image_loss"], (per_img / np.maximum(r, 1e-3))[:2].mean(), 1e-5)


@pytest.mark.parametrize("seed", [0, 3])
def test_count_weighting_uses_the_realised_mask_fraction(seed: int) -> None:
    """``weighting="count"``: ``n_maskable / n_masked`` per row, so a one-token answer region
    (always exactly one token masked) weighs its CE the same at every ``r``, where the Muddit
    weight ``1 / r`` varies up to 1000x."""
    batch = make_batch(seed)
    answer = np.zeros((B, L), bool)
    answer[:, 2] = True  # one maskable text token per row
    batch["text_maskable"] = jnp.asarray(answer)
    f = Recorder(uniform_logits)
    _, m = run(f, batch, seed=seed, weighting="count")
    img_in, txt_in, r = f.calls[0]
    n_img = (img_in == IMG_MASK).reshape(B, -1).sum(-1)
    np.testing.assert_array_equal((txt_in == TXT_MASK)[2:], answer[2:])
    # image rows: (h*w / k) * k * log V / (h*w) = log V whatever r; text rows: (1/1) log V / L
    assert np.all(n_img[:2] >= 1)
    assert_close(m["image_loss"], math.log(V_IMG), 1e-5)
    assert_close(m["text_loss"], math.log(V_TXT) / L, 1e-5)
    _, mm = run(Recorder(uniform_logits), batch, seed=seed)
    assert_close(mm["text_loss"], (math.log(V_TXT) / L / np.maximum(r, 1e-3))[2:].mean(), 1e-5)


def test_joint_mode_masks_both_modalities_in_every_row() -> None:
    batch = make_batch(8)
    f = Recorder(uniform_logits)
    loss, m = run(f, batch, seed=4, mode="joint", cond_dropout=0.0)
    img_in, txt_in, t = f.calls[0]
    assert f.rows == [None]  # every row generates both modalities
    assert (img_in == IMG_MASK).reshape(B, -1).sum(-1).min() >= 1
    assert (txt_in == TXT_MASK).sum(-1).min() >= 1
    n_img = (img_in == IMG_MASK).reshape(B, -1).sum(-1)
    np.testing.assert_array_equal(n_img, np.maximum(np.round(np.float32(H * W) * t), 1))
    # joint condition dropout masks the whole valid text
    g = Recorder(uniform_logits)
    run(g, batch, seed=4, mode="joint", cond_dropout=1.0)
    np.testing.assert_array_equal(g.calls[0][1] == TXT_MASK, np.asarray(batch["text_valid"]))


def test_odd_batch_and_bad_empty_ids_raise() -> None:
    batch = {k: v[:3] for k, v in make_batch().items()}
    with pytest.raises(ValueError):
        run(uniform_logits, batch)
    with pytest.raises(ValueError):
        run(uniform_logits, make_batch(), empty_text_ids=(1, 2))
    with pytest.raises(ValueError):
        config(mode="both")


class ToyModel:
    """A tiny differentiable forward: embeddings + timestep -> logits."""

    @staticmethod
    def init(key):
        k = jax.random.split(key, 4)
        return {
            "img_emb": jax.random.normal(k[0], (V_IMG + 1, 8)),
            "txt_emb": jax.random.normal(k[1], (V_TXT + 1, 8)),
            "img_out": jax.random.normal(k[2], (8, V_IMG)) * 0.3,
            "txt_out": jax.random.normal(k[3], (8, V_TXT)) * 0.3,
        }

    @staticmethod
    def forward(p, image_ids, text_ids, timestep, micro_conds, generated_rows=None):
        hi = p["img_emb"][image_ids] + timestep[:, None, None, None]
        ht = p["txt_emb"][text_ids] + hi.mean((1, 2))[:, None, :]
        return jnp.tanh(hi) @ p["img_out"], jnp.tanh(ht) @ p["txt_out"]


@pytest.mark.parametrize("weighting", ["muddit", "elbo", "count"])
def test_jit_matches_eager_and_grads_finite(weighting: str) -> None:
    batch = make_batch(9)
    params = ToyModel.init(jax.random.PRNGKey(0))
    cfg = config(weighting=weighting, mode="split")
    loss_fn = make_loss_fn(ToyModel.forward, cfg)
    rng = jax.random.PRNGKey(3)
    eager, _ = loss_fn(params, batch, rng)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (jitted, metrics), grads = grad_fn(params, batch, rng)
    assert_close(jitted, eager, 1e-5)
    assert set(metrics) == {
        "loss", "image_loss", "text_loss", "image_acc", "text_acc",
        "image_mask_ratio", "text_mask_ratio",
    }
    assert all(m.shape == () for m in metrics.values())
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads["txt_out"]).sum()) > 0 and float(jnp.abs(grads["img_out"]).sum()) > 0


def test_config_is_hashable_static() -> None:
    cfg = config()
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    assert cfg.min_mask_rate == 0.0 and cfg.text_loss_weight == 0.6


def _grads(params, batch, metric="loss", **kw):
    """Gradient of one metric of the split loss (the same masks for every ``kw``)."""
    def f(p):
        return diffusion_loss(forward_fn=ToyModel.forward, params=p, batch=batch,
                              rng=jax.random.PRNGKey(5), config=config(**kw))[1][metric]
    return jax.value_and_grad(f)(params)


def test_t2i_stop_gradient_leaves_matched_params_to_the_other_rows() -> None:
    batch, params = make_batch(2), ToyModel.init(jax.random.PRNGKey(1))
    on = dict(text_loss_weight=1.0, t2i_stop_gradient="img_emb, txt_.*")
    loss_on, g_on = _grads(params, batch, **on)
    loss_off, g_off = _grads(params, batch, text_loss_weight=1.0)
    _, g_text = _grads(params, batch, "text_loss", text_loss_weight=1.0)
    assert_close(loss_on, loss_off, 1e-6)  # the same forward, split in two
    # matched leaves learn from the captioning rows alone; the rest from every row, as before
    for name in ("img_emb", "txt_emb", "txt_out"):
        assert_close(g_on[name], g_text[name], 1e-6)
    assert_close(g_on["img_out"], g_off["img_out"], 1e-6)
    assert float(jnp.abs(g_off["img_emb"] - g_text["img_emb"]).max()) > 1e-4
    assert float(jnp.abs(g_on["img_emb"]).max()) > 1e-4  # the text rows still reach it
    # the two forwards are told that all of the first's rows and none of the second's generate
    fwd = Recorder(lambda p, *inputs: ToyModel.forward(p, *inputs, None))
    run(fwd, batch, params=params, **on)
    assert fwd.rows == [B // 2, 0] and [len(c[0]) for c in fwd.calls] == [B // 2, B - B // 2]


def test_t2i_stop_gradient_with_only_t2i_rows_and_bad_settings() -> None:
    batch, params = make_batch(3), ToyModel.init(jax.random.PRNGKey(2))
    _, g = _grads(params, batch, t2i_fraction=1.0, t2i_stop_gradient="img_emb")
    assert float(jnp.abs(g["img_emb"]).max()) == 0.0
    assert float(jnp.abs(g["img_out"]).max()) > 0.0
    with pytest.raises(ValueError, match="loss.t2i_stop_gradient: 'mmdit/.*' matches no"):
        _grads(params, batch, t2i_stop_gradient="mmdit/.*")
    with pytest.raises(ValueError, match="needs mode='split'"):
        config(mode="joint", t2i_stop_gradient="img_emb")
