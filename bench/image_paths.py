"""Benchmark: the default's loss gradient when each row runs only its own image input path
(``generated_rows``, what the trainer passes) against both paths on every row (the model's
fallback, which keeps one per row), same params, batch and key, timed round-robin.

The default (``configs/shapes_tiny.py``) gives clean images (the captioning / VQA condition)
an input path of their own with two ConvNeXt blocks on the 16 x 16 code grid; a ``split``
batch is half T2I rows and half condition rows, so the fallback runs each path on twice the
rows it needs. The ratio is fallback / per-row time of ``value_and_grad`` of the loss (the
optimizer update is the same in both and not in it).

``python -m bench.image_paths [--smoke] [--json PATH] [--iters 20]``
"""

from __future__ import annotations

from typing import Any

import jax

from bench import common
from bench.codes_step import default_run
from muddit_jax.train import config as C
from muddit_jax.train.step import muddit_loss_fn


def grad_fn(run: Any, state: Any, loss_config: Any, per_row: bool):
    """Jitted ``(trainable, batch, rng) -> (loss, grads)`` of the trainer's Muddit loss;
    ``per_row=False`` makes every row run both image input paths."""
    loss_fn = muddit_loss_fn(run.nets, loss_config, per_row_paths=per_row)
    return jax.jit(jax.value_and_grad(lambda p, b, r: loss_fn(p, state.frozen, b, r)[0]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    run, state, batch = default_run(True, args.smoke)
    loss_config = C.loss_config(run.config, run.model)
    rng = jax.random.key(0)
    fns, results = {}, {}
    for name, per_row in (("each row's path", True), ("both paths on every row", False)):
        fn = grad_fn(run, state, loss_config, per_row)
        fns[name] = lambda fn=fn: fn(state.params, batch, rng)
        results[name] = fns[name]()
    (loss_a, grads_a), (loss_b, grads_b) = results.values()
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(abs(a - b).max()),
                                            grads_a, grads_b)))
    times = common.time_interleaved(fns, 2 if args.smoke else args.iters, warmup=1)
    rows = [{"image input": name, "median ms": 1e3 * t.median, "best ms": 1e3 * t.best}
            for name, t in times.items()]
    a, b = times.values()
    ratio = b.median / a.median
    rows.append({"image input": "both / each row's", "median ms": ratio,
                 "best ms": b.best / a.best})
    return common.finish(
        "image_paths", args, {"loss gradient (configs/shapes_tiny.py)": (rows, None)},
        speedup=ratio, loss_diff=abs(float(loss_a) - float(loss_b)), max_grad_diff=diff)


if __name__ == "__main__":
    main()
