"""Multi-process start-up: ``jax.distributed.initialize`` from config or the environment.

Call :func:`initialize` before anything touches a JAX device. Sources, in order:

1. explicit config (``config.distributed.coordinator_address`` / ``num_processes`` /
   ``process_id``), e.g. from ``launch/local.sh``;
2. the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
   ``JAX_PROCESS_ID`` (and optional ``JAX_LOCAL_DEVICE_IDS``, comma separated);
3. cluster auto-detection by JAX (Cloud TPU pod slices, SLURM ``srun``, Open MPI), used when
   ``mode="auto"`` finds such a cluster or ``mode="cluster"`` forces it.

``mode="none"`` (or a single-process run with nothing configured) does nothing.

A runtime started here is stopped at exit by :func:`shutdown`, which keeps the coordinator's
service up for ``SERVICE_GRACE_S`` after the shutdown barrier: stopping it while the other
processes' last RPCs are still arriving can abort the coordinator in gRPC's server teardown
(``Check failed: queue.Pop() == nullptr``, seen with jaxlib 0.10.2).
"""

from __future__ import annotations

import atexit
import os
import time
from typing import Any, Mapping

import jax

MODES = ("auto", "none", "explicit", "cluster")
SERVICE_GRACE_S = 2.0


def shutdown(grace_s: float = SERVICE_GRACE_S) -> None:
    """Stop the distributed runtime: every process's client (JAX's shutdown barrier), then,
    on the coordinator, the service ``grace_s`` later. A no-op when nothing is running."""
    state = getattr(getattr(jax._src, "distributed", None), "global_state", None)  # private
    service = getattr(state, "service", None)
    if service is not None:
        state.service = None  # jax.distributed.shutdown then stops only the client
    jax.distributed.shutdown()
    if service is not None:
        time.sleep(grace_s)
        service.shutdown()


def _start(*args: Any, **kwargs: Any) -> None:
    jax.distributed.initialize(*args, **kwargs)
    atexit.register(shutdown)  # runs before JAX's own exit hook, which then finds nothing


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _in_cluster() -> bool:
    """True when JAX's auto-detection would find a multi-process cluster."""
    slurm = _env_int("SLURM_NTASKS") or 1
    ompi = _env_int("OMPI_COMM_WORLD_SIZE") or 1
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    megascale = "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    return slurm > 1 or ompi > 1 or len(tpu_hosts) > 1 or megascale


def initialize(cfg: Mapping[str, Any] | None = None) -> bool:
    """Start the JAX distributed runtime if this run is multi-process; returns whether it did.

    ``cfg`` is ``config.distributed`` (keys: ``mode``, ``coordinator_address``,
    ``num_processes``, ``process_id``, ``local_device_ids``); see the module docstring.
    """
    cfg = dict(cfg or {})
    mode = cfg.get("mode", "auto")
    if mode not in MODES:
        raise ValueError(f"config.distributed.mode={mode!r}: use one of {MODES}")
    if mode == "none" or jax.distributed.is_initialized():
        return False
    address = cfg.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = cfg.get("num_processes") or _env_int("JAX_NUM_PROCESSES")
    pid = cfg.get("process_id")
    pid = _env_int("JAX_PROCESS_ID") if pid is None or pid < 0 else pid
    local = cfg.get("local_device_ids") or os.environ.get("JAX_LOCAL_DEVICE_IDS")
    if isinstance(local, str):
        local = [int(i) for i in local.split(",") if i]
    if address and mode in ("auto", "explicit"):
        if num is None or pid is None:
            raise ValueError(
                f"coordinator_address={address!r} needs num_processes and process_id (config."
                "distributed.* or JAX_NUM_PROCESSES / JAX_PROCESS_ID)"
            )
        _start(address, int(num), int(pid), local_device_ids=local or None)
        return True
    if mode == "explicit":
        raise ValueError("config.distributed.mode='explicit' needs coordinator_address")
    if mode == "cluster" or _in_cluster():
        _start(local_device_ids=local or None)
        return True
    return False
