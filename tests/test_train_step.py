"""Train step, optimizer and state in-process (1 device): gradient accumulation equals the big
batch, the non-finite guard, EMA, the weight-decay mask, schedules, frozen parts without Adam
state, frozen leaves (``optim.freeze``). Toy losses keep compiles small; the real model runs in
the subprocess tests."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from muddit_jax.parallel.mesh import MeshConfig, create_mesh
from muddit_jax.parallel.rules import get_rules
from muddit_jax.train import config as C
from muddit_jax.train.optimizer import decay_mask, make_optimizer, make_schedule
from muddit_jax.train.state import Networks, TrainState, new_state, setup_state
from muddit_jax.train.step import _micro_batches, accumulate_gradients, make_train_step
from tests.helpers import assert_close

D_IN, D_OUT, B = 3, 2, 8


def toy_loss(trainable, frozen, batch, rng):
    """Per-example-mean squared error of a linear map (+ a frozen offset); rng unused."""
    pred = batch["x"] @ trainable["lin"]["kernel"] + trainable["lin"]["bias"] + frozen["offset"]
    loss = jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=-1))
    return loss, {"loss": loss}


def toy_state(tx, ema: bool = False) -> TrainState:
    rng = np.random.default_rng(0)
    params = {"lin": {"kernel": jnp.asarray(rng.normal(size=(D_IN, D_OUT)), jnp.float32),
                      "bias": jnp.zeros((D_OUT,))},
              "offset": jnp.full((D_OUT,), 0.5)}
    return new_state(params, jax.random.PRNGKey(0), tx, ("lin",), ema)


def toy_batch(seed: int = 1, n: int = B) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.normal(size=(n, D_IN)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(n, D_OUT)), jnp.float32)}


@pytest.mark.parametrize("k", [2, 4])
def test_grad_accumulation_equals_big_batch(k: int) -> None:
    state, batch = toy_state(optax.sgd(0.1)), toy_batch()
    rng = jax.random.PRNGKey(3)
    big, m_big = accumulate_gradients(toy_loss, state.params, state.frozen, batch, rng, 1)
    acc, m_acc = jax.jit(accumulate_gradients, static_argnums=(0, 5))(
        toy_loss, state.params, state.frozen, batch, rng, k)
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-6, "grad"), acc, big)
    assert_close(m_acc["loss"], m_big["loss"], 1e-6, "loss")
    # and through the whole step: same params as one big-batch step
    tx = optax.adamw(1e-2, weight_decay=0.1)
    s1, _ = jax.jit(make_train_step(toy_loss, tx))(toy_state(tx), batch)
    sk, _ = jax.jit(make_train_step(toy_loss, tx, accum_steps=k))(toy_state(tx), batch)
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-6, "params"), sk.params, s1.params)


def test_micro_batches_take_strided_rows() -> None:
    """Micro-batch j holds rows j, j + k, ... (each device keeps its own rows)."""
    batch = {"x": jnp.arange(8.0)[:, None] * jnp.ones((1, D_IN)), "y": jnp.zeros((8, D_OUT))}
    micro = _micro_batches(batch, 2)
    assert micro["x"].shape == (2, 4, D_IN) and micro["y"].shape == (2, 4, D_OUT)
    np.testing.assert_array_equal(micro["x"][:, :, 0], [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_nonfinite_step_is_skipped_and_counted() -> None:
    tx = optax.adam(1e-2)
    step = jax.jit(make_train_step(toy_loss, tx, ema_decay=0.5))
    state = toy_state(tx, ema=True)
    good, bad = toy_batch(1), toy_batch(2)
    bad["x"] = bad["x"].at[0, 0].set(jnp.nan)

    s1, m1 = step(state, good)
    assert float(m1["skipped"]) == 0 and int(s1.nonfinite_streak) == 0
    s2, m2 = step(s1, bad)
    assert not math.isfinite(float(m2["loss"]))
    assert float(m2["skipped"]) == 1 and int(s2.nonfinite_streak) == 1
    for new, old in ((s2.params, s1.params), (s2.opt_state, s1.opt_state),
                     (s2.ema_params, s1.ema_params)):
        jax.tree.map(np.testing.assert_array_equal, new, old)
    s3, _ = step(s2, bad)
    assert int(s3.nonfinite_streak) == 2 and int(s3.nonfinite_total) == 2 and int(s3.step) == 3
    s4, m4 = step(s3, good)
    assert int(s4.nonfinite_streak) == 0 and int(s4.nonfinite_total) == 2
    assert float(m4["skipped"]) == 0
    assert np.all(np.isfinite(s4.params["lin"]["kernel"]))
    assert not np.array_equal(s4.params["lin"]["kernel"], s3.params["lin"]["kernel"])
    # Adam's count only advanced on the two applied updates
    assert int(s4.opt_state[0].count) == 2


def test_poisoned_param_skips_every_step() -> None:
    tx = optax.adam(1e-2)
    state = toy_state(tx)
    state = state.replace(params={"lin": {**state.params["lin"],
                                          "bias": jnp.array([jnp.inf, 0.0])}})
    step = jax.jit(make_train_step(toy_loss, tx))
    for _ in range(3):
        state, metrics = step(state, toy_batch())
        assert float(metrics["skipped"]) == 1
    assert int(state.nonfinite_streak) == 3


def test_ema_update_and_frozen_untouched() -> None:
    tx = optax.sgd(0.1)
    state = toy_state(tx, ema=True)
    new, _ = jax.jit(make_train_step(toy_loss, tx, ema_decay=0.9))(state, toy_batch())
    expect = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema_params, new.params)
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-6, "ema"), new.ema_params, expect)
    np.testing.assert_array_equal(new.frozen["offset"], state.frozen["offset"])
    assert "offset" not in str(jax.tree_util.tree_structure(new.opt_state))


def test_step_rng_folds_in_step() -> None:
    keys = []

    def loss(trainable, frozen, batch, rng):
        keys.append(rng)
        return toy_loss(trainable, frozen, batch, rng)

    tx = optax.sgd(0.1)
    state = toy_state(tx).replace(step=jnp.asarray(7, jnp.int32))
    make_train_step(loss, tx)(state, toy_batch())
    np.testing.assert_array_equal(keys[0], jax.random.fold_in(state.rng, 7))


def muddit_abstract_params() -> dict:
    cfg = C.base_config()
    nets = Networks.build(C.model_config(cfg))
    return nn.unbox(jax.eval_shape(lambda: nets.init(jax.random.PRNGKey(0), 4, 8)))


def test_weight_decay_mask() -> None:
    params = muddit_abstract_params()
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["['mmdit']['transformer_blocks_0']['ff']['proj_in']['kernel']"] is True
    assert flat["['mmdit']['transformer_blocks_0']['ff']['proj_in']['bias']"] is False
    assert flat["['mmdit']['transformer_blocks_0']['attn']['norm_q']['scale']"] is False
    assert flat["['mmdit']['embed']['embeddings']['embedding']"] is False
    assert flat["['text_encoder']['token_embedding']['embedding']"] is False
    assert flat["['text_encoder']['layers_0']['layer_norm1']['bias']"] is False
    assert all(v == path.endswith("['kernel']") for path, v in flat.items())
    # and AdamW applies it: with zero gradients only kernels shrink
    toy = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2), "norm": {"scale": jnp.ones(2)},
           "emb": {"embedding": jnp.ones((3, 2))}}
    tx, _ = make_optimizer(dict(C.base_config().optim, lr=0.1, weight_decay=0.5), 10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, toy), tx.init(toy), toy)
    new = optax.apply_updates(toy, updates)
    assert_close(new["kernel"], np.full((2, 2), 1 - 0.1 * 0.5), 1e-6, "decayed kernel")
    for path in (("bias",), ("norm", "scale"), ("emb", "embedding")):
        leaf = new
        for p in path:
            leaf = leaf[p]
        np.testing.assert_array_equal(leaf, 1.0)


def test_schedules() -> None:
    base = dict(C.base_config().optim, lr=1.0, warmup_steps=4, end_lr_ratio=0.1)
    cosine = make_schedule(dict(base, schedule="cosine"), 14)
    assert [float(cosine(i)) for i in (0, 2, 4)] == [0.0, 0.5, 1.0]
    assert_close(cosine(9), 0.1 + 0.9 * 0.5, 1e-6, "cosine midpoint")
    assert_close(cosine(14), 0.1, 1e-6, "cosine end")
    constant = make_schedule(dict(base, schedule="constant"), 14)
    assert [float(constant(i)) for i in (0, 2, 4, 100)] == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="optim.schedule"):
        make_schedule(dict(base, schedule="linear"), 10)


def test_clipping_uses_global_norm() -> None:
    tx, _ = make_optimizer(dict(C.base_config().optim, clip_norm=1.0), 10)
    params = {"kernel": jnp.zeros((4,))}
    _, opt_state = tx.update({"kernel": jnp.full((4,), 10.0)}, tx.init(params), params)
    mu = opt_state[1][0].mu  # (clip, adamw=(adam, decay mask, schedule)); mu = (1 - b1) * g
    assert_close(optax.global_norm(mu), 0.1 * 1.0, 1e-6, "clipped gradient norm")


def test_freeze_keeps_matched_leaves_and_excludes_them_from_the_norm() -> None:
    base = dict(C.base_config().optim, lr=0.1, weight_decay=0.5, clip_norm=1.0)
    tx, _ = make_optimizer(dict(base, freeze=r"mmdit/emb/.*, mmdit/head/kernel"), 10)
    params = {"mmdit": {"emb": {"embedding": jnp.ones((3, 2))}, "head": {"kernel": jnp.ones((2, 2)),
                                                                       "bias": jnp.ones(2)}}}
    grads = {"mmdit": {"emb": {"embedding": jnp.full((3, 2), 100.0)},
                       "head": {"kernel": jnp.full((2, 2), 100.0), "bias": jnp.full(2, 0.3)}}}
    state, new = tx.init(params), params
    for _ in range(3):
        updates, state = tx.update(grads, state, new)
        new = optax.apply_updates(new, updates)
    # frozen leaves: neither the gradient nor weight decay (the kernel is decayed otherwise) moves them
    np.testing.assert_array_equal(new["mmdit"]["emb"]["embedding"], 1.0)
    np.testing.assert_array_equal(new["mmdit"]["head"]["kernel"], 1.0)
    assert float(jnp.abs(new["mmdit"]["head"]["bias"] - 1.0).min()) > 0.05
    # the bias's gradient (norm 0.42 < clip 1) is not scaled down by the frozen ones' norm of 245
    mu = state[1][1][0].mu  # (zero, (clip, adamw=(adam, ...)), zero)
    assert_close(mu["mmdit"]["head"]["bias"], np.full(2, (1 - 0.9 ** 3) * 0.3), 1e-5, "bias mu")
    np.testing.assert_array_equal(mu["mmdit"]["emb"]["embedding"], 0.0)
    # works with the sharded state setup (optax's placeholder trees) and names the field on a typo
    cfg = C.base_config()
    nets = Networks.build(C.model_config(cfg))
    mesh = create_mesh(MeshConfig(), jax.devices()[:1])
    tx, _ = make_optimizer(dict(cfg.optim, freeze="mmdit/embed/embeddings/embedding"), 10)
    setup_state(nets, tx, mesh, get_rules("default"), trainable=("mmdit",), ema=False, grid=4,
                text_length=8)
    tx, _ = make_optimizer(dict(cfg.optim, freeze="mmdit/embedding"), 10)
    with pytest.raises(ValueError, match="optim.freeze: 'mmdit/embedding' matches no"):
        setup_state(nets, tx, mesh, get_rules("default"), trainable=("mmdit",), ema=False, grid=4,
                    text_length=8)


@pytest.mark.parametrize("trainable", [("mmdit",), ("mmdit", "text_encoder")])
def test_frozen_submodels_have_no_optimizer_state(trainable) -> None:
    cfg = C.base_config()
    nets = Networks.build(C.model_config(cfg), with_vq=True)
    tx, _ = make_optimizer(cfg.optim, 10)
    mesh = create_mesh(MeshConfig(), jax.devices()[:1])
    setup = setup_state(nets, tx, mesh, get_rules("default"), trainable=trainable, ema=True,
                        grid=4, text_length=8)
    abstract = setup.abstract
    assert sorted(abstract.params) == sorted(trainable)
    assert "vq" in abstract.frozen and not set(trainable) & set(abstract.frozen)
    opt_paths = [jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_flatten_with_path(abstract.opt_state)[0]]
    frozen = [n for n in ("vq", "text_encoder") if n not in trainable]
    assert not [p for p in opt_paths if any(f"['{n}']" in p for n in frozen)]
    n_train = sum(x.size for x in jax.tree.leaves(abstract.params))
    n_opt = sum(x.size for x in jax.tree.leaves(abstract.opt_state) if x.ndim)
    assert n_opt == 2 * n_train  # Adam mu + nu of the trainable params only
    assert sorted(abstract.ema_params) == sorted(trainable)


def test_trainable_names_validated() -> None:
    cfg = C.base_config()
    cfg.train.trainable = "mmdit,vq"
    with pytest.raises(ValueError, match="train.trainable"):
        C.trainable(cfg)


def test_loss_ratio_floor_and_weighting_reach_the_loss() -> None:
    """``loss.ratio_floor`` (the floor of r in the 1/r weight) and ``loss.weighting`` are config
    fields: upstream's 1e-3 and "muddit" by default, overridable, validated."""
    from muddit_jax.train.config import base_config, loss_config, model_config

    cfg = base_config()
    assert loss_config(cfg, model_config(cfg)).ratio_floor == 1e-3
    cfg.loss.ratio_floor = 0.2
    assert loss_config(cfg, model_config(cfg)).ratio_floor == 0.2
    cfg.loss.ratio_floor = 0.0
    with pytest.raises(ValueError, match="ratio_floor"):
        loss_config(cfg, model_config(cfg))
    cfg.loss.ratio_floor = 1e-3
    cfg.loss.weighting = "count"
    assert loss_config(cfg, model_config(cfg)).weighting == "count"
    cfg.loss.weighting = "counts"
    with pytest.raises(ValueError, match="weighting must be one of"):
        loss_config(cfg, model_config(cfg))
