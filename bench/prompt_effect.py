"""Benchmark 8: how well a run's MM-DiT predicts object codes, and how much the prompt helps.

For ``shapes`` images of a trained run (``--workdir``; its saved config, VQ and MM-DiT), each
mask ratio ``r`` masks a random ``r`` of the image codes and scores the masked codes that cover
object pixels: cross-entropy and accuracy with the image's own caption as the prompt, and
cross-entropy with another image's caption (``prompt_effect`` = the difference, in nats). The
``r = 1`` row is where sampling starts: a lower masked-token loss that comes from copying visible
neighbours does not show there, and text-to-image samples followed this row, not the training
loss, in BENCHMARKS.md §1.7. ``background_ce`` scores the other masked codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, shapes_run
from muddit_jax.data import shapes


def measure(workdir: Path, n: int, ratios: list[float], split: str, seed: int = 0
            ) -> list[dict[str, Any]]:
    """One row per mask ratio over the first ``n`` images of ``split`` (see the module doc)."""
    _, pipe, options = shapes_run.load(workdir, "the object masks")
    examples = [shapes.generate(options, split, i) for i in range(n)]
    codes = shapes_run.scene_codes(pipe, examples)
    objects = shapes_run.object_codes(options, examples, codes.shape[1])
    captions = pipe.tokenizer.encode([e.captions[0] for e in examples], pipe.text_length)
    shuffled = captions[np.roll(np.arange(n), 1)]
    (model, nets), k = shapes_run.generator(pipe), pipe.config.mmdit.codebook_size

    @jax.jit
    def code_ce(text: jax.Array, tokens: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits, _ = model.apply({"params": nets}, tokens, text, t, jnp.asarray(pipe._micro(n)))
        logp = jax.nn.log_softmax(logits[..., :k])
        ce = -jnp.take_along_axis(logp, jnp.asarray(codes)[..., None], axis=-1)[..., 0]
        return ce, jnp.argmax(logp, axis=-1) == codes

    rng, rows = np.random.default_rng(seed), []
    for r in ratios:
        masked = rng.random(codes.shape) < r
        tokens = jnp.asarray(np.where(masked, pipe.config.mmdit.mask_token_id, codes))
        t = jnp.full((n,), r, jnp.float32)
        (ce, right), (ce_other, _) = (code_ce(jnp.asarray(x), tokens, t)
                                      for x in (captions, shuffled))
        obj, bg = masked & objects, masked & ~objects
        true, other = float(np.asarray(ce)[obj].mean()), float(np.asarray(ce_other)[obj].mean())
        rows.append(dict(mask_ratio=r, object_ce=round(true, 3), object_ce_other_prompt=round(
            other, 3), prompt_effect=round(other - true, 3), object_acc=round(float(
                np.asarray(right)[obj].mean()), 3), background_ce=round(float(
                    np.asarray(ce)[bg].mean()), 3), masked_object_codes=int(obj.sum())))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True, help="a trained run on 'shapes'")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--ratios", default="1.0,0.7,0.3", help="comma-separated mask ratios")
    p.add_argument("--split", default="validation")
    args = p.parse_args(argv)
    ratios = [float(x) for x in args.ratios.split(",")]
    if not all(0 < r <= 1 for r in ratios):
        p.error(f"--ratios {args.ratios}: each must be in (0, 1]")
    rows = measure(args.workdir, 8 if args.smoke else args.images, ratios, args.split)
    return common.finish("prompt_effect", args, {"masked object codes, true vs other prompt":
                                                 (rows, None)})


if __name__ == "__main__":
    common.reexec_with_host_env("bench.prompt_effect")
    main()
