"""Run every benchmark, each in a fresh process (own allocator and JIT caches, :data:`HOST_ENV`),
collect their JSON files in ``--out`` and write one combined ``--json``.

``python -m bench.run [--smoke] [--only train_step,sampler] [--out bench_results] [--json PATH]``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import common

BENCHMARKS = ("train_step", "sampler", "compile_memory", "scaling", "gpu", "binding",
              "codes_step", "model_width", "image_paths")


def run_one(name: str, smoke: bool, out: Path) -> common.Row:
    """``python -m bench.<name> [--smoke] --json out/<name>.json`` with :data:`HOST_ENV`."""
    path = out / f"{name}.json"
    cmd = [sys.executable, "-m", f"bench.{name}", "--json", str(path)]
    cmd += ["--smoke"] if smoke else []
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env={**os.environ, **common.HOST_ENV}, check=False).returncode
    row: common.Row = dict(benchmark=name, seconds=time.perf_counter() - t0, exit_code=rc)
    if rc == 0 and path.exists():
        result = json.loads(path.read_text())
        row["target_met"] = json.dumps(result.get("target_met", result.get("reason")))
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(BENCHMARKS))
    p.add_argument("--out", type=Path, default=Path("bench_results"))
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmarks {unknown}; choose from {BENCHMARKS}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_one(name, args.smoke, args.out) for name in names]
    results = {
        r["benchmark"]: json.loads((args.out / f"{r['benchmark']}.json").read_text())
        for r in rows
        if r["exit_code"] == 0
    }
    payload = common.finish("run", args, {"benchmarks": (rows, None)}, results=results)
    if any(r["exit_code"] for r in rows):
        raise SystemExit(1)
    return payload


if __name__ == "__main__":
    main()
