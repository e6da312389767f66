"""CLIP text encoder: parity with transformers' CLIPTextModelWithProjection, port, <mask> rows."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muddit_jax.models.text_encoder import (
    CLIPTextConfig,
    CLIPTextEncoder,
    add_mask_token,
    resize_token_embeddings,
)
from muddit_jax.port import clip_text
from muddit_jax.port.mapping import PortError
from tests.helpers import assert_close, logical_axes_of

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 100


def _config(**kw) -> CLIPTextConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=98,
        eos_token_id=99,
    )
    return CLIPTextConfig(**{**base, **kw})


def _torch_model(config: CLIPTextConfig, tmp_path, seed: int = 0):
    """A random-init transformers model saved with save_pretrained; returns (model, folder)."""
    torch.manual_seed(seed)
    hf_cfg = transformers.CLIPTextConfig(**config.to_hf_config())
    model = transformers.CLIPTextModelWithProjection(hf_cfg).eval()
    with torch.no_grad():  # non-trivial layer norms so their port is exercised
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / "text_encoder"
    model.save_pretrained(folder)
    return model, folder


def _ids(config: CLIPTextConfig, lengths, seq_len: int = 12, pad: int | None = None) -> np.ndarray:
    """bos + random words + eos, right-padded with ``pad`` (default: eos, like OpenAI CLIP)."""
    rng = np.random.default_rng(1)
    pad = config.eos_token_id if pad is None else pad
    out = np.full((len(lengths), seq_len), pad, np.int32)
    for row, n in enumerate(lengths):
        out[row, 0] = config.bos_token_id
        out[row, 1 : n + 1] = rng.integers(3, 90, n)
        out[row, n + 1] = config.eos_token_id
    return out


def _parity(config, tmp_path, ids, attention_mask=None, tol=1e-4):
    model, folder = _torch_model(config, tmp_path)
    loaded_cfg, params = clip_text.load_pretrained(folder)
    assert loaded_cfg == config
    with torch.no_grad():
        ref = model(
            torch.from_numpy(ids).long(),
            attention_mask=None if attention_mask is None else torch.from_numpy(attention_mask),
            output_hidden_states=True,
        )
    out = CLIPTextEncoder(config).apply(
        {"params": params},
        jnp.asarray(ids),
        None if attention_mask is None else jnp.asarray(attention_mask),
        output_hidden_states=True,
    )
    errs = {
        "context": assert_close(out.context, ref.hidden_states[-2], tol, "context"),
        "pooled": assert_close(out.pooled, ref.text_embeds, tol, "pooled"),
        "last": assert_close(out.last_hidden_state, ref.last_hidden_state, tol, "last"),
    }
    assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
    print(errs)
    return out, ref


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_parity_activations(tmp_path, act):
    config = _config(hidden_act=act)
    _parity(config, tmp_path, _ids(config, [3, 7, 10]))


def test_parity_legacy_eos_pools_at_argmax(tmp_path):
    # eos_token_id == 2: pooled at argmax(ids), here a unique maximum (97) at position 3 of row 0
    config = _config(eos_token_id=2, bos_token_id=1, num_hidden_layers=2)
    ids = _ids(config, [4, 6], pad=0)
    ids[0, 3] = 97
    out, _ = _parity(config, tmp_path, ids)
    params = clip_text.load_pretrained(tmp_path / "text_encoder")[1]
    proj = np.asarray(params["text_projection"]["kernel"])
    last = np.asarray(out.last_hidden_state)
    np.testing.assert_allclose(last[0, 3] @ proj, np.asarray(out.pooled)[0], atol=1e-5)
    assert np.abs(last[0, 5] @ proj - np.asarray(out.pooled)[0]).max() > 1e-3  # not at eos


def test_parity_padding_mask(tmp_path):
    config = _config(num_hidden_layers=2)
    ids = _ids(config, [2, 9], pad=0)
    mask = (np.arange(ids.shape[1])[None] <= np.array([[3], [10]])).astype(np.int64)
    out, _ = _parity(config, tmp_path, ids, attention_mask=mask)
    # the mask matters for padded query positions only (causal attention): check it was applied
    params = clip_text.load_pretrained(tmp_path / "text_encoder")[1]
    unmasked = CLIPTextEncoder(config).apply({"params": params}, jnp.asarray(ids))
    diff = np.abs(np.asarray(unmasked.context) - np.asarray(out.context))
    assert diff[0, :4].max() < 1e-5 and diff[0, 4:].max() > 1e-3


def test_export_round_trip_bit_exact(tmp_path):
    config = _config(num_hidden_layers=2)
    model, folder = _torch_model(config, tmp_path)
    _, params = clip_text.load_pretrained(folder)
    exported = clip_text.export(params, config)
    sd = {k: v.numpy() for k, v in model.state_dict().items() if "position_ids" not in k}
    assert exported.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(exported[k], sd[k], err_msg=k)
    # and transformers reads the folder we write
    clip_text.save_pretrained(params, config, tmp_path / "out")
    again = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "out")
    for k, v in again.state_dict().items():
        if "position_ids" not in k:
            np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)


def test_bad_keys_raise_port_error():
    config = _config(num_hidden_layers=2)
    params = CLIPTextEncoder(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    sd = clip_text.export(nn.unbox(params)["params"], config)
    sd["text_model.embeddings.position_ids"] = np.arange(16)[None]  # ignored buffer
    clip_text.convert(sd, config)
    sd.pop("text_model.encoder.layers.1.mlp.fc2.bias")
    sd["text_model.encoder.layers.7.mlp.fc2.bias"] = np.zeros(32, np.float32)
    sd["text_projection.weight"] = np.zeros((5, 32), np.float32)
    with pytest.raises(PortError) as err:
        clip_text.convert(sd, config)
    msg = str(err.value)
    assert "layers.1.mlp.fc2.bias" in msg and "layers.7.mlp.fc2.bias" in msg
    assert "text_projection.weight" in msg


def test_config_round_trip_and_clip_config():
    config = _config(hidden_act="gelu", layer_norm_eps=1e-6)
    assert CLIPTextConfig.from_hf_config(config.to_hf_config()) == config
    full = {"projection_dim": 24, "text_config": {k: v for k, v in config.to_hf_config().items()
                                                  if k != "projection_dim"}}
    assert CLIPTextConfig.from_hf_config(full) == config
    with pytest.raises(ValueError):
        _config(hidden_act="nope")


def test_mask_row_growth_keeps_old_rows(tmp_path):
    config = CLIPTextConfig.tiny(vocab_size=50)
    model = CLIPTextEncoder(config)
    ids = jnp.array([[2, 7, 9, 3, 0, 0]], jnp.int32)
    params = jax.tree.map(np.asarray, nn.unbox(model.init(jax.random.key(0), ids))["params"])
    new_cfg, new_params, mask_id = add_mask_token(config, params, jax.random.key(1))
    assert mask_id == 50 and new_cfg.vocab_size == 51
    new_table = new_params["token_embedding"]["embedding"]
    old_table = params["token_embedding"]["embedding"]
    assert new_table.shape == (51, config.hidden_size)
    np.testing.assert_array_equal(new_table[:50], old_table)
    # transformers' mean resizing: the new row sits (almost exactly) at the mean of the old rows
    np.testing.assert_allclose(new_table[50], old_table.mean(0), atol=1e-5)
    assert not np.array_equal(new_table[50], old_table.mean(0))
    # outputs on old ids are unchanged; the mask id is usable
    a = model.apply({"params": params}, ids)
    b = CLIPTextEncoder(new_cfg).apply({"params": new_params}, ids)
    np.testing.assert_array_equal(np.asarray(a.pooled), np.asarray(b.pooled))
    masked = CLIPTextEncoder(new_cfg).apply({"params": new_params}, ids.at[0, 2].set(mask_id))
    assert np.isfinite(np.asarray(masked.context)).all()
    # a saved embedding (Muddit's mask_token_embedding.pth) is loaded into the row
    vec = np.arange(config.hidden_size, dtype=np.float32)
    torch.save(torch.from_numpy(vec), tmp_path / "mask_token_embedding.pth")
    loaded = clip_text.load_mask_embedding(tmp_path / "mask_token_embedding.pth")
    cfg2, p2, mid2 = add_mask_token(config, params, jax.random.key(1), mask_embedding=loaded)
    np.testing.assert_array_equal(p2["token_embedding"]["embedding"][mid2], vec)
    # a table that already holds the mask row (checkpoint saved after resizing) does not grow
    cfg3, p3, mid3 = add_mask_token(new_cfg, new_params, jax.random.key(2), mask_id=50)
    assert cfg3 == new_cfg and mid3 == 50 and p3["token_embedding"]["embedding"].shape[0] == 51
    # zero-mean init alternative
    _, p4 = resize_token_embeddings(config, params, 53, jax.random.key(3), mean_resizing=False)
    assert 0.005 < p4["token_embedding"]["embedding"][50:].std() < 0.05


def test_logical_axes_dtype_and_jit():
    config = CLIPTextConfig.tiny(vocab_size=40)
    ids = jnp.array([[2, 5, 6, 3]], jnp.int32)
    boxed = CLIPTextEncoder(config).init(jax.random.key(0), ids)["params"]
    assert logical_axes_of(boxed) == {"vocab", "embed", "heads", "mlp", "norm", "cond"}
    bf16 = CLIPTextEncoder(config, dtype=jnp.bfloat16)
    params = nn.unbox(boxed)
    out = jax.jit(lambda p, i: bf16.apply({"params": p}, i))(params, ids)
    assert out.context.dtype == jnp.bfloat16 and out.context.shape == (1, 4, config.hidden_size)
    assert out.pooled.shape == (1, config.projection_dim)
    ref = CLIPTextEncoder(config).apply({"params": params}, ids)
    assert_close(out.pooled.astype(jnp.float32), ref.pooled, 5e-2, "bf16 pooled")
    with pytest.raises(ValueError):
        CLIPTextEncoder(config).apply({"params": params}, jnp.zeros((1, 78), jnp.int32))
    assert dataclasses.replace(config, vocab_size=41).vocab_size == 41
