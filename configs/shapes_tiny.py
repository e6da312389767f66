"""The embedded default: train VQ + MM-DiT from scratch on ``shapes`` on a 2-core CPU.

    muddit-train --config configs/shapes_tiny.py --workdir runs/shapes

Stages (``muddit_jax/train/stages.py``): a SentencePiece tokenizer trained on the captions and
questions (``data.tokenizer="auto"``), the VQ tokenizer (32 px -> 16 x 16 codes of 256, 32-64
channels, EMA codebook with dead-code restart; 1,500 steps at batch 16), then the MM-DiT
(Meissonic's 2x down/up-sampling: its blocks run on 8 x 8) and the text encoder from scratch
with the ELBO on a mixture of T2I, captioning and VQA rows (4,200 steps at batch 32, width 64),
reading the training images as VQ codes encoded once after the VQ stage (``data.pretokenize``,
BENCHMARKS.md §1.17). About 33 minutes in all on 2 cores, 22 of them the MM-DiT (§1.44); 3,400
steps would save 5 but lose a fifth of the held-out caption score (BENCHMARKS.md §1.39, §1.40).
Clean images (the captioning / VQA condition) take an input path of their own with two ConvNeXt
blocks on the code grid, which answers held-out shape questions and captions them far better
than the one shared path, at the same T2I (§1.35-§1.39).
Width 64 steps twice as fast as 128, so the same minutes train twice the steps (§1.19).
Backgrounds are plain: the noise/gradient textures put unpredictable codes in every image,
which the generator then spends its few CPU steps on. Objects are 1.5x the dataset's default
size (10 and 15 px on a side): once through the VQ, 6-px shapes are hard to tell apart for the
model and the T2I detector alike (BENCHMARKS.md §1.5). At the end: the evaluation job
(caption, VQA, compositional T2I on ``eval.split``) and the PNG artifacts.
``arg`` (comma separated): ``smoke`` shrinks every stage to a few steps (tests, CI); ``plain``
is the default before §1.39 (one shared image input path, Flux's rotary split, a random code
embedding, upstream's loss weighting and padding draw, 8 captioning + 8 VQA rows).
"""

import dataclasses

import ml_collections

from muddit_jax.data.shapes import ShapesConfig
from muddit_jax.train.config import base_config


def get_config(arg: str | None = None):
    flags = set((arg or "").split(","))
    c = base_config()
    c.data.update(kind="mixture", dataset="shapes", split="train", task="caption",
                  tokenizer="auto", global_batch=32, grid=16, text_length=32, images=True,
                  text_maskable=True, pretokenize=True)
    # every ShapesConfig field is a key, so each is overridable (--config.data.options.num_train=64)
    shapes = dataclasses.asdict(ShapesConfig(resolution=32, max_objects=3, textures=("plain",),
                                             object_scale=1.5))
    if "smoke" in flags:
        shapes.update(num_train=256, num_validation=32, num_test=32)
    # one ConfigDict shared by every reader (tokenizer, both mixture sources, evaluation,
    # artifacts), so --config.data.options.<field>=... changes them all
    shapes = ml_collections.ConfigDict(shapes)
    c.data.options = shapes
    # per batch: 16 T2I rows + about 11 captioning rows (captions), 5 VQA rows (question kept
    # visible): more captioning rows answer held-out shapes (BENCHMARKS.md §1.29, §1.39)
    c.data.mixture = dict(
        captions=dict(weight=5.0, dataset="shapes", task="caption", options=shapes),
        # question_types=("exists",) would draw only those questions (() = every type)
        vqa=dict(weight=1.0, dataset="shapes", task="vqa", options=shapes, question_types=()),
    )
    c.model.update(preset="tiny", text_vocab_size=256, codebook_size=256, width=64,
                   dual_layers=2, single_layers=4, text_layers=2, downsample=True,
                   vq_channels=(32, 64), vq_layers_per_block=1, vq_latent_channels=16,
                   vq_norm_groups=8,
                   # no spatial rotary channels, learned image positions (BENCHMARKS.md §1.20)
                   rope_axes=(16, 0, 0), image_pos_embed=True,
                   # the code embedding starts from the VQ codebook and stays fixed (§1.29)
                   code_init="codebook",
                   # clean images (captioning / VQA) take an input path of their own with two
                   # ConvNeXt blocks on the code grid (BENCHMARKS.md §1.35-§1.39)
                   condition_image_input=True, condition_conv_blocks=2, conv_kernel=3)
    c.vq.update(steps=1500, global_batch=16, lr=3e-3, warmup_steps=100, codebook="ema",
                restart_every=25, dead_after=50, checkpoint_every=500, log_every=50,
                eval_images=512)
    # count weighting (§1.3); the answer's padding masked apart from the answer (§1.22-§1.25)
    c.loss.update(cond_dropout=0.1, min_mask_rate=0.0, t2i_fraction=0.5, text_pad_is_target=True,
                  weighting="count", text_pad_masking="separate")
    c.optim.update(lr=2e-3, schedule="cosine", warmup_steps=200, end_lr_ratio=0.05,
                   weight_decay=0.01, clip_norm=1.0, b2=0.99,
                   freeze="mmdit/(condition_)?embed/embeddings/embedding")
    c.train.update(steps=4200, trainable="mmdit,text_encoder", vq_from="auto", ema_decay=0.0)
    c.checkpoint.update(every=500, keep=2)
    c.log.update(every=50)
    # guidance picks only among codes the conditional branch gives >= 0.1 of its top code's
    # probability: neutral on the default (held-out T2I 0.117 vs 0.102 without), and it keeps
    # guidance 4 from wrecking a run that fits its data (0.797 vs 0.125; BENCHMARKS.md §1.12)
    c.eval.update(tasks="caption,vqa,t2i", split="test", limit=256, steps=16,
                  guidance_scale=4.0, guidance_plausibility=0.1, batch_size=32, shard_size=64,
                  at_end=True)
    c.artifacts.update(at_end=True, every=0, num_prompts=8, num_images=8, steps=16,
                       guidance_scale=4.0)
    if "plain" in flags:  # the default until BENCHMARKS.md §1.39; §1.1-§1.38 ran from it
        c.data.mixture.captions.weight, c.data.mixture.vqa.weight = 0.75, 0.25
        c.model.update(rope_axes=(), image_pos_embed=False, code_init="random",
                       condition_image_input=False, condition_conv_blocks=0)
        c.loss.update(weighting="muddit", text_pad_masking="joint")
        c.optim.freeze = ""
    if "smoke" in flags:
        c.model.update(width=32, dual_layers=1, single_layers=1, text_layers=1,
                       vq_channels=(8, 8), vq_latent_channels=4, vq_norm_groups=4)
        c.vq.update(steps=6, global_batch=8, checkpoint_every=3, log_every=2, eval_images=16,
                    warmup_steps=2)
        c.data.global_batch = 8
        c.optim.warmup_steps = 2
        c.train.steps = 30
        c.checkpoint.every = 10
        c.log.every = 2
        c.eval.update(limit=8, steps=2, batch_size=8, shard_size=8)
        c.artifacts.update(num_prompts=4, num_images=4, steps=2)
    return c
