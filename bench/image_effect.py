"""Benchmark 10: how much a run's VQA answers depend on the image, per question type.

For the questions of the first ``n`` ``shapes`` scenes of a split, the answer region (answer,
eos, padding) is masked as at the first decoding step (``t = 1``) and the answer tokens are
scored twice: with the question's own image and with another scene's image (the images rolled
by one). ``--padding visible`` leaves the padding unmasked, as a run trained with
``loss.text_pad_is_target=False`` saw it. ``acc``: every answer token is the argmax; ``ce``:
the answer tokens' summed cross-entropy; ``image_effect`` = ``ce_other_image - ce`` (nats). A
question type whose ``acc_other_image`` matches ``acc`` is answered from the question text
alone: on a memorised run that is recall of the training questions, not reading (BENCHMARKS.md
§1.13).

``--guidance S`` adds ``acc_guided`` / ``ce_guided``, scored on the renormalised log-probs
``own + (S - 1) * (own - null)``: image guidance at answer time (the understanding side's
classifier-free guidance), with ``--null other`` (another scene's image, as above) or ``mask``
(every image code masked) as the image-free branch (BENCHMARKS.md §1.36).

``python -m bench.image_effect --workdir runs/shapes [--split test] [--scenes 128]
[--padding masked|visible] [--step N] [--guidance S --null other|mask]``
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, shapes_run
from muddit_jax.data import shapes
from muddit_jax.data.text import encode_vqa

PADDING = ("masked", "visible")
NULLS = ("other", "mask")


def question_rows(examples: list[shapes.ShapesExample], tokenizer: Any, length: int
                  ) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray, np.ndarray,
                             np.ndarray]:
    """``(scene index [q], question types, text ids [q, L], answer region [q, L], answer
    tokens [q, L], padding [q, L])`` of every question of ``examples`` that leaves room for an
    answer; the answer region (answer, eos, padding) is what the sampler masks, the answer
    tokens are scored."""
    scene, kinds, ids, region, answer, padding = [], [], [], [], [], []
    for i, example in enumerate(examples):
        for qa in example.qa:
            enc = encode_vqa(tokenizer, qa.question, qa.answer, length)
            if enc is None:
                continue
            text_ids, valid, maskable = enc
            scene.append(i)
            kinds.append(qa.question_type)
            ids.append(text_ids)
            region.append(maskable)
            answer.append(maskable & valid & (text_ids != tokenizer.eos_id))
            padding.append(maskable & ~valid)
    return (np.asarray(scene), kinds, np.stack(ids), np.stack(region), np.stack(answer),
            np.stack(padding))


def measure(workdir: Path, n: int, split: str, shift: int = 1, padding: str = "masked",
            step: int | None = None, guidance: float | None = None, null: str = "other"
            ) -> list[dict[str, Any]]:
    """One row per question type and an ``all`` row (see the module doc); ``shift``: how far the
    images are rolled for the other-image score (0 scores the own image twice); ``padding``:
    ``masked`` (as the sampler starts) or ``visible``; ``step``: the checkpoint (latest: None);
    ``guidance``/``null``: add ``acc_guided`` and ``ce_guided`` (None: no such columns)."""
    if padding not in PADDING:
        raise ValueError(f"padding={padding!r}: use one of {PADDING}")
    if null not in NULLS:
        raise ValueError(f"null={null!r}: use one of {NULLS}")
    _, pipe, options = shapes_run.load(workdir, "the questions", step)
    if pipe.config.mmdit.tokenizer_vocab_size is None:
        raise ValueError("this MM-DiT has no text decoder head: nothing answers questions")
    tok = pipe.tokenizer
    examples = [shapes.generate(options, split, i) for i in range(n)]
    scene, kinds, ids, region, answer, pads = question_rows(examples, tok, pipe.text_length)
    codes = shapes_run.scene_codes(pipe, examples)
    if padding == "visible":
        region = region & ~pads
    masked = np.where(region, tok.mask_id, ids)  # as the sampler starts the answer
    (model, nets), q = shapes_run.generator(pipe), len(ids)
    target, keep = jnp.asarray(ids)[..., None], jnp.asarray(answer)

    @jax.jit
    def log_probs(image_codes: jax.Array) -> jax.Array:
        _, logits = model.apply({"params": nets}, image_codes, jnp.asarray(masked),
                                jnp.ones((q,), jnp.float32), jnp.asarray(pipe._micro(q)))
        return jax.nn.log_softmax(logits[..., : tok.vocab_size])

    def score(logp: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        ce = -jnp.take_along_axis(logp, target, axis=-1)[..., 0]
        right = jnp.argmax(logp, axis=-1) == target[..., 0]
        return (np.asarray(jnp.where(keep, ce, 0.0).sum(-1)),
                np.asarray(jnp.all(right | ~keep, axis=-1)))

    own_codes = jnp.asarray(codes[scene])
    own, other = log_probs(own_codes), log_probs(jnp.asarray(np.roll(codes, shift, axis=0)[scene]))
    (ce, acc), (ce_other, acc_other) = score(own), score(other)
    if guidance is not None:
        base = other if null == "other" else log_probs(
            jnp.full_like(own_codes, pipe.config.mmdit.mask_token_id))
        ce_guided, acc_guided = score(jax.nn.log_softmax(own + (guidance - 1.0) * (own - base)))
    groups = collections.defaultdict(list)
    for row, kind in enumerate(kinds):
        groups[kind].append(row)
    groups = {**dict(sorted(groups.items())), "all": list(range(q))}
    rows = []
    for kind, idx in groups.items():
        rows.append(dict(question_type=kind, questions=len(idx),
                         acc=round(float(acc[idx].mean()), 3),
                         acc_other_image=round(float(acc_other[idx].mean()), 3),
                         ce=round(float(ce[idx].mean()), 3),
                         ce_other_image=round(float(ce_other[idx].mean()), 3),
                         image_effect=round(float((ce_other[idx] - ce[idx]).mean()), 3)))
        if guidance is not None:
            rows[-1].update(acc_guided=round(float(acc_guided[idx].mean()), 3),
                            ce_guided=round(float(ce_guided[idx].mean()), 3))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True, help="a trained run on 'shapes'")
    p.add_argument("--scenes", type=int, default=128, help="scenes whose questions are scored")
    p.add_argument("--split", default="test")
    p.add_argument("--padding", choices=PADDING, default="masked",
                   help="the padding after the answer: masked as the sampler starts, or visible")
    p.add_argument("--step", type=int, default=None,
                   help="score this checkpoint (default: the latest); keep several with "
                        "--config.checkpoint.keep=N to follow a run")
    p.add_argument("--guidance", type=float, default=None,
                   help="add acc_guided: answers from own + (S - 1) * (own - null) log-probs")
    p.add_argument("--null", choices=NULLS, default="other",
                   help="the image-free branch of --guidance: another scene's image, or masked")
    args = p.parse_args(argv)
    if args.scenes < 2:
        p.error(f"--scenes {args.scenes}: need at least 2 (the other image is another scene's)")
    rows = measure(args.workdir, 8 if args.smoke else args.scenes, args.split,
                   padding=args.padding, step=args.step, guidance=args.guidance,
                   null=args.null)
    return common.finish("image_effect", args, {f"answers on {args.split}, own vs other image":
                                                (rows, None)})


if __name__ == "__main__":
    common.reexec_with_host_env("bench.image_effect")
    main()
