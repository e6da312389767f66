"""Training observability: TensorBoard + JSONL metric writers, throughput, MFU, progress line.

Only process 0 writes (:class:`MetricWriter` with ``enabled=False`` on the others is a no-op).
``metrics.jsonl`` gets one JSON object per logged step (``{"step": s, name: value, ...}``); a
resumed run appends, so a step logged before a kill and again after resume appears twice (the
later entry wins, see :func:`read_jsonl`). TensorBoard event files are written with tensorboardX
(no TensorFlow needed) under ``<workdir>/tensorboard``.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path
from typing import Mapping

# Dense bf16 peak FLOP/s per device by ``jax.Device.device_kind`` prefix (vendor figures).
PEAK_FLOPS: dict[str, float] = {
    "TPU v2": 45e12, "TPU v3": 123e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
    "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12, "TPU7x": 2307e12,
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12, "NVIDIA GH200": 989e12, "NVIDIA L4": 121e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Peak FLOP/s of one device of ``device_kind`` (longest matching prefix), else ``None``."""
    best = None
    for prefix, value in PEAK_FLOPS.items():
        if device_kind.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, value)
    return best[1] if best else None


class MetricWriter:
    """Scalars to ``metrics.jsonl`` and TensorBoard (``tensorboard=True``), process 0 only."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in clean.items():
                self._tb.add_scalar(name, value, int(step))

    def flush(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | Path) -> dict[int, dict[str, float]]:
    """``{step: metrics}`` from a ``metrics.jsonl``; entries of the same step are merged, later
    values winning (a step re-run after a resume, eval metrics logged beside train metrics)."""
    out: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.setdefault(int(row.pop("step")), {}).update(row)
    return out


class Throughput:
    """Steps/s, tokens/s, MFU and ETA between successive :meth:`update` calls."""

    def __init__(
        self, *, total_steps: int, tokens_per_step: float, flops_per_step: float,
        peak_flops_total: float | None,
    ):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak = peak_flops_total
        self._last: tuple[int, float] | None = None

    def update(self, step: int) -> dict[str, float]:
        """Rates since the previous call (empty on the first)."""
        now = time.perf_counter()
        last, self._last = self._last, (step, now)
        if last is None or step <= last[0] or now <= last[1]:
            return {}
        steps_per_s = (step - last[0]) / (now - last[1])
        out = {
            "steps_per_sec": steps_per_s,
            "tokens_per_sec": steps_per_s * self.tokens_per_step,
            "eta_sec": (self.total_steps - step) / steps_per_s,
        }
        if self.peak:
            out["mfu"] = steps_per_s * self.flops_per_step / self.peak
        return out


def progress_line(step: int, total: int, metrics: Mapping[str, float]) -> str:
    """``step 10/100 [##------------------] | loss 5.1234 | 3.20 steps/s | 1.2k tok/s | MFU 12.3%
    | ETA 0:00:28``."""
    filled = round(20 * step / total) if total > 0 else 20
    bar = "#" * filled + "-" * (20 - filled)
    parts = [f"step {step}/{total} [{bar}]", f"loss {metrics.get('loss', math.nan):.4f}"]
    if "steps_per_sec" in metrics:
        parts.append(f"{metrics['steps_per_sec']:.2f} steps/s")
        parts.append(f"{_si(metrics['tokens_per_sec'])} tok/s")
    if "mfu" in metrics:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    if metrics.get("skipped"):
        parts.append(f"SKIPPED (non-finite, streak {int(metrics.get('nonfinite_streak', 0))})")
    if "eta_sec" in metrics:
        parts.append(f"ETA {datetime.timedelta(seconds=round(metrics['eta_sec']))}")
    return " | ".join(parts)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"
