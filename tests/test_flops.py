"""The analytic FLOP formulas against XLA's cost analysis of the lowered programs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from muddit_jax.models.mmdit import MMDiT
from muddit_jax.models.muddit import Muddit, MudditConfig
from muddit_jax.models.vq import VQModel
from muddit_jax.train import flops as F

B, GRID, L, WIDTH = 2, 16, 16, 128


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


@pytest.fixture(scope="module")
def setup():
    cfg = MudditConfig.tiny(64, codebook_size=32, width=WIDTH)
    cfg = dataclasses.replace(
        cfg, mmdit=dataclasses.replace(cfg.mmdit, downsample=True, upsample=True)
    )
    model = Muddit(cfg)
    args = (jnp.zeros((B, GRID, GRID), jnp.int32), jnp.zeros((B, L), jnp.int32),
            jnp.zeros((B,)), jnp.zeros((B, 5)))
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))
    return cfg, model, params, args


def test_mmdit_forward(setup) -> None:
    cfg, model, params, (ids, _, t, micro) = setup
    context, pooled = jnp.zeros((B, L, WIDTH)), jnp.zeros((B, WIDTH))
    xla = xla_flops(lambda p: model.apply(p, ids, context, pooled, t, micro,
                                          method=Muddit.denoise), params)
    ours = F.mmdit_forward_flops(cfg.mmdit, B, GRID, GRID, L)
    assert abs(ours / xla - 1) < 0.05, (ours, xla)


def test_conv_blocks_forward(setup) -> None:
    """What ``conv_blocks`` adds (ConvNeXt blocks on the code grid) matches XLA's count."""
    cfg, _, _, (ids, _, t, micro) = setup
    context, pooled = jnp.zeros((B, L, WIDTH)), jnp.zeros((B, WIDTH))
    added = {}
    for n in (0, 2):
        m = dataclasses.replace(cfg.mmdit, conv_blocks=n, conv_kernel=7)
        model = MMDiT(m)
        params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, context, pooled,
                                                   t, micro))
        added[n] = (xla_flops(lambda p: model.apply(p, ids, context, pooled, t, micro), params),
                    F.mmdit_forward_flops(m, B, GRID, GRID, L))
    xla, ours = (added[2][i] - added[0][i] for i in (0, 1))
    assert abs(ours / xla - 1) < 0.15, (ours, xla)  # XLA also counts GELU / GRN elementwise


def test_text_encoder_forward(setup) -> None:
    cfg, model, params, (_, text, _, _) = setup
    xla = xla_flops(lambda p: model.apply(p, text, method=Muddit.encode_text), params)
    ours = F.text_encoder_forward_flops(cfg.text, B, L)
    assert abs(ours / xla - 1) < 0.10, (ours, xla)


def test_vq_encode(setup) -> None:
    cfg = setup[0]
    vq, images = VQModel(cfg.vq), jnp.zeros((B, 64, 64, 3))
    params = jax.eval_shape(lambda: vq.init(jax.random.PRNGKey(0), images))
    xla = xla_flops(lambda p: vq.apply(p, images, method=VQModel.encode), params)
    ours = F.vq_encode_flops(cfg.vq, B, 64, 64)
    assert abs(ours / xla - 1) < 0.05, (ours, xla)


def test_train_step_is_three_forwards(setup) -> None:
    """Gradients w.r.t. all params cost ~3x the forward (what train_step_flops assumes)."""
    cfg, model, params, args = setup

    def loss(p):
        image_logits, text_logits = model.apply(p, *args)
        return image_logits.sum() + text_logits.sum()

    xla = xla_flops(jax.grad(loss), params)
    ours = F.train_step_flops(cfg, batch=B, grid=GRID, text_len=L,
                              trainable=("mmdit", "text_encoder"))
    assert abs(ours / xla - 1) < 0.10, (ours, xla)
    frozen_text = F.train_step_flops(cfg, batch=B, grid=GRID, text_len=L)
    assert frozen_text == pytest.approx(
        ours - 2 * F.text_encoder_forward_flops(cfg.text, B, L))


def _meissonic_run(scan: bool):
    from muddit_jax.train import config as C
    from muddit_jax.train.run import build_run

    c = C.base_config()
    c.model.update(preset="muddit_512", dtype="bfloat16", remat=scan, scan_layers=scan)
    c.data.update(global_batch=8, grid=32, text_length=77)
    return build_run(c, jax.devices()[:1])


def test_meissonic_1b_step_lowers_with_scan_remat_bf16() -> None:
    """The full-size step traces (scanned, rematerialised blocks, bf16 compute) and keeps fp32
    master params: 1.06B trainable MM-DiT params, 0.35B frozen CLIP-H text tower."""
    run = _meissonic_run(scan=True)
    abstract = run.setup.abstract
    assert {x.dtype for x in jax.tree.leaves(abstract.params)} == {jnp.dtype(jnp.float32)}
    n_train = sum(x.size for x in jax.tree.leaves(abstract.params))
    n_frozen = sum(x.size for x in jax.tree.leaves(abstract.frozen))
    assert 1.0e9 < n_train < 1.1e9 and 0.3e9 < n_frozen < 0.4e9
    text = run.lower().as_text()
    assert "bf16" in text and "stablehlo.while" in text  # bf16 matmuls inside a scan loop


@pytest.mark.slow
def test_meissonic_1b_train_step_flops() -> None:
    """At full size (unrolled, no remat) the analytic count is within 2% of XLA's."""
    run = _meissonic_run(scan=False)
    xla = float(run.lower().cost_analysis()["flops"])
    ours = F.train_step_flops(run.model, batch=8, grid=32, text_len=77)
    assert abs(ours / xla - 1) < 0.02, (ours, xla)


def test_condition_path_forward(setup) -> None:
    """The condition's own image input path (with its ConvNeXt blocks) matches XLA's count."""
    cfg, _, _, (ids, _, t, micro) = setup
    context, pooled = jnp.zeros((B, L, WIDTH)), jnp.zeros((B, WIDTH))
    counts = []
    for extra in ({}, dict(condition_image_input=True, condition_conv_blocks=2)):
        m = dataclasses.replace(cfg.mmdit, conv_kernel=7, **extra)
        model = MMDiT(m)
        params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, context, pooled,
                                                   t, micro))
        counts.append((xla_flops(lambda p: model.apply(p, ids, context, pooled, t, micro),
                                 params), F.mmdit_forward_flops(m, B, GRID, GRID, L)))
    (xla0, ours0), (xla1, ours1) = counts
    assert ours1 > ours0 and abs((ours1 - ours0) / (xla1 - xla0) - 1) < 0.15, counts
    # generated_rows: upstream's path on the first rows, the condition's on the rest
    n = B // 2
    xla_n = xla_flops(lambda p: model.apply(p, ids, context, pooled, t, micro, None, n), params)
    ours_n = F.mmdit_forward_flops(m, B, GRID, GRID, L, n)
    assert ours0 < ours_n < ours1, (ours0, ours_n, ours1)
    assert abs((ours_n - ours0) / (xla_n - xla0) - 1) < 0.15, (xla0, ours0, xla_n, ours_n)
