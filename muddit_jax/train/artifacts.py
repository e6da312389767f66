"""PNG artifacts of a run (Pillow only): titled image grids, a loss-curve plot, VQ reconstructions.

Written by the trainer at the end of a run and every ``artifacts.every`` steps::

    WORKDIR/samples/<step>/t2i.png            samples for held-out prompts, the prompt as title
    WORKDIR/samples/<step>/understanding.png  test images with generated captions and VQA answers
    WORKDIR/loss.png                          training curves from metrics.jsonl
    WORKDIR/vq/recon.png                      VQ stage: originals (top) over reconstructions

Every file is written atomically.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from muddit_jax.files import write_bytes_atomic

CELL = 128  # pixels per image cell
COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as PNG atomically; returns the path."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes_atomic(buf.getvalue(), path)
    return Path(path)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def titled_grid(images: np.ndarray | Sequence[np.ndarray], titles: Sequence[str], *,
                cols: int = 4, cell: int = CELL, lines: int = 4) -> Image.Image:
    """``images`` (uint8 ``[H, W, 3]`` each, upscaled to ``cell`` px, nearest) in a grid, each
    with its wrapped title (up to ``lines`` lines) beneath."""
    if len(images) != len(titles):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    font = _font()
    line_h = 12
    width_chars = max(8, cell // 6)
    rows = math.ceil(len(images) / cols)
    box_h = cell + lines * line_h + 6
    canvas = Image.new("RGB", (cols * (cell + 8) + 8, rows * box_h + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, title) in enumerate(zip(images, titles)):
        x, y = 8 + (i % cols) * (cell + 8), 8 + (i // cols) * box_h
        tile = Image.fromarray(np.asarray(img, np.uint8)).resize((cell, cell), Image.NEAREST)
        canvas.paste(tile, (x, y))
        wrapped = textwrap.wrap(title, width_chars)[:lines]
        for j, text in enumerate(wrapped):
            draw.text((x, y + cell + 2 + j * line_h), text, fill="black", font=font)
    return canvas


def stacked_rows(rows: Sequence[np.ndarray], *, cell: int = 64) -> Image.Image:
    """Rows of images (each ``[N, H, W, 3]`` uint8) stacked vertically, upscaled to ``cell``."""
    n = max(len(r) for r in rows)
    canvas = Image.new("RGB", (n * (cell + 4) + 4, len(rows) * (cell + 4) + 4), "white")
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            tile = Image.fromarray(np.asarray(img, np.uint8)).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (4 + c * (cell + 4), 4 + r * (cell + 4)))
    return canvas


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what is available)."""
    if window <= 1 or len(values) < 2:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
              size: tuple[int, int] = (640, 400), window: int = 1) -> Image.Image:
    """A plot of ``{name: (steps, values)}`` with axes, min/max tick labels and a legend."""
    w, h = size
    left, right, top, bottom = 64, 16, 28, 40
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    draw.text((left, 8), title, fill="black", font=font)
    data = {k: (np.asarray(x, float), smooth(np.asarray(y, float), window))
            for k, (x, y) in series.items() if len(x)}
    finite = [v[np.isfinite(v)] for _, v in data.values()]
    if not data or not any(len(f) for f in finite):
        draw.text((left, h // 2), "no data", fill="black", font=font)
        return canvas
    x_lo = min(x.min() for x, _ in data.values())
    x_hi = max(x.max() for x, _ in data.values())
    y_lo = min(f.min() for f in finite if len(f))
    y_hi = max(f.max() for f in finite if len(f))
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)
    pw, ph = w - left - right, h - top - bottom

    def px(x, y):
        return left + (x - x_lo) / (x_hi - x_lo) * pw, top + (1 - (y - y_lo) / (y_hi - y_lo)) * ph

    draw.rectangle((left, top, left + pw, top + ph), outline="black")
    for frac in (0.0, 0.5, 1.0):
        yv = y_lo + frac * (y_hi - y_lo)
        _, yy = px(x_lo, yv)
        draw.line((left - 4, yy, left, yy), fill="black")
        draw.text((4, yy - 6), f"{yv:.3g}", fill="black", font=font)
        xv = x_lo + frac * (x_hi - x_lo)
        xx, _ = px(xv, y_lo)
        draw.line((xx, top + ph, xx, top + ph + 4), fill="black")
        draw.text((xx - 12, top + ph + 8), f"{xv:.0f}", fill="black", font=font)
    draw.text((left + pw // 2 - 12, h - 14), "step", fill="black", font=font)
    for i, (name, (x, y)) in enumerate(data.items()):
        color = COLORS[i % len(COLORS)]
        ok = np.isfinite(y)
        pts = [px(a, b) for a, b in zip(x[ok], y[ok])]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        draw.rectangle((left + pw - 150, top + 8 + 14 * i, left + pw - 140, top + 18 + 14 * i),
                       fill=color)
        draw.text((left + pw - 134, top + 6 + 14 * i), name, fill="black", font=font)
    return canvas


def loss_curve(metrics: Mapping[int, Mapping[str, float]], keys: Sequence[str], *, title: str,
               window: int = 1) -> Image.Image:
    """:func:`line_plot` of ``keys`` from ``{step: metrics}`` (see ``read_jsonl``)."""
    steps = sorted(metrics)
    series = {}
    for k in keys:
        pts = [(s, metrics[s][k]) for s in steps if k in metrics[s]]
        if pts:
            series[k] = ([p[0] for p in pts], [p[1] for p in pts])
    return line_plot(series, title=title, window=window)


def write_run_artifacts(pipe: Any, out_dir: str | Path, *, prompts: Sequence[str],
                        images: np.ndarray, questions: Sequence[str], truths: Sequence[str],
                        steps: int, seed: int = 0, **t2i_options: Any) -> dict[str, Path]:
    """Sample ``prompts`` (T2I, with the ``pipe.generate`` options in ``t2i_options``: guidance
    scale, temperature, ...) and caption / answer ``images`` with ``pipe``; write the two PNG
    panels into ``out_dir``. ``questions[i]`` / ``truths[i]`` belong to ``images[i]``."""
    out_dir = Path(out_dir)
    generated = pipe.generate(list(prompts), steps=steps,
                              seed=[seed + i for i in range(len(prompts))], **t2i_options)
    t2i = save_png(titled_grid(np.asarray(generated), list(prompts)), out_dir / "t2i.png")
    captions = pipe.caption(np.asarray(images), steps=steps, seed=seed)
    answers = pipe.answer(np.asarray(images), list(questions), steps=steps, seed=seed)
    titles = [f"caption: {c} | Q: {q} A: {a} (true: {t})"
              for c, q, a, t in zip(captions, questions, answers, truths)]
    und = save_png(titled_grid(np.asarray(images), titles, lines=9), out_dir / "understanding.png")
    return {"t2i": t2i, "understanding": und}


def run_artifacts(config: Any, pipe: Any, workdir: str | Path, step: int) -> dict[str, Path]:
    """The trainer's artifacts at ``step`` from ``pipe`` (the run's current params): held-out
    T2I samples and captions / VQA answers (``samples/<step>/``, process 0), and ``loss.png``
    from ``metrics.jsonl``. T2I samples with ``artifacts.steps`` / ``guidance_scale`` /
    ``temperature`` and the evaluation's other sampler options (``eval.guidance_schedule``,
    ``eval.guidance_plausibility``, ``eval.sampling``, ``eval.top_k``)."""
    import jax

    from muddit_jax.eval.compositional import sampler_kwargs
    from muddit_jax.eval.job import split_examples
    from muddit_jax.train.metrics import read_jsonl

    workdir, a = Path(workdir), config.artifacts
    if jax.process_index() != 0:
        return {}
    captions = split_examples(config, "caption", pipe.image_size, a.num_prompts)
    vqa, seen = [], set()
    for e in split_examples(config, "vqa", pipe.image_size, a.num_images):
        image_id = e["id"].rsplit("/", 1)[0]
        if image_id not in seen:
            seen.add(image_id)
            vqa.append(e)
    out = write_run_artifacts(
        pipe, workdir / "samples" / str(step), prompts=[e["captions"][0] for e in captions],
        images=np.stack([e["image"] for e in vqa]), questions=[e["question"] for e in vqa],
        truths=[e["answers"][0] for e in vqa], steps=a.steps,
        seed=config.eval.seed, **sampler_kwargs({**config.eval, "guidance_scale": a.guidance_scale,
                                                 "temperature": a.temperature}))
    metrics_file = workdir / "metrics.jsonl"
    if metrics_file.exists():
        curve = loss_curve(read_jsonl(metrics_file), ("loss", "image_loss", "text_loss"),
                           title=f"training loss (step {step})", window=5)
        out["loss"] = save_png(curve, workdir / "loss.png")
    return out
