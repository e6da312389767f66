"""Mesh construction, the rules presets, logical -> mesh specs, host rows, distributed init."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from muddit_jax.parallel import distributed
from muddit_jax.parallel.mesh import MeshConfig, create_mesh, fill_sizes
from muddit_jax.parallel.rules import DEFAULT_RULES, PRESETS, get_rules
from muddit_jax.parallel.sharding import batch_sharding, host_rows, mesh_spec
from tests.helpers import loopback_address

MESH = types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 2})
FSDP8 = types.SimpleNamespace(shape={"data": 1, "fsdp": 8, "tensor": 1})


def test_fill_sizes() -> None:
    assert fill_sizes((-1, 2, 1), 8, "mesh") == (4, 2, 1)
    assert fill_sizes((2, 2, 2), 8, "mesh") == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one axis"):
        fill_sizes((-1, -1, 1), 8, "mesh")
    with pytest.raises(ValueError, match="multiply to 4 but there are 8"):
        fill_sizes((2, 2, 1), 8, "mesh")
    with pytest.raises(ValueError, match="not divisible"):
        fill_sizes((-1, 3, 1), 8, "mesh")


def test_mesh_config_validation() -> None:
    with pytest.raises(ValueError, match="mesh.fsdp=0"):
        MeshConfig(fsdp=0)
    with pytest.raises(ValueError, match="mesh.granule"):
        MeshConfig(granule="rack")
    cfg = MeshConfig.from_config({"data": 1, "tensor": -1, "rules": "fsdp"})
    assert cfg.ici == (1, 1, -1)


def test_create_mesh_one_device() -> None:
    mesh = create_mesh(MeshConfig(), jax.devices()[:1])
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize(
    "rules, names, shape, expected",
    [
        ("default", ("embed", "mlp"), (32, 128), ("fsdp", "tensor")),
        ("default", ("mlp",), (128,), ("tensor",)),
        ("default", ("vocab", "embed"), (17, 32), (None, "fsdp")),  # 17 rows: not divisible
        ("default", ("norm",), (32,), ()),
        ("data", ("embed", "mlp"), (32, 128), ()),
        ("tensor", ("embed", "mlp"), (32, 128), (None, "tensor")),
        ("fsdp", ("embed", "mlp"), (32, 128), ("fsdp", "tensor")),
        ("default", ("act_batch", None, None), (8, 4, 4), (("data", "fsdp"),)),
        ("data", ("act_batch", None), (8, 4), (("data", "fsdp", "tensor"),)),
    ],
)
def test_mesh_spec_presets(rules, names, shape, expected) -> None:
    assert mesh_spec(names, shape, MESH, get_rules(rules)) == PartitionSpec(*expected)


def test_fsdp_preset_falls_back_to_fsdp_when_tensor_is_absent() -> None:
    rules = get_rules("fsdp")
    assert mesh_spec(("embed", "mlp"), (32, 128), FSDP8, rules) == PartitionSpec("fsdp")
    assert mesh_spec(("mlp",), (128,), FSDP8, rules) == PartitionSpec("fsdp")
    assert mesh_spec(("mlp", "embed"), (128, 36), FSDP8, rules) == PartitionSpec("fsdp")
    # the default preset leaves the bias replicated on the same mesh
    assert mesh_spec(("mlp",), (128,), FSDP8, DEFAULT_RULES) == PartitionSpec()


def test_presets_cover_every_logical_axis() -> None:
    names = {n for n, _ in DEFAULT_RULES}
    for preset in PRESETS.values():
        assert names <= {n for n, _ in preset}
    with pytest.raises(ValueError, match="config.mesh.rules"):
        get_rules("zero3")


def test_host_rows_single_process() -> None:
    mesh = create_mesh(MeshConfig(), jax.devices()[:1])
    sharding = batch_sharding(mesh, DEFAULT_RULES, 3, 8)
    assert isinstance(sharding, NamedSharding)
    assert host_rows(sharding, 8) == slice(0, 8)


def test_distributed_initialize_is_a_noop_for_single_process(monkeypatch) -> None:
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize({"mode": "auto"}) is False
    assert distributed.initialize({"mode": "none", "coordinator_address": "x:1"}) is False
    with pytest.raises(ValueError, match="needs num_processes and process_id"):
        distributed.initialize({"coordinator_address": "127.0.0.1:1"})
    with pytest.raises(ValueError, match="mode='explicit' needs coordinator_address"):
        distributed.initialize({"mode": "explicit"})
    with pytest.raises(ValueError, match="distributed.mode"):
        distributed.initialize({"mode": "mpi"})
    assert np.isscalar(jax.process_count()) and jax.process_count() == 1


SHUTDOWN_WORKER = """
import atexit, sys, time
import jax
from muddit_jax.parallel import distributed
state = jax._src.distributed.global_state
# runs after the hook initialize() registers and before JAX's own: shows that ours stopped both
atexit.register(lambda: print("at exit", state.client is None, state.service is None))
assert distributed.initialize({"coordinator_address": sys.argv[1], "num_processes": 1,
                               "process_id": 0})
assert state.client is not None and state.service is not None
if sys.argv[2] == "explicit":
    start = time.perf_counter()
    distributed.shutdown(grace_s=0.5)
    print(time.perf_counter() - start, state.client is None, state.service is None)
    distributed.shutdown()  # nothing left to stop
"""


@pytest.mark.parametrize("how", ["explicit", "at_exit"])
def test_distributed_shutdown_stops_the_service_after_the_clients(how, tmp_path) -> None:
    """A real 1-process runtime on loopback: :func:`distributed.shutdown` stops the client,
    waits the grace, then stops the coordinator's service; the exit hook does it on its own."""
    import os
    import subprocess
    import sys

    address = loopback_address()
    script = tmp_path / "worker.py"
    script.write_text(SHUTDOWN_WORKER)
    out = subprocess.run([sys.executable, str(script), address, how], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    if how == "explicit":
        took, client_gone, service_gone = lines[0].split()
        assert float(took) >= 0.5 and client_gone == service_gone == "True"
    assert lines[-1] == "at exit True True"


def test_launch_scripts() -> None:
    """All launchers parse; the TPU one targets every worker and JAX's cluster detection."""
    import subprocess
    from pathlib import Path

    launch = Path(__file__).resolve().parents[1] / "launch"
    for name in ("local.sh", "slurm.sbatch", "tpu_pod.sh"):
        subprocess.run(["bash", "-n", str(launch / name)], check=True)
    out = subprocess.run(
        ["bash", str(launch / "tpu_pod.sh"), "run", "--config.train.steps=7"], check=True,
        capture_output=True, text=True, env={"DRY_RUN": "1", "CKPT_DIR": "gs://b/c",
                                             "PATH": "/usr/bin:/bin"}).stdout
    assert "--worker=all" in out and "distributed.mode=cluster" in out
    assert "checkpoint.dir=gs://b/c" in out and "train.steps=7" in out
    missing = subprocess.run(["bash", str(launch / "tpu_pod.sh"), "run"], capture_output=True,
                             text=True, env={"PATH": "/usr/bin:/bin"}, check=False)
    assert missing.returncode == 2 and "set TPU_NAME, ZONE and PROJECT" in missing.stderr
