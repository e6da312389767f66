"""Training config defaults (``ml_collections.ConfigDict``) and the objects built from them.

``configs/*.py`` files start from :func:`base_config` and override fields; nothing here does I/O
except :func:`model_config` with ``model.preset="pretrained"`` (reads ``config.json`` files of a
``muddit-convert`` folder).

Sections: ``model`` (size preset, dtypes, remat, scan), ``loss`` (:class:`LossConfig` fields),
``data`` (global batch and shapes), ``optim`` (AdamW, schedule, clipping), ``train`` (steps,
accumulation, frozen parts, EMA, NaN guard, init), ``checkpoint``, ``log``, ``mesh`` (axis sizes
and the rules preset), ``distributed`` (multi-process start-up).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections

from muddit_jax.diffusion.loss import LossConfig
from muddit_jax.diffusion.sampler import CONFIDENCE_TEMPERATURE
from muddit_jax.models import presets
from muddit_jax.models.mmdit import rope_axes_ok
from muddit_jax.models.muddit import MudditConfig
from muddit_jax.models.text_encoder import CLIPTextConfig
from muddit_jax.models.vq import DOWN_BLOCK, UP_BLOCK

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PRESETS = ("tiny", "muddit_512", "meissonic_1024", "pretrained")
SUBMODELS = ("text_encoder", "mmdit")


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default; see the module docstring for the sections."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(
        preset="tiny",  # tiny | muddit_512 | meissonic_1024 | pretrained (configs from init_from)
        # tiny only: vocabularies, width and depths (MM-DiT dual / single blocks, text layers)
        text_vocab_size=64, codebook_size=16, width=32, dual_layers=2, single_layers=2,
        text_layers=2,
        # tiny only: MM-DiT attention head width (heads = width // head_dim); with QK RMSNorm
        # an attention logit is at most sqrt(head_dim) x the norms' gains, so narrow heads
        # attend softly
        head_dim=16,
        # tiny only: Meissonic's 2x down/up-sampling around the blocks (UViT embed at the code
        # grid, transformer on a grid half as wide, the MLM head back at the code grid)
        downsample=False,
        # tiny only: the VQ tokenizer (channels per level: downsample 2^(levels-1))
        vq_channels=(32, 32, 64), vq_layers_per_block=1, vq_latent_channels=8,
        vq_norm_groups=8,
        # diffusers | patch: per-patch networks (a code sees and decodes only its own pixels)
        vq_encoder="diffusers", vq_decoder="diffusers",
        # initial MM-DiT code embedding / MLM output: random | codebook (from the run's VQ
        # codebook, so codes whose patches look alike start alike; muddit_jax/train/run.py).
        # An MM-DiT from train.init_from keeps the checkpoint's values
        code_init="random",
        rope_theta=10000.0,  # tiny only: RoPE base (upstream 10000; see MMDiTConfig.rope_theta)
        image_pos_embed=False,  # tiny only: learned absolute image position embedding
        # tiny only: rotary channels per (text, row, column) axis, even, summing to head_dim;
        # () = the preset's 1:3:3 split (Flux's). Axis 0 never rotates (every id is 0 there), so
        # (head_dim, 0, 0) drops spatial RoPE (pair it with image_pos_embed; BENCHMARKS.md §1.20)
        rope_axes=(),
        # tiny only: the last this many heads of every block are not rotated (content-only
        # scores; the others keep RoPE; BENCHMARKS.md §1.20)
        rope_free_heads=0,
        # tiny only: "image" rotates only image-query x image-key scores; scores with a text
        # token compare content alone ("all": every score, upstream; BENCHMARKS.md §1.29)
        rope_scope="all",
        resample_levels=1,  # tiny only: 2x down/up-sampling levels when downsample (upstream 1)
        # tiny only: ConvNeXt blocks on the code grid before down- / after up-sampling
        # (amused's UViT blocks; upstream Muddit has none) and their depthwise kernel size
        conv_blocks=0, conv_kernel=3,
        # tiny only: learned register tokens appended to the MM-DiT text stream (always visible,
        # never targets; MMDiTConfig.text_registers, BENCHMARKS.md §1.23)
        text_registers=0,
        # tiny only: clean images (captioning / VQA condition) take an image input path of
        # their own, images being generated keep upstream's (MMDiTConfig.condition_image_input)
        condition_image_input=False,
        # tiny only: clean images are encoded apart from the text (their tokens attend to no
        # text key, zero pooled text; MMDiTConfig.condition_image_isolated)
        condition_image_isolated=False,
        # tiny only: ConvNeXt blocks the condition's own input path adds to its conv_blocks
        # (MMDiTConfig.condition_conv_blocks, BENCHMARKS.md §1.37)
        condition_conv_blocks=0,
        # visible text padding is no MM-DiT attention key (any preset; upstream attends to it;
        # MudditConfig.mask_text_padding, BENCHMARKS.md §1.23)
        mask_text_padding=False,
        dtype="float32",  # compute dtype; params are kept in param_dtype (fp32 master)
        param_dtype="float32",
        remat=False,
        remat_policy="",  # "" = save nothing; else a jax.checkpoint_policies name
        scan_layers=False,
    )
    c.loss = dict(
        # weighting: muddit (1 / max(r, ratio_floor)) | elbo (exact MDLM) | count (n / k, the
        # realised mask fraction; see BENCHMARKS.md §1.3)
        text_loss_weight=0.6, min_mask_rate=0.0, mode="split", weighting="muddit",
        # a floor on the image mask ratio alone (0 = upstream; 1 = T2I from the text only, §1.33)
        image_min_mask_rate=0.0,
        # probability that a row masks its whole image (0 = upstream; a per-row mix, §1.34)
        image_full_mask_prob=0.0,
        # floor of r in the 1/r weight (upstream 1e-3); see BENCHMARKS.md §1.2
        ratio_floor=1e-3,
        schedule="cosine", cond_dropout=0.1, text_pad_is_target=False,
        # joint (upstream) | separate: mask the padding apart from the answer (BENCHMARKS §1.22)
        text_pad_masking="joint",
        # VQA rows keep their padding visible even when text_pad_is_target (captions still
        # learn to end); decode answers with eval.answer_max_tokens (BENCHMARKS §1.22)
        answer_padding_visible=False,
        # factor on each padding target's CE (upstream 1); with text_pad_masking="separate" the
        # shapes exists answers bind in 1 of 3 seeds at 0.1, 2 of 4 at 1 (BENCHMARKS §1.25)
        text_pad_weight=1.0,
        t2i_fraction=0.5,  # split mode: the first rows of each batch are T2I, the rest I2T/VQA
        # regexes over parameter paths or @groups (optim.freeze syntax) the T2I rows send no
        # gradient to, e.g. "@blocks,@image_input"; "" = upstream (BENCHMARKS §1.31)
        t2i_stop_gradient="",
        text_mask_id=-1,  # -1 = the tokenizer's <mask> id (no tokenizer: text vocab - 1)
    )
    c.data = dict(
        kind="synthetic",  # synthetic | dataset | mixture (see muddit_jax/train/data.py)
        dataset="shapes", split="train", data_dir="", task="caption",
        options=ml_collections.ConfigDict(),  # dataset builder options (e.g. shapes fields)
        # SentencePiece .model or CLIP tokenizer folder (data.kind=dataset); "auto" trains a
        # SentencePiece model of model.text_vocab_size pieces on the split's texts into
        # WORKDIR/tokenizer.model (muddit_jax/train/stages.py)
        tokenizer="",
        tokenizer_type="bpe",  # SentencePiece model type of a trained ("auto") tokenizer
        global_batch=8,
        grid=4,  # image-code grid h = w (image_size / VQ factor when images=True)
        text_length=8,
        images=False,  # feed raw images [b, H, W, 3]; the frozen VQ encodes them in the step
        # with images=True and a mixture: encode the training images to codes once, before the
        # MM-DiT stage (WORKDIR/codes/; muddit_jax/train/codes_stage.py), not in every step
        pretokenize=False,
        text_maskable=False,  # batches carry text_maskable [b, l] (VQA: keep the question)
        # data.kind=mixture: {name: dict(weight=w, dataset=..., task=caption|vqa, options=...,
        # split=, seed=, ...)}; rows per batch by weight, caption sources first
        # (muddit_jax/data/mixture.py); dataset / task / options above are then unused
        mixture=ml_collections.ConfigDict(),
        # host input throughput (muddit_jax/data/pipeline.py; every source of a mixture): grain
        # prefetch threads, examples prefetched, grain worker processes (0 = in this process).
        # None of them changes the batches; a checkpoint resumes only with the same `workers`
        read_threads=4, prefetch=64, workers=0,
        # the batches' order and draws (shuffle, caption / question picked, per-source seeds of
        # a mixture); -1 = the run's `seed`, which also draws the init and the masks, so another
        # value keeps the init and changes only the data (or the reverse)
        seed=-1,
    )
    c.eval = dict(
        tasks="caption,vqa,t2i",  # evaluators run by muddit-eval / every `every` train steps
        every=0,  # 0 = no periodic evaluation during training
        dataset="shapes", split="test", limit=64,
        options=ml_collections.ConfigDict(),  # builder options of eval.dataset; {} = data.options
        steps=16, guidance_scale=9.0, batch_size=8, shard_size=32, seed=0, ema=False,
        # T2I sampling: scale of the Gumbel noise on token confidences, annealed linearly from
        # the first to the second value over the steps; (0, 0) keeps the most likely tokens
        temperature=CONFIDENCE_TEMPERATURE,
        # how a masked token's candidate is drawn from its logits: T2I "multinomial" (upstream) |
        # "argmax" | "top_k" (with top_k); captions and answers "multinomial" | "argmax"
        sampling="multinomial", top_k=0, text_sampling="multinomial",
        # captions / answers: decode at most this many positions (text + eos), the rest stays
        # padding; 0 = to the text length (upstream). A run trained with
        # loss.text_pad_is_target=False needs a bound to end its texts (BENCHMARKS §1.22)
        caption_max_tokens=0, answer_max_tokens=0,
        # T2I guidance scale per step: "constant" | "linear" (0 at the first step up to
        # guidance_scale at the last, open-muse's schedule) | "decay" (guidance_scale at the
        # first step down to 1 at the last)
        guidance_schedule="constant",
        # T2I: guidance picks only among codes whose conditional probability is at least this
        # fraction of the top code's (contrastive decoding's plausibility constraint); 0 = off
        guidance_plausibility=0.0,
        # timestep fed while sampling (every task): "pipeline" = (T-1-i)/T as Muddit's released
        # pipeline (ported checkpoints); "ratio" = the input's mask ratio, as training feeds it
        timestep_mode="pipeline",
        at_end=False,  # also evaluate the final step
    )
    c.optim = dict(
        lr=1e-4, schedule="cosine", warmup_steps=0, end_lr_ratio=0.0,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=10.0,
        # comma-separated regexes over trainable param paths (or @groups, tree_paths.py) that
        # get no updates: "mmdit/embed/embeddings/embedding" keeps a code_init="codebook"
        # embedding fixed
        freeze="",
    )
    c.train = dict(
        steps=1000,
        grad_accum=1,  # micro-batches per step (lax.scan inside the jitted step)
        trainable="mmdit",  # comma-separated sub-models in the optimizer; the rest are frozen
        ema_decay=0.0,  # 0 = no EMA of params
        max_nonfinite=5,  # stop after this many non-finite steps in a row
        init_from="",  # muddit-convert folder or a training checkpoint dir (params only)
        vq_from="",  # VQ params from a checkpoint dir; "auto" = WORKDIR/vq/checkpoints (stage 1)
        # the training step's draws (mask ratios and positions, condition dropout); -1 = the
        # run's `seed`, which also draws the init, so another value keeps the init and changes
        # only these draws (or the reverse). A resumed run keeps its saved key
        step_seed=-1,
    )
    c.vq = dict(  # stage 1: train the VQ tokenizer (muddit_jax/train/vq_stage.py)
        steps=0,  # 0 = no VQ stage (the VQ comes from train.vq_from / train.init_from)
        global_batch=32, lr=1e-3, schedule="cosine", warmup_steps=100, end_lr_ratio=0.1,
        b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
        codebook="ema",  # ema | learned
        ema_decay=0.99, beta=0.25, l1_weight=1.0, l2_weight=1.0,
        restart_every=25, dead_after=100,  # dead-code restart (0 = never)
        restart_from="random",  # re-seed dead codes from random | error (k-means++) latents
        log_every=50, checkpoint_every=500, eval_images=256,
    )
    # PNGs of the run (muddit_jax/train/artifacts.py); T2I takes the other sampler options
    # (guidance_schedule, guidance_plausibility, sampling, top_k) from eval
    c.artifacts = dict(
        every=0,  # 0 = only at the end (if at_end)
        at_end=False, num_prompts=8, num_images=8, steps=16, guidance_scale=4.0,
        temperature=CONFIDENCE_TEMPERATURE,  # as eval.temperature
    )
    c.checkpoint = dict(every=500, keep=3, async_save=True, dir="")  # "" = WORKDIR/checkpoints
    c.log = dict(every=10, tensorboard=True, peak_flops_per_device=0.0)  # 0 = from device kind
    c.mesh = dict(
        data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1,
        granule="auto", allow_split_physical_axes=True, rules="default",
    )
    c.distributed = dict(
        mode="auto", coordinator_address="", num_processes=0, process_id=-1, local_device_ids=""
    )
    return c


def sub_seed(c: ml_collections.ConfigDict, field: str) -> int:
    """The seed at dotted ``field`` (e.g. ``"data.seed"``), or the run's ``seed`` where it is -1."""
    section, name = field.split(".")
    seed = int(c[section].get(name, -1))
    if seed < -1:
        raise ValueError(f"{field}={seed}: use -1 (the run's seed) or a seed >= 0")
    return int(c.seed) if seed == -1 else seed


def dtype(name: str) -> Any:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def _pretrained(folder: str) -> MudditConfig:
    """The networks of a converted whole pipeline, with Muddit's ``<mask>`` text row."""
    from muddit_jax.port.convert import converted_pipeline

    if not folder:
        raise ValueError(
            "model.preset='pretrained' needs train.init_from (a muddit-convert folder)"
        )
    return converted_pipeline(folder, params=False)[0]


def model_config(c: ml_collections.ConfigDict) -> MudditConfig:
    """The :class:`MudditConfig` for ``c.model`` (``c`` is the whole config)."""
    cfg = dataclasses.replace(_model_config(c), mask_text_padding=bool(c.model.mask_text_padding))
    f = cfg.mmdit.resample_factor
    if int(c.data.grid) % f:
        raise ValueError(f"data.grid={c.data.grid} must be a multiple of {f}: the MM-DiT "
                         f"down-samples the code grid {f}x (model.downsample / "
                         "model.resample_levels / the preset); change data.grid")
    return cfg


# model fields that change how a network is initialised or computed in memory, not what it is
NOT_THE_NETWORK = ("code_init", "dtype", "param_dtype", "remat", "remat_policy", "scan_layers")


def model_differences(c: ml_collections.ConfigDict, saved: Mapping[str, Any]) -> list[str]:
    """The ``model.*`` fields where ``c`` and a checkpoint's saved config dict ``saved`` describe
    different networks, as ``"model.<field>: checkpoint <v>, config <v>"`` (fields the saved
    config lacks, and those in :data:`NOT_THE_NETWORK`, are not compared)."""
    ours, out = json.loads(c.model.to_json()), []
    for key, theirs in sorted(dict(saved.get("model") or {}).items()):
        if key in NOT_THE_NETWORK or key not in ours or ours[key] == theirs:
            continue
        out.append(f"model.{key}: checkpoint {theirs!r}, config {ours[key]!r}")
    return out


def _rope_axes(m: ml_collections.ConfigDict, preset: tuple[int, ...]) -> tuple[int, ...]:
    """``model.rope_axes``, checked against ``model.head_dim`` (``()`` = ``preset``)."""
    axes = tuple(m.rope_axes) or preset
    if not rope_axes_ok(axes, m.head_dim):
        raise ValueError(f"model.rope_axes={tuple(m.rope_axes)!r} must be 3 even ints >= 0 "
                         f"summing to model.head_dim={m.head_dim} (text, row, column), e.g. "
                         f"{preset}, or () for that default")
    return axes


def _model_config(c: ml_collections.ConfigDict) -> MudditConfig:
    m = c.model
    if m.preset == "tiny":
        cfg = MudditConfig.tiny(m.text_vocab_size, codebook_size=m.codebook_size, width=m.width,
                                head_dim=m.head_dim)
        positions = max(cfg.text.max_position_embeddings, int(c.data.text_length))
        levels = len(m.vq_channels)
        vq = dataclasses.replace(
            cfg.vq, block_out_channels=tuple(m.vq_channels), down_block_types=(DOWN_BLOCK,) * levels,
            up_block_types=(UP_BLOCK,) * levels, layers_per_block=m.vq_layers_per_block,
            latent_channels=m.vq_latent_channels, norm_num_groups=m.vq_norm_groups,
            encoder=m.vq_encoder, decoder=m.vq_decoder,
        )
        return dataclasses.replace(
            cfg, vq=vq,
            text=dataclasses.replace(cfg.text, num_hidden_layers=m.text_layers,
                                     max_position_embeddings=positions),
            mmdit=dataclasses.replace(
                cfg.mmdit, num_layers=m.dual_layers, num_single_layers=m.single_layers,
                downsample=bool(m.downsample), upsample=bool(m.downsample),
                rope_theta=float(m.rope_theta), image_pos_embed=bool(m.image_pos_embed),
                axes_dims_rope=_rope_axes(m, cfg.mmdit.axes_dims_rope),
                rope_free_heads=int(m.rope_free_heads), rope_scope=str(m.rope_scope),
                resample_levels=int(m.resample_levels), conv_blocks=int(m.conv_blocks),
                conv_kernel=int(m.conv_kernel), text_registers=int(m.text_registers),
                condition_image_input=bool(m.condition_image_input),
                condition_image_isolated=bool(m.condition_image_isolated),
                condition_conv_blocks=int(m.condition_conv_blocks),
            ),
        )
    if m.preset == "muddit_512":
        return presets.muddit_512(mask_token=True)
    if m.preset == "meissonic_1024":
        return presets.meissonic_1024()
    if m.preset == "pretrained":
        return _pretrained(c.train.init_from)
    raise ValueError(f"model.preset={m.preset!r}: use one of {PRESETS}")


def empty_text_ids(text: CLIPTextConfig, length: int) -> tuple[int, ...]:
    """The tokenized empty prompt: ``<bos> <eos> <pad>...`` of ``length`` ids."""
    return (text.bos_token_id, text.eos_token_id) + (text.pad_token_id,) * (length - 2)


def loss_config(c: ml_collections.ConfigDict, model: MudditConfig,
                tokenizer_mask_id: int | None = None) -> LossConfig:
    """:class:`LossConfig` from ``c.loss`` and the model (mask ids, empty prompt). The text mask
    id is ``loss.text_mask_id`` if set, else the tokenizer's, else the last text id."""
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    kw = {k: v for k, v in c.loss.items() if k in fields and k != "text_mask_id"}
    mask_id = c.loss.text_mask_id
    if mask_id < 0:
        mask_id = model.text.vocab_size - 1 if tokenizer_mask_id is None else tokenizer_mask_id
    return LossConfig(
        image_mask_id=model.mmdit.mask_token_id,
        text_mask_id=mask_id,
        empty_text_ids=empty_text_ids(model.text, c.data.text_length),
        **kw,
    )


def trainable(c: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Sub-models in the optimizer (``train.trainable``), validated."""
    names = tuple(n.strip() for n in c.train.trainable.split(",") if n.strip())
    bad = [n for n in names if n not in SUBMODELS]
    if bad or not names:
        raise ValueError(
            f"train.trainable={c.train.trainable!r}: list one or more of {SUBMODELS} "
            "(comma separated); the VQ is always frozen"
        )
    return names
