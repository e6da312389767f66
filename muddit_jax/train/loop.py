"""The trainer: ``train(config, workdir)`` from mesh to checkpoints.

Start-up: multi-process init -> mesh, rules, abstract state and shardings
(:func:`muddit_jax.train.run.build_run`) -> restore the latest checkpoint onto this mesh (or
sharded init, optionally from pretrained params) -> the train step compiled ahead of time
(``jit(...).lower(...).compile()``) with explicit in/out shardings and the state donated. Each
step: the local rows of the batch -> global array -> step. Metrics of step ``s`` are read back
after step ``s + 1`` is dispatched, so the host never stalls the device except at checkpoints.

Stops: ``train.steps`` reached (``done``, exit 0); SIGTERM / preemption notice (``preempted``:
saves the current step, exit 75 = EX_TEMPFAIL, i.e. "requeue me"); ``train.max_nonfinite``
non-finite steps in a row (``nonfinite``: no save, the last good checkpoint stays, exit 65).
Periodic saves are skipped while a non-finite streak is running.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np

from muddit_jax.diffusion.loss import generated_rows
from muddit_jax.parallel import distributed
from muddit_jax.parallel.sharding import host_rows
from muddit_jax.train.checkpoint import Checkpointer
from muddit_jax.train.codes_stage import pretokenize_sources
from muddit_jax.train.artifacts import run_artifacts
from muddit_jax.train.data import data_seed, dataset_factory
from muddit_jax.train.flops import train_step_flops
from muddit_jax.train.metrics import MetricWriter, Throughput, peak_flops, progress_line
from muddit_jax.train.run import build_run, init_state
from muddit_jax.train.state import TrainState
from muddit_jax.train.synthetic import SyntheticData

EXIT_CODES = {"done": 0, "preempted": 75, "nonfinite": 65}


@dataclasses.dataclass
class TrainResult:
    """How a run ended: ``status`` in ``EXIT_CODES``, the step reached, the final state."""

    status: str
    step: int
    state: TrainState
    last_metrics: dict[str, float]

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


class StopRequest:
    """Preemption: a SIGTERM flag (single process) or JAX's preemption sync point (multi-process:
    JAX's preemption service catches SIGTERM on any host and all hosts stop at the same step).

    Create it before the slow start-up so a SIGTERM during compilation is not fatal."""

    def __init__(self) -> None:
        self.requested, self._old = False, None
        self.multi = jax.process_count() > 1
        if not self.multi and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __call__(self, step: int) -> bool:
        if not self.multi:
            return self.requested
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # preemption service disabled
            return False

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _log(config, writer, throughput, step, metrics, total) -> None:
    m = {k: float(v) for k, v in metrics.items()}
    if step % config.log.every and step != total and not m.get("skipped"):
        return
    m.update(throughput.update(step))
    writer.write(step, m)
    if jax.process_index() == 0:
        print(progress_line(step, total, m), flush=True)


DataArg = Iterator[Mapping[str, np.ndarray]] | Callable[[slice], Iterator[Mapping[str, np.ndarray]]]


def _due(section: ml_collections.ConfigDict, step: int, total: int) -> bool:
    """Whether ``eval`` / ``artifacts`` run at ``step``: every ``every`` steps, and at the end
    with ``at_end``."""
    return bool((section.every and step % section.every == 0) or (step == total and section.at_end))


def evaluate_and_draw(config: ml_collections.ConfigDict, state: TrainState, workdir: Path,
                      step: int, writer: MetricWriter, *, evaluate: bool, draw: bool) -> None:
    """On the current params (EMA with ``eval.ema``), one pipeline for both: with ``evaluate``
    the ``muddit-eval`` job (``eval.tasks`` on ``eval.limit`` examples, into
    ``WORKDIR/eval/<step>/``, metrics logged as ``eval/<task>/<metric>``); with ``draw`` the PNG
    artifacts (:func:`muddit_jax.train.artifacts.run_artifacts`)."""
    from muddit_jax.eval import job

    pipe = job.build_pipeline(config, state.all_params(ema=bool(config.eval.ema)))
    if evaluate:
        summary = job.evaluate(config, pipe, job.eval_dir(workdir, step, config.eval.split),
                               job.parse_tasks(config.eval.tasks))
        writer.write(step, {f"eval/{t}/{k}": v for t, ms in summary.items()
                            for k, v in ms.items()})
    if draw:
        writer.flush()
        run_artifacts(config, pipe, workdir, step)


def train(
    config: ml_collections.ConfigDict, workdir: str | Path, *, data: DataArg | None = None
) -> TrainResult:
    """Train per ``config`` in ``workdir`` (checkpoints/, metrics.jsonl, tensorboard/); resumes
    from the latest checkpoint there (or in ``checkpoint.dir``, which may be ``gs://...``).

    ``data`` replaces the synthetic iterator: an iterator of this process's rows of each global
    batch, or a function ``rows -> iterator`` given those rows (a ``slice``, see
    :func:`muddit_jax.parallel.sharding.host_rows`), e.g.
    ``lambda rows: muddit_jax.data.pipeline.make_iterator(data_config, tokenizer, rows=rows)``.
    It needs ``get_state()`` / ``set_state()`` and must yield the keys of
    :func:`muddit_jax.train.run.abstract_batch`."""
    distributed.initialize(config.distributed)
    stop = StopRequest()
    try:
        return _train(config, Path(workdir), data, stop)
    finally:
        stop.close()


def _train(config: ml_collections.ConfigDict, workdir: Path, data: Any,
           stop: StopRequest) -> TrainResult:
    if data is None:  # data.pretokenize: encode the training images once (codes_stage)
        config = pretokenize_sources(config, workdir)
    run = build_run(config)
    mesh, model, total = run.mesh, run.model, int(config.train.steps)
    rows = host_rows(run.batch_shardings["text_ids"], config.data.global_batch)
    if data is None:
        data = dataset_factory(config, model.vq.downsample_factor)
    if callable(data) and not hasattr(data, "__next__"):
        data = data(rows)
    if data is None:
        if config.data.kind != "synthetic":
            raise ValueError(f"data.kind={config.data.kind!r} is not 'synthetic' or 'dataset'")
        data = SyntheticData(
            model, global_batch=config.data.global_batch, grid=config.data.grid,
            text_length=config.data.text_length, seed=data_seed(config), images=config.data.images,
            rows=rows,
        )
    ckpt = Checkpointer(config.checkpoint.dir or workdir / "checkpoints",
                        keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    state, restored = init_state(run, ckpt, data)
    start = int(jax.device_get(state.step))
    compiled = run.compile()

    flops = train_step_flops(
        model, batch=config.data.global_batch, grid=config.data.grid,
        text_len=config.data.text_length, trainable=run.trainable, images=config.data.images,
        generated_rows=generated_rows(config.loss.mode, config.loss.t2i_fraction,
                                      config.data.global_batch),
    )
    peak = config.log.peak_flops_per_device or peak_flops(jax.devices()[0].device_kind)
    throughput = Throughput(
        total_steps=total, flops_per_step=flops, peak_flops_total=peak and peak * mesh.size,
        tokens_per_step=config.data.global_batch * (config.data.grid**2 + config.data.text_length),
    )
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0,
                          tensorboard=config.log.tensorboard)
    if jax.process_index() == 0:
        n_train = sum(x.size for x in jax.tree.leaves(run.setup.abstract.params))
        n_frozen = sum(x.size for x in jax.tree.leaves(run.setup.abstract.frozen))
        print(f"muddit-train: mesh {dict(mesh.shape)} rules={config.mesh.rules} | params "
              f"{n_train:,} trainable, {n_frozen:,} frozen | {flops / 1e9:.3g} GFLOP/step | "
              f"{'resumed at' if restored else 'starting at'} step {start}", flush=True)

    status, step, pending, last, bad = "done", start, None, {}, False
    max_bad = int(config.train.max_nonfinite)

    def consume(done_step: int, metrics: Any) -> dict[str, float]:
        nonlocal bad
        values = jax.device_get(metrics)
        _log(config, writer, throughput, done_step, values, total)
        bad = bad or values["nonfinite_streak"] >= max_bad
        return values

    try:
        while step < total:
            if stop(step):
                status = "preempted"
                break
            state, metrics = compiled(state, run.global_batch(next(data)))
            step += 1
            if pending is not None:  # the previous step's metrics, read while this one runs
                last = consume(*pending)
            pending = (step, metrics)
            if step % config.checkpoint.every == 0 or step == total:
                last, pending = consume(*pending), None
                if not bad and last["nonfinite_streak"] == 0:
                    ckpt.save(step, state, data.get_state(), config)
            if not bad:
                evaluate = _due(config.eval, step, total)
                draw = _due(config.artifacts, step, total)
                if evaluate or draw:
                    evaluate_and_draw(config, state, workdir, step, writer, evaluate=evaluate,
                                      draw=draw)
            if bad:
                break
        if pending is not None:
            last = consume(*pending)
        if bad:
            status = "nonfinite"
            if jax.process_index() == 0:
                print(f"muddit-train: stopping: {max_bad} non-finite steps in a row; the last "
                      f"good checkpoint is step {ckpt.latest_step()}", flush=True)
        elif status == "preempted":
            ckpt.save(step, state, data.get_state(), config)
    finally:
        ckpt.close()
        writer.close()
    return TrainResult(status, step, state, {k: float(v) for k, v in last.items()})
