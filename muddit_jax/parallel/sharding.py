"""Logical annotations -> ``NamedSharding``s, the sharding context, and global batches.

* :func:`mesh_spec` / :func:`tree_shardings`: logical ``PartitionSpec``s (from
  ``nn.get_partition_spec`` of a boxed abstract tree) to mesh shardings through the rules table;
  a dimension that a mesh axis does not divide falls back to the next rule for that name, else
  to replication (e.g. a 17-row codebook on 8 tensor shards).
* :func:`sharding_context`: mesh + rules active while tracing, so the modules'
  ``nn.with_logical_constraint`` calls take effect.
* :func:`batch_sharding`, :func:`host_rows`, :func:`global_batch`: the batch is split over
  ``act_batch`` on its first axis; each process feeds only the rows its devices hold and the
  global array is assembled with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from muddit_jax.parallel.rules import Rules

BATCH_AXIS = "act_batch"


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def mesh_spec(
    logical: PartitionSpec | tuple | None, shape: tuple[int, ...], mesh: Mesh, rules: Rules
) -> PartitionSpec:
    """Mesh ``PartitionSpec`` for an array of ``shape`` with logical axis names ``logical``.

    Rules are applied in order (a mesh axis at most once per array). Mesh axes of size 1 are
    dropped; a rule left with no axes, with an axis already used by this array, or whose axes do
    not divide the dimension is skipped, so the next rule for that name (or replication) applies.
    A rule mapping to ``None`` replicates the dimension.
    """
    if logical is None or len(logical) == 0:
        return PartitionSpec()
    names = tuple(logical)
    if len(names) != len(shape):
        raise ValueError(f"logical axes {names} do not match array shape {shape}")
    out: list[Any] = [None] * len(names)
    done = [n is None for n in names]
    used: set[str] = set()
    for rule_name, rule_mesh in rules:
        if rule_name not in names or done[names.index(rule_name)]:
            continue
        pos = names.index(rule_name)
        if rule_mesh is None:  # explicitly replicated
            done[pos] = True
            continue
        axes = tuple(a for a in _axes(rule_mesh) if mesh.shape[a] > 1)
        if not axes or used & set(axes) or shape[pos] % math.prod(mesh.shape[a] for a in axes):
            continue  # not applicable here: a later rule for this name may apply
        done[pos] = True
        out[pos] = axes[0] if len(axes) == 1 else axes
        used.update(axes)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def tree_shardings(logical_specs: Any, abstract: Any, mesh: Mesh, rules: Rules) -> Any:
    """``NamedSharding`` for every leaf of ``abstract`` from the matching logical spec."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, mesh_spec(spec, x.shape, mesh, rules)),
        logical_specs,
        abstract,
        is_leaf=lambda s: isinstance(s, PartitionSpec) or s is None,
    )


def logical_shardings(boxed_abstract: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings of an (abstract) tree whose leaves may be boxed ``nn.Partitioned``."""
    return tree_shardings(
        nn.get_partition_spec(boxed_abstract), nn.unbox(boxed_abstract), mesh, rules
    )


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Mesh and logical-axis rules active (for tracing jitted steps and sharded init)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int, rows: int | None = None) -> NamedSharding:
    """Sharding of a batch leaf ``[b, ...]``: ``act_batch`` on the first axis."""
    shape = (rows if rows is not None else 0,) + (1,) * (ndim - 1)
    spec = mesh_spec((BATCH_AXIS,) + (None,) * (ndim - 1), shape, mesh, rules)
    return NamedSharding(mesh, spec)


def batch_shardings(
    mesh: Mesh, rules: Rules, batch: Mapping[str, Any]
) -> dict[str, NamedSharding]:
    """``batch_sharding`` for every leaf of a (possibly abstract) batch dict."""
    return {k: batch_sharding(mesh, rules, np.ndim(v) or len(v.shape), v.shape[0])
            for k, v in batch.items()}


def host_rows(sharding: NamedSharding, global_rows: int) -> slice:
    """Rows of the global batch that this process's devices hold (a contiguous slice)."""
    index = sharding.addressable_devices_indices_map((global_rows,))
    starts = sorted({idx[0].indices(global_rows)[0] for idx in index.values()})
    stops = sorted({idx[0].indices(global_rows)[1] for idx in index.values()})
    span = slice(starts[0], stops[-1])
    size = stops[0] - starts[0]
    if (span.stop - span.start) != size * len(starts):
        raise ValueError(
            f"this process's batch rows are not contiguous ({starts}); reorder the mesh so each "
            "process owns one block of the data/fsdp axes"
        )
    return span


def global_batch(
    local: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding], global_rows: int
) -> dict[str, jax.Array]:
    """Assemble the global batch from this process's rows (see :func:`host_rows`)."""
    return {
        k: jax.make_array_from_process_local_data(
            shardings[k], np.asarray(v), (global_rows,) + tuple(np.shape(v)[1:])
        )
        for k, v in local.items()
    }
