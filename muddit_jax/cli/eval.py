"""``muddit-eval``: score a training run's checkpoint on captioning, VQA and compositional T2I.

    muddit-eval --config configs/shapes_tiny.py --workdir runs/shapes --task all

Loads the latest checkpoint of ``--workdir`` (or ``--step``; ``--ema`` for EMA params), samples
the ``config.eval`` split with the compiled sampler, sharded over every process and device, and
writes ``WORKDIR/eval/<step>/`` (see :mod:`muddit_jax.eval.job`). Reruns skip finished shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from muddit_jax.cli import config_args, host_env


def main(argv: list[str] | None = None) -> int:
    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_string("task", "all", "all or a comma-separated subset of caption,vqa,t2i",
                            flag_values=fv)
        flags.DEFINE_integer("step", None, "checkpoint step (default: latest)", flag_values=fv)
        flags.DEFINE_bool("ema", False, "evaluate the EMA params", flag_values=fv)

    if argv is None:  # the console script: glibc settings first (cli/host_env.py)
        host_env.reexec_with_host_env("muddit_jax.cli.eval", sys.argv[1:])
    fv = config_args.parse("muddit-eval", argv, define)
    if fv is None:
        return 2
    from muddit_jax.eval.job import (build_pipeline, check_sampling, eval_dir, evaluate,
                                     local_mesh, parse_tasks)
    from muddit_jax.parallel import distributed
    from muddit_jax.train.checkpoint import Checkpointer, load_params
    from muddit_jax.train.config import model_differences
    from muddit_jax.train.stages import resolve

    config, workdir = fv.config, Path(fv.workdir)
    try:
        tasks = parse_tasks(fv.task)
        check_sampling(config.eval)
        distributed.initialize(config.distributed)
        config = resolve(config, workdir, train_missing=False)
        ckpt_dir = config.checkpoint.dir or workdir / "checkpoints"
        ckpt = Checkpointer(ckpt_dir, read_only=True)
        try:
            step = fv.step if fv.step is not None else ckpt.latest_step()
            saved = ckpt.saved_config(step) if step is not None else None
        finally:
            ckpt.close()
        if step is None:
            raise ValueError(f"no checkpoint in {ckpt_dir}; train first (muddit-train)")
        differences = model_differences(config, saved[1] if saved else {})
        if differences:
            raise ValueError(
                f"--config describes another network than checkpoint step {step}: "
                + "; ".join(differences) + ". Pass the run's values (--config.model.<field>=...)")
        params = load_params(ckpt_dir, step=step, ema=fv.ema or bool(config.eval.ema))
        pipe = build_pipeline(config, params, mesh=local_mesh())
        summary = evaluate(config, pipe, eval_dir(workdir, step, config.eval.split), tasks)
    except (ValueError, FileNotFoundError) as e:
        print(f"muddit-eval: error: {e}", file=sys.stderr)
        return 2
    for task, metrics in summary.items():
        print(f"muddit-eval: step {step} {task}: " +
              ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
