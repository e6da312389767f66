"""``muddit-smoke``: run every part of the stack once on a random-init tiny model (no download).

Trains a SentencePiece tokenizer on an embedded caption corpus, builds a tiny Muddit (text
encoder + MM-DiT + VQ), and runs text-to-image, captioning and VQA through the compiled sampler,
writing a PNG grid and a JSON report with timings. Until a trained default exists this is the
project's main job; outputs are noise-like because nothing is trained.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from muddit_jax.models.muddit import MudditConfig
from muddit_jax.models.tokenizers import SentencePieceTokenizer
from muddit_jax.pipeline import MudditPipeline

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")


def caption_corpus() -> list[str]:
    """Template captions of flat-coloured shapes (the embedded default's vocabulary)."""
    pairs = itertools.product(("small", "large"), COLORS, SHAPES, COLORS, SHAPES, ("left", "right"))
    return [f"a {z} {c1} {s1} to the {side} of a {c2} {s2}." for z, c1, s1, c2, s2, side in pairs]


def save_grid(images: np.ndarray, path: Path) -> None:
    """Write ``[b, H, W, 3]`` uint8 images side by side as one PNG (atomically)."""
    from PIL import Image

    grid = np.concatenate(list(images), axis=1)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="muddit-smoke", description=__doc__)
    parser.add_argument("--out", default="runs/smoke", help="output folder")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    report: dict[str, object] = {}
    t0 = time.perf_counter()
    tok = SentencePieceTokenizer.train(caption_corpus(), 64, out / "tokenizer.model")
    pipe = MudditPipeline.random_init(
        MudditConfig.tiny(tok.vocab_size), tok, args.image_size, seed=args.seed
    )
    report["build_s"] = time.perf_counter() - t0

    prompts = ["a small red circle", "a large blue square", "a green triangle", "a purple circle"]
    for name, run in (
        ("t2i", lambda: pipe.generate(prompts, steps=args.steps, seed=args.seed)),
        ("i2t", lambda: pipe.caption(images, steps=args.steps, seed=args.seed)),
        ("vqa", lambda: pipe.answer(images, ["a red circle"] * len(prompts), steps=args.steps)),
    ):
        t = time.perf_counter()
        result = run()
        first = time.perf_counter() - t
        t = time.perf_counter()
        run()
        report[name] = {"first_call_s": first, "cached_call_s": time.perf_counter() - t}
        if name == "t2i":
            images = result
            save_grid(images, out / "t2i_grid.png")
        else:
            report[name]["outputs"] = result
        print(f"muddit-smoke: {name}: first call {first:.1f}s (compile), cached "
              f"{report[name]['cached_call_s']:.2f}s")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"muddit-smoke: wrote {out}/t2i_grid.png and {out}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
