"""Benchmark 7: do a VQ's codes let a model see shape apart from colour?

A small CNN (code embedding -> three 3x3 convs -> max-pool -> 3 classes) learns the shape of the
single object in ``shapes`` scenes from the VQ codes of a run (``WORKDIR/vq/checkpoints``), with
the run config's ``shapes`` options and ``max_objects=1``. Two inputs, each from its own init:

* ``scratch``: a learned embedding table (what the MM-DiT's code embedding starts as);
* ``codebook``: the VQ's own codebook vectors, frozen, then a learned linear map (what
  ``model.code_init="codebook"`` + ``optim.freeze`` give the MM-DiT);
* ``mmdit`` (when ``WORKDIR/checkpoints`` holds a trained MM-DiT): that MM-DiT's code
  embedding rows, frozen, then a learned linear map: what the generator learnt codes to mean.

With a trained MM-DiT a second table probes its blocks: the model reads each image with the
text fully masked (the first step of captioning, ``t = 1``), and a linear softmax probe on each
block's image stream (max- and min-pooled over tokens) learns the shape on ``train`` images and
is scored on seen and held-out pairs. Seen-pair accuracy says the block still knows the shape;
held-out accuracy says whether it knows it apart from colour.

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

from bench import common, shapes_run
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


def single_object_batches(options: shapes.ShapesConfig, split: str, n: int) -> tuple:
    """``(float image batches of up to 256 [b, R, R, 3] in [0, 1], shape labels [n])`` of the
    first ``n`` examples of ``split``."""
    examples = [shapes.generate(options, split, i) for i in range(n)]
    batches = [np.stack([e.image for e in examples[i:i + 256]]).astype(np.float32) / 255
               for i in range(0, n, 256)]
    labels = np.array([shapes.SHAPES.index(e.scene.objects[0].shape) for e in examples])
    return batches, labels


def encode_split(options: shapes.ShapesConfig, split: str, n: int, encode: Any) -> tuple:
    """``(codes [n, h, w], shape labels [n])`` of the first ``n`` examples of ``split``."""
    batches, labels = single_object_batches(options, split, n)
    return np.concatenate([np.asarray(encode(b)) for b in batches]), labels


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


def block_features(pipe: Any, options: shapes.ShapesConfig, n: dict[str, int]) -> dict:
    """``{split: ({block: [n, 2d] pooled image stream}, labels)}`` of a run's MM-DiT (its
    :class:`~muddit_jax.pipeline.MudditPipeline`, e.g. from ``pipeline_from_workdir``)."""
    (model, nets), tok, length = shapes_run.generator(pipe), pipe.tokenizer, pipe.text_length

    def is_block(module: nn.Module, method: str) -> bool:
        return method == "__call__" and (module.name or "").startswith(
            ("transformer_blocks_", "single_transformer_blocks_"))

    @jax.jit
    def forward(images: jax.Array) -> dict[str, jax.Array]:
        codes = vq.encode(pipe.params["vq"], pipe.config.vq, images)
        b = images.shape[0]
        ids = jnp.asarray(tok.encode([""] * b, length))
        ids = jnp.where(jnp.arange(length)[None] >= 1, tok.mask_id, ids)  # <bos> then masks
        _, state = model.apply({"params": nets}, codes, ids, jnp.ones((b,)),
                               jnp.asarray(pipe._micro(b)), capture_intermediates=is_block,
                               mutable=["intermediates"])
        out = {}
        for name, v in state["intermediates"]["mmdit"].items():
            carry = v["__call__"][0][0]  # a block returns (carry, _)
            img = carry[1] if isinstance(carry, tuple) else carry[:, length:]
            out[name] = jnp.concatenate([img.max(1), -img.min(1)], axis=-1)
        return out

    result = {}
    for split, k in n.items():
        batches, labels = single_object_batches(options, split, k)
        feats = [forward(b) for b in batches]
        result[split] = ({b: np.concatenate([np.asarray(f[b]) for f in feats]) for b in feats[0]},
                         labels)
    return result


def linear_probe(x: np.ndarray, y: np.ndarray, evals: list[tuple], steps: int = 500) -> list:
    """Softmax regression (standardised inputs, L2 1e-3, Adam) on ``(x, y)``; accuracies."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w = {"w": jnp.zeros((x.shape[1], len(shapes.SHAPES))), "b": jnp.zeros(len(shapes.SHAPES))}
    xs, ys = jnp.asarray((x - mu) / sd), jnp.asarray(y)

    def loss(w: Any) -> jax.Array:
        ce = optax.softmax_cross_entropy_with_integer_labels(xs @ w["w"] + w["b"], ys).mean()
        return ce + 1e-3 * jnp.sum(w["w"] ** 2)

    tx = optax.adam(1e-2)
    opt, grad = tx.init(w), jax.jit(jax.grad(loss))
    for _ in range(steps):
        updates, opt = tx.update(grad(w), opt)
        w = optax.apply_updates(w, updates)
    return [float(((((xe - mu) / sd) @ w["w"] + w["b"]).argmax(-1) == ye).mean())
            for xe, ye in evals]


def block_rows(pipe: Any, options: shapes.ShapesConfig, n: dict[str, int]) -> list[common.Row]:
    """One row per MM-DiT block (in order): linear-probe shape accuracy on seen / held-out."""
    data = block_features(pipe, options, n)
    (train, y), seen, held = data["train"], data["validation"], data["test"]
    rows = []
    for b in sorted(train, key=lambda b: (b.startswith("single"), int(b.rsplit("_", 1)[1]))):
        acc = linear_probe(train[b], y, [(seen[0][b], seen[1]), (held[0][b], held[1])])
        rows.append(dict(block=b, seen_pairs=acc[0], held_out_pairs=acc[1], chance=1 / 3))
    return rows


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
    trained = args.workdir is not None and (args.workdir / "checkpoints").is_dir()
    if trained:  # the run's latest pipeline, loaded once for both tables
        from muddit_jax.eval.job import pipeline_from_workdir

        _, pipe = pipeline_from_workdir(args.workdir)
        tables["mmdit"] = np.asarray(pipe.params["mmdit"]["embed"]["embeddings"]["embedding"],
                                     np.float32)[:len(codebook)]
    steps = 3 if args.smoke else args.steps
    rows = [train_probe(name, table, len(codebook), data, steps)
            for name, table in tables.items()]
    out = {"shape accuracy from VQ codes": (rows, None)}
    if trained:
        n_blocks = n if args.smoke else dict(train=4096, validation=512, test=512)
        out["linear shape probes on the MM-DiT's image stream"] = (
            block_rows(pipe, options, n_blocks), None)
    return common.finish("code_probe", args, out)


if __name__ == "__main__":
    common.reexec_with_host_env("bench.code_probe")
    main()
