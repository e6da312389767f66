"""MM-DiT generator: parity with the PyTorch reference (official key layout), port round trip and
errors, bf16 vs fp32, scanned vs unrolled layers, jit caching, logical axis names."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from muddit_jax.models.embeddings import (
    apply_rope,
    per_head_rope,
    rope_cos_sin,
    rope_ids,
    timestep_embedding,
)
from muddit_jax.models.mmdit import (
    CONDITION_PREFIX,
    MMDiT,
    MMDiTConfig,
    add_condition_input,
    dummy_inputs,
    stack_block_params,
    unstack_block_params,
)
from muddit_jax.parallel.rules import LOGICAL_AXES
from muddit_jax.port import io
from muddit_jax.port.mapping import PortError, flatten
from muddit_jax.port.mmdit import convert, export, key_map, load_pretrained, target_params
from tests.helpers import assert_close, logical_axes_of
from muddit_jax.port.torch_reference import (
    SymmetricTransformer2DModel,
    prepare_ids,
    save_reference,
)

BASE = dict(
    patch_size=1,
    in_channels=32,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=32,
    guidance_embeds=False,
    axes_dims_rope=[4, 6, 6],
    vocab_size=33,
    codebook_size=32,
    tokenizer_vocab_size=40,
    downsample=True,
    upsample=True,
)
CASES = {
    "down_up_text": {},
    "plain_no_text": dict(downsample=False, upsample=False, tokenizer_vocab_size=None),
    "t5_adapter": dict(t5_dim=20),
}
B, H, W, L = 2, 8, 8, 6


def _inputs(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(
        image_ids=rng.integers(0, cfg["vocab_size"], (B, H, W)).astype(np.int32),
        text_states=rng.standard_normal(
            (B, L, cfg.get("t5_dim") or cfg["joint_attention_dim"])
        ).astype(np.float32),
        pooled=rng.standard_normal((B, cfg["pooled_projection_dim"])).astype(np.float32),
        timestep=np.array([0.3, 0.85], np.float32),
        micro_conds=np.array([[512, 512, 0, 0, 6], [256, 384, 16, 8, 5]], np.float32),
    )


_BUILT: dict[str, dict] = {}


def _case(name: str, tmp_path_factory) -> dict:
    """A random torch reference saved in the official layout, with its outputs on fixed inputs."""
    if name in _BUILT:
        return _BUILT[name]
    cfg = {**BASE, **CASES[name]}
    torch.manual_seed(0)
    model = SymmetricTransformer2DModel(**cfg).eval()
    with torch.no_grad():  # move every weight (incl. norm scales) off its default init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = _inputs(cfg)
    grid = (H // 2, W // 2) if cfg["downsample"] else (H, W)
    img_ids, txt_ids = prepare_ids(L, *grid)
    with torch.no_grad():
        img, txt = model(
            torch.from_numpy(x["image_ids"]).long(),
            torch.from_numpy(x["text_states"]),
            torch.from_numpy(x["pooled"]),
            torch.from_numpy(x["timestep"]),
            img_ids,
            txt_ids,
            torch.from_numpy(x["micro_conds"]),
        )
    folder = tmp_path_factory.mktemp(name)
    save_reference(model, cfg, folder)
    ref_txt = None if txt is None else txt.numpy()
    _BUILT[name] = dict(
        name=name, cfg=cfg, folder=folder, inputs=x, ref=(img.permute(0, 2, 3, 1).numpy(), ref_txt)
    )
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    return _case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def main_case(tmp_path_factory):
    return _case("down_up_text", tmp_path_factory)


TRACES: dict[tuple, int] = {}


@functools.cache
def _forward(config: MMDiTConfig, **options):
    """One jitted forward per (config, options), shared by the tests; counts its traces."""
    model, key = MMDiT(config, **options), (config, tuple(sorted(options.items())))

    @jax.jit
    def fwd(params, *x):
        TRACES[key] = TRACES.get(key, 0) + 1
        return model.apply({"params": params}, *x)

    return fwd, key


def _apply(config: MMDiTConfig, params, x: dict, **options):
    return _forward(config, **options)[0](params, *x.values())


def test_parity_with_torch_reference(case):
    config, params = load_pretrained(case["folder"])
    img, txt = _apply(config, params, case["inputs"])
    ref_img, ref_txt = case["ref"]
    assert img.shape == (B, H, W, config.codebook_size) and img.dtype == jnp.float32
    assert float(np.std(ref_img)) > 0.1  # non-trivial output
    err = assert_close(img, ref_img, 1e-4, "image logits")
    if ref_txt is None:
        assert txt is None
    else:
        assert txt.shape == (B, L, config.tokenizer_vocab_size)
        err = max(err, assert_close(txt, ref_txt, 1e-4, "text logits"))
    print(f"{case['name']}: max relative error {err:.2e}")


def test_export_round_trip_is_bit_exact(case):
    sd = io.load_state_dict(case["folder"])
    for scan in (False, True):
        out = export(convert(sd, case["cfg"], scan_layers=scan), case["cfg"])
        assert sorted(out) == sorted(sd)
        for k, v in sd.items():
            assert out[k].dtype == v.dtype and np.array_equal(out[k], v), k


def test_port_errors_name_the_key():
    cfg = {**BASE, **CASES["down_up_text"]}
    rng = np.random.default_rng(0)
    random_params = jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32),
        target_params(MMDiTConfig(**cfg)),
    )
    sd = export(random_params, cfg)
    bad = dict(sd, **{"transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros(3, np.float32)})
    with pytest.raises(PortError, match=r"transformer_blocks\.0\.attn\.to_q\.lora_A\.weight"):
        convert(bad, cfg)
    bad = {k: v for k, v in sd.items() if k != "single_transformer_blocks.1.proj_mlp.bias"}
    with pytest.raises(PortError, match=r"single_transformer_blocks\.1\.proj_mlp\.bias"):
        convert(bad, cfg)
    bad = dict(sd, **{"mlm_layer.conv2.weight": np.zeros((7, 32, 1, 1), np.float32)})
    with pytest.raises(PortError, match=r"mlm_layer\.conv2\.weight"):
        convert(bad, cfg)
    # a checkpoint without a text head does not fit a config that has one
    bad = {k: v for k, v in sd.items() if not k.startswith("text_decoder")}
    with pytest.raises(PortError, match=r"text_decoder\.1\.weight"):
        convert(bad, cfg)


def test_bf16_compute_close_to_fp32(main_case):
    """bf16 compute (fp32 params) stays within 5e-2 of fp32 (max-abs relative to logit scale)."""
    config, params = load_pretrained(main_case["folder"])
    ref_img, ref_txt = _apply(config, params, main_case["inputs"])
    img, txt = _apply(config, params, main_case["inputs"], dtype=jnp.bfloat16)
    assert img.dtype == jnp.float32
    err = assert_close(img, ref_img, 5e-2, "bf16 image logits")
    err_t = assert_close(txt, ref_txt, 5e-2, "bf16 text logits")
    assert err > 0 and err_t > 0  # bf16 really was used
    print(f"bf16 vs fp32: image {err:.2e}, text {err_t:.2e}")


def test_scan_and_remat_match_unrolled(main_case):
    config, unrolled = load_pretrained(main_case["folder"])
    _, scanned = load_pretrained(main_case["folder"], scan_layers=True)
    assert scanned["transformer_blocks"]["attn"]["to_q"]["kernel"].shape == (2, 32, 32)
    assert "transformer_blocks_0" not in scanned
    jax.tree.map(np.testing.assert_array_equal, stack_block_params(unrolled), scanned)
    jax.tree.map(np.testing.assert_array_equal, unstack_block_params(scanned), unrolled)
    ref = _apply(config, unrolled, main_case["inputs"])
    out = _apply(config, scanned, main_case["inputs"], scan_layers=True, remat=True)
    for a, e in zip(out, ref, strict=True):
        assert_close(a, e, 1e-5, "scanned + remat")


def test_scan_remat_gradients_match_unrolled():
    """Training path: gradients through scanned + rematerialised blocks equal the unrolled ones."""
    config = MMDiTConfig(**{**BASE, **CASES["plain_no_text"]})
    x = list(_inputs(BASE).values())
    rng = np.random.default_rng(1)
    unrolled = jax.tree.map(
        lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), target_params(config)
    )

    def grads(params, **options):
        model = MMDiT(config, **options)

        def loss(p):
            return jnp.mean(jnp.sin(model.apply({"params": p}, *x)[0]))

        # "float32" (not the conftest's "highest") halves XLA:CPU compile time, same f32 math
        with jax.default_matmul_precision("float32"):
            return jax.jit(jax.grad(loss))(params)

    ref = stack_block_params(grads(unrolled))
    got = grads(stack_block_params(unrolled), scan_layers=True, remat=True)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref))
    assert scale > 0
    jax.tree.map(
        lambda a, e: assert_close(np.asarray(a) / scale, np.asarray(e) / scale, 1e-5), got, ref
    )


def test_jit_compiles_once(main_case):
    """Repeated same-shape calls (new values each time) reuse one trace / one executable."""
    config, params = load_pretrained(main_case["folder"])
    fwd, key = _forward(config)
    outs = [fwd(params, *_inputs(main_case["cfg"], seed).values()) for seed in range(3)]
    assert TRACES[key] == 1 and fwd._cache_size() == 1
    assert not np.allclose(outs[0][0], outs[1][0])  # the inputs really differed


def test_param_logical_axes():
    config = MMDiTConfig(**{**BASE, "t5_dim": 20})
    for scan in (False, True):
        boxed = jax.eval_shape(
            MMDiT(config, scan_layers=scan).init, jax.random.key(0), *dummy_inputs(config)
        )["params"]
        names = logical_axes_of(boxed)
        assert names <= LOGICAL_AXES, names - LOGICAL_AXES
        assert ("layers" in names) == scan
        if scan:
            leaf = boxed["single_transformer_blocks"]["proj_mlp"]["kernel"]
            assert leaf.names == ("layers", "embed", "mlp")
    assert {"embed", "mlp", "heads", "vocab", "cond", "norm", "conv_in", "conv_out"} <= names


def test_config_round_trip_and_validation():
    hf = {"_class_name": "SymmetricTransformer2DModel", "_diffusers_version": "0.30.0", **BASE}
    cfg = MMDiTConfig.from_hf_config(hf)
    assert cfg.inner_dim == 32 and cfg.mask_token_id == 32 and cfg.axes_dims_rope == (4, 6, 6)
    assert MMDiTConfig.from_hf_config(cfg.to_hf_config()) == cfg
    assert cfg.to_hf_config()["axes_dims_rope"] == [4, 6, 6]
    assert MMDiTConfig.from_hf_config({**BASE, "block_out_channels": 32}).block_out_channels == 32
    with pytest.raises(ValueError, match="unknown .* keys: \\['not_a_key'\\]"):
        MMDiTConfig.from_hf_config({**BASE, "not_a_key": 1})
    with pytest.raises(ValueError, match="pooled_projection_dim"):
        MMDiTConfig(**{**BASE, "pooled_projection_dim": 16})
    # each sums wrong, is odd, negative or not one per rotary id axis (a ported config.json too)
    for axes in [(4, 6, 8), (3, 7, 6), (20, -2, -2), (8, 8), (4, 4, 4, 4)]:
        with pytest.raises(ValueError, match=r"axes_dims_rope .* 3 even ints >= 0"):
            MMDiTConfig.from_hf_config({**BASE, "axes_dims_rope": list(axes)})


def test_embeddings_match_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    t = np.array([0.0, 3.5, 512.0, 999.0], np.float32)
    ref = get_timestep_embedding(
        torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0
    )
    # float32 sin/cos of arguments up to ~1000 rad: one ulp of the argument is ~6e-5
    assert_close(timestep_embedding(jnp.asarray(t)), ref, 1e-4, "timestep embedding")
    img_ids, txt_ids = prepare_ids(3, 4, 5)
    cos_ref, sin_ref = FluxPosEmbed(10000, [4, 6, 6])(torch.cat([txt_ids, img_ids]))
    ids = rope_ids(3, 4, 5)
    np.testing.assert_array_equal(ids, torch.cat([txt_ids, img_ids]).numpy())
    cos, sin = rope_cos_sin(ids, (4, 6, 6))
    assert_close(cos, cos_ref, 1e-6, "rope cos")
    assert_close(sin, sin_ref, 1e-6, "rope sin")


def test_unboxed_init_matches_port_target():
    """``init`` params (unboxed) have exactly the key-map paths: nothing unported, nothing extra."""
    config = MMDiTConfig(**BASE)
    params = nn.unbox(jax.eval_shape(MMDiT(config).init, jax.random.key(0), *dummy_inputs(config)))
    flat = {"/".join(k) for k in flatten(params["params"])}
    assert flat == {"/".join(m.flax_path) for m in key_map(config)}


def test_rope_theta_option():
    """``rope_theta`` reaches the rotary tables (diffusers' ``FluxPosEmbed(theta)``), changes the
    output, travels in the config dict only when not upstream's 10000, and is validated. Why it
    exists: with 6 channels per axis, theta=10000 makes columns 0 and 6 of an 8-wide grid almost
    the same rotation; theta=16 keeps every pair apart."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    img_ids, txt_ids = prepare_ids(3, 8, 8)
    cos_ref, sin_ref = FluxPosEmbed(16, [4, 6, 6])(torch.cat([txt_ids, img_ids]))
    cos, sin = rope_cos_sin(rope_ids(3, 8, 8), (4, 6, 6), 16.0)
    assert_close(cos, cos_ref, 1e-6, "rope cos, theta 16")
    assert_close(sin, sin_ref, 1e-6, "rope sin, theta 16")

    def column_similarity(theta: float) -> np.ndarray:
        ids = np.zeros((8, 3))
        ids[:, 2] = np.arange(8)
        c, s = rope_cos_sin(ids, (4, 6, 6), theta)
        v = np.concatenate([c[:, 10:], s[:, 10:]], axis=1) / np.sqrt(6)
        return v @ v.T

    assert column_similarity(10000.0)[0, 6] > 0.95
    assert column_similarity(16.0)[np.triu_indices(8, 2)].max() < 0.5

    cfg = MMDiTConfig(**BASE)
    low = dataclasses.replace(cfg, rope_theta=16.0)
    assert "rope_theta" not in cfg.to_hf_config()
    assert low.to_hf_config()["rope_theta"] == 16.0
    assert MMDiTConfig.from_hf_config(low.to_hf_config()) == low
    inputs = [jnp.asarray(v) for v in _inputs(BASE).values()]
    params = MMDiT(cfg).init(jax.random.key(0), *inputs)
    out_default = MMDiT(cfg).apply(params, *inputs)[0]
    out_low = MMDiT(low).apply(params, *inputs)[0]
    assert float(jnp.abs(out_default - out_low).max()) > 1e-3
    with pytest.raises(ValueError, match="rope_theta"):
        dataclasses.replace(cfg, rope_theta=1.0)


def test_rope_axes_without_spatial_channels_make_image_tokens_a_set():
    """Rotary axes ``(head_dim, 0, 0)`` (``model.rope_axes``) leave no channel that rotates with
    row or column (axis 0 is 0 for every token), so without down-sampling or a position table
    permuting the image tokens permutes the image logits; the preset's 1:3:3 split does not.
    The training config maps and validates the field."""
    from muddit_jax.train import config as C

    plain = dataclasses.replace(MMDiTConfig(**BASE), downsample=False, upsample=False)
    inputs = {k: jnp.asarray(v) for k, v in _inputs(BASE).items()}
    perm = np.random.default_rng(1).permutation(H * W)

    def permuted_gap(cfg: MMDiTConfig) -> float:
        params = MMDiT(cfg).init(jax.random.key(0), *inputs.values())
        logits = MMDiT(cfg).apply(params, *inputs.values())[0]
        shuffled = dict(inputs, image_ids=inputs["image_ids"].reshape(B, -1)[:, perm]
                        .reshape(B, H, W))
        moved = MMDiT(cfg).apply(params, *shuffled.values())[0]
        flat = logits.reshape(B, H * W, -1)[:, perm]
        return float(jnp.abs(moved.reshape(B, H * W, -1) - flat).max())

    assert permuted_gap(dataclasses.replace(plain, axes_dims_rope=(16, 0, 0))) < 1e-4
    assert permuted_gap(plain) > 1e-3

    c = C.base_config()
    c.model.update(head_dim=16, rope_axes=(16, 0, 0))
    assert C.model_config(c).mmdit.axes_dims_rope == (16, 0, 0)
    c.model.rope_axes = ()
    assert C.model_config(c).mmdit.axes_dims_rope == (4, 6, 6)
    c.model.rope_axes = (4, 4, 4)
    with pytest.raises(ValueError, match=r"model.rope_axes=\(4, 4, 4\).*head_dim=16"):
        C.model_config(c)


def test_rope_free_heads_option():
    """``rope_free_heads=k`` leaves the last ``k`` heads unrotated: all heads free is the model
    without spatial channels (same params, same output), one free head is neither that nor
    the default; the key travels in the config dict only when set, is validated, and the port
    refuses it (upstream rotates every head)."""
    from muddit_jax.train import config as C

    cos, sin = per_head_rope(*rope_cos_sin(rope_ids(2, 3, 3), (4, 6, 6)), heads=3, free=1)
    full = rope_cos_sin(rope_ids(2, 3, 3), (4, 6, 6))
    np.testing.assert_array_equal(cos[:, :2], np.stack([full[0]] * 2, 1))
    np.testing.assert_array_equal(sin[:, :2], np.stack([full[1]] * 2, 1))
    assert (cos[:, 2] == 1).all() and (sin[:, 2] == 0).all()

    cfg = MMDiTConfig(**BASE)
    inputs = [jnp.asarray(v) for v in _inputs(BASE).values()]
    params = MMDiT(cfg).init(jax.random.key(0), *inputs)

    def logits(c: MMDiTConfig) -> jax.Array:
        return MMDiT(c).apply(params, *inputs)[0]

    one = dataclasses.replace(cfg, rope_free_heads=1)
    all_free = logits(dataclasses.replace(cfg, rope_free_heads=2))
    no_spatial = logits(dataclasses.replace(cfg, axes_dims_rope=(16, 0, 0)))
    one_free = logits(one)
    assert_close(all_free, no_spatial, 1e-5, "every head free = no spatial rotary channels")
    assert float(jnp.abs(one_free - all_free).max()) > 1e-3
    assert float(jnp.abs(one_free - logits(cfg)).max()) > 1e-3

    assert "rope_free_heads" not in cfg.to_hf_config()
    assert MMDiTConfig.from_hf_config(one.to_hf_config()) == one
    with pytest.raises(ValueError, match="rope_free_heads=3"):
        dataclasses.replace(cfg, rope_free_heads=3)
    with pytest.raises(ValueError, match="only rope_free_heads=0 can be ported"):
        key_map(one)
    c = C.base_config()
    c.model.rope_free_heads = 1
    assert C.model_config(c).mmdit.rope_free_heads == 1


def test_rope_scope_image_rotates_only_image_pairs():
    """``image_start`` rotates the image-image scores and no other: the attention equals an
    explicit softmax whose scores are rotated where query and key are both image tokens and
    unrotated elsewhere (per-head tables too), and differs from rotating every score."""
    from muddit_jax.models.mmdit import Attention

    n_txt, grid, heads, dim = 3, 3, 2, 16
    x = jax.random.normal(jax.random.key(1), (2, n_txt + grid * grid, 32))
    cos, sin = per_head_rope(*rope_cos_sin(rope_ids(n_txt, grid, grid), (4, 6, 6), 4.0),
                             heads=heads, free=1)
    scoped = Attention(heads, dim, image_start=n_txt)
    params = scoped.init(jax.random.key(0), x, None, cos, sin)
    p = nn.unbox(params)["params"]

    def project(name: str, norm: str | None) -> jax.Array:
        y = (x @ p[name]["kernel"] + p[name]["bias"]).reshape(*x.shape[:2], heads, dim)
        if norm is None:
            return y
        return y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6) * p[norm]["scale"]

    q, k, v = project("to_q", "norm_q"), project("to_k", "norm_k"), project("to_v", None)
    rot = functools.partial(apply_rope, cos=jnp.asarray(cos), sin=jnp.asarray(sin))
    image = jnp.arange(x.shape[1]) >= n_txt
    pairs = image[:, None] & image[None, :]
    scores = jnp.where(pairs, jnp.einsum("bqhd,bkhd->bhqk", rot(q), rot(k)),
                       jnp.einsum("bqhd,bkhd->bhqk", q, k)) / np.sqrt(dim)
    want = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)
    got = scoped.apply(params, x, None, cos, sin)
    assert_close(got, want.reshape(got.shape), 1e-5, "image-scoped RoPE attention")
    every = Attention(heads, dim).apply(params, x, None, cos, sin)
    assert float(jnp.abs(every - got).max()) > 1e-3


def test_rope_scope_option():
    """``rope_scope="image"`` through the model: without spatial channels it is the default
    (nothing turns), with them it is neither the default nor position-free; under scan + remat
    it gives the unrolled result; the key travels in the config dict only when set, is
    validated, and the port refuses it."""
    from muddit_jax.train import config as C

    cfg = MMDiTConfig(**BASE)
    x = {k: jnp.asarray(v) for k, v in _inputs(BASE).items()}
    params = MMDiT(cfg).init(jax.random.key(0), *x.values())

    def logits(c: MMDiTConfig) -> jax.Array:
        return MMDiT(c).apply(params, **x)[0]

    scoped = dataclasses.replace(cfg, rope_scope="image")
    flat = dataclasses.replace(cfg, axes_dims_rope=(16, 0, 0))
    assert_close(logits(dataclasses.replace(flat, rope_scope="image")), logits(flat), 1e-5,
                 "no spatial channels: the scope changes nothing")
    image_only = logits(scoped)
    assert float(jnp.abs(image_only - logits(cfg)).max()) > 1e-3
    assert float(jnp.abs(image_only - logits(flat)).max()) > 1e-3
    scanned = {"params": stack_block_params(nn.unbox(params)["params"])}
    assert_close(MMDiT(scoped, scan_layers=True, remat=True).apply(scanned, **x)[0], image_only,
                 1e-5, "scanned image-scoped RoPE")

    assert "rope_scope" not in cfg.to_hf_config()
    assert MMDiTConfig.from_hf_config(scoped.to_hf_config()) == scoped
    with pytest.raises(ValueError, match="rope_scope='text' must be one of"):
        dataclasses.replace(cfg, rope_scope="text")
    with pytest.raises(ValueError, match="only rope_scope='all' can be ported"):
        key_map(scoped)
    c = C.base_config()
    c.model.rope_scope = "image"
    assert C.model_config(c).mmdit.rope_scope == "image"


def test_image_pos_embed_option():
    """``image_pos_embed`` adds one learned ``[tokens, width]`` table (logical axes ``(None,
    embed)``) that makes the output depend on where a token is; it is exported only when on."""
    cfg = dataclasses.replace(MMDiTConfig(**BASE), image_pos_embed=True)
    inputs = [jnp.asarray(v) for v in _inputs(BASE).values()]
    boxed = MMDiT(cfg).init(jax.random.key(0), *inputs)["params"]
    table = boxed["image_pos_embed"]
    assert table.names == (None, "embed") and table.value.shape == ((H // 2) * (W // 2), 32)
    params = {"params": nn.unbox(boxed)}
    zero = {"params": {**params["params"], "image_pos_embed": jnp.zeros_like(table.value)}}
    with_table = MMDiT(cfg).apply(params, *inputs)[0]
    without = MMDiT(cfg).apply(zero, *inputs)[0]
    assert float(jnp.abs(with_table - without).max()) > 1e-4
    assert "image_pos_embed" not in MMDiTConfig(**BASE).to_hf_config()
    assert MMDiTConfig.from_hf_config(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize("registers", [0, 3])
def test_text_keys_hide_positions_as_if_they_were_not_there(registers):
    """A text position with ``text_keys`` False informs nothing: the image logits and the other
    text positions' logits equal those of the sequence without it (text RoPE ids are all 0),
    under scan + remat too, and its content no longer matters; without ``text_keys`` it does.
    Register tokens stay keys."""
    cfg = MMDiTConfig(**BASE, text_registers=registers)
    x = {k: jnp.asarray(v) for k, v in _inputs(BASE).items()}
    keep = L - 2
    keys = jnp.broadcast_to(jnp.arange(L) < keep, (B, L))
    params = MMDiT(cfg).init(jax.random.key(0), *x.values())
    short = MMDiT(cfg).apply(params, **{**x, "text_states": x["text_states"][:, :keep]})
    scanned = {"params": stack_block_params(nn.unbox(params)["params"])}
    noisy = {**x, "text_states": x["text_states"].at[:, keep:].add(3.0)}
    for model, p, inputs in ((MMDiT(cfg), params, x), (MMDiT(cfg), params, noisy),
                             (MMDiT(cfg, scan_layers=True, remat=True), scanned, noisy)):
        img, txt = model.apply(p, **inputs, text_keys=keys)
        assert_close(img, short[0], 1e-5, "image logits with hidden text keys")
        assert_close(txt[:, :keep], short[1], 1e-5, "visible text logits")
    plain, moved = (MMDiT(cfg).apply(params, **inputs)[0] for inputs in (x, noisy))
    assert float(jnp.abs(plain - moved).max()) > 1e-3, "without text_keys the tail matters"
    with pytest.raises(ValueError, match=r"text_keys must be \[2, 6\]"):
        MMDiT(cfg).apply(params, **x, text_keys=keys[:, :3])


def test_text_registers_option():
    """``text_registers=n`` adds one learned ``[n, width]`` table (logical axes ``(None,
    embed)``) of tokens that join the text stream and shape every output, yet yield no text
    logits; the key travels in the config dict only when set, and cannot be ported."""
    from muddit_jax.train import config as C

    cfg = MMDiTConfig(**BASE, text_registers=3)
    inputs = [jnp.asarray(v) for v in _inputs(BASE).values()]
    boxed = MMDiT(cfg).init(jax.random.key(0), *inputs)["params"]
    table = boxed["text_registers"]
    assert table.names == (None, "embed") and table.value.shape == (3, 32)
    params = nn.unbox(boxed)
    img, txt = MMDiT(cfg).apply({"params": params}, *inputs)
    assert img.shape == (B, H, W, 32) and txt.shape == (B, L, 40)
    other = {**params, "text_registers": jax.random.normal(jax.random.key(1), (3, 32))}
    moved_img, moved_txt = MMDiT(cfg).apply({"params": other}, *inputs)
    assert float(jnp.abs(moved_img - img).max()) > 1e-4
    assert float(jnp.abs(moved_txt - txt).max()) > 1e-4
    assert "text_registers" not in MMDiTConfig(**BASE).to_hf_config()
    assert MMDiTConfig.from_hf_config(cfg.to_hf_config()) == cfg
    with pytest.raises(ValueError, match="text_registers=3: upstream has no register"):
        key_map(cfg)
    with pytest.raises(ValueError, match="text_registers=-1 must be >= 0"):
        MMDiTConfig(**BASE, text_registers=-1)
    c = C.base_config()
    c.model.text_registers = 2
    assert C.model_config(c).mmdit.text_registers == 2


def _condition_and_generated_rows(cfg: MMDiTConfig) -> list[jax.Array]:
    """``_inputs(BASE)`` as arrays with row 0's image clean (the condition) and row 1's partly
    masked (being generated)."""
    inputs = [jnp.asarray(v) for v in _inputs(BASE).values()]
    inputs[0] = (inputs[0] % cfg.codebook_size).at[1, :2].set(cfg.mask_token_id)
    return inputs


def _usual_and_condition_paths(params: dict) -> tuple[dict, dict]:
    """Unboxed ``params`` -> (the usual modules alone, the ``condition_*`` modules under the
    usual names)."""
    usual = {k: v for k, v in params.items() if not k.startswith(CONDITION_PREFIX)}
    renamed = {k[len(CONDITION_PREFIX):]: v for k, v in params.items()
               if k.startswith(CONDITION_PREFIX)}
    return usual, renamed


def test_condition_image_input_option():
    """``condition_image_input``: a row whose image has no mask token runs exactly upstream's
    model with the ``condition_*`` copy of the image input path, a row with one exactly the
    model with the usual path; each row's gradient reaches only its own path. The copy has the
    usual path's shapes and logical axes; the key travels only when on and is not ported."""
    from muddit_jax.train import config as C

    on = MMDiTConfig(**BASE, conv_blocks=1, image_pos_embed=True, condition_image_input=True)
    off = dataclasses.replace(on, condition_image_input=False)
    inputs = _condition_and_generated_rows(on)
    boxed = MMDiT(on).init(jax.random.key(0), *inputs)["params"]
    copies = {k for k in boxed if k.startswith(CONDITION_PREFIX)}
    assert copies == {"condition_" + k for k in ("embed", "down_convnext_0", "down_block",
                      "project_to_hidden_norm", "project_to_hidden", "image_pos_embed")}
    for name in copies:
        same = jax.tree.map(lambda a, b: (a.value.shape, a.names) == (b.value.shape, b.names),
                            boxed[name], boxed[name[len(CONDITION_PREFIX):]],
                            is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert all(jax.tree.leaves(same))
    params = nn.unbox(boxed)
    usual, renamed = _usual_and_condition_paths(params)
    swapped = {**usual, **renamed}
    got = MMDiT(on).apply({"params": params}, *inputs)
    want_clean = MMDiT(off).apply({"params": swapped}, *inputs)
    want_masked = MMDiT(off).apply({"params": usual}, *inputs)
    for g, c, m in zip(got, want_clean, want_masked):
        assert_close(g[0], c[0], tol=1e-5)
        assert_close(g[1], m[1], tol=1e-5)
        assert float(jnp.abs(c[0] - m[0]).max()) > 1e-3  # the two paths differ

    def grads(row: int) -> dict:
        loss = lambda p: sum(o[row].sum() for o in MMDiT(on).apply({"params": p}, *inputs))
        norms = jax.tree.map(lambda g: float(jnp.abs(g).max()), jax.grad(loss)(params))
        return {k: max(jax.tree.leaves(v)) for k, v in norms.items()}

    clean, masked = grads(0), grads(1)
    for name in copies:
        base = name[len(CONDITION_PREFIX):]
        assert masked[name] == 0.0 and masked[base] > 0.0
        assert clean[base] == 0.0 and clean[name] > 0.0
    # add_condition_input: the copy of the usual path makes both rows answer as without it
    started = add_condition_input(usual)
    assert set(started) == set(params) and add_condition_input(started) == started
    for g, m in zip(MMDiT(on).apply({"params": started}, *inputs), want_masked):
        assert_close(g, m, tol=1e-5)
    assert "condition_image_input" not in off.to_hf_config()
    assert MMDiTConfig.from_hf_config(on.to_hf_config()) == on
    with pytest.raises(ValueError, match="condition_image_input=True: upstream has one"):
        key_map(dataclasses.replace(on, conv_blocks=0))
    c = C.base_config()
    c.model.condition_image_input = True
    assert C.model_config(c).mmdit.condition_image_input


def test_condition_conv_blocks_option():
    """``condition_conv_blocks``: the condition's path alone gets ConvNeXt blocks after its
    ``conv_blocks``; a clean row's text logits are those of the model with that many
    ``conv_blocks`` on the condition's weights, a row being generated is the model without
    them. Needs ``condition_image_input``; travels only when on; wired from the config."""
    from muddit_jax.train import config as C

    on = MMDiTConfig(**BASE, conv_blocks=1, condition_image_input=True, condition_conv_blocks=2)
    inputs = _condition_and_generated_rows(on)
    params = nn.unbox(MMDiT(on).init(jax.random.key(0), *inputs)["params"])
    convs = sorted(k for k in params if "convnext" in k)
    assert convs == ["condition_down_convnext_0", "condition_down_convnext_1",
                     "condition_down_convnext_2", "down_convnext_0", "up_convnext_0"]
    got_image, got_text = MMDiT(on).apply({"params": params}, *inputs)
    usual, renamed = _usual_and_condition_paths(params)
    want_image, want_text = MMDiT(dataclasses.replace(
        on, condition_image_input=False, condition_conv_blocks=0)).apply({"params": usual}, *inputs)
    assert_close(got_image[1], want_image[1], tol=1e-5)
    assert_close(got_text[1], want_text[1], tol=1e-5)
    three = dataclasses.replace(on, conv_blocks=3, condition_image_input=False,
                                condition_conv_blocks=0)
    as_three = {**usual, **renamed}
    as_three["up_convnext_1"] = as_three["up_convnext_2"] = params["up_convnext_0"]
    assert_close(got_text[0], MMDiT(three).apply({"params": as_three}, *inputs)[1][0], tol=1e-5)
    assert float(jnp.abs(got_text[0] - want_text[0]).max()) > 1e-3
    assert MMDiTConfig.from_hf_config(on.to_hf_config()) == on
    assert "condition_conv_blocks" not in dataclasses.replace(
        on, condition_conv_blocks=0).to_hf_config()
    for bad in (dict(condition_conv_blocks=-1),
                dict(condition_image_input=False, condition_conv_blocks=1)):
        with pytest.raises(ValueError, match="condition_conv_blocks=.* needs condition_image_in"):
            dataclasses.replace(on, **bad)
    c = C.base_config()
    c.model.update(condition_image_input=True, condition_conv_blocks=2)
    assert C.model_config(c).mmdit.condition_conv_blocks == 2


def test_generated_rows_runs_each_path_on_its_rows():
    """``generated_rows=n`` (rows ``[0, n)`` generated, the rest clean) gives every row the
    logits and the gradient of the default, which runs both image input paths on every row;
    ``n`` outside ``[0, b]`` is refused by name."""
    cfg = MMDiTConfig(**BASE, conv_blocks=1, image_pos_embed=True, condition_image_input=True,
                      condition_conv_blocks=1)
    inputs = [x[::-1] for x in _condition_and_generated_rows(cfg)]  # row 0 masked, row 1 clean
    model = MMDiT(cfg)
    params = nn.unbox(model.init(jax.random.key(0), *inputs)["params"])
    want = model.apply({"params": params}, *inputs)
    got = model.apply({"params": params}, *inputs, None, 1)
    for g, w in zip(got, want):
        assert_close(g, w, tol=1e-5)
    for rows, n in ((slice(0, 1), 1), (slice(1, 2), 0)):  # one kind of row alone: n = 1 or 0
        alone = model.apply({"params": params}, *(x[rows] for x in inputs), None, n)
        for g, w in zip(alone, want):
            assert_close(g, w[rows], tol=1e-5)

    def grads(n: int | None) -> dict:
        loss = lambda p: sum((o ** 2).sum() for o in model.apply({"params": p}, *inputs, None, n))
        return jax.grad(loss)(params)

    both, split = flatten(grads(None)), flatten(grads(1))
    assert set(split) == set(both)
    for path, g in split.items():
        assert_close(g, both[path], tol=1e-4, what=str(path))
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=f"generated_rows={bad} must be in"):
            model.apply({"params": params}, *inputs, None, bad)


@pytest.mark.parametrize("rope_scope", ["all", "image"])
def test_condition_image_isolated_option(rope_scope: str):
    """``condition_image_isolated``: a clean row's image logits do not depend on the text
    (states, pooled embedding) while its text logits read the image; a row with a mask token
    runs exactly the model without the option. The key travels only when on; not ported."""
    from muddit_jax.train import config as C

    on = MMDiTConfig(**BASE, text_registers=2, rope_scope=rope_scope,
                     condition_image_isolated=True)
    off = dataclasses.replace(on, condition_image_isolated=False)
    inputs = _condition_and_generated_rows(on)
    keys = jnp.ones((B, L), bool).at[:, -2:].set(False)
    params = MMDiT(on).init(jax.random.key(0), *inputs, keys)["params"]

    def run(cfg: MMDiTConfig, args: list) -> tuple[jax.Array, jax.Array]:
        return MMDiT(cfg).apply({"params": params}, *args, keys)

    def differ(a: jax.Array, b: jax.Array) -> bool:
        return float(jnp.abs(a - b).max()) > 1e-3

    img, txt = run(on, inputs)
    new_text = [jnp.asarray(v) for v in _inputs(BASE, seed=1).values()]
    other_text = [inputs[0], *new_text[1:3], *inputs[3:]]
    img_t, txt_t = run(on, other_text)
    assert_close(img_t[0], img[0], tol=1e-6)  # the condition's image features ignore the text
    assert differ(txt_t[0], txt[0]) and differ(img_t[1], img[1])
    other_image = [inputs[0].at[0].set((inputs[0][0] + 1) % on.codebook_size), *inputs[1:]]
    assert differ(run(on, other_image)[1][0], txt[0])  # the text still reads the image
    img_off, txt_off = run(off, inputs)
    assert_close(img[1], img_off[1], tol=1e-5)  # a row being generated is unchanged
    assert_close(txt[1], txt_off[1], tol=1e-5)
    assert differ(txt[0], txt_off[0])
    assert "condition_image_isolated" not in off.to_hf_config()
    assert MMDiTConfig.from_hf_config(on.to_hf_config()) == on
    with pytest.raises(ValueError, match="condition_image_isolated=True: upstream's image"):
        key_map(dataclasses.replace(on, text_registers=0, rope_scope="all"))
    c = C.base_config()
    c.model.condition_image_isolated = True
    assert C.model_config(c).mmdit.condition_image_isolated


def test_resample_levels_option():
    """``resample_levels=2`` stacks two 2x down/up-sampling levels: the blocks see 16x fewer
    image tokens (the position table's rows count them), logits stay on the code grid, level 0
    keeps upstream's names, the key travels in the config dict only when not 1, and neither
    the port nor a code grid the factor does not divide accepts it."""
    from muddit_jax.train import config as C
    from muddit_jax.train.flops import mmdit_forward_flops

    cfg = dataclasses.replace(MMDiTConfig(**BASE), image_pos_embed=True, resample_levels=2)
    inputs = [jnp.asarray(v) for v in _inputs(BASE).values()]
    boxed = MMDiT(cfg).init(jax.random.key(0), *inputs)["params"]
    assert boxed["image_pos_embed"].value.shape == ((H // 4) * (W // 4), 32)
    for name in ("down_block", "down_block_1"):
        assert boxed[name]["conv"]["kernel"].value.shape == (2, 2, 32, 32)
    assert boxed["up_block"]["kernel"].value.shape == boxed["up_block_1"]["kernel"].value.shape
    logits, _ = MMDiT(cfg).apply({"params": nn.unbox(boxed)}, *inputs)
    assert logits.shape == (B, H, W, BASE["codebook_size"]) and bool(jnp.isfinite(logits).all())
    assert cfg.resample_factor == 4 and MMDiTConfig(**BASE).resample_factor == 2
    assert "resample_levels" not in MMDiTConfig(**BASE).to_hf_config()
    assert MMDiTConfig.from_hf_config(cfg.to_hf_config()) == cfg
    one = dataclasses.replace(cfg, resample_levels=1)
    assert mmdit_forward_flops(cfg, 1, 16, 16, 4) < 0.5 * mmdit_forward_flops(one, 1, 16, 16, 4)
    with pytest.raises(ValueError, match="only resample_levels=1 can be ported"):
        key_map(cfg)
    with pytest.raises(ValueError, match="resample_levels=0"):
        dataclasses.replace(cfg, resample_levels=0)
    c = C.base_config()
    c.model.update(preset="tiny", downsample=True, resample_levels=2)
    c.data.grid = 6
    with pytest.raises(ValueError, match="data.grid=6 must be a multiple of 4"):
        C.model_config(c)


def test_conv_blocks_option():
    """``conv_blocks`` puts ConvNeXt blocks on the code grid around the down/up-sampling: named
    params with logical axes, logits on the code grid, a translation-equivariant block, the
    key in the config dict only when set, and no port or bad values."""
    from muddit_jax.models.mmdit import ConvNeXtBlock

    cfg = dataclasses.replace(MMDiTConfig(**BASE), conv_blocks=2, conv_kernel=5)
    inputs = [jnp.asarray(v) for v in _inputs(BASE).values()]
    boxed = MMDiT(cfg).init(jax.random.key(0), *inputs)["params"]
    for name in ("down_convnext_0", "down_convnext_1", "up_convnext_0", "up_convnext_1"):
        assert boxed[name]["depthwise"]["kernel"].value.shape == (5, 5, 1, 32)
    assert logical_axes_of(boxed) <= LOGICAL_AXES
    params = nn.unbox(boxed)
    logits, _ = MMDiT(cfg).apply({"params": params}, *inputs)
    plain, _ = MMDiT(MMDiTConfig(**BASE)).apply({"params": params}, *inputs)
    assert logits.shape == plain.shape == (B, H, W, BASE["codebook_size"])
    assert float(jnp.abs(logits - plain).max()) > 1e-3  # the blocks are in the path

    # one block with every parameter random (GRN and the conditioning mapper start at 0)
    block = ConvNeXtBlock(kernel=3)
    x = jnp.zeros((1, 12, 12, 8)).at[:, 3:7, 4:8].set(
        jax.random.normal(jax.random.key(1), (1, 4, 4, 8)))
    temb = jax.random.normal(jax.random.key(2), (1, 16))
    p = nn.unbox(block.init(jax.random.key(3), x, temb))
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    p = jax.tree.unflatten(tree, [jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)])
    y = block.apply(p, x, temb)
    shifted = block.apply(p, jnp.roll(x, (2, 1), axis=(1, 2)), temb)
    np.testing.assert_allclose(shifted, jnp.roll(y, (2, 1), axis=(1, 2)), atol=1e-4)
    assert float(jnp.abs(y - block.apply(p, x, -temb)).max()) > 1e-3  # conditioned

    assert "conv_blocks" not in MMDiTConfig(**BASE).to_hf_config()
    assert MMDiTConfig.from_hf_config(cfg.to_hf_config()) == cfg
    with pytest.raises(ValueError, match="only conv_blocks=0 can be ported"):
        key_map(cfg)
    for bad in (dict(conv_blocks=-1), dict(conv_kernel=4)):
        with pytest.raises(ValueError, match="conv_kernel"):
            dataclasses.replace(cfg, **bad)


def test_depthwise_conv_matches_torch_grouped_conv():
    """``layers.DepthwiseConv`` (shifted sums) = PyTorch ``Conv2d(groups=c, padding=k // 2)``
    with the same weights (kernel ``[k, k, 1, c]`` <-> ``[c, 1, k, k]``)."""
    from muddit_jax.models.layers import DepthwiseConv

    x = np.random.default_rng(0).standard_normal((2, 6, 7, 4)).astype(np.float32)
    for k in (1, 3, 5):
        conv = torch.nn.Conv2d(4, 4, k, padding=k // 2, groups=4)
        params = {"kernel": jnp.asarray(conv.weight.detach().numpy().transpose(2, 3, 1, 0)),
                  "bias": jnp.asarray(conv.bias.detach().numpy())}
        ours = DepthwiseConv(k).apply({"params": params}, jnp.asarray(x))
        ref = conv(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
        assert_close(ours, ref, tol=1e-5)


def test_tiny_head_dim_option():
    """``model.head_dim`` (tiny preset) sets the head width and count and splits the rotary
    channels 1:3:3; bad values name the field."""
    from muddit_jax.models.muddit import MudditConfig
    from muddit_jax.train.config import base_config, model_config

    c = base_config()
    c.model.update(width=128, head_dim=64)
    m = model_config(c).mmdit
    assert (m.attention_head_dim, m.num_attention_heads, m.axes_dims_rope) == (64, 2, (16, 24, 24))
    assert MudditConfig.tiny(64).mmdit.axes_dims_rope == (4, 6, 6)  # the default: 16-wide heads
    cfg = dataclasses.replace(MMDiTConfig(**BASE), attention_head_dim=32, num_attention_heads=1,
                              axes_dims_rope=(8, 12, 12))
    inputs = [jnp.asarray(v) for v in _inputs(BASE).values()]
    variables = MMDiT(cfg).init(jax.random.key(0), *inputs)
    logits, _ = MMDiT(cfg).apply(variables, *inputs)
    assert logits.shape[:3] == (inputs[0].shape[0], H, W) and bool(jnp.isfinite(logits).all())
    for bad in (24, 48, 256):
        with pytest.raises(ValueError, match="head_dim"):
            MudditConfig.tiny(64, width=128, head_dim=bad)
