"""Muddit's masked-diffusion training objective over image and text tokens (pure, jittable).

Upstream (Muddit ``train/train_unified.py``): per example, cross-entropy summed over the masked
tokens, divided by the sequence length (``.mean(-1)`` over all positions, unmasked ones count 0),
divided by the mask ratio ``r`` (floored at 1e-3), averaged over the examples of that task;
``loss = image_loss + text_loss_weight * text_loss``. Upstream runs T2I and I2T as two forward
passes on two half-batches; here ``mode="split"`` packs both halves into ONE forward pass.

Interface with the model::

    forward_fn(params, image_ids [b,h,w] i32, text_ids [b,l] i32, timestep [b] f32 in [0,1],
               micro_conds [b,5], *, generated_rows: int | None)
        -> (image_logits [b,h,w,V_img], text_logits [b,l,V_txt])

``generated_rows`` (static) says that rows ``[0, n)`` generate their image and the rest hold
clean images (``mode="split"``; ``None`` in ``mode="joint"``); a model may use it to run only
the image input path each row needs (:class:`~muddit_jax.models.mmdit.MMDiT`) or ignore it.

``timestep`` is the mask ratio ``r`` of the modality being generated (upstream feeds ``r * 1000``
to a model that multiplies by 1000 again; the model wrapper owns that scaling).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from muddit_jax.diffusion.masking import (
    apply_mask,
    random_mask,
    sample_mask_ratio,
    text_targets,
)
from muddit_jax.diffusion.schedule import Schedule, get_schedule
from muddit_jax.tree_paths import match_leaves

Array = jax.Array
ForwardFn = Callable[[Any, Array, Array, Array, Array], tuple[Array, Array]]

MODES = ("split", "joint")
WEIGHTINGS = ("muddit", "elbo", "count")
PAD_MASKINGS = ("joint", "separate")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static configuration of :func:`diffusion_loss` (hashable).

    Attributes:
      image_mask_id: id written into masked image positions (Muddit: ``vocab_size - 1``).
      text_mask_id: id written into masked text positions (the added ``<mask>`` token).
      empty_text_ids: the tokenized empty prompt ``(l,)``, used for condition dropout.
      text_loss_weight: weight of the text term.
      min_mask_rate: ``r = max(r(u), min_mask_rate)``; upstream default 0.0 (Muddit & Meissonic).
      image_min_mask_rate: a further floor on the image ratio alone, ``r_img = max(r(u),
        min_mask_rate, image_min_mask_rate)``; 0.0 (default, upstream) adds none. 1.0 masks
        every image token of the generating rows, so T2I learns codes from the text alone and
        never from other codes of the same image (a diagnostic, BENCHMARKS §1.33; the sampler
        still shows the model partly masked images).
      image_full_mask_prob: probability that a row masks its whole image (``r_img = 1``; the
        weights read the time off the ratio, as for any floor), drawn per row; the other rows
        keep the usual ratio. 0.0 (default, upstream): none. A per-row mix of the text-only
        T2I rows of ``image_min_mask_rate=1`` and the usual ones, which train the sampler's
        later steps (BENCHMARKS §1.34). Both options refuse ``weighting="elbo"`` with the
        cosine schedule, whose weight at r = 1 is 0.
      mode: ``"split"`` (first rows T2I, the rest I2T, see ``t2i_fraction``) or ``"joint"``
        (both modalities masked at independent times in every example; beyond the paper).
      weighting: ``"muddit"`` (``1 / max(r, ratio_floor)``), ``"elbo"`` (exact MDLM weight) or
        ``"count"`` (``n / k``: maskable positions over the positions actually masked, the
        realised ratio; equals ``1 / r`` up to rounding, but a row whose ``r`` is far below
        ``1 / n`` still masks one token and gets weight ``n``, not ``1 / r``).
      schedule: mask-ratio schedule name (see ``schedule.py``).
      cond_dropout: probability of dropping the text condition of T2I examples.
      text_pad_is_target: if True the padding after the eos is maskable/target too, which is
        what upstream does (it masks the whole padded answer region); False: never masked.
        Applies to caption rows and to the answer region of ``text_maskable`` rows alike.
        False leaves the padding visible, which tells the model the answer length; sampling
        (``MudditPipeline.answer``) masks every position after the prompt, so SFT runs want True.
      answer_padding_visible: with ``text_pad_is_target``, rows with a question prefix (a
        ``text_maskable`` region that leaves out the bos: VQA / instruction rows) still never
        mask their padding; caption rows do. Such answers are decoded with a bound on their
        length (``eval.answer_max_tokens``), since the model never saw masked padding after
        them. See BENCHMARKS §1.22.
      text_pad_masking: with ``text_pad_is_target``, how the padding is drawn. ``"joint"``
        (upstream): one count ``round(n * r)`` over the answer and its padding together, so at
        low ``r`` the answer is rarely a target. ``"separate"``: the answer (bos/answer .. eos)
        and the padding are two strata, each masked at the same ``r``: ``max(1, round(n_answer *
        r))`` answer positions and ``round(n_pad * r)`` padding positions. Every position is
        still masked with probability about ``r``; only the count per stratum is fixed.
        ``weighting="count"`` weighs each stratum by its own ``n / k``. See BENCHMARKS §1.22.
      text_pad_weight: with ``text_pad_is_target``, the factor on each masked padding position's
        cross-entropy (upstream 1: every target alike); the masks do not change. Below 1 the
        padding stays a target (texts still end) with a smaller share of the gradient. With
        ``text_pad_masking="separate"`` the ``shapes`` exists answers read the image in one
        seed of three at 0.1 and two of four at 1: the weight is not the cause (BENCHMARKS §1.25).
      ratio_floor: floor of ``r`` in the weights (upstream ``clamp(min=1e-3)``).
      t2i_fraction: ``mode="split"``: the first ``b * t2i_fraction`` rows are T2I (upstream:
        half); must give a whole number of rows. A mixture puts its caption rows first
        (:mod:`muddit_jax.data.mixture`), so this is the T2I share of a mixed batch.
      t2i_stop_gradient: ``mode="split"``: comma-separated regexes over parameter paths
        (``mmdit/transformer_blocks_0/.*``) or ``@group`` names (``@image_input``), the syntax
        of ``optim.freeze`` (:mod:`muddit_jax.tree_paths`); the T2I rows'
        loss sends no gradient into the matched parameters, which then learn from the other
        rows alone (the T2I rows still use them in the forward pass). "" (default, upstream):
        off. On, the T2I rows and the others run as two forward passes over their own rows
        (the same arithmetic as one; on a mesh the row split reshards the batch).
    """

    image_mask_id: int
    text_mask_id: int
    empty_text_ids: tuple[int, ...] = ()
    text_loss_weight: float = 0.6
    min_mask_rate: float = 0.0
    image_min_mask_rate: float = 0.0
    image_full_mask_prob: float = 0.0
    mode: str = "split"
    weighting: str = "muddit"
    schedule: str = "cosine"
    cond_dropout: float = 0.1
    text_pad_is_target: bool = False
    text_pad_masking: str = "joint"
    answer_padding_visible: bool = False
    text_pad_weight: float = 1.0
    ratio_floor: float = 1e-3
    t2i_fraction: float = 0.5
    t2i_stop_gradient: str = ""

    def __post_init__(self) -> None:
        for name in ("min_mask_rate", "image_min_mask_rate", "image_full_mask_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1] (0 = off)")
        fully_masked = self.image_min_mask_rate == 1.0 or self.image_full_mask_prob > 0
        if fully_masked and self.weighting == "elbo" and self.schedule == "cosine":
            raise ValueError("weighting='elbo' gives a fully masked image row the cosine ELBO "
                             "weight at r = 1, which is 0, so image_min_mask_rate=1 or "
                             "image_full_mask_prob > 0 would train nothing on those rows; use "
                             "weighting='count' or 'muddit' (weight 1 there)")
        if not 0.0 <= self.t2i_fraction <= 1.0:
            raise ValueError(f"t2i_fraction={self.t2i_fraction} must be in [0, 1]")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not 0.0 < self.ratio_floor <= 1.0:
            raise ValueError(f"ratio_floor={self.ratio_floor} must be in (0, 1] (upstream 1e-3; "
                             "1 = no 1/r weighting)")
        if self.text_pad_masking not in PAD_MASKINGS:
            raise ValueError(f"text_pad_masking must be one of {PAD_MASKINGS}, "
                             f"got {self.text_pad_masking!r}")
        if self.text_pad_masking == "separate" and not self.text_pad_is_target:
            raise ValueError("text_pad_masking='separate' draws the padding apart from the "
                             "answer, so it needs text_pad_is_target=True (without it the "
                             "padding is never masked); set one or use 'joint'")
        if self.text_pad_weight < 0:
            raise ValueError(f"text_pad_weight={self.text_pad_weight} must be >= 0 (1 = upstream)")
        if self.text_pad_weight != 1.0 and not self.text_pad_is_target:
            raise ValueError(f"text_pad_weight={self.text_pad_weight} weighs padding targets, but "
                             "text_pad_is_target=False makes none; set text_pad_is_target=True "
                             "or leave text_pad_weight at 1")
        if self.t2i_stop_gradient and self.mode != "split":
            raise ValueError("t2i_stop_gradient keeps the T2I rows' gradient out of parameters, "
                             "so it needs mode='split' (in 'joint' every row is both); set "
                             "mode='split' or t2i_stop_gradient=''")
        get_schedule(self.schedule)


def _masked_ce(logits: Array, targets: Array, mask: Array, weight: Array | None = None
               ) -> tuple[Array, Array]:
    """Per-example summed CE over ``mask`` and number of correct argmax predictions there.

    ``logits [b, ..., V]``, ``targets``/``mask [b, ...]`` -> ``([b] f32, [b] f32)``; ``weight``
    (same shape as ``mask``) multiplies each position's CE in the sum.

    The target logit is picked with a one-hot select rather than a gather: the gather's gradient
    is a scatter, which XLA CPU runs serially (it was ~40% of a small train step on CPU).
    """
    logits32 = logits.astype(jnp.float32)
    tgt = jnp.clip(targets, 0, logits.shape[-1] - 1)
    onehot = tgt[..., None] == jnp.arange(logits.shape[-1], dtype=tgt.dtype)
    picked = jnp.sum(jnp.where(onehot, logits32, 0.0), axis=-1)
    ce = jax.nn.logsumexp(logits32, axis=-1) - picked
    # "argmax == target" without a variadic (value, index) reduce (slow on CPU); counts a tie
    # with the maximum as correct.
    correct = (picked >= jnp.max(logits32, axis=-1)) & (targets == tgt)
    axes = tuple(range(1, mask.ndim))
    ce_sum = jnp.where(mask, ce if weight is None else ce * weight, 0.0).sum(axes)
    n_correct = (correct & mask).sum(axes).astype(jnp.float32)
    return ce_sum, n_correct


def _count_weight(n_masked: Array, n_maskable: Array | int) -> Array:
    """The ``count`` weight ``n_maskable / n_masked`` (the realised mask fraction's inverse)."""
    return n_maskable / jnp.maximum(n_masked, 1).astype(jnp.float32)


def _weight(u: Array, r: Array, n_masked: Array, n_maskable: Array | int, schedule: Schedule,
            config: LossConfig) -> Array:
    """Per-example weight multiplying the length-normalised CE: ``[b]``. ``n_masked [b]``: the
    positions masked in each row; ``n_maskable`` (``[b]`` or a scalar): those that could be."""
    if config.weighting == "count":
        return _count_weight(n_masked, n_maskable)
    if config.weighting == "muddit":
        return 1.0 / jnp.maximum(r, config.ratio_floor)
    # Exact NELBO weight at the time of the (possibly clipped) ratio; equals the sampled time
    # t = 1 - u whenever min_mask_rate did not clip.
    u_eff = jnp.where(r > schedule.mask_ratio(u), schedule.progress_of_ratio(r), u)
    return schedule.elbo_weight(1.0 - u_eff, config.ratio_floor)


def _text_mask(rng: Array, maskable: Array, text_valid: Array, ratio: Array,
               config: LossConfig) -> tuple[Array, Array | None]:
    """The text mask ``[b, l]`` and, for separate padding with count weights, each position's
    weight ``[b, l]`` (its stratum's ``n / k``; ``None``: the row weight of :func:`_weight`)."""
    if config.text_pad_masking == "joint":
        return random_mask(rng, maskable, ratio), None
    k_answer, k_pad = jax.random.split(rng)
    answer, pad = maskable & text_valid, maskable & ~text_valid
    answer_mask = random_mask(k_answer, answer, ratio)
    pad_mask = random_mask(k_pad, pad, ratio, min_masked=0)
    if config.weighting != "count":
        return answer_mask | pad_mask, None

    weight = jnp.where(text_valid,
                       _count_weight(answer_mask.sum(-1), answer.sum(-1))[:, None],
                       _count_weight(pad_mask.sum(-1), pad.sum(-1))[:, None])
    return answer_mask | pad_mask, weight


def _pad_weighted(weight: Array | None, text_valid: Array, config: LossConfig) -> Array | None:
    """``weight`` (``None`` = 1) times ``text_pad_weight`` at the padding positions."""
    if config.text_pad_weight == 1.0:
        return weight
    pad = jnp.where(text_valid, 1.0, config.text_pad_weight)
    return pad if weight is None else weight * pad


def _forward_t2i_apart(forward_fn: ForwardFn, params: Any, inputs: tuple[Array, ...],
                       n_t2i: int, config: LossConfig) -> tuple[Array, Array | None]:
    """``forward_fn`` with the first ``n_t2i`` rows (T2I) on ``params`` whose leaves matched by
    ``config.t2i_stop_gradient`` are under ``stop_gradient``, and the other rows on ``params``;
    the logits of both are concatenated back in row order."""
    held = match_leaves(params, config.t2i_stop_gradient, "loss.t2i_stop_gradient")
    t2i_params = jax.tree_util.tree_map(
        lambda stop, p: jax.lax.stop_gradient(p) if stop else p, held, params)
    b = inputs[0].shape[0]
    if n_t2i == 0:
        return forward_fn(params, *inputs, generated_rows=0)
    if n_t2i == b:
        return forward_fn(t2i_params, *inputs, generated_rows=b)
    head = forward_fn(t2i_params, *(x[:n_t2i] for x in inputs), generated_rows=n_t2i)
    tail = forward_fn(params, *(x[n_t2i:] for x in inputs), generated_rows=0)
    return tuple(None if h is None else jnp.concatenate([h, t]) for h, t in zip(head, tail))


def generated_rows(mode: str, t2i_fraction: float, batch: int) -> int | None:
    """The ``generated_rows`` a ``batch``-row forward of this loss is called with: ``split``
    mode's T2I rows come first (``round(batch * t2i_fraction)``); ``joint``: ``None``."""
    return round(batch * t2i_fraction) if mode == "split" else None


def _masked_mean(x: Array, rows: Array) -> Array:
    """Mean of ``x [b]`` over rows where ``rows [b]`` is True (0 if none)."""
    rows = rows.astype(jnp.float32)
    return (x * rows).sum() / jnp.maximum(rows.sum(), 1.0)


def diffusion_loss(
    *,
    forward_fn: ForwardFn,
    params: Any,
    batch: Mapping[str, Array],
    rng: Array,
    config: LossConfig,
) -> tuple[Array, dict[str, Array]]:
    """Muddit's unified masked-diffusion loss in one forward pass; returns ``(loss, metrics)``.

    Args:
      forward_fn: the model, see the module docstring.
      params: anything ``forward_fn`` takes as its first argument.
      batch: ``image_ids [b,h,w]`` int, ``text_ids [b,l]`` int, ``text_valid [b,l]`` bool (non-pad),
        ``micro_conds [b,5]``; optional ``text_maskable [b,l]`` bool answer region: text
        positions outside it (a VQA question prefix) are never masked nor targets (see
        :func:`~muddit_jax.diffusion.masking.text_targets`; padding per ``text_pad_is_target``).
      rng: PRNG key (ratios, masks, condition dropout).
      config: :class:`LossConfig`.

    ``mode="split"`` (``n = b * t2i_fraction`` whole, ``b/2`` by default): rows ``[0, n)`` are
    T2I (image masked at ratio ``r``, text condition clean except condition dropout ->
    ``empty_text_ids``; text not a target), rows ``[n, b)`` are I2T (text masked inside its
    answer region / valid text, clean image as condition, image not a target; upstream
    applies no dropout to the image condition). ``mode="joint"``: every row masks both modalities
    at independent ratios; the timestep fed is the image ratio, and condition dropout masks the
    whole text (``r_text = 1``), which is the unconditional case of a joint model.

    Per example ``i`` and modality ``m`` with length ``L_m`` (``h*w`` or ``l``)::

        loss_m[i] = w(i) * sum_{masked j} -log p(x_j) / L_m
        w = 1 / max(r, floor)                                  (weighting="muddit")
        w = -alpha'(t) / max(1 - alpha(t), floor), t = 1 - u     (weighting="elbo", MDLM)
        w = n_maskable[i] / n_masked[i]                          (weighting="count")

    ``loss_m`` is averaged over the rows where modality ``m`` is generated, and
    ``loss = image_loss + text_loss_weight * text_loss``. Metrics (scalars): ``loss``,
    ``image_loss``, ``text_loss``, ``image_acc``/``text_acc`` (argmax accuracy over masked tokens),
    ``image_mask_ratio``/``text_mask_ratio`` (mean ``r`` over the generating rows); with
    ``text_maskable``, ``answer_ce``/``answer_acc`` of the question rows (:func:`_answer_metrics`).
    """
    image_ids = jnp.asarray(batch["image_ids"], jnp.int32)
    text_ids = jnp.asarray(batch["text_ids"], jnp.int32)
    text_valid = jnp.asarray(batch["text_valid"], bool)
    micro_conds = batch["micro_conds"]
    b, h, w = image_ids.shape
    l = text_ids.shape[1]
    schedule = get_schedule(config.schedule)

    k_ui, k_ut, k_mi, k_mt, k_drop = jax.random.split(rng, 5)
    u_img, r_img = sample_mask_ratio(
        k_ui, b, schedule=schedule, min_rate=max(config.min_mask_rate, config.image_min_mask_rate))
    if config.image_full_mask_prob > 0:  # a key of its own: the other draws stay as they were
        full = jax.random.uniform(jax.random.fold_in(k_ui, 1), (b,)) < config.image_full_mask_prob
        r_img = jnp.where(full, 1.0, r_img)
    u_txt, r_txt = sample_mask_ratio(k_ut, b, schedule=schedule, min_rate=config.min_mask_rate)
    drop = jax.random.uniform(k_drop, (b,)) < config.cond_dropout

    if config.mode == "split":
        n_t2i = b * config.t2i_fraction
        if abs(n_t2i - round(n_t2i)) > 1e-6:
            raise ValueError(f"mode='split' needs batch * t2i_fraction whole; got batch {b}, "
                             f"t2i_fraction={config.t2i_fraction} (an even batch for 0.5)")
        img_rows = jnp.arange(b) < round(n_t2i)
        txt_rows = ~img_rows
        drop = drop & img_rows
        if config.cond_dropout > 0:
            if len(config.empty_text_ids) != l:
                raise ValueError(
                    f"empty_text_ids has length {len(config.empty_text_ids)}, text length is {l}"
                )
            empty = jnp.asarray(config.empty_text_ids, jnp.int32)[None, :]
            text_ids_cond = jnp.where(drop[:, None], empty, text_ids)
        else:
            text_ids_cond = text_ids
    else:
        img_rows = txt_rows = jnp.ones((b,), bool)
        r_txt = jnp.where(drop, 1.0, r_txt)
        text_ids_cond = text_ids

    answer = batch.get("text_maskable")
    answer = None if answer is None else jnp.asarray(answer, bool)
    pad_is_target = config.text_pad_is_target
    if answer is not None and config.answer_padding_visible:
        pad_is_target = pad_is_target & answer[:, :1]  # a question row never masks its bos
    maskable = text_targets(text_valid, answer, pad_is_target=pad_is_target)

    img_mask = random_mask(k_mi, jnp.ones((b, h * w), bool), r_img).reshape(b, h, w)
    img_mask = img_mask & img_rows[:, None, None]
    txt_mask, txt_weight = _text_mask(k_mt, maskable, text_valid, r_txt, config)
    txt_mask = txt_mask & txt_rows[:, None]

    image_in = apply_mask(image_ids, img_mask, config.image_mask_id)
    text_in = apply_mask(text_ids_cond, txt_mask, config.text_mask_id)
    timestep = jnp.where(img_rows, r_img, r_txt)
    inputs = (image_in, text_in, timestep, micro_conds)
    n_generated = generated_rows(config.mode, config.t2i_fraction, b)
    if config.t2i_stop_gradient:
        image_logits, text_logits = _forward_t2i_apart(forward_fn, params, inputs, n_generated,
                                                       config)
    else:
        image_logits, text_logits = forward_fn(params, *inputs, generated_rows=n_generated)

    img_ce, img_correct = _masked_ce(image_logits, image_ids, img_mask)
    if text_logits is None:  # a T2I-only generator (no text head): every row must be T2I
        if config.mode != "split" or round(b * config.t2i_fraction) != b:
            raise ValueError("the model has no text head (T2I only): set loss.mode='split' and "
                             "loss.t2i_fraction=1")
        txt_ce, txt_correct = jnp.zeros((b,)), jnp.zeros((b, l), bool)
    else:
        txt_ce, txt_correct = _masked_ce(text_logits, text_ids, txt_mask,
                                         _pad_weighted(txt_weight, text_valid, config))
    img_loss_i = img_ce / (h * w) * _weight(u_img, r_img, img_mask.sum((1, 2)), h * w,
                                            schedule, config)
    txt_loss_i = txt_ce / l
    if txt_weight is None:  # otherwise the strata's count weights are already in txt_ce
        txt_loss_i = txt_loss_i * _weight(u_txt, r_txt, txt_mask.sum(-1), maskable.sum(-1),
                                          schedule, config)

    image_loss = _masked_mean(img_loss_i, img_rows)
    text_loss = _masked_mean(txt_loss_i, txt_rows)
    loss = image_loss + config.text_loss_weight * text_loss
    metrics = {
        "loss": loss,
        "image_loss": image_loss,
        "text_loss": text_loss,
        "image_acc": img_correct.sum() / jnp.maximum(img_mask.sum(), 1),
        "text_acc": txt_correct.sum() / jnp.maximum(txt_mask.sum(), 1),
        "image_mask_ratio": _masked_mean(r_img, img_rows),
        "text_mask_ratio": _masked_mean(r_txt, txt_rows),
    }
    if answer is not None and text_logits is not None:
        metrics.update(_answer_metrics(text_logits, text_ids, txt_mask, answer, text_valid))
    return loss, metrics


def _answer_metrics(text_logits: Array, text_ids: Array, txt_mask: Array, answer: Array,
                    text_valid: Array) -> dict[str, Array]:
    """``answer_ce`` (mean nats, unweighted) and ``answer_acc`` over the masked answer tokens
    (answer words and eos, no padding) of the rows with a question, apart from the captions'.

    A row has a question when its bos lies outside the answer region (caption rows' region is
    the whole row). 0 when a batch masks no such token."""
    tokens = txt_mask & answer & text_valid & ~answer[:, :1]
    ce_sum, n_correct = _masked_ce(text_logits, text_ids, tokens)
    n = jnp.maximum(tokens.sum(), 1).astype(jnp.float32)
    return {"answer_ce": ce_sum.sum() / n, "answer_acc": n_correct.sum() / n}


def make_loss_fn(
    forward_fn: ForwardFn, config: LossConfig
) -> Callable[[Any, Mapping[str, Array], Array], tuple[Array, dict[str, Array]]]:
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` for ``value_and_grad(has_aux=True)``."""

    def loss_fn(params: Any, batch: Mapping[str, Array], rng: Array):
        return diffusion_loss(
            forward_fn=forward_fn, params=params, batch=batch, rng=rng, config=config
        )

    return loss_fn
