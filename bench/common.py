"""Shared benchmark plumbing: flags, timing, compile counting, tables/JSON, sizes, the torch twin.

Every ``bench/<name>.py`` builds its rows (flat dicts), then calls :func:`finish`, which prints a
markdown table (pasted as is into ``BENCHMARKS.md``) and writes ``--json`` with the machine
description. Ratios are always measured in the same process on the same machine.

Sizes (:data:`SIZES`) are shared by the train-step and sampler benchmarks; :class:`TorchMuddit`
is the PyTorch side of both: transformers' ``CLIPTextModelWithProjection`` + the reference
``SymmetricTransformer2DModel``, loaded with the JAX params through the port's export path.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import glob
import gzip
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muddit_jax.cli import host_env
from muddit_jax.cli.host_env import HOST_ENV
from muddit_jax.models.mmdit import MMDiTConfig, unstack_block_params
from muddit_jax.models.muddit import Muddit, MudditConfig
from muddit_jax.models.text_encoder import CLIPTextConfig
from muddit_jax.models.vq import DOWN_BLOCK, UP_BLOCK, VQConfig

Row = dict[str, Any]
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# ---------------------------------------------------------------------------------------------
# CLI, machine, output


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: ``--smoke`` (seconds-long run) and ``--json PATH``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few steps: checks it runs")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p


def reexec_with_host_env(module: str) -> None:
    """Re-run ``python -m module argv...`` with :data:`HOST_ENV` (the trainer's allocator
    settings) unless ``--default-malloc`` is given; call from ``__main__``."""
    if "--default-malloc" in sys.argv:
        sys.argv.remove("--default-malloc")
        return
    host_env.reexec_with_host_env(module, sys.argv[1:])


def machine() -> dict[str, Any]:
    """CPU model, cores, library versions and JAX devices of this process."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    for mod in ("jaxlib", "flax", "optax", "torch"):
        with contextlib.suppress(ImportError):
            versions[mod] = __import__(mod).__version__
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in jax.devices()],
        "host_env": {k: os.environ.get(k) for k in HOST_ENV},
        "load_avg": os.getloadavg(),
        **versions,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return "" if v is None else str(v)


def format_table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows`` (``columns`` default: keys of the first row)."""
    if not rows:
        return "(no rows in this run)"
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def finish(
    name: str,
    args: argparse.Namespace,
    tables: dict[str, tuple[Sequence[Row], Sequence[str] | None]],
    **extra: Any,
) -> dict[str, Any]:
    """Print each table, write ``{"benchmark", "smoke", "machine", "tables", **extra}`` as JSON."""
    for title, (rows, columns) in tables.items():
        print(f"\n### {name}: {title}\n")
        print(format_table(rows, columns))
    for key, value in extra.items():
        text = json.dumps(value, default=str)
        print(f"{key}: {text if len(text) <= 400 else '(see the JSON)'}")
    payload = {
        "benchmark": name,
        "smoke": bool(args.smoke),
        "machine": machine(),
        "tables": {title: list(rows) for title, (rows, _) in tables.items()},
        **extra,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return payload


# ---------------------------------------------------------------------------------------------
# timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls (after warm-up)."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)


def block(x: Any) -> Any:
    """Wait for every JAX array in ``x`` (torch CPU tensors are already synchronous)."""
    return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], iters: int, warmup: int = 1) -> Timing:
    """Call ``fn`` ``warmup`` times, then time ``iters`` calls (each blocks on its result)."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times))


def time_interleaved(
    fns: dict[str, Callable[[], Any]], iters: int, warmup: int = 1
) -> dict[str, Timing]:
    """Time several callables round-robin (``a b c a b c ...``) so that load from other processes
    on a shared machine hits all of them alike; each call blocks on its result."""
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            block(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(tuple(ts)) for name, ts in times.items()}


def _op_kind(name: str) -> str:
    base = re.sub(r"\.\d+$", "", name)
    if base.startswith(("ynn", "dot", "xnn", "onednn")) or "convolution" in base:
        return "matmul/conv"
    if base.startswith(("copy", "transpose")) or base.endswith("transpose_fusion"):
        return "copy/transpose"
    if "scatter" in base or "gather" in base:
        return "gather/scatter"
    return "other fusions (elementwise/reduce/rng)"


def op_profile(
    fn: Callable[[], Any],
    hlo_text: str,
    parts: Sequence[tuple[str, str]] = (),
    iters: int = 2,
    top: int = 6,
) -> list[Row]:
    """Where the time goes: a ``jax.profiler`` trace of ``fn`` (already compiled), XLA op time
    summed by kind (matmul, copy/transpose, ...), by program part (first ``(label, regex)`` of
    ``parts`` matching the op's ``op_name`` metadata in ``hlo_text``, the compiled module's
    ``as_text()``), and the ``top`` single ops. Shares are of the summed op time."""
    sources = dict(re.findall(r'%([\w.\-]+) = [^\n]*?op_name="([^"]+)"', hlo_text))
    ops: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(iters):
                block(fn())
        (path,) = glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)
        events = json.load(gzip.open(path))["traceEvents"]
    for e in events:  # XLA ops are lower-case HLO names; runtime events are not. Control-flow
        name = e.get("name", "")  # thunks (while/conditional/call) span their bodies: not counted twice
        if e.get("ph") == "X" and re.fullmatch(r"[a-z][a-z0-9_\-]*(\.\d+)?", name):
            if not re.fullmatch(r"(while|conditional|call)(\.\d+)?", name):
                ops[name] += e["dur"] / iters / 1e3
    total = sum(ops.values()) or 1.0

    def part(name: str) -> str:
        src = sources.get(name, "")
        return next((label for label, rx in parts if src and re.search(rx, src)), "unattributed")

    rows = []
    for group, key in (("kind", _op_kind), ("part", part)):
        if group == "part" and not parts:
            continue
        sums: collections.Counter[str] = collections.Counter()
        for name, ms in ops.items():
            sums[key(name)] += ms
        rows += [dict(group=group, name=k, ms=ms, share=ms / total, source="")
                 for k, ms in sums.most_common()]
    rows += [
        dict(group="op", name=n, ms=ms, share=ms / total, source=sources.get(n, "")[-80:])
        for n, ms in ops.most_common(top)
    ]
    return rows


def with_torch_threads(fn: Callable[[], Any], threads: int) -> Callable[[], Any]:
    """``fn`` run with ``torch.set_num_threads(threads)`` (restored after).

    On a shared machine torch's OpenMP barriers spin while a co-tenant holds a core, which can
    make a 2-thread step several times slower than a 1-thread one; the benchmarks time both and
    compare JAX with the faster.
    """
    import torch

    def call() -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return call


def torch_thread_counts() -> tuple[int, ...]:
    """Thread counts the torch baselines are timed with: all cores, and 1 if that differs."""
    n = os.cpu_count() or 1
    return (n, 1) if n > 1 else (1,)


class CompileCounter:
    """Counts XLA backend compilations (all jitted functions) while active.

    >>> with CompileCounter() as cc:
    ...     f(x); f(x)
    >>> cc.count
    """

    def __init__(self) -> None:
        self.count, self.seconds = 0, 0.0

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if event == COMPILE_EVENT:
            self.count += 1
            self.seconds += duration

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)


@contextlib.contextmanager
def no_recompiles(what: str) -> Iterator[CompileCounter]:
    """Assert that the block compiles nothing (steady-state calls must hit the jit cache)."""
    with CompileCounter() as cc:
        yield cc
    if cc.count:
        raise AssertionError(f"{what}: {cc.count} recompilation(s) in steady state")


def timed_compile(lowered: Any) -> tuple[Any, float]:
    """``lowered.compile()`` and its wall-clock seconds."""
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# model sizes


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Flux-style RoPE split of ``head_dim`` (16/56/56 at 128): even parts summing to it."""
    t = max(2, (head_dim // 8) // 2 * 2)
    hw = (head_dim - t) // 2 // 2 * 2
    return (head_dim - 2 * hw, hw, hw)


def muddit_config(
    *,
    width: int,
    heads: int,
    dual: int,
    single: int,
    text_layers: int,
    text_width: int,
    text_vocab: int,
    codebook: int,
    downsample: bool = True,
) -> MudditConfig:
    """A Muddit-shaped config (CLIP text tower -> MM-DiT with a text head); tiny VQ (unused)."""
    text = CLIPTextConfig(
        vocab_size=text_vocab,
        hidden_size=text_width,
        intermediate_size=4 * text_width,
        projection_dim=width,
        num_hidden_layers=text_layers,
        num_attention_heads=max(1, text_width // 64),
        max_position_embeddings=77,
        hidden_act="gelu",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=3,
    )
    vq = VQConfig(
        block_out_channels=(32,),
        down_block_types=(DOWN_BLOCK,),
        up_block_types=(UP_BLOCK,),
        norm_num_groups=8,
        latent_channels=8,
        num_vq_embeddings=codebook,
    )
    mmdit = MMDiTConfig(
        num_layers=dual,
        num_single_layers=single,
        attention_head_dim=width // heads,
        num_attention_heads=heads,
        joint_attention_dim=text_width,
        pooled_projection_dim=width,
        axes_dims_rope=rope_axes(width // heads),
        vocab_size=codebook + 1,
        codebook_size=codebook,
        tokenizer_vocab_size=text_vocab,
        downsample=downsample,
        upsample=downsample,
    )
    return MudditConfig(text=text, vq=vq, mmdit=mmdit)


@dataclasses.dataclass(frozen=True)
class BenchSize:
    """A model config and the batch it is measured at (``grid``: side of the VQ code grid)."""

    name: str
    config: MudditConfig
    batch: int
    grid: int
    text_len: int

    @property
    def tokens(self) -> int:
        """Input tokens per example: image codes + text ids."""
        return self.grid * self.grid + self.text_len

    @property
    def mask_text_id(self) -> int:
        return self.config.text.vocab_size - 1


SIZES: dict[str, BenchSize] = {
    "tiny": BenchSize("tiny", MudditConfig.tiny(256), batch=4, grid=8, text_len=16),
    "small": BenchSize(
        "small",
        muddit_config(
            width=256, heads=4, dual=2, single=4, text_layers=2, text_width=256,
            text_vocab=4096, codebook=1024,
        ),
        batch=8,
        grid=16,
        text_len=32,
    ),
    "base": BenchSize(  # ~110M params (88M MM-DiT + 23M text), Muddit-512 token counts
        "base",
        muddit_config(
            width=512, heads=4, dual=4, single=8, text_layers=6, text_width=512,
            text_vocab=8192, codebook=8192,
        ),
        batch=4,
        grid=32,
        text_len=77,
    ),
}


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


@functools.lru_cache(maxsize=None)
def _jitted_init(config: MudditConfig) -> Callable:
    return jax.jit(Muddit(config, scan_layers=True).init)


def init_params(size: BenchSize, seed: int = 0, scan_layers: bool = False) -> dict[str, Any]:
    """Fresh unboxed ``{"text_encoder", "mmdit"}`` params of ``size`` (one compile per config).

    Always initialised in the scanned layout and unstacked for ``scan_layers=False``: the
    unrolled init compiles every block (81 s against 24 s for Muddit-512 on 2 CPU cores)."""
    args = (
        jnp.zeros((1, size.grid, size.grid), jnp.int32),
        jnp.zeros((1, size.text_len), jnp.int32),
        jnp.zeros((1,), jnp.float32),
        jnp.zeros((1, 5), jnp.float32),
    )
    params = nn.unbox(_jitted_init(size.config)(jax.random.key(seed), *args))["params"]
    if not scan_layers:
        params = {**params, "mmdit": unstack_block_params(params["mmdit"])}
    return params


def make_batch(size: BenchSize, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
    """A random training batch: ``image_ids``, ``text_ids`` (bos, words, eos, pad), ``text_valid``,
    ``micro_conds``."""
    rng = np.random.default_rng(seed)
    b, l, t = batch or size.batch, size.text_len, size.config.text
    cb = size.config.mmdit.codebook_size
    lengths = rng.integers(max(3, l // 2), l + 1, size=b)
    ids = rng.integers(4, t.vocab_size - 1, size=(b, l))
    pos = np.arange(l)[None, :]
    ids = np.where(pos == lengths[:, None] - 1, t.eos_token_id, ids)
    ids = np.where(pos >= lengths[:, None], t.pad_token_id, ids)
    ids[:, 0] = t.bos_token_id
    micro = np.tile(np.array([[512, 512, 0, 0, 6]], np.float32), (b, 1))
    return {
        "image_ids": rng.integers(0, cb, size=(b, size.grid, size.grid)).astype(np.int32),
        "text_ids": ids.astype(np.int32),
        "text_valid": pos < lengths[:, None],
        "micro_conds": micro,
    }


def empty_text_ids(size: BenchSize) -> tuple[int, ...]:
    """The tokenized empty prompt: ``bos eos pad...``."""
    t = size.config.text
    return (t.bos_token_id, t.eos_token_id) + (t.pad_token_id,) * (size.text_len - 2)


# ---------------------------------------------------------------------------------------------
# the PyTorch twin (same weights via muddit_jax.port)


def torch_muddit(config: MudditConfig, params: dict[str, Any], grid: int):
    """PyTorch text encoder + reference MM-DiT holding ``params`` (exported, not re-initialised).

    Returns a ``torch.nn.Module`` whose ``forward(image_ids, text_ids, timestep, micro_conds)``
    gives ``(image_logits [b, K, h, w] (NCHW, as upstream), text_logits [b, l, V])``, and whose
    ``encode_text`` / ``denoise`` split it like :class:`~muddit_jax.models.muddit.Muddit`.
    """
    import torch
    import transformers

    from muddit_jax.port import clip_text
    from muddit_jax.port import mmdit as mmdit_port
    from muddit_jax.port.torch_reference import SymmetricTransformer2DModel, prepare_ids

    def load(module: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
        missing, unexpected = module.load_state_dict(
            {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}, strict=False
        )
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise RuntimeError(f"torch twin: missing {missing}, unexpected {unexpected}")

    class TorchMuddit(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            hf = transformers.CLIPTextConfig(**config.text.to_hf_config())
            self.text_encoder = transformers.CLIPTextModelWithProjection(hf)
            self.mmdit = SymmetricTransformer2DModel(**config.mmdit.to_hf_config())
            load(self.text_encoder, clip_text.export(params["text_encoder"], config.text))
            load(self.mmdit, mmdit_port.export(params["mmdit"], config.mmdit))
            self.grid = grid // 2 if config.mmdit.downsample else grid

        def encode_text(self, text_ids):
            out = self.text_encoder(text_ids, output_hidden_states=True)
            return out.hidden_states[-2], out.text_embeds

        def denoise(self, image_ids, context, pooled, timestep, micro_conds):
            img_ids, txt_ids = prepare_ids(context.shape[1], self.grid, self.grid)
            return self.mmdit(image_ids, context, pooled, timestep, img_ids, txt_ids, micro_conds)

        def forward(self, image_ids, text_ids, timestep, micro_conds):
            context, pooled = self.encode_text(text_ids)
            return self.denoise(image_ids, context, pooled, timestep, micro_conds)

    return TorchMuddit().eval()
