"""The one table mapping logical axis names to mesh axes.

Modules annotate parameters and activations with the logical names below (via
``nn.with_logical_partitioning`` / ``nn.with_logical_constraint``); nothing else in the code base
knows about mesh axes. Mesh axes are ``data``, ``fsdp`` and ``tensor``.

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
  act_batch, act_len, act_embed, act_heads, act_kv, act_vocab
"""

from __future__ import annotations

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

DEFAULT_RULES: Rules = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
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

LOGICAL_AXES: frozenset[str] = frozenset(name for name, _ in DEFAULT_RULES)
