"""Benchmark 7: do a VQ's codes let a model see shape apart from colour?

A small CNN (code embedding -> three 3x3 convs -> max-pool -> 3 classes) learns the shape of the
single object in ``shapes`` scenes from the VQ codes of a run (``WORKDIR/vq/checkpoints``), with
the run config's ``shapes`` options and ``max_objects=1``. Two inputs, each from its own init:

* ``scratch``: a learned embedding table (what the MM-DiT's code embedding starts as);
* ``codebook``: the VQ's own codebook vectors, frozen, then a learned linear map (what
  ``model.code_init="codebook"`` + ``optim.freeze`` give the MM-DiT);
* ``mmdit`` (when ``WORKDIR/checkpoints`` holds a trained MM-DiT): that MM-DiT's code
  embedding rows, frozen, then a learned linear map: what the generator learnt codes to mean.

Accuracy is reported on seen (colour, shape) pairs (``validation``) and on held-out pairs
(``test``: with one object, every test image shows a pair training never does). Chance is 1/3;
a classifier that reads colour instead of shape is right on seen pairs about 40% of the time
and never on held-out ones. BENCHMARKS.md §1.6 has the measurements.

``python -m bench.code_probe --workdir runs/shapes [--config configs/shapes_tiny.py] [--steps N]``
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import common
from muddit_jax.data import shapes
from muddit_jax.models import vq
from muddit_jax.train import config as C
from muddit_jax.train.checkpoint import load_params

BATCH = 64


def load_config(spec: str) -> Any:
    """``path[:arg]`` of an experiment config -> its ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


class ShapeProbe(nn.Module):
    """Codes ``[B, h, w]`` -> shape logits ``[B, 3]``; ``table`` (frozen code vectors) replaces
    the learned embedding."""

    codebook_size: int
    table: Any = None
    width: int = 64

    @nn.compact
    def __call__(self, codes: jax.Array) -> jax.Array:
        if self.table is None:
            h = nn.Embed(self.codebook_size, 32)(codes)
        else:
            h = nn.Dense(32)(jnp.asarray(self.table)[codes])
        for stride in (1, 2, 1):
            h = nn.relu(nn.Conv(self.width, (3, 3), strides=stride)(h))
        return nn.Dense(len(shapes.SHAPES))(h.max(axis=(1, 2)))


def encode_split(options: shapes.ShapesConfig, split: str, n: int, encode: Any) -> tuple:
    """``(codes [n, h, w], shape labels [n])`` of the first ``n`` examples of ``split``."""
    examples = [shapes.generate(options, split, i) for i in range(n)]
    codes = [np.asarray(encode(np.stack([e.image for e in examples[i:i + 256]])
                               .astype(np.float32) / 255)) for i in range(0, n, 256)]
    labels = np.array([shapes.SHAPES.index(e.scene.objects[0].shape) for e in examples])
    return np.concatenate(codes), labels


def train_probe(inputs: str, table: np.ndarray | None, codebook_size: int,
                data: dict[str, tuple], steps: int, seed: int = 0) -> common.Row:
    """Train one probe on ``data["train"]`` over frozen ``table`` rows (``None``: a learned
    embedding); accuracy on the other splits."""
    model = ShapeProbe(codebook_size, table)
    x, y = data["train"]
    params = model.init(jax.random.PRNGKey(seed), x[:2])
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params: Any, opt: Any, xb: jax.Array, yb: jax.Array) -> tuple[Any, Any]:
        def loss(p: Any) -> jax.Array:
            logits = model.apply(p, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        updates, opt = tx.update(jax.grad(loss)(params), opt)
        return optax.apply_updates(params, updates), opt

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(x), BATCH)
        params, opt = step(params, opt, x[idx], y[idx])
    predict = jax.jit(lambda p, xb: model.apply(p, xb).argmax(-1))
    acc = {s: float((np.asarray(predict(params, data[s][0])) == data[s][1]).mean())
           for s in ("validation", "test")}
    return dict(inputs=inputs, steps=steps, seen_pairs=acc["validation"],
                held_out_pairs=acc["test"], chance=1 / 3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None,
                   help="a run whose vq/checkpoints hold the VQ (none: a random VQ, smoke only)")
    p.add_argument("--config", default="configs/shapes_tiny.py",
                   help="the run's experiment config, path[:arg]")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--train-images", type=int, default=8192)
    args = p.parse_args(argv)
    if args.workdir is None and not args.smoke:
        p.error("--workdir is required (a run with vq/checkpoints) unless --smoke")
    config = load_config(args.config)
    vq_config = C.model_config(config).vq
    if args.workdir is None:
        params = nn.unbox(vq.init_params(vq_config, jax.random.PRNGKey(0)))["params"]
    else:
        params = load_params(args.workdir / "vq" / "checkpoints")["vq"]
    options = shapes.ShapesConfig(**{**dict(config.data.options), "max_objects": 1})
    encode = jax.jit(lambda images: vq.encode(params, vq_config, images))
    n = dict(train=32, validation=16, test=16) if args.smoke else dict(
        train=args.train_images, validation=1024, test=1024)
    data = {s: encode_split(options, s, k, encode) for s, k in n.items()}
    codebook = np.asarray(params["codebook"]["embedding"], np.float32)
    tables = {"scratch": None, "codebook": codebook}
    if args.workdir is not None and (args.workdir / "checkpoints").is_dir():
        mmdit = load_params(args.workdir / "checkpoints")["mmdit"]
        tables["mmdit"] = np.asarray(mmdit["embed"]["embeddings"]["embedding"],
                                     np.float32)[:len(codebook)]
    steps = 3 if args.smoke else args.steps
    rows = [train_probe(name, table, len(codebook), data, steps)
            for name, table in tables.items()]
    return common.finish("code_probe", args, {"shape accuracy from VQ codes": (rows, None)})


if __name__ == "__main__":
    common.reexec_with_host_env("bench.code_probe")
    main()
