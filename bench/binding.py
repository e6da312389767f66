"""Benchmark 6: can the tiny MM-DiT learn to bind a question word to image content?

A toy VQA over ``grid x grid`` token images holding two coloured tokens (``colours`` classes) on
a blank background, trained with the I2T side of :func:`diffusion_loss` (answer region masked,
question visible). Three tasks, each from its own random init, same model, optimizer and steps:

* ``copy``: the answer is a word determined by the question's colour word (text -> answer);
* ``image``: "is colour 0 present?" (image -> answer, the question is constant);
* ``bind``: "is colour c present?" for a random ``c`` (the answer needs both: neither the
  question nor the image alone says anything about it, so no single-input feature helps).

The table reports held-out answer accuracy (chance 1/2 for the yes/no tasks). The loss weights
each row by ``1 / max(r, ratio_floor)``; with upstream's floor (1e-3) and answers of one or two
tokens, a row with tiny ``r`` still masks one token and weighs it up to 1000x. Two extra rows
repeat ``bind`` with ``--ratio-floor`` (default 0.2) and with ``loss.weighting="count"`` (the
realised ``n / k``: a one-token answer always weighs 1), and a third repeats the ``count`` row
with rotary axes ``(head_dim, 0, 0)``: no channel rotates with the image row or column, so a
text query matches image keys by content alone (``model.rope_axes``; at 8 x 8 tokens this is
what lets ``bind`` be learnt, BENCHMARKS.md §1.20). The baseline row trains a plain
pre-LN transformer encoder (same width, depth and heads; learned positions and a modality
embedding; no adaLN, RoPE or QK norm) on ``bind`` with the same data and optimizer.
``bind`` is what the shapes run fails at (``is there a red circle?``, colour attribution), see
BENCHMARKS.md §1.2.

``--bridge`` instead trains that last ``bind`` row (``count``, no spatial channels) on the
original toy and then with one step toward the shapes run at a time (:class:`Toy`: objects
several codes wide, with the MM-DiT's down-sampling on a twice finer grid, several code ids per
colour, 32 text positions with and without the padding as targets, and with the padding
masked apart from the answer (``loss.text_pad_masking="separate"``) or weighted 0.1
(``loss.text_pad_weight``), the shapes depth), to find which of them holds ``bind`` back
(BENCHMARKS.md §1.21, §1.22, §1.24).

``python -m bench.binding [--smoke] [--bridge] [--steps N] [--grid G] [--seed S] [--json PATH]``
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import common
from muddit_jax.diffusion.loss import LossConfig, diffusion_loss
from muddit_jax.models.muddit import Muddit, MudditConfig

Row = dict[str, Any]
TASKS = ("copy", "image", "bind")
COLOURS, LENGTH, BATCH, VOCAB = 8, 8, 32, 32
BOS, EOS, QUESTION, YES, NO, COLOUR_WORD, COPY_WORD, MASK = 2, 3, 4, 5, 6, 10, 18, 31
ANSWER = 3  # text = <bos> question colour-word answer <eos>
UPSTREAM_FLOOR = LossConfig.ratio_floor  # Muddit / Meissonic clamp r at 1e-3 in the 1/r weight


@dataclasses.dataclass(frozen=True)
class Toy:
    """The toy's data and model. The defaults are the toy above; each other value is one step
    toward the shapes run (``--bridge``)."""

    objects: int = 1  # object side in codes (shapes: 5-8 codes on a 16 x 16 grid)
    codes: int = 1  # code ids per colour, drawn per token (shapes: codes carry context)
    length: int = LENGTH  # text positions (shapes: 32)
    pad_targets: bool = False  # padding after the answer is masked and scored (shapes' default)
    separate_pads: bool = False  # with pad_targets: loss.text_pad_masking="separate"
    pad_weight: float = 1.0  # with pad_targets: loss.text_pad_weight
    downsample: bool = False  # the MM-DiT's 2x down/up-sampling (shapes' default)
    deep: bool = False  # 2 + 4 MM-DiT blocks and a 2-layer text encoder (shapes' default)

    @property
    def codebook(self) -> int:
        return COLOURS * self.codes + 1


def make_batch(task: str, grid: int, rng: np.random.Generator, toy: Toy = Toy()
               ) -> dict[str, jax.Array]:
    """One batch of ``task``: images with two coloured objects, question, answer."""
    asked = np.zeros(BATCH, np.int64) if task == "image" else rng.integers(0, COLOURS, BATCH)
    present = rng.integers(0, 2, BATCH).astype(bool)
    image = np.zeros((BATCH, grid, grid), np.int64)
    for i in range(BATCH):
        colours = rng.choice([c for c in range(COLOURS) if c != asked[i]], 2, replace=False)
        if present[i]:
            colours[0] = asked[i]
        for colour, (y, x) in zip(colours, _places(grid, toy.objects, rng)):
            ids = colour + 1 if toy.codes == 1 else 1 + colour * toy.codes + rng.integers(
                0, toy.codes, (toy.objects, toy.objects))
            image[i, y:y + toy.objects, x:x + toy.objects] = ids
    answer = COPY_WORD + asked if task == "copy" else np.where(present, YES, NO)
    text = np.zeros((BATCH, toy.length), np.int64)
    text[:, :5] = np.stack([np.full(BATCH, BOS), np.full(BATCH, QUESTION), COLOUR_WORD + asked,
                            answer, np.full(BATCH, EOS)], 1)
    maskable = np.zeros((BATCH, toy.length), bool)
    maskable[:, ANSWER:None if toy.pad_targets else ANSWER + 2] = True
    return dict(image_ids=jnp.asarray(image, jnp.int32),
                text_ids=jnp.asarray(text, jnp.int32), text_valid=jnp.asarray(text != 0),
                text_maskable=jnp.asarray(maskable), micro_conds=jnp.full((BATCH, 5), 16.0))


def _places(grid: int, side: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left corners of two non-overlapping ``side``-square objects."""
    if grid < 2 * side:
        raise ValueError(f"two objects of {side} x {side} codes do not fit a {grid} x {grid} "
                         "grid side by side; raise the grid or lower Toy.objects")
    if side == 1:
        return [divmod(int(k), grid) for k in rng.choice(grid * grid, 2, replace=False)]
    while True:
        (y0, x0), (y1, x1) = rng.integers(0, grid - side + 1, (2, 2))
        if abs(y0 - y1) >= side or abs(x0 - x1) >= side:
            return [(y0, x0), (y1, x1)]


def blank_answer(batch: dict) -> jax.Array:
    """The batch's text with the answer region (answer + eos, and the padding when it is a
    target) masked: what both models see."""
    return jnp.where(batch["text_maskable"], MASK, batch["text_ids"])


def model(width: int, spatial_rope: bool = True, toy: Toy = Toy()) -> Muddit:
    """The tiny preset at ``width`` (2 + 2 MM-DiT blocks, a 1-layer text encoder, unless
    ``toy.deep``); without ``spatial_rope`` every rotary channel sits on the (always zero)
    first axis."""
    cfg = MudditConfig.tiny(VOCAB, codebook_size=toy.codebook, width=width)
    text = dataclasses.replace(cfg.text, num_hidden_layers=2 if toy.deep else 1,
                               max_position_embeddings=toy.length)
    mmdit = dataclasses.replace(cfg.mmdit, downsample=toy.downsample, upsample=toy.downsample,
                                num_single_layers=4 if toy.deep else 2)
    if not spatial_rope:
        mmdit = dataclasses.replace(mmdit, axes_dims_rope=(mmdit.attention_head_dim, 0, 0))
    return Muddit(dataclasses.replace(cfg, text=text, mmdit=mmdit))


def train_task(task: str, *, steps: int, grid: int, width: int, lr: float,
               ratio_floor: float = UPSTREAM_FLOOR, weighting: str = "muddit",
               spatial_rope: bool = True, seed: int = 0, toy: Toy = Toy()) -> Row:
    """Train a fresh model on ``task`` for ``steps`` (loss weight ``1 / max(r, ratio_floor)``,
    or the realised ``n / k`` for ``weighting="count"``) and score its answers on held-out
    batches."""
    net, rng = model(width, spatial_rope, toy), np.random.default_rng(seed)
    config = LossConfig(image_mask_id=toy.codebook, text_mask_id=MASK, t2i_fraction=0.0,
                        empty_text_ids=(BOS, EOS) + (0,) * (toy.length - 2), cond_dropout=0.0,
                        ratio_floor=ratio_floor, weighting=weighting,
                        text_pad_is_target=toy.pad_targets,
                        text_pad_masking="separate" if toy.separate_pads else "joint",
                        text_pad_weight=toy.pad_weight)
    probe = make_batch(task, grid, rng, toy)
    params = net.init(jax.random.key(seed), probe["image_ids"], probe["text_ids"],
                      jnp.ones((BATCH,)), probe["micro_conds"])["params"]
    tx = optax.adam(lr)

    def forward(p: Any, *args: jax.Array, generated_rows: int | None = None) -> Any:
        return net.apply({"params": p}, *args, generated_rows=generated_rows)

    @jax.jit
    def step(params: Any, opt: Any, batch: dict, key: jax.Array) -> tuple[Any, Any]:
        grads, _ = jax.grad(lambda p: diffusion_loss(forward_fn=forward, params=p, batch=batch,
                                                     rng=key, config=config), has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    @jax.jit
    def correct(params: Any, batch: dict) -> jax.Array:
        _, logits = forward(params, batch["image_ids"], blank_answer(batch), jnp.ones((BATCH,)),
                            batch["micro_conds"])
        return jnp.sum(jnp.argmax(logits[:, ANSWER], -1) == batch["text_ids"][:, ANSWER])

    opt, start = tx.init(params), time.perf_counter()
    for i in range(steps):
        params, opt = step(params, opt, make_batch(task, grid, rng, toy), jax.random.key(i))
    accuracy = held_out_accuracy(lambda b: correct(params, b), task, grid, toy)
    return dict(task=task, weighting=weighting, ratio_floor=ratio_floor,
                spatial_rope=spatial_rope, toy=_changed(toy), steps=steps, grid=grid,
                width=width, lr=lr,
                chance=1 / COLOURS if task == "copy" else 0.5,
                accuracy=accuracy, train_s_with_compile=time.perf_counter() - start)


class PlainTransformer(nn.Module):
    """The baseline: ``[text; image]`` tokens with learned positions and a modality embedding,
    ``depth`` pre-LN blocks, a linear head on the text positions."""

    width: int
    depth: int = 4
    heads: int = 4

    @nn.compact
    def __call__(self, text: jax.Array, image: jax.Array) -> jax.Array:
        b, n_img = image.shape[0], image.shape[1] * image.shape[2]
        t = nn.Embed(VOCAB, self.width)(text) + nn.Embed(LENGTH, self.width)(jnp.arange(LENGTH))
        i = (nn.Embed(COLOURS + 2, self.width)(image.reshape(b, n_img))
             + nn.Embed(n_img, self.width)(jnp.arange(n_img))
             + self.param("image_type", nn.initializers.normal(0.02), (self.width,)))
        x = jnp.concatenate([t, i], 1)
        for _ in range(self.depth):
            x = x + nn.MultiHeadDotProductAttention(self.heads)(nn.LayerNorm()(x))
            h = nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(x)))
            x = x + nn.Dense(self.width)(h)
        return nn.Dense(VOCAB)(nn.LayerNorm()(x[:, :LENGTH]))


def train_baseline(*, steps: int, grid: int, width: int, lr: float, seed: int = 0) -> Row:
    """:class:`PlainTransformer` on ``bind``: cross-entropy on the masked answer."""
    net, rng = PlainTransformer(width), np.random.default_rng(seed)
    probe = make_batch("bind", grid, rng)
    params = net.init(jax.random.key(seed), blank_answer(probe), probe["image_ids"])
    tx = optax.adam(lr)

    def loss(p: Any, batch: dict) -> jax.Array:
        logits = net.apply(p, blank_answer(batch), batch["image_ids"])[:, ANSWER]
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["text_ids"][:, ANSWER]).mean()

    @jax.jit
    def step(params: Any, opt: Any, batch: dict) -> tuple[Any, Any]:
        updates, opt = tx.update(jax.grad(loss)(params, batch), opt, params)
        return optax.apply_updates(params, updates), opt

    @jax.jit
    def correct(params: Any, batch: dict) -> jax.Array:
        logits = net.apply(params, blank_answer(batch), batch["image_ids"])[:, ANSWER]
        return jnp.sum(jnp.argmax(logits, -1) == batch["text_ids"][:, ANSWER])

    opt, start = tx.init(params), time.perf_counter()
    for _ in range(steps):
        params, opt = step(params, opt, make_batch("bind", grid, rng))
    accuracy = held_out_accuracy(lambda b: correct(params, b), "bind", grid)
    return dict(task="bind (plain transformer baseline)", weighting=None, ratio_floor=None,
                spatial_rope=None, toy=None, steps=steps, grid=grid, width=width, lr=lr,
                chance=0.5, accuracy=accuracy, train_s_with_compile=time.perf_counter() - start)


def _changed(toy: Toy) -> str:
    """The toy's fields that differ from the original toy, e.g. ``"pad_targets=True"``."""
    return ", ".join(f"{f.name}={getattr(toy, f.name)}" for f in dataclasses.fields(toy)
                     if getattr(toy, f.name) != f.default) or "original"


def held_out_accuracy(correct: Any, task: str, grid: int, toy: Toy = Toy()) -> float:
    """Answer accuracy over 8 held-out batches of ``task`` (fixed seeds); ``correct(batch)``
    counts the right answers of one batch."""
    batches = [make_batch(task, grid, np.random.default_rng(10_000 + i), toy)
               for i in range(8)]
    return sum(int(correct(b)) for b in batches) / (8 * BATCH)


# (toy, grid multiplier): each a single step from the original toy toward the shapes run;
# down-sampling doubles the code grid so that the blocks still see the same tokens
BRIDGE = ((Toy(), 1), (Toy(objects=3), 1), (Toy(objects=6, downsample=True), 2),
          (Toy(codes=8), 1), (Toy(length=32), 1), (Toy(length=32, pad_targets=True), 1),
          (Toy(length=32, pad_targets=True, separate_pads=True), 1),
          (Toy(length=32, pad_targets=True, pad_weight=0.1), 1), (Toy(deep=True), 1))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--grid", type=int, default=2, help="image tokens per side")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ratio-floor", type=float, default=0.2,
                   help="the floor of r in the 1/r loss weight of the extra bind row "
                        f"(the other rows use upstream's {UPSTREAM_FLOOR})")
    p.add_argument("--bridge", action="store_true",
                   help="instead: the count-weight bind row without spatial rotary channels, on "
                        "the original toy and with each single step toward the shapes run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    steps, width = (5, 32) if args.smoke else (args.steps, args.width)
    kw = dict(steps=steps, grid=args.grid, width=width, lr=args.lr, seed=args.seed)
    if args.bridge:
        rows = [train_task("bind", weighting="count", spatial_rope=False, toy=toy,
                           **{**kw, "grid": args.grid * scale}) for toy, scale in BRIDGE]
        return common.finish("binding", args, {"bind, one step toward shapes": (rows, None)})
    rows = [train_task(t, **kw) for t in TASKS]
    rows.append(train_task("bind", ratio_floor=args.ratio_floor, **kw))
    rows.append(train_task("bind", weighting="count", **kw))
    rows.append(train_task("bind", weighting="count", spatial_rope=False, **kw))
    rows.append(train_baseline(**kw))
    return common.finish("binding", args, {"answer accuracy after training": (rows, None)})


if __name__ == "__main__":
    common.reexec_with_host_env("bench.binding")
    main()
