"""Mask-ratio schedules shared by training and sampling.

Two views of the same schedule:

* **Progress** ``u`` in ``[0, 1]`` (MaskGIT / Muddit view): ``r(u)`` is the fraction of tokens that
  are MASKED; ``r(0) = 1`` (all masked), ``r(1) = 0`` (clean). Training draws ``u ~ U(0, 1)`` and
  masks ``r(u)`` of the tokens; the sampler re-masks ``r((step + 1) / T)`` after each step.
* **Diffusion time** ``t = 1 - u`` (MDLM view): ``alpha(t) = 1 - r(1 - t)`` is the fraction of
  tokens still UNmasked, decreasing from ``alpha(0) = 1`` to ``alpha(1) = 0``. The continuous-time
  NELBO weight of the masked cross-entropy is ``-alpha'(t) / (1 - alpha(t))``.

Schedules: ``cosine`` ``r(u) = cos(pi/2 * u)`` (Muddit/Meissonic default) and ``linear``
``r(u) = 1 - u``. All functions are elementwise, pure and jittable.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

Array = jnp.ndarray

SCHEDULES: tuple[str, ...] = ("cosine", "linear")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A mask-ratio schedule; hashable so it can live inside static jit configs."""

    name: str = "cosine"

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; expected one of {SCHEDULES}")

    # ---- progress view ------------------------------------------------------------------------
    def mask_ratio(self, u: Array) -> Array:
        """``r(u)``: fraction of tokens masked at progress ``u`` (1 at u=0, 0 at u=1)."""
        u = jnp.asarray(u, jnp.float32)
        if self.name == "cosine":
            return jnp.cos(0.5 * math.pi * u)
        return 1.0 - u

    def mask_ratio_prime(self, u: Array) -> Array:
        """``dr/du`` (non-positive)."""
        u = jnp.asarray(u, jnp.float32)
        if self.name == "cosine":
            return -0.5 * math.pi * jnp.sin(0.5 * math.pi * u)
        return -jnp.ones_like(u)

    def progress_of_ratio(self, r: Array) -> Array:
        """Inverse of :meth:`mask_ratio`: the progress ``u`` at which ``r(u) = r``."""
        r = jnp.clip(jnp.asarray(r, jnp.float32), 0.0, 1.0)
        if self.name == "cosine":
            return jnp.arccos(r) / (0.5 * math.pi)
        return 1.0 - r

    # ---- diffusion-time view ------------------------------------------------------------------
    def alpha(self, t: Array) -> Array:
        """``alpha(t) = 1 - r(1 - t)``: fraction of tokens UNmasked at diffusion time ``t``."""
        return 1.0 - self.mask_ratio(1.0 - jnp.asarray(t, jnp.float32))

    def alpha_prime(self, t: Array) -> Array:
        """``d alpha / dt = r'(1 - t)`` (non-positive)."""
        return self.mask_ratio_prime(1.0 - jnp.asarray(t, jnp.float32))

    def elbo_weight(self, t: Array, floor: float = 1e-3) -> Array:
        """MDLM NELBO weight ``w(t) = -alpha'(t) / (1 - alpha(t))``, the denominator floored.

        cosine: ``alpha(t) = 1 - sin(pi t / 2)`` so ``w = (pi/2) cot(pi t / 2)``; with the mask
        ratio ``r = 1 - alpha(t)``: ``w = (pi/2) sqrt(1 - r^2) / r`` (-> ``(pi/2) / r`` as r -> 0).
        linear: ``alpha(t) = 1 - t`` so ``w = 1 / t = 1 / r`` exactly.
        """
        denom = jnp.maximum(1.0 - self.alpha(t), floor)
        return -self.alpha_prime(t) / denom


def get_schedule(name: str) -> Schedule:
    """The schedule called ``name`` (``"cosine"`` or ``"linear"``)."""
    return Schedule(name)
