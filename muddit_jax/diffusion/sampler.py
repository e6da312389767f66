"""MaskGIT-style iterative decoding (Muddit/Meissonic scheduler) as ONE compiled program.

Step rule at step ``i`` of ``T`` (Meissonic ``Scheduler.step`` = diffusers ``AmusedScheduler``):

1. ``logits = logits_fn(context, tokens, timestep_i)`` (optionally classifier-free guided),
   restricted to the first ``vocab_limit`` ids, the mask id excluded.
2. A candidate is drawn for every masked position (multinomial / argmax / top-k / top-p);
   given and already-revealed positions keep their token.
3. On the last step every candidate is kept. Otherwise, with ``ratio = (i + 1) / T``::

       mask_len = max(1, min(#masked - 1, floor(n * r(ratio))))
       confidence = log p(candidate) + temp_i * Gumbel,  temp_i = linspace(t0, t1, T)[i]

   (``+inf`` for given/revealed positions) and the ``mask_len`` least confident positions are
   masked again. ``n`` is the full sequence length as upstream (``mask_len_base="length"``) or the
   number of initially masked positions as in MaskGIT (``"unknown"``).

The fed timestep is ``(T - 1 - i) / T`` as in Muddit's released pipeline
(``timestep_mode="pipeline"``) or the current mask ratio ``r(i / T)`` matching the training-time
``timestep = r`` (``"ratio"``). The loop is a ``lax.scan``; ``context`` (params + conditioning) is a
traced argument so new inputs of the same shapes never recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from muddit_jax.diffusion.schedule import get_schedule

Array = jax.Array
LogitsFn = Callable[[Any, Array, Array], Array]

SAMPLING = ("multinomial", "argmax", "top_k", "top_p")
# the timestep fed at each step (see :func:`model_timestep`)
TIMESTEP_MODES = ("pipeline", "ratio")
# how the guidance scale moves over the steps (see :func:`guidance_scale_at`)
GUIDANCE_SCHEDULES = ("constant", "linear", "decay")
# (start, end) scale of the Gumbel noise on token confidences, annealed linearly over the steps
CONFIDENCE_TEMPERATURE = (2.0, 0.0)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static sampler configuration (hashable).

    ``guidance_scale=None`` means no classifier-free guidance and a plain ``logits_fn``; a float
    (1.0 included) means ``logits_fn`` takes a doubled batch (cond rows, then uncond rows) and is
    combined as ``uncond + s * (cond - uncond)``. ``guidance_schedule="linear"`` ramps ``s`` as
    ``linspace(0, guidance_scale, T)`` (open-muse's linear guidance schedule); ``"decay"`` as
    ``linspace(guidance_scale, 1, T)`` (guided while the layout is drawn, conditional-only at the
    end). ``guidance_plausibility=a > 0`` keeps only ids whose conditional probability is at least
    ``a`` times the most likely id's (contrastive decoding's adaptive plausibility constraint):
    guidance then re-ranks what the conditional branch finds plausible and cannot promote ids
    it rules out.
    """

    num_steps: int
    mask_id: int
    schedule: str = "cosine"
    temperature: tuple[float, float] = CONFIDENCE_TEMPERATURE
    sampling: str = "multinomial"
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float | None = None
    guidance_schedule: str = "constant"
    guidance_plausibility: float = 0.0
    vocab_limit: int | None = None
    timestep_mode: str = "pipeline"
    mask_len_base: str = "length"

    def __post_init__(self) -> None:
        get_schedule(self.schedule)
        checks = {
            "sampling": (self.sampling, SAMPLING),
            "guidance_schedule": (self.guidance_schedule, GUIDANCE_SCHEDULES),
            "timestep_mode": (self.timestep_mode, TIMESTEP_MODES),
            "mask_len_base": (self.mask_len_base, ("length", "unknown")),
        }
        for field, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {value!r}")
        if self.num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        t = self.temperature
        if not (isinstance(t, tuple) and len(t) == 2
                and all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in t)):
            raise ValueError(f"temperature must be a (start, end) tuple of two finite numbers "
                             f">= 0 (e.g. (2.0, 0.0)), got {t!r}")
        if not 0.0 <= self.guidance_plausibility < 1.0:
            raise ValueError(f"guidance_plausibility must be in [0, 1) (0 = off, e.g. 0.1), got "
                             f"{self.guidance_plausibility!r}")
        if self.sampling == "top_k" and self.top_k < 1:
            raise ValueError("sampling='top_k' needs top_k >= 1")


# ---------------------------------------------------------------------------------------------
# Pieces of one step (public so tests and other samplers can reuse them)
# ---------------------------------------------------------------------------------------------


def classifier_free_guidance(
    logits_fn: LogitsFn, scale: float | Array, cfg: SamplerConfig | None = None
) -> LogitsFn:
    """Wrap a doubled-batch ``logits_fn`` into a guided one.

    The wrapped function receives ``tokens [2b, n]`` / ``timestep [2b]`` (rows ``[0, b)`` use the
    conditional context, rows ``[b, 2b)`` the unconditional one -- the context holds both) and the
    result is ``uncond + scale * (cond - uncond)`` ``[b, n, V]`` (f32), computed as
    ``cond + (scale - 1) * (cond - uncond)`` so that ``scale == 1`` returns ``cond`` bit-exactly.
    ``scale`` may be traced. With ``cfg.guidance_plausibility > 0`` the result is
    :func:`prepare_logits`'d and ids outside the conditional branch's plausible set are ``-inf``.
    """

    def guided(context: Any, tokens: Array, timestep: Array) -> Array:
        b = tokens.shape[0]
        both = logits_fn(
            context, jnp.concatenate([tokens, tokens]), jnp.concatenate([timestep, timestep])
        ).astype(jnp.float32)
        cond, uncond = both[:b], both[b:]
        out = cond + (scale - 1.0) * (cond - uncond)
        if cfg is None or cfg.guidance_plausibility == 0.0:
            return out
        cond = prepare_logits(cond, cfg)
        cut = jnp.max(cond, axis=-1, keepdims=True) + math.log(cfg.guidance_plausibility)
        return jnp.where(cond >= cut, prepare_logits(out, cfg), -jnp.inf)

    return guided


def prepare_logits(logits: Array, cfg: SamplerConfig) -> Array:
    """Restrict ``[b, n, V]`` logits to the first ``vocab_limit`` ids and forbid ``mask_id``."""
    logits = logits.astype(jnp.float32)
    if cfg.vocab_limit is not None:
        logits = logits[..., : cfg.vocab_limit]
    if 0 <= cfg.mask_id < logits.shape[-1]:
        logits = logits.at[..., cfg.mask_id].set(-jnp.inf)
    return logits


def filter_logits(logits: Array, cfg: SamplerConfig) -> Array:
    """Apply the top-k / top-p truncation of ``cfg.sampling`` (other modes: unchanged)."""
    if cfg.sampling == "top_k":
        k = min(cfg.top_k, logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        return jnp.where(logits >= kth, logits, -jnp.inf)
    if cfg.sampling == "top_p":
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Smallest prefix whose mass reaches top_p; the most likely id is always kept.
        keep = mass_before < cfg.top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(logits >= threshold, logits, -jnp.inf)
    return logits


def argmax_last(x: Array) -> Array:
    """``jnp.argmax(x, -1)`` (first index of the maximum) as two plain reductions (max, then min
    over matching indices): XLA:CPU runs the variadic (value, index) reduce of ``argmax`` about
    3x slower, and it is ~10% of a sampling step over an 8k codebook."""
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def draw_candidates(logits: Array, sample_gumbel: Array | None, cfg: SamplerConfig) -> Array:
    """Candidates ``[b, n]``: Gumbel-max over filtered logits (= categorical), or argmax."""
    if cfg.sampling == "argmax" or sample_gumbel is None:
        return argmax_last(logits)
    return argmax_last(filter_logits(logits, cfg) + sample_gumbel)


def num_to_remask(unknown: Array, step: Array, n_base: Array, cfg: SamplerConfig) -> Array:
    """``mask_len [b]`` after (non-final) ``step``: ``max(1, min(#unknown - 1, floor(n r)))``."""
    ratio = (step + 1).astype(jnp.float32) / cfg.num_steps
    target = jnp.floor(n_base.astype(jnp.float32) * get_schedule(cfg.schedule).mask_ratio(ratio))
    mask_len = jnp.minimum(unknown.sum(-1) - 1, target.astype(jnp.int32))
    return jnp.maximum(mask_len, 1)


def remask_lowest_confidence(
    candidates: Array,
    unknown: Array,
    log_p: Array,
    mask_len: Array,
    temperature: Array,
    conf_gumbel: Array,
    mask_id: int,
) -> Array:
    """Mask again the ``mask_len [b]`` least confident unknown positions of ``candidates [b, n]``.

    ``confidence = log_p + temperature * conf_gumbel`` on unknown positions, ``+inf`` elsewhere;
    positions strictly below the ``mask_len``-th smallest confidence are masked (upstream rule).
    """
    confidence = jnp.where(unknown, log_p + temperature * conf_gumbel, jnp.inf)
    ordered = jnp.sort(confidence, axis=-1)
    idx = jnp.minimum(mask_len, confidence.shape[-1] - 1)[:, None]
    cut_off = jnp.take_along_axis(ordered, idx, axis=-1)
    return jnp.where(confidence < cut_off, jnp.asarray(mask_id, candidates.dtype), candidates)


def denoise_step(
    logits: Array,
    tokens: Array,
    unknown: Array,
    step: Array,
    n_base: Array,
    sample_gumbel: Array | None,
    conf_gumbel: Array,
    cfg: SamplerConfig,
) -> Array:
    """One decoding step given model logits ``[b, n, V]`` and explicit noise; new tokens ``[b, n]``.

    ``sample_gumbel [b, n, V']`` drives candidate sampling (unused for argmax), ``conf_gumbel
    [b, n]`` the confidence noise. Deterministic given its inputs.
    """
    logits = prepare_logits(logits, cfg)
    candidates = draw_candidates(logits, sample_gumbel, cfg)
    candidates = jnp.where(unknown, candidates, tokens)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    log_p = jnp.take_along_axis(
        log_probs, jnp.clip(candidates, 0, logits.shape[-1] - 1)[..., None], axis=-1
    )[..., 0]
    temps = jnp.linspace(cfg.temperature[0], cfg.temperature[1], cfg.num_steps)
    mask_len = num_to_remask(unknown, step, n_base, cfg)
    remasked = remask_lowest_confidence(
        candidates, unknown, log_p, mask_len, temps[step], conf_gumbel, cfg.mask_id
    )
    return jnp.where(step == cfg.num_steps - 1, candidates, remasked)


def guidance_scale_at(step: Array, cfg: SamplerConfig) -> Array:
    """Guidance scale used at ``step``: constant ``s``, ``linspace(0, s, T)[step]`` ("linear") or
    ``linspace(s, 1, T)[step]`` ("decay")."""
    s = jnp.float32(cfg.guidance_scale)
    frac = step.astype(jnp.float32) / max(cfg.num_steps - 1, 1)
    if cfg.guidance_schedule == "linear":
        return s * frac
    if cfg.guidance_schedule == "decay":
        return s + (1.0 - s) * frac
    return s


def model_timestep(step: Array, cfg: SamplerConfig) -> Array:
    """Scalar timestep fed to the model at ``step`` (see module docstring)."""
    step = step.astype(jnp.float32)
    if cfg.timestep_mode == "pipeline":
        return (cfg.num_steps - 1 - step) / cfg.num_steps
    return get_schedule(cfg.schedule).mask_ratio(step / cfg.num_steps)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def sample(
    logits_fn: LogitsFn,
    context: Any,
    tokens: Array,
    fixed: Array,
    rng: Array,
    cfg: SamplerConfig,
    return_history: bool = False,
) -> Array | tuple[Array, Array]:
    """Decode ``tokens [b, n]`` in ``cfg.num_steps`` steps; positions with ``fixed [b, n]`` stay.

    ``logits_fn(context, tokens [b, n] i32, timestep [b] f32) -> [b, n, V]`` (doubled batch when
    ``cfg.guidance_scale`` is set, see :func:`classifier_free_guidance`). Non-fixed positions
    start as ``cfg.mask_id``. Returns the final tokens ``[b, n]`` (no mask id left when
    ``vocab_limit``/the mask id exclude it), plus the state after every step ``[T, b, n]`` if
    ``return_history``. Deterministic for a given ``rng``. Wrap with :func:`make_sampler`.

    ``rng`` is one key for the whole batch, or one key per row (``[b]`` typed keys / ``[b, 2]``
    raw keys): then each row's noise depends only on its own key, so a row decodes identically
    whatever batch, device count or host it lands in (what sharded evaluation needs).
    """
    fixed = fixed.astype(bool)
    tokens = jnp.where(fixed, tokens.astype(jnp.int32), jnp.int32(cfg.mask_id))
    b, n = tokens.shape
    if cfg.mask_len_base == "length":
        n_base = jnp.full((b,), n, jnp.int32)
    else:
        n_base = (~fixed).sum(-1).astype(jnp.int32)

    def body(state: Array, step: Array) -> tuple[Array, Array]:
        unknown = (state == cfg.mask_id) & ~fixed
        timestep = jnp.full((b,), model_timestep(step, cfg), jnp.float32)
        if cfg.guidance_scale is None:
            logits = logits_fn(context, state, timestep)
        else:
            guided = classifier_free_guidance(logits_fn, guidance_scale_at(step, cfg), cfg)
            logits = guided(context, state, timestep)
        k_sample, k_conf = _split_step_keys(rng, step)
        vocab = logits.shape[-1]
        if cfg.vocab_limit is not None:
            vocab = min(cfg.vocab_limit, vocab)
        sample_gumbel = None
        if cfg.sampling != "argmax":
            sample_gumbel = _gumbel(k_sample, b, (n, vocab))
        conf_gumbel = _gumbel(k_conf, b, (n,))
        new = denoise_step(logits, state, unknown, step, n_base, sample_gumbel, conf_gumbel, cfg)
        return new, (new if return_history else None)

    final, history = jax.lax.scan(body, tokens, jnp.arange(cfg.num_steps, dtype=jnp.int32))
    return (final, history) if return_history else final


def _per_row(rng: Array) -> bool:
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    return rng.ndim == (1 if typed else 2)


def _split_step_keys(rng: Array, step: Array) -> tuple[Array, Array]:
    """(sample key, confidence key) of ``step``, for one key or per-row keys."""
    if _per_row(rng):
        keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, step)))(rng)
        return keys[:, 0], keys[:, 1]
    k_sample, k_conf = jax.random.split(jax.random.fold_in(rng, step))
    return k_sample, k_conf


def _gumbel(rng: Array, b: int, row_shape: tuple[int, ...]) -> Array:
    """Gumbel noise ``[b, *row_shape]`` from one key or from one key per row."""
    if _per_row(rng):
        return jax.vmap(lambda k: jax.random.gumbel(k, row_shape, jnp.float32))(rng)
    return jax.random.gumbel(rng, (b, *row_shape), jnp.float32)


def make_sampler(
    logits_fn: LogitsFn, cfg: SamplerConfig, return_history: bool = False
) -> Callable[[Any, Array, Array, Array], Array | tuple[Array, Array]]:
    """Jitted ``sampler(context, tokens, fixed, rng)`` with ``logits_fn`` and ``cfg`` baked in."""
    return jax.jit(
        functools.partial(sample, logits_fn, cfg=cfg, return_history=return_history)
    )
