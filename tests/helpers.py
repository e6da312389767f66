"""Assertions and fixtures-as-functions shared by the test modules."""

from __future__ import annotations

import socket
from typing import Any

import numpy as np

# XLA CPU flags for tests: skip the expensive backend passes (the tests compile many small
# programs once each, so compile time dominates)
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def compile_cache_env(cache_dir: Any, min_compile_s: float) -> dict[str, str]:
    """Environment variables that give JAX a persistent compilation cache in ``cache_dir``,
    keeping every program that took at least ``min_compile_s`` to compile."""
    return dict(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(min_compile_s),
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def loopback_address() -> str:
    """``127.0.0.1:PORT`` with a port free now, for a test's JAX distributed coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def to_numpy(x: Any) -> np.ndarray:
    """A jax/torch/numpy array as float64 numpy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(actual: Any, expected: Any, tol: float = 1e-4, what: str = "output") -> float:
    """Assert max|actual - expected| <= tol * max(1, max|expected|); returns the relative error."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    scale = max(1.0, float(np.max(np.abs(e))) if e.size else 1.0)
    err = float(np.max(np.abs(a - e))) / scale if e.size else 0.0
    assert err <= tol, f"{what}: max-abs error {err:.3e} (relative to scale {scale:.3g}) > {tol}"
    return err


def logical_axes_of(boxed_params: Any) -> set[str]:
    """Every logical axis name used by a boxed (``nn.Partitioned``) params tree.

    Raises if any leaf is not annotated.
    """
    import flax.linen as nn
    import jax

    names: set[str] = set()
    leaves = jax.tree_util.tree_leaves(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), f"unannotated parameter of shape {leaf.shape}"
        assert len(leaf.names) == leaf.value.ndim, f"axis names {leaf.names} vs {leaf.value.shape}"
        names.update(n for n in leaf.names if n is not None)
    return names


SHAPE_CORPUS = [
    f"a {size} {c1} {s1} to the {side} of a {c2} {s2}."
    for size in ("small", "large")
    for c1 in ("red", "green", "blue", "yellow", "purple", "orange")
    for s1 in ("circle", "square", "triangle")
    for c2 in ("red", "green", "blue")
    for s2 in ("circle", "square")
    for side in ("left", "right")
]


def tiny_pipeline(folder: Any, image_size: int = 16, mesh: Any = None) -> Any:
    """A random-init tiny MudditPipeline with a SentencePiece tokenizer trained in ``folder``
    (deterministic: the same call gives the same tokenizer and params in any process)."""
    from pathlib import Path

    from muddit_jax.models.muddit import MudditConfig
    from muddit_jax.models.tokenizers import SentencePieceTokenizer
    from muddit_jax.pipeline import MudditPipeline

    tok = SentencePieceTokenizer.train(SHAPE_CORPUS, 48, Path(folder) / "sp.model")
    config = MudditConfig.tiny(tok.vocab_size, codebook_size=32, width=32)
    return MudditPipeline.random_init(config, tok, image_size, seed=0, mesh=mesh)
