"""Benchmark: the default's MM-DiT train step on pixels (the frozen VQ encoder inside the step)
against the same step on pre-tokenized codes (``data.pretokenize=True``, what
:mod:`muddit_jax.train.codes_stage` feeds), same params, timed round-robin in one process.

Every arm is :func:`muddit_jax.train.run.build_run` of ``configs/shapes_tiny.py`` (random init,
synthetic batches of the default's shapes); the ratio is pixels / codes step time. The input
pipeline is not in it (the trainer's ``steps/s`` in ``metrics.jsonl`` is).

``--t2i-stop-gradient PATTERNS`` adds a third arm: the step on codes with that
``loss.t2i_stop_gradient`` (the T2I rows and the others as two forward passes), and its ratio
to the plain step on codes.

``python -m bench.codes_step [--smoke] [--json PATH] [--iters 20] [--t2i-stop-gradient RX]``
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from bench import common
from bench.code_probe import load_config
from muddit_jax.train.run import build_run
from muddit_jax.train.synthetic import SyntheticData

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny.py"


def arm(pretokenize: bool, smoke: bool, t2i_stop_gradient: str = "",
        **model: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``(compiled step, state, global batch)`` of the default with or without codes;
    ``model`` overrides ``config.model`` fields (e.g. ``width=64``)."""
    run, state, batch = default_run(pretokenize, smoke, t2i_stop_gradient, **model)
    return run.compile(), state, batch


def default_run(pretokenize: bool, smoke: bool, t2i_stop_gradient: str = "",
                **model: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``(run, state, global batch)`` of the default (see :func:`arm`)."""
    config = load_config(str(CONFIG) + (":smoke" if smoke else ""))
    config.model.update(model)
    config.loss.t2i_stop_gradient = t2i_stop_gradient
    config.data.tokenizer = ""  # no tokenizer file: the <mask> id is set directly
    config.loss.text_mask_id = config.model.text_vocab_size - 1
    config.data.pretokenize = pretokenize
    config.eval.at_end = config.artifacts.at_end = False  # (they need the tokenizer)
    run = build_run(config)
    state = run.setup.init(config.seed, None)
    data = SyntheticData(run.model, global_batch=config.data.global_batch,
                         grid=config.data.grid, text_length=config.data.text_length,
                         images=not pretokenize)
    local = next(data)
    if "text_maskable" in run.batch_abstract:  # caption-like rows: all of the text is maskable
        local["text_maskable"] = np.ones_like(local["text_valid"])
    return run, state, run.global_batch(local)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--t2i-stop-gradient", default="",
                   help="also time the step on codes with this loss.t2i_stop_gradient")
    args = p.parse_args(argv)
    states, fns, keys = {}, {}, {}
    arms = [("pixels", False, ""), ("codes", True, "")]
    if args.t2i_stop_gradient:
        arms.append(("codes, T2I apart", True, args.t2i_stop_gradient))
    for name, pretokenize, stop in arms:
        step, state, batch = arm(pretokenize, args.smoke, stop)
        states[name], keys[name] = state, sorted(batch)

        def call(name=name, step=step, batch=batch):
            states[name], metrics = step(states[name], batch)
            return metrics

        fns[name] = call
    times = common.time_interleaved(fns, 2 if args.smoke else args.iters, warmup=2)
    rows = [{"step on": name, "median ms": 1e3 * t.median, "best ms": 1e3 * t.best}
            for name, t in times.items()]
    ratio = times["pixels"].median / times["codes"].median
    rows.append({"step on": "pixels / codes", "median ms": ratio,
                 "best ms": times["pixels"].best / times["codes"].best})
    if args.t2i_stop_gradient:
        apart = times["codes, T2I apart"]
        rows.append({"step on": "T2I apart / codes", "median ms": apart.median
                     / times["codes"].median, "best ms": apart.best / times["codes"].best})
    return common.finish("codes_step", args, {"MM-DiT train step (configs/shapes_tiny.py)":
                                              (rows, None)}, speedup=ratio,
                         batch_keys=keys, devices=jax.device_count())


if __name__ == "__main__":
    main()
