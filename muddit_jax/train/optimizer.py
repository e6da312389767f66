"""The optimizer: global-norm clipping + AdamW with a decay mask and a warmup schedule.

Weight decay applies only to matrices named ``kernel`` (dense / conv weights); norms (``scale``,
``bias``), biases and embedding tables (``embedding``) are excluded, as is common for transformers.
Only trainable sub-models are passed to the optimizer, so frozen ones get no Adam state.
``optim.freeze`` freezes single leaves inside them too (e.g. the MM-DiT's code embedding, kept at
its ``model.code_init="codebook"`` values): their gradients are zeroed before clipping and their
updates after AdamW, so they never move and take no share of the clipped global norm.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

from muddit_jax.tree_paths import match_leaves

SCHEDULES = ("constant", "cosine")


def make_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then constant or cosine to ``end_lr_ratio``."""
    lr, warmup = float(cfg["lr"]), int(cfg["warmup_steps"])
    if cfg["schedule"] == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    if cfg["schedule"] == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup, max(total_steps, warmup + 1), lr * float(cfg["end_lr_ratio"])
        )
    raise ValueError(f"optim.schedule={cfg['schedule']!r}: use one of {SCHEDULES}")


def decay_mask(params: Any) -> Any:
    """``True`` for leaves named ``kernel`` (decayed), ``False`` elsewhere (same tree)."""

    def is_kernel(path: tuple, _: Any) -> bool:
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return bool(keys) and keys[-1] == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def freeze_mask(patterns: str) -> Any:
    """``params -> bool tree``: a leaf is frozen when its ``/``-joined path
    (``mmdit/embed/embeddings/embedding``) fully matches one of the comma-separated regexes or
    ``@group`` names; an entry that matches nothing raises
    (:func:`muddit_jax.tree_paths.match_leaves`)."""
    return lambda params: match_leaves(params, patterns, "optim.freeze")


def make_optimizer(
    cfg: Mapping[str, Any], total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)`` from ``config.optim``; clipping is skipped when ``clip_norm <= 0``;
    leaves matched by ``freeze`` (see :func:`freeze_mask`) are never updated."""
    schedule = make_schedule(cfg, total_steps)
    adamw = optax.adamw(
        schedule, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"],
        weight_decay=cfg["weight_decay"], mask=decay_mask,
    )
    clip = float(cfg["clip_norm"])
    tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
    if cfg.get("freeze", ""):
        # zero frozen grads before clipping (no share of the norm, zero moments) and the
        # updates after AdamW (no weight decay either)
        zero = optax.masked(optax.set_to_zero(), freeze_mask(cfg["freeze"]))
        tx = optax.chain(zero, tx, zero)
    return tx, schedule
