"""``muddit-sample``: text-to-image, captioning or VQA from a training run or a converted checkpoint.

    muddit-sample --workdir runs/shapes --prompt "a red circle to the left of a blue square" --out a.png
    muddit-sample --workdir runs/shapes --image x.png                       # caption
    muddit-sample --workdir runs/shapes --image x.png --question "what color is the circle?"
    muddit-sample --checkpoint DIR --prompt "a red circle" --out a.png

``--workdir`` is a ``muddit-train`` run folder (its latest checkpoint, or ``--step``; the config,
tokenizer and image size come from the run); ``--checkpoint`` is a ``muddit-convert`` output of a
whole pipeline folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from muddit_jax.diffusion.sampler import GUIDANCE_SCHEDULES
from muddit_jax.port.mapping import PortError


def load_image(path: str | Path, size: int) -> np.ndarray:
    """An image file as ``uint8 [size, size, 3]`` (centre crop to square, then resize)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--image {path} does not exist")
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(img.resize((size, size), Image.BICUBIC), np.uint8)


def load_pipeline(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The pipeline of ``--workdir`` or ``--checkpoint`` and the sampling options of the task
    asked for (T2I: ``guidance_scale``, ``guidance_schedule``, ``guidance_plausibility``,
    ``temperature``, ``sampling``, ``top_k``; captions and
    answers: ``sampling``, ``max_tokens``): the flags, else the run's ``eval`` settings; with
    ``--checkpoint`` only the flags given (the pipeline's defaults fill the rest)."""
    if args.prompt is not None:
        given = dict(guidance_scale=args.guidance_scale,
                     guidance_schedule=args.guidance_schedule,
                     guidance_plausibility=args.guidance_plausibility, temperature=args.temperature,
                     sampling=args.sampling, top_k=args.top_k)
        fields = {k: k for k in given}
    else:
        given = dict(sampling=args.sampling, max_tokens=args.max_tokens)
        bound = "caption_max_tokens" if args.question is None else "answer_max_tokens"
        fields = dict(sampling="text_sampling", max_tokens=bound)
    if args.checkpoint:
        from muddit_jax.pipeline import MudditPipeline

        pipe = MudditPipeline.from_converted(args.checkpoint, image_size=args.image_size)
        return pipe, {k: v for k, v in given.items() if v is not None}
    from muddit_jax.eval.job import pipeline_from_workdir

    config, pipe = pipeline_from_workdir(args.workdir, args.step, ema=args.ema)
    # runs saved before a field existed fall back to the pipeline's default
    run = {k: config.eval.get(f) for k, f in fields.items()}
    options = {k: run[k] if v is None else v for k, v in given.items()
               if v is not None or run[k] is not None}
    if options.get("max_tokens") == 0:  # eval's 0: decode to the text length
        del options["max_tokens"]
    return pipe, options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (usage errors exit with status 2)."""
    p = argparse.ArgumentParser(prog="muddit-sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="muddit-train run folder")
    src.add_argument("--checkpoint", help="muddit-convert output folder")
    p.add_argument("--step", type=int, help="checkpoint step of --workdir (default: latest)")
    p.add_argument("--ema", action="store_true", help="EMA params of --workdir")
    p.add_argument("--prompt", help="text-to-image prompt")
    p.add_argument("--image", help="input image for captioning / VQA")
    p.add_argument("--question", help="VQA question (with --image)")
    p.add_argument("--out", default="sample.png", help="output PNG for --prompt")
    p.add_argument("--image-size", type=int, default=512, help="--checkpoint only")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="default: the run's eval.guidance_scale (--workdir) or 9")
    p.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES, default=None,
                   help="how the scale moves over the steps: constant, linear (0 up to the "
                        "scale) or decay (the scale down to 1); default: the run's "
                        "eval.guidance_schedule or constant")
    p.add_argument("--guidance-plausibility", type=float, default=None, metavar="A",
                   help="guidance picks only among codes with at least A times the top code's "
                        "conditional probability (0 = off); default: the run's "
                        "eval.guidance_plausibility or 0")
    p.add_argument("--temperature", type=float, nargs=2, default=None, metavar=("START", "END"),
                   help="T2I confidence-noise temperature, annealed from START to END (0 0 = keep "
                        "the most likely tokens); default: the run's eval.temperature or 2 0")
    p.add_argument("--sampling", choices=("multinomial", "argmax", "top_k"), default=None,
                   help="how each masked token's candidate is drawn (top_k: T2I only, with "
                        "--top-k); default: the run's eval.sampling / eval.text_sampling")
    p.add_argument("--top-k", type=int, default=None, help="with --sampling top_k")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="caption / VQA: decode at most this many positions (text and eos), the "
                        "rest stays padding; default: the run's eval.caption_max_tokens / "
                        "eval.answer_max_tokens (0: to the text length)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if (args.prompt is None) == (args.image is None):
        p.error("pass exactly one of --prompt (text-to-image) or --image (caption / VQA)")
    if args.question is not None and args.image is None:
        p.error("--question needs --image")
    for flag in ("temperature", "guidance_schedule", "guidance_plausibility"):
        if getattr(args, flag) is not None and args.prompt is None:
            p.error(f"--{flag.replace('_', '-')} applies to text-to-image (--prompt) only")
    if args.prompt is None and (args.sampling == "top_k" or args.top_k is not None):
        p.error("--sampling top_k / --top-k apply to text-to-image (--prompt) only")
    if args.max_tokens is not None and (args.prompt is not None or args.max_tokens < 1):
        p.error("--max-tokens applies to captions / VQA (--image) and needs a value >= 1")
    if args.top_k is not None and (args.sampling != "top_k" or args.top_k < 1):
        p.error("--top-k needs --sampling top_k and a value >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pipe, options = load_pipeline(args)
        if args.prompt is not None:
            image = pipe.generate([args.prompt], steps=args.steps, seed=args.seed, **options)[0]
            from PIL import Image

            from muddit_jax.train.artifacts import save_png

            save_png(Image.fromarray(image), args.out)
            print(f"muddit-sample: wrote {args.out}")
            return 0
        image = load_image(args.image, pipe.image_size)[None]
        if args.question is None:
            print(pipe.caption(image, steps=args.steps, seed=args.seed, **options)[0])
        else:
            print(pipe.answer(image, [args.question], steps=args.steps, seed=args.seed,
                              **options)[0])
        return 0
    except (ValueError, PortError, FileNotFoundError) as e:
        print(f"muddit-sample: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
