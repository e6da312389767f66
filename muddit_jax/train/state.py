"""Train state, the networks it holds, and its sharded initialisation.

Flow (the MaxDiffusion/MaxText pattern): ``jax.eval_shape`` of the model init gives boxed
abstract params -> logical ``PartitionSpec``s -> ``NamedSharding``s through the rules table ->
the optimizer-state shardings mirror the params (``optax.tree_map_params``) -> a jitted init with
``out_shardings`` creates every array directly on its shards.

Params are split by sub-model: ``state.params`` holds the trainable ones (``train.trainable``,
e.g. ``{"mmdit": ...}``), which alone get Adam moments and EMA; ``state.frozen`` holds the rest
(the text encoder by default, and the VQ when raw images are encoded inside the step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from muddit_jax.models.muddit import Muddit, MudditConfig
from muddit_jax.models.vq import VQModel
from muddit_jax.parallel.rules import Rules
from muddit_jax.parallel.sharding import logical_shardings, sharding_context


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; checkpointed whole.

    Attributes:
      step: number of batches consumed (also counts skipped non-finite steps).
      params: trainable sub-models ``{name: params}`` (fp32 master copy).
      frozen: frozen sub-models, never differentiated and without optimizer state.
      opt_state: optax state of ``params``.
      ema_params: EMA of ``params`` (``None`` when ``train.ema_decay == 0``).
      rng: base PRNG key (raw ``uint32[2]``); the step's key is ``fold_in(rng, step)``.
      nonfinite_streak: consecutive steps whose loss or gradients were not finite.
      nonfinite_total: all such (skipped) steps.
    """

    step: jax.Array
    params: dict[str, Any]
    frozen: dict[str, Any]
    opt_state: Any
    ema_params: dict[str, Any] | None
    rng: jax.Array
    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array

    def all_params(self, ema: bool = False) -> dict[str, Any]:
        """``{**frozen, **trainable}``, the trainable part from the EMA when ``ema``."""
        trained = self.ema_params if ema and self.ema_params is not None else self.params
        return {**self.frozen, **trained}


@dataclasses.dataclass(frozen=True)
class Networks:
    """The modules a run uses; ``vq`` is set when images are encoded inside the step."""

    muddit: Muddit
    vq: VQModel | None

    @classmethod
    def build(
        cls, config: MudditConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
        remat: bool = False, remat_policy: str | None = None, scan_layers: bool = False,
        with_vq: bool = False,
    ) -> Networks:
        muddit = Muddit(config, dtype=dtype, param_dtype=param_dtype, remat=remat,
                        scan_layers=scan_layers, remat_policy=remat_policy or None)
        return cls(muddit, VQModel(config.vq, param_dtype=param_dtype) if with_vq else None)

    def init(self, rng: jax.Array, grid: int, text_length: int) -> dict[str, Any]:
        """Boxed (logically annotated) params ``{"text_encoder", "mmdit"[, "vq"]}``."""
        k_m, k_v = jax.random.split(rng)
        params = dict(self.muddit.init(
            k_m, jnp.zeros((1, grid, grid), jnp.int32), jnp.zeros((1, text_length), jnp.int32),
            jnp.zeros((1,), jnp.float32), jnp.zeros((1, 5), jnp.float32),
        )["params"])
        if self.vq is not None:
            f = self.vq.config.downsample_factor
            images = jnp.zeros((1, f, f, self.vq.config.in_channels), jnp.float32)
            params["vq"] = self.vq.init(k_v, images)["params"]
        return params


def split_params(
    params: Mapping[str, Any], trainable: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(trainable, frozen)`` sub-model dicts."""
    missing = [n for n in trainable if n not in params]
    if missing:
        raise ValueError(f"train.trainable names {missing} not in the params {sorted(params)}")
    return ({k: v for k, v in params.items() if k in trainable},
            {k: v for k, v in params.items() if k not in trainable})


def new_state(
    params: Mapping[str, Any], rng: jax.Array, tx: optax.GradientTransformation,
    trainable: tuple[str, ...], ema: bool,
) -> TrainState:
    """A step-0 state from (unboxed) params."""
    train, frozen = split_params(params, trainable)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero, params=train, frozen=frozen, opt_state=tx.init(train),
        ema_params=jax.tree.map(jnp.copy, train) if ema else None,
        rng=rng, nonfinite_streak=zero, nonfinite_total=zero,
    )


@dataclasses.dataclass
class StateSetup:
    """Abstract state, shardings and sharded constructors for one mesh.

    Attributes:
      abstract: ``TrainState`` of ``jax.ShapeDtypeStruct`` with ``sharding`` set (the restore
        target of a checkpoint on this mesh).
      shardings: ``TrainState`` of ``NamedSharding``.
      param_shardings: shardings of the full params dict (trainable and frozen).
    """

    abstract: TrainState
    shardings: TrainState
    param_shardings: dict[str, Any]
    mesh: Mesh
    rules: Rules
    _init_params: Callable[[jax.Array], dict[str, Any]]
    _from_params: Callable[[dict[str, Any], jax.Array], TrainState]

    def init(self, seed: int, params: Mapping[str, Any] | None = None,
             edit: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
             step_seed: int | None = None) -> TrainState:
        """Sharded random init; sub-models present in ``params`` (host or device arrays,
        unboxed) replace the random ones (e.g. pretrained text encoder / VQ / MM-DiT); then
        ``edit(params) -> params`` (same tree and shapes) may rewrite the initial values. The
        steps' base key comes from ``step_seed`` (default ``seed``), the params' from ``seed``."""
        k_params = jax.random.split(jax.random.PRNGKey(seed))[0]
        k_train = jax.random.split(jax.random.PRNGKey(seed if step_seed is None else step_seed))[1]
        with sharding_context(self.mesh, self.rules):
            full = self._init_params(k_params)
            for name, sub in (params or {}).items():
                if name not in full:
                    raise ValueError(f"pretrained sub-model {name!r} is not part of this model")
                full[name] = _put_like(sub, full[name], self.param_shardings[name], name)
            if edit is not None:
                edited = edit(full)
                full = {n: _put_like(edited[n], full[n], self.param_shardings[n], n) for n in full}
            return self._from_params(full, k_train)


def _put_like(tree: Any, like: Any, shardings: Any, name: str) -> Any:
    """``tree`` placed like ``like`` (same structure, shapes and dtypes) on ``shardings``."""
    try:
        jax.tree.map(lambda a, b: None, tree, like)
    except ValueError as e:
        raise ValueError(f"pretrained {name} params do not match the model's tree: {e}") from None

    def put(x, ref, sh):
        if tuple(np.shape(x)) != ref.shape:
            raise ValueError(f"pretrained {name} param of shape {np.shape(x)} != {ref.shape}")
        x = x.astype(ref.dtype) if isinstance(x, jax.Array) else np.asarray(x, ref.dtype)
        return jax.device_put(x, sh)

    return jax.tree.map(put, tree, like, shardings)


def optimizer_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                        param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of ``tx``'s state: moments like their params, other leaves replicated."""
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt_state, param_shardings,
        transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """``abstract`` with each leaf's ``sharding`` set: the restore target on this mesh."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def setup_state(
    nets: Networks, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules, *,
    trainable: tuple[str, ...], ema: bool, grid: int, text_length: int,
) -> StateSetup:
    """Abstract state -> shardings -> jitted sharded constructors (see the module docstring)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    rng = jax.random.PRNGKey(0)
    with sharding_context(mesh, rules):
        boxed = jax.eval_shape(lambda k: nets.init(k, grid, text_length), rng)
    param_sh = logical_shardings(boxed, mesh, rules)
    abstract_params = nn.unbox(boxed)

    def build(params: Any, rng: jax.Array) -> TrainState:
        return new_state(params, rng, tx, trainable, ema)

    abstract = jax.eval_shape(build, abstract_params, rng)
    train_sh, frozen_sh = split_params(param_sh, trainable)
    opt_sh = optimizer_shardings(tx, abstract.opt_state, train_sh, mesh)
    shardings = TrainState(
        step=replicated, params=train_sh, frozen=frozen_sh, opt_state=opt_sh,
        ema_params=train_sh if ema else None, rng=replicated,
        nonfinite_streak=replicated, nonfinite_total=replicated,
    )
    abstract = with_shardings(abstract, shardings)
    init_params = jax.jit(
        lambda k: nn.unbox(nets.init(k, grid, text_length)), out_shardings=param_sh
    )
    from_params = jax.jit(build, out_shardings=shardings, donate_argnums=0)
    return StateSetup(abstract, shardings, param_sh, mesh, rules, init_params, from_params)
