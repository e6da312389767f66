"""Every experiment config loads, its bad arguments and overrides fail at start with a message,
and the pod-scale configs trace a full train step abstractly (no 1B allocation)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax
import pytest
from flax.traverse_util import flatten_dict

from muddit_jax.cli import train as train_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ARGS = {
    "shapes_tiny": [None, "smoke", "plain", "plain,smoke"],
    "train_tiny": [None, "images,micro"],
    "muddit_512": [None, "data", "tensor", "fsdp,synthetic"],
    "meissonic_1024": [None],
    "muddit_512_sft": [None, "own"],
}


def load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_every_config_file_is_listed() -> None:
    assert {p.stem for p in CONFIGS.glob("*.py")} == set(ARGS)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in ARGS.items() for a in args])
def test_config_loads(name: str, arg: str | None) -> None:
    c = load(name, arg)
    assert c.data.global_batch > 0 and c.train.steps > 0


def test_shapes_tiny_plain_undoes_exactly_the_settings_the_default_gained() -> None:
    """``shapes_tiny.py:plain`` is the default before BENCHMARKS.md §1.39 (§1.1-§1.38 ran from
    it): it differs from the default in those settings and in nothing else."""
    new, old = (flatten_dict(load("shapes_tiny", a).to_dict(), sep=".") for a in (None, "plain"))
    assert new.keys() == old.keys()
    assert {k for k in new if new[k] != old[k]} == {
        "model.rope_axes", "model.image_pos_embed", "model.code_init", "optim.freeze",
        "model.condition_image_input", "model.condition_conv_blocks", "loss.weighting",
        "loss.text_pad_masking", "data.mixture.captions.weight", "data.mixture.vqa.weight"}
    assert not old["model.condition_image_input"] and old["model.rope_axes"] == ()


@pytest.mark.parametrize("name,arg", [("muddit_512", "zero3"), ("muddit_512_sft", "scratch"),
                                      ("muddit_512", "data,tensor")])
def test_bad_config_argument_names_the_choices(name: str, arg: str) -> None:
    with pytest.raises(ValueError, match=f"{name}.py"):
        load(name, arg)


@pytest.mark.parametrize("override,message", [
    ("--config.vq.codebook=kmeans", "vq.codebook"),
    ("--config.train.trainable=vq", "train.trainable"),
    ("--config.model.preset=huge", "model.preset"),
    ("--config.data.grid=15", "data.grid"),  # the default MM-DiT down-samples 2x
    ("--config.data.options.textures=('stripes',)", "textures"),
])
def test_invalid_override_fails_before_any_work(tmp_path, capsys, override, message) -> None:
    code = train_cli.main([f"--config={CONFIGS}/shapes_tiny.py:smoke",
                           f"--workdir={tmp_path}", override])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "tokenizer.model").exists()  # failed before training the tokenizer


def test_every_shapes_option_is_overridable_and_reaches_every_reader(tmp_path) -> None:
    from muddit_jax.cli.config_args import parse
    from muddit_jax.data.shapes import ShapesConfig

    assert set(load("shapes_tiny").data.options) == {
        f.name for f in dataclasses.fields(ShapesConfig)}
    fv = parse("muddit-train", [f"--config={CONFIGS}/shapes_tiny.py", f"--workdir={tmp_path}",
                                "--config.data.options.num_train=64",
                                "--config.data.mixture.vqa.question_types=('exists',)"])
    c = fv.config
    for options in (c.data.options, c.data.mixture.captions.options, c.data.mixture.vqa.options):
        assert ShapesConfig(**options).num_train == 64
    from muddit_jax.train.data import mixture_config  # the README's question_types override

    sources = mixture_config(c, 2).sources
    assert [(s.name, s.config.question_types) for s in sources] == [
        ("captions", ()), ("vqa", ("exists",))]


@pytest.mark.parametrize("name", ["muddit_512", "meissonic_1024"])
def test_pod_config_traces_a_train_step(name: str) -> None:
    """The full-size step lowers (scanned, rematerialised, bf16) on one CPU device."""
    from muddit_jax.train.run import build_run

    c = load(name)
    c.data.global_batch = 2
    c.mesh.update(data=-1, fsdp=1, tensor=1, dcn_data=1, rules="default")
    run = build_run(c, jax.devices()[:1])
    text = run.lower().as_text()
    assert "bf16" in text and "stablehlo.while" in text
    if name == "meissonic_1024":  # T2I only: no text head, 64 x 64 codes
        assert run.model.mmdit.tokenizer_vocab_size is None
        assert run.batch_abstract["image_ids"].shape == (2, 64, 64)


def test_a_saved_config_from_before_a_field_existed_loads_with_its_default() -> None:
    from muddit_jax.train.config import base_config
    from muddit_jax.train.stages import with_defaults

    saved = base_config().to_dict()
    del saved["model"]["downsample"]  # an older run's checkpoint
    saved["model"].update(width=7, vq_channels=[16, 32])  # JSON gives lists
    saved["data"]["options"] = {"resolution": 32, "textures": ["plain"]}
    c = with_defaults(saved)
    assert c.model.width == 7 and tuple(c.model.vq_channels) == (16, 32)
    assert c.model.downsample is False
    assert c.data.options.resolution == 32 and list(c.data.options.textures) == ["plain"]
