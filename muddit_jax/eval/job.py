"""The evaluation job: a training run's params -> pipeline -> evaluators -> summary files.

Used by ``muddit-eval`` (latest or a given checkpoint of a workdir) and by the trainer every
``eval.every`` steps, so both produce the same files::

    WORKDIR/eval/<step>/<task>.json      per-example predictions + metrics
    WORKDIR/eval/<step>/shards/          resumable per-process shards
    WORKDIR/eval/<step>/summary.json     {task: {metric: value}}
    WORKDIR/eval/<step>/summary.md       the same as a Markdown table
    WORKDIR/eval/<step>-<split>/...      the same for an ``eval.split`` other than ``test``
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import ml_collections

import muddit_jax.eval.compositional  # noqa: F401  (registers "t2i")
import muddit_jax.eval.tasks  # noqa: F401  (registers "caption", "vqa")
from muddit_jax.eval.base import REGISTRY, get_evaluator
from muddit_jax.eval.datasets import TASKS, eval_examples
from muddit_jax.files import write_bytes_atomic, write_json_atomic


def eval_dir(workdir: str | Path, step: int, split: str) -> Path:
    """``WORKDIR/eval/<step>`` for the default ``test`` split, ``WORKDIR/eval/<step>-<split>``
    for another split (so resumable shards of different splits never mix)."""
    return Path(workdir) / "eval" / (str(step) if split == "test" else f"{step}-{split}")


def eval_data_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The builder options the evaluation reads its dataset with: ``eval.options``, else
    ``data.options``."""
    return dict(config.eval.get("options") or {}) or dict(config.data.options)


def split_examples(config: ml_collections.ConfigDict, task: str, image_size: int,
                   limit: int | None) -> list[dict[str, Any]]:
    """The first ``limit`` ``task`` examples of ``eval.dataset`` / ``eval.split``, read with
    :func:`eval_data_options` from ``data.data_dir``."""
    options = eval_data_options(config)
    return eval_examples(task, config.eval.dataset, config.eval.split, image_size=image_size,
                         limit=limit, data_dir=config.data.data_dir or None, **options)


def parse_tasks(spec: str) -> list[str]:
    """``"all"`` or a comma-separated subset of the evaluation tasks."""
    tasks = list(TASKS) if spec == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"eval tasks {bad or spec!r}: use 'all' or a subset of {TASKS}")
    return tasks


TEXT_SAMPLING = ("multinomial", "argmax")


def check_sampling(e: ml_collections.ConfigDict) -> None:
    """Clear errors for ``eval`` sampler settings, before any training or sampling runs."""
    from muddit_jax.diffusion.sampler import SAMPLING, SamplerConfig
    from muddit_jax.eval.compositional import sampler_kwargs

    if e.sampling not in SAMPLING or e.sampling == "top_p":
        raise ValueError(f"eval.sampling={e.sampling!r}: use one of multinomial, argmax, top_k")
    if e.text_sampling not in TEXT_SAMPLING:
        raise ValueError(f"eval.text_sampling={e.text_sampling!r}: use one of {TEXT_SAMPLING}")
    for field in ("caption_max_tokens", "answer_max_tokens"):
        if not isinstance(e[field], int) or e[field] < 0:
            raise ValueError(f"eval.{field}={e[field]!r}: use 0 (decode to the text length) or "
                             "a positive number of positions (the text and its eos)")
    if (e.sampling == "top_k") != (e.top_k > 0):
        raise ValueError(f"eval.top_k={e.top_k} with eval.sampling={e.sampling!r}: set both "
                         "(sampling='top_k' and top_k >= 1) or neither")
    options = sampler_kwargs(e)
    options.pop("guidance_scale", None)  # the pipeline's argument, not a SamplerConfig field
    if "temperature" in options:
        options["temperature"] = tuple(options["temperature"])
    try:
        SamplerConfig(num_steps=e.steps, mask_id=0, timestep_mode=e.timestep_mode, **options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"eval settings: {err} (eval.steps / temperature / timestep_mode / "
                         "guidance_schedule / guidance_plausibility)") from None


def local_mesh() -> jax.sharding.Mesh | None:
    """A 1-axis ``data`` mesh over this process's devices (``None`` with one device): each
    process samples its own shards data-parallel over its local devices."""
    import numpy as np

    devices = jax.local_devices()
    return None if len(devices) == 1 else jax.sharding.Mesh(np.array(devices), ("data",))


def build_pipeline(config: ml_collections.ConfigDict, params: Mapping[str, Any],
                   mesh: jax.sharding.Mesh | None = None) -> Any:
    """A :class:`MudditPipeline` for a training config and its params (``vq`` included);
    with ``mesh`` the params are replicated on it and batches split over it."""
    from muddit_jax.models.tokenizers import load_tokenizer
    from muddit_jax.pipeline import MudditPipeline
    from muddit_jax.train.config import model_config

    if "vq" not in params:
        raise ValueError("the params have no VQ tokenizer ('vq'); evaluation decodes images, so "
                         "train with data.images=True or init_from a converted pipeline")
    if not config.data.tokenizer:
        raise ValueError("evaluation needs data.tokenizer (the training tokenizer)")
    model = model_config(config)
    size = int(config.data.grid) * model.vq.downsample_factor
    if mesh is not None and config.eval.batch_size % mesh.devices.size:
        raise ValueError(f"eval.batch_size={config.eval.batch_size} must be a multiple of the "
                         f"{mesh.devices.size} local devices")
    tokenizer = load_tokenizer(config.data.tokenizer, add_mask_token=True)
    return MudditPipeline(model, tokenizer, dict(params), size,
                          text_length=int(config.data.text_length), mesh=mesh,
                          timestep_mode=config.eval.timestep_mode)


def pipeline_from_workdir(workdir: str | Path, step: int | None = None, ema: bool = False
                          ) -> tuple[ml_collections.ConfigDict, Any]:
    """``(config, pipeline)`` of a training run: the config saved with checkpoint ``step`` (the
    latest by default) and that checkpoint's params (``ema``: the EMA params)."""
    from muddit_jax.train.checkpoint import load_params
    from muddit_jax.train.stages import saved_config

    config, step = saved_config(workdir, step)
    params = load_params(Path(workdir) / "checkpoints", step=step, ema=ema)
    return config, build_pipeline(config, params)


def evaluate(
    config: ml_collections.ConfigDict, pipe: Any, out_dir: str | Path, tasks: list[str]
) -> dict[str, dict[str, float]]:
    """Run ``tasks`` on ``config.eval``'s split; process 0 returns and writes the summary."""
    e, out_dir = config.eval, Path(out_dir)
    barrier = None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        barrier = multihost_utils.sync_global_devices
    summary = {}
    for task in tasks:
        examples = split_examples(config, task, pipe.image_size, e.limit or None)
        options = {k: e[k] for k in REGISTRY[task].config_options} if task in REGISTRY else {}
        ev = get_evaluator(task, examples, batch_size=e.batch_size, shard_size=e.shard_size,
                           steps=e.steps, seed=e.seed, **options)
        summary[task] = ev.run(pipe, out_dir, process_index=jax.process_index(),
                               process_count=jax.process_count(), barrier=barrier)
    if jax.process_index() == 0:
        write_json_atomic(summary, out_dir / "summary.json")
        write_bytes_atomic(markdown_table(summary).encode(), out_dir / "summary.md")
    return summary


def markdown_table(summary: Mapping[str, Mapping[str, float]]) -> str:
    """``| task | metric | value |`` rows."""
    rows = ["| task | metric | value |", "|---|---|---|"]
    rows += [f"| {t} | {m} | {v:.4f} |" for t, ms in summary.items() for m, v in sorted(ms.items())]
    return "\n".join(rows) + "\n"
