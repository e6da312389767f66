"""Subprocess entry for the eval-job device-count test: ``python -m tests.eval_runner DIR N``.

Runs the caption evaluator with an N-device CPU mesh (set XLA_FLAGS before importing jax) and
writes its predictions to ``DIR/caption.json``.
"""

import os
import sys

out_dir, n_devices = sys.argv[1], int(sys.argv[2])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from tests.test_eval_job import caption_examples  # noqa: E402
from tests.helpers import tiny_pipeline  # noqa: E402
from muddit_jax.eval.base import get_evaluator  # noqa: E402

mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
pipe = tiny_pipeline(out_dir, mesh=mesh)
evaluator = get_evaluator("caption", caption_examples(), batch_size=8, shard_size=8, steps=3)
evaluator.run(pipe, out_dir)
