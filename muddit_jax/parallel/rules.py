"""The one table mapping logical axis names to mesh axes, and its named presets.

Modules annotate parameters and activations with the logical names below (via
``nn.with_logical_partitioning`` / ``nn.with_logical_constraint``); nothing else in the code base
knows about mesh axes. Mesh axes are ``data``, ``fsdp`` and ``tensor``
(:mod:`muddit_jax.parallel.mesh` builds the mesh).

Parameter axes:
  embed      model width of a transformer stream (FSDP-sharded)
  mlp        feed-forward hidden width (tensor-parallel)
  heads      fused ``heads * head_dim`` projection width (tensor-parallel)
  kv         per-head width (replicated)
  vocab      vocabulary / codebook rows of embeddings and output heads (tensor-parallel)
  cond       width of conditioning inputs (timestep/pooled/micro-conditions, adaLN inputs)
  norm       scale/bias of normalisation layers (replicated)
  conv_in / conv_out   input/output channels of convolutions
  layers     the stacked axis of ``nn.scan``-ed blocks (replicated)
Activation axes:
  act_batch, act_len, act_embed, act_heads, act_kv, act_mlp, act_vocab

Rules are Flax logical-axis rules: for each array, rules are applied in order and a mesh axis is
used at most once per array, so a later rule for the same logical name is a fallback that applies
when the earlier mesh axis is already taken (or a dimension is not divisible by it, see
:func:`muddit_jax.parallel.sharding.mesh_spec`).

Presets (:data:`PRESETS`, chosen by ``config.mesh.rules``):
  default  Megatron-style tensor parallelism on ``tensor`` + ZeRO-3 on ``fsdp`` + data parallel
           on ``data``; the batch is split over ``data`` x ``fsdp``. Works for any mesh shape.
  data     every parameter replicated; the batch is split over all three mesh axes.
  fsdp     ``default`` plus fallbacks that shard 1-D and non-``embed`` parameters (biases, the
           ``mlp``/``heads``/``vocab`` rows) over ``fsdp`` too, so every sizeable tensor is split.
  tensor   ``default`` without the ``fsdp`` parameter sharding (pure tensor + data parallel).
"""

from __future__ import annotations

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

_ACTIVATIONS: Rules = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

DEFAULT_RULES: Rules = _ACTIVATIONS + (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("cond", None),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("layers", None),
)

DATA_RULES: Rules = (("act_batch", MESH_AXES),) + tuple(
    (name, None) for name, _ in DEFAULT_RULES if name != "act_batch"
)

FSDP_RULES: Rules = DEFAULT_RULES + (
    ("mlp", "fsdp"),
    ("heads", "fsdp"),
    ("vocab", "fsdp"),
    ("conv_out", "fsdp"),
    ("cond", "fsdp"),
    ("conv_in", "fsdp"),
)

TENSOR_RULES: Rules = tuple((n, None) if n == "embed" else (n, m) for n, m in DEFAULT_RULES)

PRESETS: dict[str, Rules] = {
    "default": DEFAULT_RULES,
    "data": DATA_RULES,
    "fsdp": FSDP_RULES,
    "tensor": TENSOR_RULES,
}

LOGICAL_AXES: frozenset[str] = frozenset(name for name, _ in DEFAULT_RULES)


def get_rules(name: str) -> Rules:
    """The rules preset ``name`` (see the module docstring)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"config.mesh.rules={name!r} is not a rules preset; use one of {sorted(PRESETS)}"
        ) from None
