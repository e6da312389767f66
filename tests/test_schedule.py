"""Schedules (endpoints, monotonicity, derivatives, ELBO weight) and the masking process."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muddit_jax.diffusion.masking import (
    apply_mask,
    num_to_mask,
    random_mask,
    sample_mask_ratio,
)
from muddit_jax.diffusion.schedule import Schedule, get_schedule
from tests.helpers import assert_close

GRID = jnp.linspace(0.0, 1.0, 101)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_endpoints_and_monotone(name: str) -> None:
    s = get_schedule(name)
    assert_close(s.mask_ratio(0.0), 1.0, 1e-6)
    assert_close(s.mask_ratio(1.0), 0.0, 1e-6)
    assert_close(s.alpha(0.0), 1.0, 1e-6)  # t = 0: clean
    assert_close(s.alpha(1.0), 0.0, 1e-6)  # t = 1: all masked
    r = np.asarray(s.mask_ratio(GRID))
    assert np.all(np.diff(r) < 0)
    assert np.all(np.diff(np.asarray(s.alpha(GRID))) < 0)
    assert_close(s.alpha(GRID), 1.0 - s.mask_ratio(1.0 - GRID), 1e-6)


def test_cosine_values() -> None:
    s = get_schedule("cosine")
    u = np.array([0.25, 0.5, 0.75])
    assert_close(s.mask_ratio(u), np.cos(np.pi / 2 * u), 1e-6)
    assert_close(get_schedule("linear").mask_ratio(u), 1.0 - u, 1e-6)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_derivatives_match_finite_differences(name: str) -> None:
    s = get_schedule(name)
    x = np.linspace(0.05, 0.95, 19)
    eps = 1e-3
    fd_r = (np.asarray(s.mask_ratio(x + eps)) - np.asarray(s.mask_ratio(x - eps))) / (2 * eps)
    fd_a = (np.asarray(s.alpha(x + eps)) - np.asarray(s.alpha(x - eps))) / (2 * eps)
    assert_close(s.mask_ratio_prime(x), fd_r, 1e-3)
    assert_close(s.alpha_prime(x), fd_a, 1e-3)
    assert np.all(np.asarray(s.alpha_prime(x)) < 0)


def test_jax_grad_agrees_with_alpha_prime() -> None:
    s = get_schedule("cosine")
    g = jax.vmap(jax.grad(lambda t: s.alpha(t)))(jnp.linspace(0.1, 0.9, 9))
    assert_close(g, s.alpha_prime(jnp.linspace(0.1, 0.9, 9)), 1e-5)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_progress_of_ratio_inverts(name: str) -> None:
    s = get_schedule(name)
    u = jnp.linspace(0.0, 1.0, 41)
    assert_close(s.progress_of_ratio(s.mask_ratio(u)), u, 1e-3)


def test_elbo_weight_relation_to_one_over_r() -> None:
    t = jnp.linspace(0.05, 0.95, 19)
    lin = get_schedule("linear")
    r_lin = 1.0 - lin.alpha(t)
    assert_close(lin.elbo_weight(t), 1.0 / r_lin, 1e-5)  # linear: exactly 1/r
    cos = get_schedule("cosine")
    r = 1.0 - cos.alpha(t)
    w = cos.elbo_weight(t)
    assert_close(w, (math.pi / 2) * jnp.sqrt(1.0 - r**2) / r, 1e-4)
    assert_close(w, (math.pi / 2) / jnp.tan(math.pi * t / 2), 1e-4)
    # small r: ELBO weight -> (pi/2) / r, i.e. Muddit's 1/r up to the constant pi/2
    r_small = 1.0 - cos.alpha(jnp.float32(1e-3))
    assert_close(cos.elbo_weight(1e-3) * r_small, math.pi / 2, 1e-4)


def test_unknown_schedule_raises() -> None:
    with pytest.raises(ValueError):
        Schedule("sqrt")


# ------------------------------------------------------------------------------------------------
# masking
# ------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    density=st.floats(0.0, 1.0),
    min_rate=st.sampled_from([0.0, 0.1, 0.5]),
)
def test_random_mask_exact_counts(seed: int, density: float, min_rate: float) -> None:
    b, l = 4, 24  # fixed shapes: no recompilation between examples
    rng = np.random.default_rng(seed)
    valid = rng.random((b, l)) < density
    ratio = rng.random(b).astype(np.float32)
    key = jax.random.PRNGKey(seed)
    mask = np.asarray(random_mask(key, jnp.asarray(valid), jnp.asarray(ratio), min_rate=min_rate))
    n_valid = valid.sum(-1)
    r = np.maximum(ratio, np.float32(min_rate))
    expected = np.minimum(np.maximum(np.round(n_valid.astype(np.float32) * r), 1), n_valid)
    np.testing.assert_array_equal(mask.sum(-1), expected)
    assert not np.any(mask & ~valid)


def test_random_mask_many_draws_counts_and_uniformity() -> None:
    lengths = np.array([16, 12, 9, 5, 3, 1, 0, 16])
    valid = jnp.asarray(np.arange(16)[None, :] < lengths[:, None])
    ratio = jnp.asarray([0.5, 0.25, 0.9, 0.1, 0.5, 0.3, 0.7, 1.0])
    f = jax.jit(jax.vmap(lambda k: random_mask(k, valid, ratio)))
    masks = np.asarray(f(jax.random.split(jax.random.PRNGKey(0), 400)))
    expected = np.array([8, 3, 8, 1, 2, 1, 0, 16])  # round half to even: 12*.25=3, 3*.5=1.5->2
    assert np.all(masks.sum(-1) == expected[None, :])
    assert not np.any(masks & ~np.asarray(valid)[None])
    # row 0 masks half of 16 positions: each position is hit ~50% of the time
    freq = masks[:, 0].mean(0)
    assert np.all(np.abs(freq - 0.5) < 0.12), freq


def test_random_mask_round_half_even_and_min_masked() -> None:
    k = num_to_mask(jnp.array([5, 3, 10, 4]), jnp.array([0.5, 0.5, 0.0, 0.125]))
    assert list(np.asarray(k)) == [2, 2, 1, 1]  # 2.5 -> 2, 1.5 -> 2, 0 -> 1 (min), 0.5 -> 0 -> 1
    assert list(np.asarray(num_to_mask(jnp.array([10]), jnp.array([0.0]), min_masked=0))) == [0]


def test_random_mask_deterministic_per_key() -> None:
    valid = jnp.ones((3, 32), bool)
    ratio = jnp.full((3,), 0.4)
    a = random_mask(jax.random.PRNGKey(1), valid, ratio)
    b = random_mask(jax.random.PRNGKey(1), valid, ratio)
    c = random_mask(jax.random.PRNGKey(2), valid, ratio)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.any(np.asarray(a) != np.asarray(c))


def test_sample_mask_ratio_clip_and_apply_mask() -> None:
    cosine = get_schedule("cosine")
    u, r = sample_mask_ratio(jax.random.PRNGKey(0), 2000, schedule=cosine, min_rate=0.3)
    assert_close(r, np.maximum(np.cos(np.pi / 2 * np.asarray(u)), 0.3), 1e-6)
    assert float(r.min()) >= 0.3 - 1e-7
    # u ~ U(0,1) so E[cos(pi u / 2)] = 2/pi (without clipping)
    _, r0 = sample_mask_ratio(jax.random.PRNGKey(0), 20000, schedule=get_schedule("cosine"))
    assert abs(float(r0.mean()) - 2 / np.pi) < 0.01
    ids = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
    out = apply_mask(ids, jnp.array([[True, False, False], [False, False, True]]), 99)
    np.testing.assert_array_equal(np.asarray(out), [[99, 1, 2], [3, 4, 99]])
