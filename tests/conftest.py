"""Test-wide JAX settings: CPU, full-precision matmuls for parity tests, and cheap compiles.

The tests run many small programs once each, so compile time dominates the suite: XLA's CPU
backend is told to skip its expensive optimisation passes, and one persistent compilation cache
per session lets repeated programs (the CLI subprocesses of the end-to-end tests, the same step
rebuilt by several tests) compile once. Both reach subprocesses through the environment; a
test that sets its own ``XLA_FLAGS`` replaces the first.
"""

import atexit
import os
import shutil
import tempfile

from tests.helpers import FAST_COMPILE_FLAGS, compile_cache_env

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="muddit-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(compile_cache_env(_cache, min_compile_s=0.2))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
