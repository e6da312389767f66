"""``muddit-train``: train Muddit from a config file.

    muddit-train --config configs/train_tiny.py --workdir runs/tiny --config.train.steps=100
    muddit-train --config configs/shapes_tiny.py --workdir runs/shapes [--stage vq|mmdit|all]

``--config`` is a Python file with ``get_config(arg=None)`` (``path.py:arg`` passes ``arg``);
any field can be overridden with ``--config.<section>.<field>=value``. The run resumes from the
latest checkpoint in ``--workdir``. ``--stage`` (default ``all``) picks the stages of
:mod:`muddit_jax.train.stages`: the VQ tokenizer (when ``vq.steps > 0``), then the MM-DiT.
Exit codes: 0 done, 75 preempted (checkpoint saved; rerun the same command to resume), 65
stopped on non-finite losses (last good checkpoint kept). The console script first re-executes
itself with glibc's allocator settings (:mod:`muddit_jax.cli.host_env`;
``MUDDIT_DEFAULT_MALLOC=1`` keeps glibc's defaults).
"""

from __future__ import annotations

import sys

from absl import flags

from muddit_jax.cli import config_args, host_env


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the console script: glibc settings first (cli/host_env.py)
        host_env.reexec_with_host_env("muddit_jax.cli.train", sys.argv[1:])
    fv = config_args.parse("muddit-train", argv, lambda fv: flags.DEFINE_enum(
        "stage", "all", ["vq", "mmdit", "all"], "which training stages to run", flag_values=fv))
    if fv is None:
        return 2
    from muddit_jax.train.stages import run_stages

    try:
        result = run_stages(fv.config, fv.workdir, fv.stage)
    except ValueError as e:
        print(f"muddit-train: error: {e}", file=sys.stderr)
        return 2
    if fv.stage == "vq":
        return 0
    print(f"muddit-train: {result.status} at step {result.step}", flush=True)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
