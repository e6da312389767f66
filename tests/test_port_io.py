"""Checkpoint reading/writing and the generic key-map converter (muddit_jax.port.io / mapping)."""

import json
import os

import numpy as np
import pytest

from muddit_jax.port import io, mapping


def _sd():
    rng = np.random.default_rng(0)
    return {
        "fc.weight": rng.normal(size=(3, 4)).astype(np.float32),
        "fc.bias": rng.normal(size=(3,)).astype(np.float32),
        "conv.weight": rng.normal(size=(5, 2, 3, 3)).astype(np.float32),
        "ln.weight": rng.normal(size=(3,)).astype(np.float32),
    }


KEY_MAP = (
    mapping.linear("fc", ("fc",))
    + mapping.conv2d("conv", ("conv",), bias=False)
    + mapping.norm("ln", ("ln",), bias=False)
)
TARGET = {
    "fc": {"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros((3,), np.float32)},
    "conv": {"kernel": np.zeros((3, 3, 2, 5), np.float32)},
    "ln": {"scale": np.zeros((3,), np.float32)},
}


def test_convert_layouts_and_round_trip():
    sd = _sd()
    params = mapping.torch_to_flax(sd, KEY_MAP, TARGET)
    np.testing.assert_array_equal(params["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(params["conv"]["kernel"][1, 2, 0, 4], sd["conv.weight"][4, 0, 1, 2])
    back = mapping.flax_to_torch(params, KEY_MAP)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda sd: sd.update(extra=np.zeros(1)), "unknown keys"),
        (lambda sd: sd.pop("fc.bias"), "missing keys"),
        (lambda sd: sd.update({"ln.weight": np.zeros(4)}), "mis-shaped keys"),
    ],
)
def test_convert_reports_bad_keys(edit, fragment):
    sd = _sd()
    edit(sd)
    with pytest.raises(mapping.PortError, match=fragment) as info:
        mapping.torch_to_flax(sd, KEY_MAP, TARGET, what="toy")
    assert "toy" in str(info.value)


def test_ignore_patterns_drop_buffers():
    sd = _sd()
    sd["embeddings.position_ids"] = np.arange(4)
    mapping.torch_to_flax(sd, KEY_MAP, TARGET, ignore=["*.position_ids"])


def test_unfilled_flax_param_is_reported():
    target = dict(TARGET, extra={"kernel": np.zeros((1,), np.float32)})
    with pytest.raises(mapping.PortError, match="extra/kernel"):
        mapping.torch_to_flax(_sd(), KEY_MAP, target)


def test_load_safetensors_folder_sharded_and_single(tmp_path):
    sd = _sd()
    folder = tmp_path / "model"
    io.save_safetensors(sd, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "Toy"}))
    loaded = io.load_state_dict(folder)
    assert io.load_config(folder) == {"_class_name": "Toy"}
    assert all(np.array_equal(loaded[k], sd[k]) for k in sd)

    sharded = tmp_path / "sharded"
    keys = sorted(sd)
    io.save_safetensors({k: sd[k] for k in keys[:2]}, sharded / "model-00001-of-00002.safetensors")
    io.save_safetensors({k: sd[k] for k in keys[2:]}, sharded / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 + (i >= 2)}-of-00002.safetensors" for i, k in enumerate(keys)}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = io.load_state_dict(sharded)
    assert sorted(loaded) == keys


def test_load_pickled_bin_with_wrappers_and_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(v) for k, v in _sd().items()}
    sd["fc.weight"] = sd["fc.weight"].to(torch.bfloat16)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "x.ckpt")
    loaded = io.load_state_dict(tmp_path / "x.ckpt")
    assert sorted(loaded) == sorted(sd)
    assert loaded["fc.weight"].dtype == np.float32
    np.testing.assert_allclose(loaded["fc.weight"], sd["fc.weight"].float().numpy())


def test_bf16_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2, 2, dtype=torch.bfloat16)}, str(tmp_path / "w.safetensors"))
    np.testing.assert_array_equal(io.load_state_dict(tmp_path / "w.safetensors")["w"], np.ones((2, 2)))


def test_missing_paths_fail_with_clear_message(tmp_path):
    with pytest.raises(mapping.PortError, match="does not exist"):
        io.load_state_dict(tmp_path / "nope")
    with pytest.raises(mapping.PortError, match="config.json"):
        io.load_config(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(mapping.PortError, match="no unique weights file"):
        io.load_state_dict(tmp_path)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import safetensors.numpy

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(RuntimeError):
        io.save_safetensors(_sd(), tmp_path / "w.safetensors")
    assert os.listdir(tmp_path) == []
