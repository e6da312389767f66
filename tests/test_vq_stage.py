"""Stage 1 (VQ tokenizer training): EMA codebook, dead-code restart, learned codebook, metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muddit_jax.models.vq import VQConfig, VQModel
from muddit_jax.train import vq_stage
from muddit_jax.train.config import base_config

N_CODES = 16


def _config(**vq):
    c = base_config()
    c.vq.update({"steps": 10, "global_batch": 4, "lr": 1e-3, "warmup_steps": 0,
                 "restart_every": 0, "dead_after": 3, **vq})
    return c


def _vq() -> VQConfig:
    return VQConfig(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                    norm_num_groups=4, num_vq_embeddings=N_CODES, mid_block_add_attention=False)


def _images(seed: int, n: int = 4) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (n, 8, 8, 3))


def _latents(run: vq_stage.VQRun, state, images) -> np.ndarray:
    z = run.model.apply({"params": state.params["vq"]}, images, method=VQModel.encode_latents)
    return np.asarray(z).reshape(-1, z.shape[-1])


def test_code_stats_and_ema_codebook_match_numpy() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 5, (3, 4))
    z = rng.normal(size=(12, 2)).astype(np.float32)
    counts, sums = vq_stage.code_stats(jnp.asarray(codes), jnp.asarray(z), 6)
    np.testing.assert_array_equal(counts, np.bincount(codes.ravel(), minlength=6))
    for k in range(6):
        np.testing.assert_allclose(sums[k], z[codes.ravel() == k].sum(0), atol=1e-6)
    book = vq_stage.ema_codebook(counts, sums)
    used = np.asarray(counts) > 0
    np.testing.assert_allclose(np.asarray(book)[used],
                               np.asarray(sums)[used] / np.asarray(counts)[used, None], rtol=1e-4)


def test_step0_seeds_every_code_from_batch_latents_then_ema_updates() -> None:
    run = vq_stage.build(_config(), _vq(), resolution=8)
    state = run.init(0)
    x0 = _images(1)
    z0 = _latents(run, state, x0)
    state, m0 = run.step(state, {"images": x0})
    book = np.asarray(state.params["vq"]["codebook"]["embedding"])
    # every row is one of the step-0 latents (codebook initialised on the data)
    dist = ((book[:, None] - z0[None]) ** 2).sum(-1).min(1)
    assert dist.max() < 1e-10 and m0["restarted"] == N_CODES
    # step 1 (no restart): rows follow the EMA statistics, idle counts unused codes
    x1 = _images(2)
    z1 = _latents(run, state, x1)
    codes = np.asarray(run.model.apply({"params": state.params["vq"]}, x1,
                                       method=VQModel.encode)).ravel()
    prev_cluster, prev_sum = np.asarray(state.cluster_size), np.asarray(state.embed_sum)
    state, m1 = run.step(state, {"images": x1})  # (the old state is donated)
    counts, sums = vq_stage.code_stats(jnp.asarray(codes), jnp.asarray(z1), N_CODES)
    d = 0.99
    cluster = d * prev_cluster + (1 - d) * np.asarray(counts)
    esum = d * prev_sum + (1 - d) * np.asarray(sums)
    np.testing.assert_allclose(state.cluster_size, cluster, rtol=1e-5)
    np.testing.assert_allclose(state.params["vq"]["codebook"]["embedding"],
                               vq_stage.ema_codebook(jnp.asarray(cluster), jnp.asarray(esum)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(state.idle, np.where(np.asarray(counts) > 0, 0, 1))
    assert m1["restarted"] == 0
    assert float(m1["usage"]) == pytest.approx(len(set(codes)) / N_CODES)
    # the codebook gets no AdamW state in EMA mode (its gradient is zeroed)
    mu = state.opt_state[1][0].mu["vq"]["codebook"]["embedding"]
    assert float(jnp.abs(mu).max()) == 0.0


def test_dead_codes_restart_from_batch_latents_and_live_codes_stay() -> None:
    run = vq_stage.build(_config(restart_every=2), _vq(), resolution=8)
    state = run.init(0)
    state, _ = run.step(state, {"images": _images(1)})  # step 0: seeded
    state, _ = run.step(state, {"images": _images(2)})  # step 1: no restart (odd)
    x = jnp.full((4, 8, 8, 3), 0.5)  # a flat batch uses few codes
    z = _latents(run, state, x)
    used = np.unique(np.asarray(run.model.apply({"params": state.params["vq"]}, x,
                                                method=VQModel.encode)))
    dead = np.setdiff1d(np.arange(N_CODES), used)[:4]  # idle long enough and unused now
    assert len(dead) == 4
    idle = np.zeros(N_CODES, np.int32)
    idle[dead] = 5  # >= dead_after = 3
    state = state.replace(idle=jnp.asarray(idle))
    before = np.asarray(state.params["vq"]["codebook"]["embedding"]).copy()
    state, m = run.step(state, {"images": x})  # step 2: restart due
    book = np.asarray(state.params["vq"]["codebook"]["embedding"])
    dist = ((book[:, None] - z[None]) ** 2).sum(-1).min(1)
    assert m["restarted"] == 4 and dist[dead].max() < 1e-10
    assert (np.asarray(state.idle)[dead] == 0).all()
    assert np.asarray(state.cluster_size)[dead].tolist() == [1.0] * 4
    assert np.abs(book[dead] - before[dead]).max() > 1e-6


def test_learned_codebook_moves_by_gradient_and_training_improves_psnr() -> None:
    run = vq_stage.build(_config(codebook="learned", lr=3e-3), _vq(), resolution=8)
    state = run.init(0)
    x = _images(7, n=4)
    state, first = run.step(state, {"images": x})
    book1 = np.asarray(state.params["vq"]["codebook"]["embedding"])
    for _ in range(25):
        state, last = run.step(state, {"images": x})
    book2 = np.asarray(state.params["vq"]["codebook"]["embedding"])
    assert np.abs(book2 - book1).max() > 1e-4
    mu = state.opt_state[1][0].mu["vq"]["codebook"]["embedding"]
    assert float(jnp.abs(mu).max()) > 0.0
    assert float(last["psnr"]) > float(first["psnr"]) + 1.0


def test_evaluate_reports_psnr_usage_and_perplexity() -> None:
    run = vq_stage.build(_config(), _vq(), resolution=8)
    params = run.init(0).params["vq"]
    images = np.asarray(_images(4, n=6))
    metrics, recon = vq_stage.evaluate(run.model, params, images, batch=4)
    codes = np.asarray(run.model.apply({"params": params}, images, method=VQModel.encode))
    assert metrics["usage"] == pytest.approx(len(np.unique(codes)) / N_CODES)
    assert recon.shape == (6, 8, 8, 3)  # every image, whatever the batch
    whole, recon6 = vq_stage.evaluate(run.model, params, images, batch=6)
    np.testing.assert_allclose(recon6, recon, atol=1e-6)
    assert 0.0 <= recon.min() and recon.max() <= 1.0
    mse = ((recon - images) ** 2).mean(axis=(1, 2, 3))
    assert metrics["psnr"] == pytest.approx(float(np.mean(-10 * np.log10(mse))), rel=1e-5)
    assert whole["psnr"] == pytest.approx(metrics["psnr"], rel=1e-5)


def test_bad_vq_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="vq.codebook"):
        vq_stage.validate(_config(codebook="kmeans").vq)
    with pytest.raises(ValueError, match="vq.restart_from='worst'"):
        vq_stage.validate(_config(restart_from="worst").vq)


def test_restart_draw_is_uniform_or_proportional_to_quantization_error() -> None:
    # 4 latents: two exactly on their code, two off by squared distance 1 and 3
    latents = jnp.array([[0.0, 0.0], [1.0, 1.0], [2.0, 1.0], [3.0, 3.0 + 3**0.5]])
    assigned = jnp.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [3.0, 3.0]])
    key = jax.random.key(0)
    by_error = np.asarray(vq_stage.restart_draw(key, latents, assigned, 20000, True))
    freq = np.bincount(by_error, minlength=4) / by_error.size
    np.testing.assert_allclose(freq, [0.0, 0.0, 0.25, 0.75], atol=0.015)
    uniform = np.asarray(vq_stage.restart_draw(key, latents, assigned, 20000, False))
    np.testing.assert_allclose(np.bincount(uniform, minlength=4) / 20000, [0.25] * 4, atol=0.015)


def test_error_restart_reseeds_dead_codes_on_the_worst_represented_latents() -> None:
    mean_err = {}
    for mode in ("random", "error"):
        run = vq_stage.build(_config(restart_every=1, dead_after=1, restart_from=mode), _vq(),
                             resolution=8)
        state, _ = run.step(run.init(0), {"images": _images(1)})  # step 0: every code seeded
        x = jnp.concatenate([jnp.full((3, 8, 8, 3), 0.5), _images(3, n=1)])  # mostly flat
        z = _latents(run, state, x)
        book = np.asarray(state.params["vq"]["codebook"]["embedding"])
        dist = ((z[:, None] - book[None]) ** 2).sum(-1)
        err, used = dist.min(1), np.unique(dist.argmin(1))
        dead = np.setdiff1d(np.arange(N_CODES), used)
        state = state.replace(idle=jnp.full((N_CODES,), 5, jnp.int32))
        state, m = run.step(state, {"images": x})
        new = np.asarray(state.params["vq"]["codebook"]["embedding"])[dead]
        src = ((new[:, None] - z[None]) ** 2).sum(-1).argmin(1)
        assert m["restarted"] == len(dead) >= 3
        np.testing.assert_allclose(new, z[src], atol=1e-6)  # re-seeded on this batch's latents
        mean_err[mode] = err[src].mean() / err.mean()
    # uniform draws follow the (flat, well represented) mass; error draws the worst latents
    assert mean_err["error"] > 2.0 * max(mean_err["random"], 1.0), mean_err


@pytest.mark.parametrize("encoder", ["patch", "diffusers"])
def test_patch_encoder_codes_depend_only_on_their_own_pixels(encoder: str) -> None:
    import dataclasses

    config = dataclasses.replace(_vq(), encoder=encoder)
    model = VQModel(config)
    params = model.init(jax.random.key(0), _images(0, 1))["params"]
    x = np.asarray(_images(1, 2))
    outside = x.copy()
    outside[:, 2:, :, :] = 1.0 - outside[:, 2:, :, :]  # every pixel but the top row of patches
    inside = x.copy()
    inside[:, 0, 0, :] = 1.0 - inside[:, 0, 0, :]  # one pixel of patch (0, 0)

    def latents(img):
        return np.asarray(model.apply({"params": params}, img, method=VQModel.encode_latents))

    z, z_out, z_in = latents(x), latents(outside), latents(inside)
    assert z.shape == (2, 4, 4, 4)
    same_patch_unchanged = np.array_equal(z[:, 0], z_out[:, 0])
    assert same_patch_unchanged == (encoder == "patch")  # a diffusers encoder sees context
    assert not np.allclose(z[:, 0, 0], z_in[:, 0, 0])
    if encoder == "patch":  # the other patches of the row did not see the changed pixel
        np.testing.assert_array_equal(z[:, 0, 1:], z_in[:, 0, 1:])
        with pytest.raises(ValueError, match="encoder='patch'"):
            config.to_hf_config()
    with pytest.raises(ValueError, match="encoder must be one of"):
        dataclasses.replace(config, encoder="conv")


def test_recon_detector_score_is_the_t2i_ceiling_of_the_reconstructions() -> None:
    from muddit_jax.data import shapes
    from muddit_jax.train.stages import recon_detector_score

    config = shapes.ShapesConfig(resolution=32, max_objects=3, textures=("plain",))
    exs = [shapes.generate(config, "test", i) for i in range(12)]
    examples = [dict(image=e.image, objects=[dict(color=o.color, shape=o.shape, size=o.size,
                                                  bbox=list(o.bbox)) for o in e.scene.objects])
                for e in exs]
    exact = np.stack([e.image for e in exs])
    assert recon_detector_score(examples, exact) == 1.0  # perfect reconstructions
    # another image's reconstruction does not pass for this one's objects
    assert recon_detector_score(examples, np.roll(exact, 1, axis=0)) < 0.2
    assert recon_detector_score([dict(image=exs[0].image)], exact[:1]) is None
