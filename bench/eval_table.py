"""The evaluation job's scores of several runs side by side (no model is loaded).

Reads each run's ``WORKDIR/eval/<step>/summary.json`` (written by ``muddit-eval`` and at the
end of ``muddit-train``; :func:`muddit_jax.eval.job.eval_dir`) at ``--step`` or the latest step
evaluated on ``--split``, and prints one row per run: VQA accuracy overall and per question
type, caption CIDEr-D and attribute accuracy, T2I overall and per category. ``--metrics``
picks columns by their ``task/metric`` names (``vqa/question_type/shape``; ``task/*`` keeps
every metric of a task). A run without that task leaves its cells empty.

``python -m bench.eval_table runs/a runs/b [--step N] [--split test] [--metrics ...]``
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from bench import common
from muddit_jax.eval.job import eval_dir

DEFAULT_METRICS = ("vqa/vqa_accuracy", "vqa/question_type/*", "caption/cider_d",
                   "caption/attribute_accuracy", "t2i/overall", "t2i/colors")


def evaluated_steps(workdir: Path, split: str) -> list[int]:
    """Checkpoint steps of ``workdir`` with a summary on ``split``, ascending (the folder names
    are :func:`eval_dir`'s)."""
    steps = []
    for path in (workdir / "eval").glob("*/summary.json"):
        step = path.parent.name.partition("-")[0]
        if step.isdigit() and eval_dir(workdir, int(step), split) == path.parent:
            steps.append(int(step))
    return sorted(steps)


def load_summary(workdir: Path, split: str = "test", step: int | None = None
                 ) -> tuple[int, dict[str, Any]]:
    """``(step, {"task/metric": value})`` of the run's summary at ``step`` (default: latest)."""
    if step is None:
        steps = evaluated_steps(workdir, split)
        if not steps:
            raise FileNotFoundError(
                f"{workdir}: no eval/<step>/summary.json on split {split!r}; run muddit-eval "
                f"--workdir {workdir} (with --config.eval.split={split} for another split)")
        step = steps[-1]
    path = eval_dir(workdir, step, split) / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; evaluated steps on {split!r}: "
                                f"{evaluated_steps(workdir, split)} (pass one as --step)")
    summary = json.loads(path.read_text())
    return step, {f"{task}/{name}": value for task, metrics in summary.items()
                  for name, value in metrics.items()}


def select(available: list[str], patterns: list[str]) -> list[str]:
    """The metric names matching ``patterns`` in pattern order (each name once)."""
    out: list[str] = []
    for pattern in patterns:
        out += [m for m in sorted(available) if fnmatch.fnmatchcase(m, pattern) and m not in out]
    return out


def table(workdirs: list[Path], split: str = "test", step: int | None = None,
          metrics: list[str] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """``(rows, columns)``: one row per run (``run``, ``step``, then the selected metrics
    rounded to 3 decimals)."""
    loaded = [(wd, *load_summary(wd, split, step)) for wd in workdirs]
    available = list({m for _, _, scores in loaded for m in scores})  # select() sorts
    columns = select(available, list(metrics or DEFAULT_METRICS))
    rows = []
    for wd, at, scores in loaded:
        row: dict[str, Any] = {"run": wd.name, "step": at}
        row.update({c: round(float(scores[c]), 3) for c in columns if c in scores})
        rows.append(row)
    return rows, ["run", "step", *columns]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("workdirs", type=Path, nargs="+", help="run folders")
    p.add_argument("--split", default="test", help="the split the summaries were written for")
    p.add_argument("--step", type=int, default=None, help="default: each run's latest")
    p.add_argument("--metrics", nargs="+", default=None,
                   help=f"task/metric names or patterns (default: {' '.join(DEFAULT_METRICS)})")
    args = p.parse_args(argv)
    rows, columns = table(args.workdirs, args.split, args.step, args.metrics)
    return common.finish("eval_table", args, {f"evaluation on {args.split}": (rows, columns)})


if __name__ == "__main__":
    main()
