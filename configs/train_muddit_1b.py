"""Muddit-1B shapes (Meissonic MM-DiT + CLIP-H text tower) at 512 px, for pod-scale runs.

``arg`` picks the parallel layout (see ``muddit_jax/parallel/rules.py``):
  ``fsdp`` (default)  ZeRO-3 over all devices of a slice/node, data parallel across (dcn_data)
  ``data``            pure data parallel (params replicated; fits 1B in bf16 compute on 16 GB+)
  ``tensor``          4-way tensor parallel inside a host, data parallel elsewhere
Data: synthetic token batches until the input pipeline is wired in (useful for throughput/MFU);
``--config.model.preset=pretrained --config.train.init_from=CONVERTED`` fine-tunes released
weights. Scale ``data.global_batch`` with the device count.
"""

from muddit_jax.train.config import base_config


def get_config(arg: str | None = None):
    layout = arg or "fsdp"
    c = base_config()
    c.model.update(preset="meissonic_1b", dtype="bfloat16", remat=True,
                   remat_policy="dots_with_no_batch_dims_saveable", scan_layers=True)
    c.data.update(global_batch=256, grid=32, text_length=77)
    c.optim.update(lr=1e-4, schedule="cosine", warmup_steps=1000, weight_decay=0.01,
                   clip_norm=10.0)
    c.train.update(steps=100_000, ema_decay=0.9999)
    c.checkpoint.update(every=1000, keep=3)
    c.log.update(every=50)
    meshes = {
        "fsdp": dict(data=1, fsdp=-1, tensor=1, dcn_data=-1, rules="fsdp"),
        "data": dict(data=-1, fsdp=1, tensor=1, rules="data"),
        "tensor": dict(data=-1, fsdp=1, tensor=4, rules="default"),
    }
    if layout not in meshes:
        raise ValueError(f"configs/train_muddit_1b.py:{layout}: use one of {sorted(meshes)}")
    c.mesh.update(meshes[layout])
    return c
