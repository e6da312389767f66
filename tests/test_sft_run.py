"""Instruction tuning starts from a ``muddit-convert`` checkpoint: params-only restore (with
Muddit's ``<mask>`` text row from the release), the SFT config's loss on VQA-style rows."""

from __future__ import annotations

import numpy as np
import pytest

from muddit_jax.port import convert as conv
from muddit_jax.port.mapping import flatten
from tests.test_configs import load
from tests.test_convert import pipeline_folder  # noqa: F401  (fixture)

pytest.importorskip("torch")


class VQABatches:
    """Fixed-seed rows in the trainer's batch layout: images, text with an answer region."""

    def __init__(self, batch: int, size: int, length: int):
        self.rng, self.shape = np.random.default_rng(0), (batch, size, length)
        self.count = 0

    def __next__(self):
        b, size, l = self.shape
        self.count += 1
        maskable = np.zeros((b, l), bool)
        maskable[:, l // 2 :] = True  # question = first half, answer = second half
        return {"images": self.rng.random((b, size, size, 3), np.float32),
                "text_ids": self.rng.integers(0, 512, (b, l), np.int32),
                "text_valid": np.ones((b, l), bool), "text_maskable": maskable,
                "micro_conds": np.full((b, 5), 32.0, np.float32)}

    def get_state(self):
        return {"count": self.count}

    def set_state(self, state):
        self.count = state["count"]


def test_sft_run_restores_converted_params_only(pipeline_folder, tmp_path) -> None:  # noqa: F811
    from muddit_jax.train.loop import train
    from muddit_jax.train.stages import resolve

    dst = tmp_path / "converted"
    conv.convert(pipeline_folder, dst)
    c = load("muddit_512_sft")  # arg "converted": networks + tokenizer from the folder
    c.train.update(init_from=str(dst), steps=2)
    c.model.update(dtype="float32", remat=False, scan_layers=False)
    c.data.update(global_batch=4, grid=4, text_length=8)
    c.mesh.update(data=-1, fsdp=1, tensor=1, dcn_data=1, rules="default")
    c.optim.lr = 0.0  # AdamW with lr 0 changes nothing: the run must hold the converted params
    c.checkpoint.update(every=1, async_save=False)
    c.log.update(every=1, tensorboard=False)
    config = resolve(c, tmp_path / "run")
    assert config.data.tokenizer == str(dst / "tokenizer")
    result = train(config, tmp_path / "run", data=VQABatches(4, 8, 8))
    assert result.status == "done" and result.step == 2
    assert np.isfinite(result.last_metrics["loss"]) and result.last_metrics["text_loss"] > 0
    _, tok, expected = conv.converted_pipeline(dst)
    got = result.state.all_params()
    for name in ("mmdit", "text_encoder", "vq"):
        a, b = flatten(got[name]), flatten(expected[name])
        assert a.keys() == b.keys(), name
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))
    (table,) = [np.asarray(v) for k, v in flatten(got["text_encoder"]).items()
                if "token_embedding" in "/".join(k)]
    assert table.shape[0] == tok.mask_id + 1  # the <mask> row, from mask_token_embedding.pth
    np.testing.assert_array_equal(table[tok.mask_id], np.arange(16, dtype=np.float32))
