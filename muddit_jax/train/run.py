"""What a run builds from its config: mesh, rules, networks, optimizer, state setup, the step.

:func:`build_run` is shared by the trainer (:mod:`muddit_jax.train.loop`) and by anything that
needs the same compiled step without the loop (tests, AOT compiles for a target topology).
:func:`init_state` restores the latest checkpoint onto the run's mesh or initialises.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from muddit_jax.parallel.mesh import MeshConfig, create_mesh
from muddit_jax.parallel.rules import get_rules
from muddit_jax.parallel.sharding import (
    BATCH_AXIS,
    batch_shardings,
    global_batch,
    sharding_context,
)
from muddit_jax.train import config as C
from muddit_jax.train.checkpoint import Checkpointer, load_params
from muddit_jax.train.optimizer import make_optimizer
from muddit_jax.train.state import Networks, StateSetup, TrainState, setup_state
from muddit_jax.train.step import make_train_step, muddit_loss_fn, vq_encode_fn


def abstract_batch(
    config: ml_collections.ConfigDict, model: Any
) -> dict[str, jax.ShapeDtypeStruct]:
    """Global batch shapes and dtypes the step is compiled for."""
    b, g, l = config.data.global_batch, config.data.grid, config.data.text_length
    out = {
        "text_ids": jax.ShapeDtypeStruct((b, l), jnp.int32),
        "text_valid": jax.ShapeDtypeStruct((b, l), jnp.bool_),
        "micro_conds": jax.ShapeDtypeStruct((b, 5), jnp.float32),
    }
    if config.data.text_maskable:  # VQA: which text positions may be masked
        out["text_maskable"] = jax.ShapeDtypeStruct((b, l), jnp.bool_)
    if config.data.images and not config.data.get("pretokenize", False):  # else codes
        size = g * model.vq.downsample_factor
        out["images"] = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)
    else:
        out["image_ids"] = jax.ShapeDtypeStruct((b, g, g), jnp.int32)
    return out


def batch_shards(mesh: Any, rules: Any) -> int:
    """How many ways the batch is split (product of the ``act_batch`` mesh axes)."""
    axes = next((m for n, m in rules if n == BATCH_AXIS), None)
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return math.prod(mesh.shape[a] for a in axes)


def validate(config: ml_collections.ConfigDict, shards: int, model: Any) -> None:
    """Clear errors for inconsistent batch / accumulation / shape settings."""
    b, k = config.data.global_batch, config.train.grad_accum
    if k < 1 or b % k:
        raise ValueError(f"data.global_batch={b} must be a multiple of train.grad_accum={k}")
    micro = b // k
    if micro % shards:
        raise ValueError(
            f"micro-batch {micro} (data.global_batch / train.grad_accum) must be a multiple of the "
            f"{shards} batch shards (mesh data x fsdp); change the batch or the mesh"
        )
    if config.loss.mode == "split" and micro % 2:
        raise ValueError(f"loss.mode='split' needs an even micro-batch, got {micro}")
    if config.data.text_length > model.text.max_position_embeddings:
        raise ValueError(
            f"data.text_length={config.data.text_length} exceeds the text encoder's "
            f"{model.text.max_position_embeddings} positions"
        )
    e, a = config.eval, config.artifacts
    if e.every or e.at_end or a.every or a.at_end:
        what = "eval.every/at_end and artifacts.every/at_end"
        if not config.data.images:
            raise ValueError(f"{what} decode images with the VQ: set data.images=True")
        if not config.data.tokenizer:
            raise ValueError(f"{what} need data.tokenizer")
        from muddit_jax.eval.job import check_sampling

        check_sampling(e)
    code_init_edit(config)  # raises on a bad model.code_init
    if config.checkpoint.every < 1 or config.log.every < 1:
        raise ValueError("checkpoint.every and log.every must be >= 1")


@dataclasses.dataclass
class Run:
    """Everything a run builds from its config before touching data or checkpoints."""

    config: ml_collections.ConfigDict
    mesh: Any
    rules: Any
    model: Any
    nets: Networks
    trainable: tuple[str, ...]
    setup: StateSetup
    step_fn: Any
    batch_abstract: dict[str, jax.ShapeDtypeStruct]
    batch_shardings: dict[str, NamedSharding]

    def lower(self) -> jax.stages.Lowered:
        """The step jitted with explicit in/out shardings and donated state, lowered for the
        abstract state and batch (under the mesh + rules, so activation constraints apply)."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        with sharding_context(self.mesh, self.rules):
            return jax.jit(
                self.step_fn, in_shardings=(self.setup.shardings, self.batch_shardings),
                out_shardings=(self.setup.shardings, replicated), donate_argnums=0,
            ).lower(self.setup.abstract, self.batch_abstract)

    def compile(self) -> jax.stages.Compiled:
        """Ahead-of-time compiled step (done once at start-up)."""
        return self.lower().compile()

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> the global, sharded batch (extra keys, e.g. ``index``, are
        dropped)."""
        missing = sorted(set(self.batch_shardings) - set(local))
        if missing:
            raise ValueError(f"the data iterator's batch lacks {missing}; check data.images / "
                             "data.text_maskable against the dataset")
        local = {k: local[k] for k in self.batch_shardings}
        return global_batch(local, self.batch_shardings, self.config.data.global_batch)


def text_mask_id(config: ml_collections.ConfigDict, model: Any) -> int | None:
    """The ``<mask>`` id of ``data.tokenizer`` (what the samplers start from), checked against the
    text vocabulary; ``None`` without a tokenizer (``loss.text_mask_id`` then decides)."""
    if not config.data.tokenizer or config.loss.text_mask_id >= 0:
        return None
    from muddit_jax.models.tokenizers import load_tokenizer

    tok = load_tokenizer(config.data.tokenizer, add_mask_token=True)
    if tok.vocab_size > model.text.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the text encoder only "
                         f"{model.text.vocab_size}; raise model.text_vocab_size")
    return tok.mask_id


def build_run(config: ml_collections.ConfigDict, devices: Any = None) -> Run:
    """Mesh, rules, networks, optimizer, state setup and the step for ``config``."""
    mesh = create_mesh(MeshConfig.from_config(config.mesh), devices)
    rules = get_rules(config.mesh.rules)
    model = C.model_config(config)
    validate(config, batch_shards(mesh, rules), model)
    trainable = C.trainable(config)
    nets = Networks.build(
        model, dtype=C.dtype(config.model.dtype), param_dtype=C.dtype(config.model.param_dtype),
        remat=config.model.remat, remat_policy=config.model.remat_policy or None,
        scan_layers=config.model.scan_layers, with_vq=config.data.images,
    )
    tx, schedule = make_optimizer(config.optim, int(config.train.steps))
    setup = setup_state(
        nets, tx, mesh, rules, trainable=trainable, ema=config.train.ema_decay > 0,
        grid=config.data.grid, text_length=config.data.text_length,
    )
    step_fn = make_train_step(
        muddit_loss_fn(nets, C.loss_config(config, model, text_mask_id(config, model))), tx,
        schedule=schedule,
        accum_steps=config.train.grad_accum, ema_decay=config.train.ema_decay,
        encode_fn=vq_encode_fn(nets) if config.data.images else None,
    )
    batch_abs = abstract_batch(config, model)
    return Run(config, mesh, rules, model, nets, trainable, setup, step_fn, batch_abs,
               batch_shardings(mesh, rules, batch_abs))


def init_state(run: Run, ckpt: Checkpointer, data: Any) -> tuple[TrainState, bool]:
    """Restore the latest checkpoint onto ``run``'s mesh, else a sharded (pretrained) init."""
    config = run.config
    step_seed = C.sub_seed(config, "train.step_seed")  # checked on resume too
    restored = ckpt.restore_or_none(run.setup.abstract)
    if restored is not None:
        data.set_state(restored.data_iter)
        return restored.state, True
    pretrained = {}
    if config.train.init_from:
        shardings = None if config.model.scan_layers else run.setup.param_shardings
        pretrained = load_params(config.train.init_from, shardings=shardings)
        if config.model.scan_layers and "mmdit" in pretrained:
            from muddit_jax.models.mmdit import stack_block_params

            pretrained["mmdit"] = stack_block_params(pretrained["mmdit"])
        mm = run.nets.muddit.config.mmdit
        if mm.condition_image_input and "mmdit" in pretrained:
            from muddit_jax.models.mmdit import add_condition_input

            # a checkpoint without the condition's path: it starts as the trained usual one
            pretrained["mmdit"] = add_condition_input(pretrained["mmdit"])
            last = f"condition_down_convnext_{mm.conv_blocks + mm.condition_conv_blocks - 1}"
            if mm.condition_conv_blocks and last not in pretrained["mmdit"]:
                raise ValueError(
                    f"model.condition_conv_blocks={mm.condition_conv_blocks}: train.init_from "
                    f"{config.train.init_from} has no {last}; start such a run fresh or from "
                    "a checkpoint with as many condition blocks")
    if config.train.vq_from:
        if not config.data.images:
            raise ValueError("train.vq_from needs data.images=True (the VQ encodes the images)")
        pretrained["vq"] = load_params(config.train.vq_from)["vq"]
    # model.code_init shapes a fresh MM-DiT; one from train.init_from keeps its trained codes
    edit = None if "mmdit" in pretrained else code_init_edit(config)
    state = run.setup.init(config.seed, pretrained or None, edit=edit, step_seed=step_seed)
    return state, False


CODE_INITS = ("random", "codebook")


def code_init_edit(config: ml_collections.ConfigDict) -> Any:
    """The initial-params edit of ``model.code_init``: ``"codebook"`` sets the MM-DiT's code
    embedding and MLM output from the VQ codebook (:func:`~muddit_jax.models.mmdit.codebook_init`;
    needs the VQ in the run; an MM-DiT from ``train.init_from`` is not edited), ``"random"``
    none."""
    mode = config.model.code_init
    if mode not in CODE_INITS:
        raise ValueError(f"model.code_init={mode!r}: use one of {CODE_INITS}")
    if mode == "random":
        return None
    if not config.data.images:
        raise ValueError("model.code_init='codebook' initialises the MM-DiT from the run's VQ: "
                         "it needs data.images=True (or set model.code_init='random')")
    from muddit_jax.models.mmdit import codebook_init

    def edit(params: dict[str, Any]) -> dict[str, Any]:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
        book = params["vq"]["codebook"]["embedding"]
        return {**params, "mmdit": codebook_init(params["mmdit"], book, key)}

    return edit
