"""VQ tokenizer: parity with diffusers ``VQModel``, quantizer maths, port round trip, axes."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muddit_jax.models.vq import (
    DOWN_BLOCK,
    UP_BLOCK,
    VQConfig,
    VQModel,
    decode,
    encode,
    init_params,
    nearest_codes,
    vector_quantize,
)
from muddit_jax.parallel.rules import LOGICAL_AXES
from muddit_jax.port.mapping import PortError
from muddit_jax.port.vq import convert, export, load_pretrained, save_pretrained
from tests.helpers import assert_close, logical_axes_of

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _hf(blocks, **kw):
    n = len(blocks)
    base = dict(
        block_out_channels=blocks,
        down_block_types=[DOWN_BLOCK] * n,
        up_block_types=[UP_BLOCK] * n,
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=32,
        norm_num_groups=8,
    )
    return {**base, **kw}


# name -> (diffusers kwargs, image size)
CASES = {
    "attn": (_hf([32, 64], lookup_from_codebook=True), 16),
    "noattn_3lvl": (
        _hf([16, 32, 32], layers_per_block=2, vq_embed_dim=8, num_vq_embeddings=64,
            mid_block_add_attention=False),
        32,
    ),
    "spatial": (_hf([32, 32], norm_num_groups=32, norm_type="spatial"), 16),
}


def _torch_model(hf: dict, size: int, seed: int = 0):
    """Random-init diffusers VQModel with perturbed norms/biases and a well-spread codebook."""
    torch.manual_seed(seed)
    m = diffusers.VQModel(**hf).eval()
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        h = m.encode(x).latents
        emb = m.quantize.embedding.weight
        emb.copy_(h.mean() + h.std() * torch.randn_like(emb))
    return m, x


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    hf, size = CASES[request.param]
    m, x = _torch_model(hf, size)
    path = tmp_path_factory.mktemp(f"vq_{request.param}")
    m.save_pretrained(path)
    config, params = load_pretrained(path)
    return request.param, m, x, config, params


def _nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_parity_with_diffusers(case):
    name, m, x, config, params = case
    images = jnp.asarray(_nhwc(x))
    model = VQModel(config)
    variables = {"params": params}
    with torch.no_grad():
        h_t = m.encode(x).latents
        quant_t, loss_t, (_, _, idx_t) = m.quantize(h_t)
        b, d, hh, ww = h_t.shape
        idx_t = idx_t.reshape(b, hh, ww)
        if config.lookup_from_codebook:
            dec_t = m.decode(idx_t.reshape(-1), force_not_quantize=True, shape=(b, hh, ww, d))
        else:
            dec_t = m.decode(quant_t, force_not_quantize=True)
        fwd_t = m(x)

    # continuous latents before quantization
    h = model.apply(variables, images, method=VQModel.encode_latents)
    err_h = assert_close(h, _nhwc(h_t), 1e-4, "latents")

    # codes: first make sure no position is a near-tie (float64 distances), then exact equality
    z = _nhwc(h_t).reshape(-1, d).astype(np.float64)
    cb = m.quantize.embedding.weight.detach().numpy().astype(np.float64)
    dist = np.sort(((z[:, None, :] - cb[None]) ** 2).sum(-1), axis=-1)
    assert np.min(dist[:, 1] - dist[:, 0]) > 1e-4 * np.max(dist[:, 0]), "near-tie in test data"
    codes = encode(params, config, images)
    assert codes.dtype == jnp.int32 and codes.shape == (2, hh, ww)
    np.testing.assert_array_equal(np.asarray(codes), idx_t.numpy())
    assert len(np.unique(idx_t.numpy())) > 1

    # decode from codes
    img = decode(params, config, codes)
    assert img.shape == images.shape
    err_dec = assert_close(img, _nhwc(dec_t.sample), 1e-4, "decoded images")

    # training forward: reconstruction and legacy loss
    recon, codes_f, losses = model.apply(variables, images)
    np.testing.assert_array_equal(np.asarray(codes_f), idx_t.numpy())
    err_rec = assert_close(recon, _nhwc(fwd_t.sample), 1e-4, "reconstruction")
    assert_close(losses.loss, loss_t.item(), 1e-5, "quantizer loss")
    assert_close(losses.loss, fwd_t.commit_loss.item(), 1e-5, "forward commit_loss")
    print(f"{name}: latents {err_h:.2e} decode {err_dec:.2e} recon {err_rec:.2e}")


def test_export_round_trip_bit_exact(case, tmp_path):
    _, m, x, config, params = case
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    out = export(params, config)
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert np.array_equal(out[k], v), k
    # a saved folder loads in diffusers with no missing/unexpected keys
    save_pretrained(params, config, tmp_path)
    m2, info = diffusers.VQModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    for k, v in m2.state_dict().items():
        assert np.array_equal(v.numpy(), sd[k]), k
    assert config.to_hf_config().items() <= {**dict(m2.config), "_class_name": "VQModel"}.items()


def _state_dict(name: str) -> tuple[dict[str, np.ndarray], VQConfig]:
    hf, _ = CASES[name]
    torch.manual_seed(0)
    m = diffusers.VQModel(**hf)
    return {k: v.numpy() for k, v in m.state_dict().items()}, VQConfig.from_hf_config(hf)


def test_port_errors_name_the_key():
    sd, config = _state_dict("attn")
    convert(sd, config)  # the unmodified checkpoint converts
    extra = {**sd, "decoder.bogus.weight": np.zeros(3, np.float32)}
    with pytest.raises(PortError, match=r"decoder\.bogus\.weight"):
        convert(extra, config)
    missing = dict(sd)
    del missing["encoder.mid_block.attentions.0.to_k.bias"]
    with pytest.raises(PortError, match=r"encoder\.mid_block\.attentions\.0\.to_k\.bias"):
        convert(missing, config)
    bad = {**sd, "quantize.embedding.weight": np.zeros((31, 4), np.float32)}
    with pytest.raises(PortError, match=r"quantize\.embedding\.weight"):
        convert(bad, config)


def test_legacy_attention_keys_are_renamed():
    sd, config = _state_dict("attn")
    legacy = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[k] = v
    assert legacy.keys() != sd.keys()
    a, b = convert(sd, config), convert(legacy, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_quantizer_straight_through_and_losses():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    cb = rng.normal(size=(16, 4)).astype(np.float32)
    beta = 0.3

    # codes = brute-force float64 argmin
    d = ((z.reshape(-1, 1, 4).astype(np.float64) - cb[None]) ** 2).sum(-1)
    want = d.argmin(-1).reshape(2, 3, 5)
    zq_np = cb[want]
    z_q, codes, losses = vector_quantize(jnp.asarray(z), jnp.asarray(cb), beta=beta)
    np.testing.assert_array_equal(np.asarray(codes), want)
    np.testing.assert_allclose(np.asarray(z_q), zq_np, atol=1e-6)
    mse = np.mean((zq_np.astype(np.float64) - z) ** 2)
    np.testing.assert_allclose(float(losses.commitment), mse, rtol=1e-6)
    np.testing.assert_allclose(float(losses.codebook), mse, rtol=1e-6)
    np.testing.assert_allclose(float(losses.loss), (1 + beta) * mse, rtol=1e-6)

    # straight-through: d z_q / d z is the identity
    g = rng.normal(size=z.shape).astype(np.float32)
    _, vjp = jax.vjp(lambda zz: vector_quantize(zz, jnp.asarray(cb))[0], jnp.asarray(z))
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), g)

    # gradient routing of the legacy total: 1 x commitment to z, beta x codebook to the codebook
    def total(zz, ee, legacy):
        return vector_quantize(zz, ee, beta=beta, legacy=legacy)[2].loss

    n = z.size
    gz, ge = jax.grad(total, argnums=(0, 1))(jnp.asarray(z), jnp.asarray(cb), True)
    np.testing.assert_allclose(np.asarray(gz), 2 * (z - zq_np) / n, atol=1e-7)
    ge_want = np.zeros_like(cb)
    np.add.at(ge_want, want.reshape(-1), 2 * (zq_np - z).reshape(-1, 4) / n)
    np.testing.assert_allclose(np.asarray(ge), beta * ge_want, atol=1e-7)
    gz, ge = jax.grad(total, argnums=(0, 1))(jnp.asarray(z), jnp.asarray(cb), False)
    np.testing.assert_allclose(np.asarray(gz), beta * 2 * (z - zq_np) / n, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ge), ge_want, atol=1e-7)


def test_quantizer_ties_pick_lowest_index():
    cb = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    z = jnp.asarray([[0.0, 1.0], [0.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(nearest_codes(z, cb)), [1, 0, 3])


def _abstract_boxed(config: VQConfig):
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))["params"]


def test_logical_axes_and_shapes():
    config = VQConfig.from_hf_config(CASES["attn"][0])
    boxed = _abstract_boxed(config)
    names = logical_axes_of(boxed)
    assert names <= LOGICAL_AXES
    assert {"conv_in", "conv_out", "norm", "vocab", "embed", "heads"} <= names
    assert logical_axes_of(_abstract_boxed(VQConfig.from_hf_config(CASES["spatial"][0]))) <= (
        LOGICAL_AXES
    )
    assert boxed["codebook"]["embedding"].names == ("vocab", "embed")
    assert boxed["codebook"]["embedding"].value.shape == (32, 4)
    assert config.downsample_factor == 2
    params = nn.unbox(boxed)
    x = jax.ShapeDtypeStruct((3, 8, 12, 3), jnp.float32)
    codes = jax.eval_shape(lambda p, xx: encode(p, config, xx), params, x)
    assert codes.shape == (3, 4, 6) and codes.dtype == jnp.int32
    c = jax.ShapeDtypeStruct((3, 4, 6), jnp.int32)
    img = jax.eval_shape(lambda p, cc: decode(p, config, cc), params, c)
    assert img.shape == (3, 8, 12, 3) and img.dtype == jnp.float32


def test_config_round_trip_and_validation():
    hf = {**CASES["noattn_3lvl"][0], "_class_name": "VQModel", "_diffusers_version": "0.42.1"}
    config = VQConfig.from_hf_config(hf)
    assert config.block_out_channels == (16, 32, 32) and config.embed_dim == 8
    assert config.downsample_factor == 4
    assert VQConfig.from_hf_config(config.to_hf_config()) == config
    hash(config)
    with pytest.raises(ValueError, match="norm_type"):
        dataclasses.replace(config, norm_type="layer")
    with pytest.raises(ValueError, match="down_block_types"):
        dataclasses.replace(config, down_block_types=(DOWN_BLOCK,))
    with pytest.raises(ValueError, match="divisible by 32"):
        dataclasses.replace(config, norm_type="spatial", vq_embed_dim=None)
