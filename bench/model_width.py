"""Benchmark: the default's MM-DiT train step on codes at several model widths (the text
encoder and the text stream narrow with the MM-DiT), timed round-robin in one process.

Each arm is :func:`bench.codes_step.arm` (``configs/shapes_tiny.py``, random init, synthetic
batches of the default's shapes) with only ``model.width`` changed. The ratio is the default
width's step time over each arm's: how many steps an arm trains in the wall time of one of the
default's (BENCHMARKS.md §1.19 trains each for that many steps). The input pipeline is not in it.

``python -m bench.model_width [--smoke] [--json PATH] [--iters 10] [--widths 64 96 128]``
"""

from __future__ import annotations

from typing import Any

import jax

from bench import common
from bench.code_probe import load_config
from bench.codes_step import CONFIG, arm


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--widths", type=int, nargs="+", default=None,
                   help="model.width of each arm (default 64 96 128; --smoke: 16 32)")
    args = p.parse_args(argv)
    default = int(load_config(str(CONFIG) + (":smoke" if args.smoke else "")).model.width)
    widths = sorted(set(args.widths or ((16, 32) if args.smoke else (64, 96, 128))) | {default})
    states, fns, params = {}, {}, {}
    for width in widths:
        step, state, batch = arm(True, args.smoke, width=width)
        states[width] = state
        params[width] = sum(x.size for x in jax.tree.leaves(state.params))

        def call(width=width, step=step, batch=batch):
            states[width], metrics = step(states[width], batch)
            return metrics

        fns[width] = call
    times = common.time_interleaved(fns, 2 if args.smoke else args.iters, warmup=2)
    rows = [{"width": w, "trainable params": params[w], "median ms": 1e3 * times[w].median,
             "best ms": 1e3 * times[w].best,
             "steps per default step": times[default].median / times[w].median}
            for w in widths]
    return common.finish("model_width", args, {
        f"MM-DiT train step on codes by model.width (default {default})": (rows, None)},
        default_width=default, devices=jax.device_count())


if __name__ == "__main__":
    main()
