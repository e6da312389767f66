"""Compiled MaskGIT/Muddit sampler: schedule of reveals, fixed tokens, CFG, NumPy reference step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muddit_jax.diffusion.sampler import (
    SamplerConfig,
    classifier_free_guidance,
    denoise_step,
    make_sampler,
    model_timestep,
    num_to_remask,
    sample,
)
from tests.helpers import assert_close

B, N, V, T = 3, 24, 16, 8
MASK = V  # outside the predicted vocab, like Muddit's image mask id


def table(seed: int, b: int = B, n: int = N, v: int = V) -> jnp.ndarray:
    return 3.0 * jax.random.normal(jax.random.PRNGKey(seed), (b, n, v))


def static_fn(ctx, tokens, timestep):
    """Logits independent of the tokens: ``ctx['table'] [b, n, V]``."""
    return ctx["table"]


def dynamic_fn(ctx, tokens, timestep):
    """Logits that depend on the current tokens and the timestep."""
    seen = jnp.take(ctx["mix"], jnp.minimum(tokens, ctx["mix"].shape[0] - 1), axis=0)
    seen = seen * (tokens != MASK)[..., None]
    ctx_mean = seen.mean(1, keepdims=True)
    return ctx["table"] + ctx_mean + timestep[:, None, None]


def dyn_ctx(seed: int) -> dict:
    return {"table": table(seed), "mix": jax.random.normal(jax.random.PRNGKey(seed + 100), (V, V))}


def cfg(**kw) -> SamplerConfig:
    return SamplerConfig(**{"num_steps": T, "mask_id": MASK, **kw})


def expected_masked_counts(n: int, start: int, steps: int, base: int | None = None) -> list[int]:
    """Number of masked tokens after each step, by the upstream recurrence (float32 ratio)."""
    base = n if base is None else base
    counts, m = [], start
    for i in range(steps - 1):
        ratio = np.float32(i + 1) / np.float32(steps)
        r = np.cos(np.float32(np.pi / 2) * ratio, dtype=np.float32)
        x = np.float32(base) * r
        assert abs(x - np.round(x)) > 1e-3, "test grid lies on a rounding boundary"
        m = max(1, min(m - 1, int(np.floor(x))))
        counts.append(m)
    return counts + [0]


def test_final_state_has_no_masks_and_history_follows_schedule() -> None:
    sampler = make_sampler(dynamic_fn, cfg(), return_history=True)
    tokens = jnp.zeros((B, N), jnp.int32)
    final, hist = sampler(dyn_ctx(0), tokens, jnp.zeros((B, N), bool), jax.random.PRNGKey(0))
    final, hist = np.asarray(final), np.asarray(hist)
    assert hist.shape == (T, B, N)
    np.testing.assert_array_equal(hist[-1], final)
    assert not np.any(final == MASK) and final.min() >= 0 and final.max() < V
    masked = (hist == MASK).sum(-1)  # [T, B]
    exp = expected_masked_counts(N, N, T)
    for b in range(B):
        assert list(masked[:, b]) == exp
    # once revealed a token never changes again
    for i in range(1, T):
        was = hist[i - 1] != MASK
        np.testing.assert_array_equal(hist[i][was], hist[i - 1][was])


@pytest.mark.parametrize("base", ["length", "unknown"])
def test_fixed_tokens_never_change(base: str) -> None:
    rng = np.random.default_rng(0)
    fixed = np.zeros((B, N), bool)
    fixed[:, :5] = True  # e.g. a VQA question prefix
    given = rng.integers(0, V, (B, N))
    sampler = make_sampler(dynamic_fn, cfg(mask_len_base=base), return_history=True)
    key = jax.random.PRNGKey(1)
    final, hist = sampler(dyn_ctx(1), jnp.asarray(given, jnp.int32), jnp.asarray(fixed), key)
    hist = np.asarray(hist)
    for i in range(T):
        np.testing.assert_array_equal(hist[i][fixed], given[fixed])
    assert not np.any(np.asarray(final) == MASK)
    n_free = N - 5
    exp = expected_masked_counts(N, n_free, T, base=N if base == "length" else n_free)
    assert list((hist == MASK).sum(-1)[:, 0]) == exp


def test_classifier_free_guidance_formula_and_scale_one() -> None:
    cond, uncond = table(1), table(2)
    ctx = {"both": jnp.concatenate([cond, uncond])}

    def doubled(c, tokens, t):
        assert tokens.shape[0] == 2 * B and t.shape == (2 * B,)
        return c["both"]

    toks, t = jnp.zeros((B, N), jnp.int32), jnp.zeros((B,))
    guided3 = classifier_free_guidance(doubled, 3.0)(ctx, toks, t)
    assert_close(guided3, uncond + 3.0 * (cond - uncond), 1e-5)
    guided1 = classifier_free_guidance(doubled, 1.0)(ctx, toks, t)
    np.testing.assert_array_equal(np.asarray(guided1), np.asarray(cond))

    # whole sampler: guidance_scale=1 on the doubled function == no guidance on the cond function
    key = jax.random.PRNGKey(5)
    zeros, free = jnp.zeros((B, N), jnp.int32), jnp.zeros((B, N), bool)
    guided = make_sampler(doubled, cfg(guidance_scale=1.0))(ctx, zeros, free, key)
    plain = make_sampler(static_fn, cfg())({"table": cond}, zeros, free, key)
    np.testing.assert_array_equal(np.asarray(guided), np.asarray(plain))
    strong = make_sampler(doubled, cfg(guidance_scale=5.0))(ctx, zeros, free, key)
    assert np.any(np.asarray(strong) != np.asarray(plain))


def test_guidance_plausibility_keeps_only_what_the_conditional_allows() -> None:
    """Guidance can promote a code both branches rule out (here the uncond branch rules it out
    harder); the plausibility constraint keeps guided logits only on codes with at least
    ``a`` times the conditional top probability, and ``a = 0`` is plain guidance bit for bit."""
    cond = jnp.asarray([[[0.0, -1.0, -5.0, 3.0]]])  # id 3 = the mask id: never plausible
    uncond = jnp.asarray([[[0.0, -1.0, -9.0, 3.0]]])
    ctx = {"both": jnp.concatenate([cond, uncond])}
    toks, t = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,))
    c = SamplerConfig(num_steps=T, mask_id=3, guidance_scale=4.0)
    plain = classifier_free_guidance(lambda c_, x, t_: c_["both"], 4.0)(ctx, toks, t)
    assert int(jnp.argmax(plain[0, 0, :3])) == 2  # -5 + 3 * 4 = 7: the implausible id wins
    off = classifier_free_guidance(lambda c_, x, t_: c_["both"], 4.0, c)(ctx, toks, t)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))
    on = dataclasses.replace(c, guidance_plausibility=0.1)  # keeps ids within log(10) of the top
    kept = classifier_free_guidance(lambda c_, x, t_: c_["both"], 4.0, on)(ctx, toks, t)
    np.testing.assert_array_equal(np.isfinite(np.asarray(kept[0, 0])), [True, True, False, False])
    assert_close(kept[0, 0, :2], plain[0, 0, :2], 1e-6)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="guidance_plausibility"):
            dataclasses.replace(c, guidance_plausibility=bad)


def test_guidance_schedules_and_timesteps() -> None:
    from muddit_jax.diffusion.sampler import guidance_scale_at

    c = cfg(guidance_scale=4.0, guidance_schedule="linear")
    scales = jnp.stack([guidance_scale_at(jnp.int32(i), c) for i in range(T)])
    assert_close(scales, np.linspace(0, 4, T), 1e-6)
    c = cfg(guidance_scale=4.0, guidance_schedule="decay")
    scales = jnp.stack([guidance_scale_at(jnp.int32(i), c) for i in range(T)])
    assert_close(scales, np.linspace(4, 1, T), 1e-6)
    assert_close(guidance_scale_at(jnp.int32(3), cfg(guidance_scale=4.0)), 4.0, 1e-7)
    steps = [jnp.int32(i) for i in range(T)]
    pipeline = jnp.stack([model_timestep(s, cfg()) for s in steps])
    assert_close(pipeline, (T - 1 - np.arange(T)) / T, 1e-6)
    ratio = jnp.stack([model_timestep(s, cfg(timestep_mode="ratio")) for s in steps])
    assert_close(ratio, np.cos(np.pi / 2 * np.arange(T) / T), 1e-6)


def numpy_reference_step(logits, sample_ids, step, steps, mask_id, temps, g_sample, g_conf):
    """NumPy transcription of Meissonic's/aMUSEd's ``Scheduler.step`` (multinomial = Gumbel-max)."""
    unknown = sample_ids == mask_id
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    pred = np.argmax(logits + g_sample, -1)
    pred = np.where(unknown, pred, sample_ids)
    if step == steps - 1:
        return pred
    seq_len = sample_ids.shape[1]
    ratio = np.float32(step + 1) / np.float32(steps)
    mask_ratio = np.cos(ratio * np.float32(np.pi / 2), dtype=np.float32)
    mask_len = np.floor(np.float32(seq_len) * mask_ratio)
    mask_len = np.minimum(unknown.sum(-1, keepdims=True) - 1, mask_len)
    mask_len = np.maximum(1, mask_len).astype(np.int64)
    selected = np.take_along_axis(probs, pred[..., None], -1)[..., 0]
    selected = np.where(unknown, selected, np.finfo(np.float32).max)
    confidence = np.log(np.clip(selected, 1e-20, None)) + temps[step] * g_conf
    cut_off = np.take_along_axis(np.sort(confidence, -1), mask_len, -1)
    return np.where(confidence < cut_off, mask_id, pred)


@pytest.mark.parametrize("step", [0, 3, T - 2, T - 1])
def test_step_matches_numpy_reference(step: int) -> None:
    rng = np.random.default_rng(step)
    logits = rng.normal(size=(B, N, V)).astype(np.float32) * 2
    state = np.where(rng.random((B, N)) < 0.7, MASK, rng.integers(0, V, (B, N)))
    g_sample = rng.gumbel(size=(B, N, V)).astype(np.float32)
    g_conf = rng.gumbel(size=(B, N)).astype(np.float32)
    c = cfg()
    temps = np.linspace(2.0, 0.0, T).astype(np.float32)
    ref = numpy_reference_step(logits, state, step, T, MASK, temps, g_sample, g_conf)
    out = denoise_step(
        jnp.asarray(logits),
        jnp.asarray(state, jnp.int32),
        jnp.asarray(state == MASK),
        jnp.int32(step),
        jnp.full((B,), N, jnp.int32),
        jnp.asarray(g_sample),
        jnp.asarray(g_conf),
        c,
    )
    np.testing.assert_array_equal(np.asarray(out), ref)
    if step < T - 1:
        unknown = state == MASK
        target = np.floor(N * np.cos(np.pi / 2 * (step + 1) / T))
        exp_len = np.maximum(1, np.minimum(unknown.sum(-1) - 1, target))
        got = num_to_remask(jnp.asarray(unknown), jnp.int32(step), jnp.full((B,), N), c)
        np.testing.assert_array_equal(np.asarray(got), exp_len)
        assert list((np.asarray(out) == MASK).sum(-1)) == list(exp_len)


def test_no_recompile_for_new_inputs_and_deterministic() -> None:
    traces = []

    def counting_fn(ctx, tokens, t):
        traces.append(1)
        return dynamic_fn(ctx, tokens, t)

    sampler = make_sampler(counting_fn, cfg())
    free = jnp.zeros((B, N), bool)
    a = sampler(dyn_ctx(0), jnp.zeros((B, N), jnp.int32), free, jax.random.PRNGKey(0))
    n_traces = len(traces)
    ones = jnp.ones((B, N), jnp.int32)
    b = sampler(dyn_ctx(1), ones, free.at[:, 0].set(True), jax.random.PRNGKey(1))
    a2 = sampler(dyn_ctx(0), jnp.zeros((B, N), jnp.int32), free, jax.random.PRNGKey(0))
    assert n_traces >= 1 and len(traces) == n_traces
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
    assert np.any(np.asarray(a) != np.asarray(b))
    c = sampler(dyn_ctx(0), jnp.zeros((B, N), jnp.int32), free, jax.random.PRNGKey(2))
    assert np.any(np.asarray(a) != np.asarray(c))


def test_argmax_sampling_reproduces_argmax_tokens() -> None:
    ctx = {"table": table(3)}
    args = (ctx, jnp.zeros((B, N), jnp.int32), jnp.zeros((B, N), bool), jax.random.PRNGKey(0))
    out = make_sampler(static_fn, cfg(sampling="argmax"))(*args)
    np.testing.assert_array_equal(np.asarray(out), np.argmax(np.asarray(ctx["table"]), -1))
    # vocab_limit restricts the candidates to the first ids; the in-vocab mask id is never sampled
    lim = cfg(sampling="argmax", vocab_limit=10, mask_id=9)
    out = make_sampler(static_fn, lim)(*args)
    np.testing.assert_array_equal(np.asarray(out), np.argmax(np.asarray(ctx["table"])[..., :9], -1))


def test_top_k_and_top_p_stay_in_their_sets() -> None:
    ctx = {"table": table(4)}
    tab = np.asarray(ctx["table"])
    args = (ctx, jnp.zeros((B, N), jnp.int32), jnp.zeros((B, N), bool))
    top3 = np.argsort(-tab, -1)[..., :3]
    picks, top_k_sampler = [], make_sampler(static_fn, cfg(sampling="top_k", top_k=3))
    for seed in range(3):
        out = np.asarray(top_k_sampler(*args, jax.random.PRNGKey(seed)))
        assert np.all((out[..., None] == top3).any(-1))
        picks.append(out)
    assert np.any(np.stack(picks) != np.argmax(tab, -1))  # it does sample, not argmax
    # top-p: every pick lies in the smallest set of ids whose probability reaches p
    probs = np.exp(tab - tab.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, -1)
    sorted_p = np.take_along_axis(probs, order, -1)
    keep_sorted = (np.cumsum(sorted_p, -1) - sorted_p) < 0.6
    top_p_sampler = make_sampler(static_fn, cfg(sampling="top_p", top_p=0.6))
    out = np.asarray(top_p_sampler(*args, jax.random.PRNGKey(0)))
    rank = np.argmax(order == out[..., None], -1)
    assert np.all(np.take_along_axis(keep_sorted, rank[..., None], -1))


def test_single_step_and_config_validation() -> None:
    zeros, free = jnp.zeros((B, N), jnp.int32), jnp.zeros((B, N), bool)
    one_step = cfg(num_steps=1, sampling="argmax")
    out = sample(static_fn, {"table": table(5)}, zeros, free, jax.random.PRNGKey(0), one_step)
    np.testing.assert_array_equal(np.asarray(out), np.argmax(np.asarray(table(5)), -1))
    bad_configs = (
        dict(sampling="beam"), dict(num_steps=0), dict(sampling="top_k"), dict(timestep_mode="x")
    )
    for bad in bad_configs:
        with pytest.raises(ValueError):
            cfg(**bad)
    for t in ((2.0,), (-1.0, 0.0), (float("nan"), 0.0), [2.0, 0.0], ("2", 0.0)):
        with pytest.raises(ValueError, match="temperature must be"):
            cfg(temperature=t)
    assert hash(cfg()) == hash(dataclasses.replace(cfg()))


def _row_logits_fn(ctx, tokens, timestep):
    """Row-local logits: depend only on the row's own context value, tokens and timestep."""
    mix = jnp.cumsum(tokens, axis=-1).astype(jnp.float32)[..., None]
    return 3.0 * jnp.sin(ctx[:, None, None] + 0.1 * mix + jnp.arange(V) + timestep[:, None, None])


def test_per_row_keys_make_rows_independent_of_the_batch() -> None:
    """With one key per row, a row decodes the same alone or inside any batch."""
    cfg = SamplerConfig(num_steps=4, mask_id=V)
    sampler = make_sampler(_row_logits_fn, cfg)
    keys = jax.random.split(jax.random.key(3), 3)
    tokens = jnp.zeros((3, N), jnp.int32)
    fixed = jnp.zeros((3, N), bool)
    ctx = jnp.arange(3.0)
    full = sampler(ctx, tokens, fixed, keys)
    for i in range(3):
        alone = sampler(ctx[i : i + 1], tokens[:1], fixed[:1], keys[i : i + 1])
        np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(full[i]))
    assert not np.array_equal(np.asarray(full[0]), np.asarray(full[1]))
