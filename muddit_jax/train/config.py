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
from typing import Any

import jax.numpy as jnp
import ml_collections

from muddit_jax.diffusion.loss import LossConfig
from muddit_jax.models.mmdit import MMDiTConfig
from muddit_jax.models.muddit import MudditConfig
from muddit_jax.models.text_encoder import CLIPTextConfig
from muddit_jax.models.vq import DOWN_BLOCK, UP_BLOCK, VQConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PRESETS = ("tiny", "meissonic_1b", "pretrained")
SUBMODELS = ("text_encoder", "mmdit")


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default; see the module docstring for the sections."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(
        preset="tiny",  # tiny | meissonic_1b | pretrained (configs from train.init_from)
        # tiny only: vocabularies, width and depths (MM-DiT dual / single blocks, text layers)
        text_vocab_size=64, codebook_size=16, width=32, dual_layers=2, single_layers=2,
        text_layers=2,
        dtype="float32",  # compute dtype; params are kept in param_dtype (fp32 master)
        param_dtype="float32",
        remat=False,
        remat_policy="",  # "" = save nothing; else a jax.checkpoint_policies name
        scan_layers=False,
    )
    c.loss = dict(
        text_loss_weight=0.6, min_mask_rate=0.0, mode="split", weighting="muddit",
        schedule="cosine", cond_dropout=0.1, text_pad_is_target=False,
        text_mask_id=-1,  # -1 = text vocab - 1
    )
    c.data = dict(
        kind="synthetic",  # synthetic | dataset (see muddit_jax/train/data.py)
        dataset="shapes", split="train", data_dir="", task="caption",
        options=ml_collections.ConfigDict(),  # dataset builder options (e.g. shapes fields)
        tokenizer="",  # SentencePiece .model or CLIP tokenizer folder (data.kind=dataset)
        global_batch=8,
        grid=4,  # image-code grid h = w (image_size / VQ factor when images=True)
        text_length=8,
        images=False,  # feed raw images [b, H, W, 3]; the frozen VQ encodes them in the step
        text_maskable=False,  # batches carry text_maskable [b, l] (VQA: keep the question)
    )
    c.eval = dict(
        tasks="caption,vqa,t2i",  # evaluators run by muddit-eval / every `every` train steps
        every=0,  # 0 = no periodic evaluation during training
        dataset="shapes", split="test", limit=64,  # options: data.options
        steps=16, guidance_scale=9.0, batch_size=8, shard_size=32, seed=0, ema=False,
    )
    c.optim = dict(
        lr=1e-4, schedule="cosine", warmup_steps=0, end_lr_ratio=0.0,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=10.0,
    )
    c.train = dict(
        steps=1000,
        grad_accum=1,  # micro-batches per step (lax.scan inside the jitted step)
        trainable="mmdit",  # comma-separated sub-models in the optimizer; the rest are frozen
        ema_decay=0.0,  # 0 = no EMA of params
        max_nonfinite=5,  # stop after this many non-finite steps in a row
        init_from="",  # muddit-convert folder or a training checkpoint dir (params only)
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


def dtype(name: str) -> Any:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def _meissonic_1b() -> MudditConfig:
    """Muddit / Meissonic 1B shapes (CLIP-H text tower, 14 + 28 MM-DiT blocks, 8192 codes).

    Written from the public configs for FLOP estimates, AOT compiles and scaling runs; to train
    from the released weights use ``preset="pretrained"`` (configs read from the converted folder).
    """
    text = CLIPTextConfig(
        vocab_size=49409, hidden_size=1024, intermediate_size=4096, projection_dim=1024,
        num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu",
    )
    vq = VQConfig(
        block_out_channels=(128, 256, 256, 512, 768), down_block_types=(DOWN_BLOCK,) * 5,
        up_block_types=(UP_BLOCK,) * 5, layers_per_block=2, latent_channels=64,
        num_vq_embeddings=8192, vq_embed_dim=64, norm_num_groups=32,
    )
    mmdit = MMDiTConfig(
        num_layers=14, num_single_layers=28, attention_head_dim=128, num_attention_heads=8,
        joint_attention_dim=1024, pooled_projection_dim=1024, axes_dims_rope=(16, 56, 56),
        vocab_size=8256, codebook_size=8192, tokenizer_vocab_size=49409,
        downsample=True, upsample=True,
    )
    return MudditConfig(text=text, vq=vq, mmdit=mmdit)


def _pretrained(folder: str) -> MudditConfig:
    from pathlib import Path

    from muddit_jax.port import io

    if not folder:
        raise ValueError(
            "model.preset='pretrained' needs train.init_from (a muddit-convert folder)"
        )
    root = Path(folder)
    return MudditConfig(
        text=CLIPTextConfig.from_hf_config(_strip(io.load_config(root / "text_encoder"))),
        vq=VQConfig.from_hf_config(_strip(io.load_config(root / "vqvae"))),
        mmdit=MMDiTConfig.from_hf_config(_strip(io.load_config(root / "transformer"))),
    )


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def model_config(c: ml_collections.ConfigDict) -> MudditConfig:
    """The :class:`MudditConfig` for ``c.model`` (``c`` is the whole config)."""
    m = c.model
    if m.preset == "tiny":
        cfg = MudditConfig.tiny(m.text_vocab_size, codebook_size=m.codebook_size, width=m.width)
        positions = max(cfg.text.max_position_embeddings, int(c.data.text_length))
        return dataclasses.replace(
            cfg,
            text=dataclasses.replace(cfg.text, num_hidden_layers=m.text_layers,
                                     max_position_embeddings=positions),
            mmdit=dataclasses.replace(
                cfg.mmdit, num_layers=m.dual_layers, num_single_layers=m.single_layers
            ),
        )
    if m.preset == "meissonic_1b":
        return _meissonic_1b()
    if m.preset == "pretrained":
        return _pretrained(c.train.init_from)
    raise ValueError(f"model.preset={m.preset!r}: use one of {PRESETS}")


def empty_text_ids(text: CLIPTextConfig, length: int) -> tuple[int, ...]:
    """The tokenized empty prompt: ``<bos> <eos> <pad>...`` of ``length`` ids."""
    return (text.bos_token_id, text.eos_token_id) + (text.pad_token_id,) * (length - 2)


def loss_config(c: ml_collections.ConfigDict, model: MudditConfig) -> LossConfig:
    """:class:`LossConfig` from ``c.loss`` and the model (mask ids, empty prompt)."""
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    kw = {k: v for k, v in c.loss.items() if k in fields and k != "text_mask_id"}
    mask_id = c.loss.text_mask_id
    return LossConfig(
        image_mask_id=model.mmdit.mask_token_id,
        text_mask_id=model.text.vocab_size - 1 if mask_id < 0 else mask_id,
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
