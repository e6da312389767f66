"""``model.code_init="codebook"``: the MM-DiT's code embedding and MLM output start from the VQ
codebook (:func:`muddit_jax.models.mmdit.codebook_init`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muddit_jax.models.mmdit import codebook_init

ROOT = Path(__file__).resolve().parents[1]


def _params(k: int = 6, width: int = 8) -> dict:
    rng = np.random.default_rng(0)
    return {"embed": {"embeddings": {"embedding": jnp.asarray(
                rng.normal(0, 0.02, (k + 1, width)), jnp.float32)}},
            "mlm_layer": {"conv2": {"kernel": jnp.asarray(
                rng.normal(0, 0.3, (width, k)), jnp.float32)}},
            "other": {"kernel": jnp.ones((2, 2))}}


def test_codebook_init_maps_alike_codes_to_alike_rows_and_keeps_the_scale() -> None:
    params = _params()
    book = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)), jnp.float32)
    book = book.at[4].set(book[1])  # two codes with the same vector
    out = codebook_init(params, book, jax.random.key(0))
    table, kernel = out["embed"]["embeddings"]["embedding"], out["mlm_layer"]["conv2"]["kernel"]
    np.testing.assert_allclose(table[4], table[1], atol=1e-6)
    np.testing.assert_allclose(kernel[:, 4], kernel[:, 1], atol=1e-6)
    assert not np.allclose(table[2], table[1])
    # the mask row and other params keep their values; the input tree is not modified
    np.testing.assert_array_equal(table[6], params["embed"]["embeddings"]["embedding"][6])
    np.testing.assert_array_equal(out["other"]["kernel"], params["other"]["kernel"])
    assert not np.allclose(params["embed"]["embeddings"]["embedding"][:6], table[:6])
    assert float(jnp.std(table[:6])) == pytest.approx(
        float(jnp.std(params["embed"]["embeddings"]["embedding"])), rel=1e-4)
    assert float(jnp.std(kernel)) == pytest.approx(
        float(jnp.std(params["mlm_layer"]["conv2"]["kernel"])), rel=1e-4)
    # rows are linear in the whitened codebook: a 3-dim codebook spans a 3-dim row space
    assert np.linalg.matrix_rank(np.asarray(table[:6]), tol=1e-5) == 3
    with pytest.raises(ValueError, match="codebook_size"):
        codebook_init(params, book[:5], jax.random.key(0))
    # condition_image_input's copy of the code embedding starts with the same rows
    both = codebook_init({**params, "condition_embed": jax.tree.map(
        lambda x: x * 2, params["embed"])}, book, jax.random.key(0))
    np.testing.assert_array_equal(both["condition_embed"]["embeddings"]["embedding"][:6],
                                  table[:6])
    np.testing.assert_array_equal(both["condition_embed"]["embeddings"]["embedding"][6],
                                  params["embed"]["embeddings"]["embedding"][6] * 2)


def _smoke_config(**model):
    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / "shapes_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.data.tokenizer = ""
    config.eval.at_end = config.artifacts.at_end = False
    config.model.update(model)
    return config


def test_run_starts_from_the_codebook_and_rejects_bad_values() -> None:
    from muddit_jax.train.run import build_run, code_init_edit

    config = _smoke_config(code_init="codebook")
    run = build_run(config)
    state = run.setup.init(0, None, edit=code_init_edit(config))
    plain = run.setup.init(0, None)
    book = np.asarray(state.frozen["vq"]["codebook"]["embedding"])
    np.testing.assert_array_equal(book, plain.frozen["vq"]["codebook"]["embedding"])
    expected = codebook_init(jax.device_get(plain.params["mmdit"]), book,
                             jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
    got = state.params["mmdit"]["embed"]["embeddings"]["embedding"]
    np.testing.assert_allclose(got, expected["embed"]["embeddings"]["embedding"], atol=1e-6)
    assert code_init_edit(_smoke_config(code_init="random")) is None
    with pytest.raises(ValueError, match="model.code_init"):
        build_run(_smoke_config(code_init="pixels"))
    no_images = _smoke_config(code_init="codebook")
    no_images.data.images = False
    with pytest.raises(ValueError, match="data.images"):
        code_init_edit(no_images)


def test_frozen_codebook_embedding_stays_at_its_init_through_training(tmp_path) -> None:
    """``optim.freeze`` keeps the code embedding at its ``code_init`` values while the MLM
    output (same init, not frozen) trains."""
    from muddit_jax.train.checkpoint import load_params
    from muddit_jax.train.loop import train
    from muddit_jax.train.run import build_run, code_init_edit

    config = _smoke_config(code_init="codebook")
    config.optim.freeze = "mmdit/embed/embeddings/embedding"
    config.data.update(kind="synthetic", text_maskable=False, pretokenize=False)
    config.train.vq_from = ""  # the random-init VQ (no stage-1 run here)
    config.train.steps = config.checkpoint.every = 3
    start = build_run(config).setup.init(0, None, edit=code_init_edit(config))
    train(config, tmp_path)
    end = load_params(tmp_path / "checkpoints")["mmdit"]
    np.testing.assert_array_equal(end["embed"]["embeddings"]["embedding"],
                                  start.params["mmdit"]["embed"]["embeddings"]["embedding"])
    moved = np.abs(end["mlm_layer"]["conv2"]["kernel"]
                   - start.params["mmdit"]["mlm_layer"]["conv2"]["kernel"]).max()
    assert moved > 1e-4


def test_init_from_a_run_without_the_condition_path_copies_its_input_path(tmp_path) -> None:
    """``model.condition_image_input`` with ``train.init_from`` a checkpoint that lacks the
    ``condition_*`` path: the path starts as the checkpoint's trained image input path, and
    every other param is the checkpoint's (``model.code_init="codebook"`` edits fresh params
    only, so the checkpoint's code embedding stays)."""
    from muddit_jax.train.checkpoint import Checkpointer
    from muddit_jax.train.run import build_run, init_state

    source = build_run(_smoke_config(condition_image_input=False, condition_conv_blocks=0))
    state = source.setup.init(3, None)
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(0, state, {})
    ckpt.close()
    config = _smoke_config(condition_image_input=True, condition_conv_blocks=0,
                           code_init="codebook")
    config.train.update(init_from=str(tmp_path / "ckpt"), vq_from="")  # the VQ: from there too
    run = build_run(config)
    got, resumed = init_state(run, Checkpointer(tmp_path / "new"), data=None)
    assert not resumed
    old, new = state.all_params()["mmdit"], got.all_params()["mmdit"]
    copies = {k for k in new if k.startswith("condition_")}
    assert copies and copies == {"condition_" + k for k in old if "condition_" + k in new}
    for name in copies:
        jax.tree.map(np.testing.assert_array_equal, new[name], old[name[len("condition_"):]])
    for name in old:
        jax.tree.map(np.testing.assert_array_equal, new[name], old[name])
    # ConvNeXt blocks of the condition's path alone: the checkpoint has none to copy
    config.model.condition_conv_blocks = 2
    with pytest.raises(ValueError, match=r"condition_conv_blocks=2: train.init_from .* has no "
                                         r"condition_down_convnext_1"):
        init_state(build_run(config), Checkpointer(tmp_path / "new2"), data=None)
    assert not (tmp_path / "new2").exists() or not any((tmp_path / "new2").iterdir())
