"""Benchmark 9: a run's text-to-image scores under sampler settings, and how close its codes are.

For the evaluation job's first ``--prompts`` t2i examples of ``--split`` of a trained ``shapes``
run (``--workdir``; same prompts, seeds and batches, so the row at the run's ``eval.*`` settings
is the job's score), every setting generates one image per prompt and reports the
compositional detector's score per category plus ``code_match``: the share of generated VQ
codes equal to the codes of the scene the prompt was written from (``object_code_match``: on
the codes that cover object pixels). On the training split of a run that has memorised its
data the code match says whether the sampler reproduces what the model knows; on other splits
it is a weak hint (a prompt fits many images). BENCHMARKS.md §1.11 found classifier-free
guidance at the eval default (4) halving a memorised run's code match.

A setting is ``key=value`` pairs joined by commas: ``g`` (guidance scale, or ``none``),
``steps``, ``sampling`` (``multinomial`` | ``argmax`` | ``top_k``), ``top_k``, ``temp``
(``start:end`` of the confidence temperature), ``sched`` (guidance schedule: ``constant`` |
``linear`` | ``decay``), ``plaus`` (guidance plausibility, e.g. ``0.1``). Unset keys take the run's ``eval.*`` values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench import common, shapes_run
from muddit_jax.data import shapes
from muddit_jax.data.shapes_tfds import record_index
from muddit_jax.eval.base import example_seeds
from muddit_jax.eval.compositional import (
    CATEGORIES,
    CompositionalT2IEvaluator,
    category_scores,
    judge,
    sampler_kwargs,
)

DEFAULT_SETTINGS = ("g=4", "g=2", "g=1", "g=none")
KEYS = ("g", "steps", "sampling", "top_k", "temp", "sched", "plaus")


def parse_setting(spec: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """``"g=1,steps=64"`` -> keyword arguments of ``MudditPipeline.generate``."""
    out = dict(defaults)
    for part in filter(None, spec.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in KEYS:
            raise ValueError(f"setting {spec!r}: {part!r} is not key=value with a key in {KEYS}")
        try:
            if key == "g":
                out["guidance_scale"] = None if value == "none" else float(value)
            elif key in ("steps", "top_k"):
                out[key] = int(value)
            elif key == "temp":
                start, end = value.split(":")
                out["temperature"] = (float(start), float(end))
            elif key == "sched":
                out["guidance_schedule"] = value
            elif key == "plaus":
                out["guidance_plausibility"] = float(value)
            else:
                out[key] = value
        except ValueError as err:
            raise ValueError(f"setting {spec!r}: bad value for {key} ({err}); "
                             "e.g. g=none, steps=64, temp=2:0") from None
    return out


def measure(workdir: Path, n: int, split: str, settings: list[str], batch: int = 32
            ) -> list[dict[str, Any]]:
    """One row per setting over the first ``n`` prompts of ``split`` (see the module doc)."""
    from muddit_jax.eval.job import eval_data_options, split_examples

    config, pipe, _ = shapes_run.load(workdir, "the scenes")
    e = config.eval
    # what the evaluation job's t2i evaluator would pass to the sampler
    defaults = dict(steps=e.steps, **sampler_kwargs(
        {k: e[k] for k in CompositionalT2IEvaluator.config_options if k in e}))
    kwargs = [parse_setting(s, defaults) for s in settings]  # fail before any sampling
    config.eval.split = split
    # the evaluation job's examples (TFDS order), seeds and batches: the row at the run's own
    # eval settings is the job's t2i score
    prompts = split_examples(config, "t2i", pipe.image_size, n)
    options = shapes.ShapesConfig(**eval_data_options(config))
    scenes = [shapes.generate(options, split, record_index(p["id"])) for p in prompts]
    truth = shapes_run.scene_codes(pipe, scenes)
    objects = shapes_run.object_codes(options, scenes, truth.shape[1])
    seeds = example_seeds([p["id"] for p in prompts], e.seed)
    n, rows = len(prompts), []
    for spec, kw in zip(settings, kwargs):
        verdicts, codes = [], []
        for i in range(0, n, batch):
            chunk = prompts[i:i + batch]
            images, c = pipe.generate([p["prompt"] for p in chunk], seed=seeds[i:i + batch],
                                      return_codes=True, **kw)
            codes.append(c)
            verdicts += [judge(img, p["objects"], object_scale=p.get("object_scale", 1.0))
                         for img, p in zip(images, chunk)]
        same = np.concatenate(codes) == truth
        scores = category_scores(verdicts)
        # every category: on the default, guidance moves two-object prompts and single ones
        # in opposite directions under a flat overall score (BENCHMARKS.md §1.11)
        rows.append(dict(setting=spec, t2i_overall=round(scores["overall"], 3),
                         **{k: round(scores.get(k, float("nan")), 3) for k in CATEGORIES},
                         code_match=round(float(same.mean()), 3),
                         object_code_match=round(float(same[objects].mean()), 3)))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True, help="a trained run on 'shapes'")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--split", default="validation", help="train | validation | test")
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS),
                   help="e.g. g=4 g=1 g=none g=1,sampling=argmax g=4,steps=64")
    args = p.parse_args(argv)
    try:
        for s in args.settings:
            parse_setting(s, {})
    except ValueError as err:
        p.error(str(err))
    rows = measure(args.workdir, 4 if args.smoke else args.prompts, args.split, args.settings,
                   batch=4 if args.smoke else 32)
    return common.finish("t2i_settings", args, {f"T2I by sampler setting, {args.split}":
                                                (rows, None)})


if __name__ == "__main__":
    common.reexec_with_host_env("bench.t2i_settings")
    main()
