"""The input pipeline: batch layout, exact resume from a JSON state, disjoint and complete host
shards, bad records skipped and counted, VQA text masks, crops, fail-fast config errors."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from muddit_jax.data import pipeline, registry, text
from muddit_jax.data.pipeline import DataConfig, make_iterator
from muddit_jax.data.schema import SkippedExamplesWarning
from tests.helpers import loopback_address

SHAPES = dict(num_train=24, num_validation=4, num_test=4)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    source = registry.data_source("shapes", "train", root / "data", resolution=32, **SHAPES)
    tok = text.train_tokenizer(text.dataset_texts([source]), 128, root / "tok.model")
    config = DataConfig(data_dir=str(root / "data"), options=SHAPES, resolution=32,
                        text_length=48, global_batch_size=4, seed=3)
    return config, tok, source


def take(config: DataConfig, tok, n: int, **kw) -> list[dict[str, np.ndarray]]:
    with make_iterator(config, tok, process_index=0, process_count=1, **kw) as it:
        return [next(it) for _ in range(n)]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_batch_layout(env):
    config, tok, source = env
    (batch,) = take(config, tok, 1)
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "images": ((4, 32, 32, 3), "float32"), "text_ids": ((4, 48), "int32"),
        "text_valid": ((4, 48), "bool"), "micro_conds": ((4, 5), "float32"),
        "index": ((4,), "int32"),
    }
    np.testing.assert_array_equal(batch["micro_conds"], [[32, 32, 0, 0, 6.0]] * 4)
    for row in range(4):
        record = source[int(batch["index"][row])]
        pixels = np.asarray(Image.open(io.BytesIO(record["image"])), np.float32) / 255
        np.testing.assert_array_equal(batch["images"][row], pixels)
        ids, valid = batch["text_ids"][row], batch["text_valid"][row]
        assert ids[0] == tok.bos_id and ids[valid.sum() - 1] == tok.eos_id
        assert tok.decode(ids[None])[0] in {c.decode() for c in record["captions"]}


def test_read_threads_get_a_prefetch_buffer_that_uses_them(env, caplog):
    config, tok, _ = env
    with caplog.at_level("WARNING"):
        take(dataclasses.replace(config, read_threads=4, prefetch=4), tok, 1)  # 1 batch ahead
    assert not [r for r in caplog.records if "prefetch_buffer_size" in r.getMessage()]


def test_resume_mid_epoch_gives_the_same_batches(env):
    config, tok, _ = env
    config = dataclasses.replace(config, random_crop=True)
    with make_iterator(config, tok, process_index=0, process_count=1) as it:
        for _ in range(4):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(5)]  # crosses the epoch boundary (6 batches/epoch)
    with make_iterator(config, tok, process_index=0, process_count=1) as it:
        it.set_state(state)
        assert_same([next(it) for _ in range(5)], expected)
    assert_same(take(config, tok, 9)[4:], expected)
    with make_iterator(dataclasses.replace(config, seed=4), tok, process_index=0,
                       process_count=1) as other:
        with pytest.raises(ValueError, match="different stream"):
            other.set_state(state)


def test_epochs_are_reshuffled_permutations(env):
    config, tok, _ = env
    batches = take(config, tok, 12)
    epochs = [np.concatenate([b["index"] for b in batches[e * 6 : (e + 1) * 6]]) for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(24))
    assert not np.array_equal(epochs[0], epochs[1])


def test_host_shards_are_disjoint_complete_and_host_count_invariant(env):
    config, tok, _ = env
    one_epoch = dataclasses.replace(config, num_epochs=1, global_batch_size=6, random_crop=True)
    single = take(one_epoch, tok, 4)  # 24 records = 4 global batches
    shards = []
    for host in range(3):
        with make_iterator(one_epoch, tok, process_index=host, process_count=3) as it:
            batches = list(it)
        assert len(batches) == 4
        for k, batch in enumerate(batches):  # host p feeds rows [2p, 2p + 2) of batch k
            rows = slice(2 * host, 2 * host + 2)
            assert_same([batch], [{key: v[rows] for key, v in single[k].items()}])
        shards.append({int(i) for b in batches for i in b["index"]})
    assert set().union(*shards) == set(range(24))
    assert sum(map(len, shards)) == 24
    with make_iterator(one_epoch, tok, rows=slice(2, 6)) as it:  # the trainer's host_rows form
        assert_same([next(it)], [{key: v[2:6] for key, v in single[0].items()}])


def test_bad_records_are_skipped_and_counted(env):
    config, tok, source = env
    good = [dict(source[i]) for i in range(6)]
    bad_image = dict(good[0], image=b"not an image")
    no_caption = dict(good[1], captions=[b"", b"  "])
    records = [good[0], bad_image, *good[1:4], no_caption, *good[4:], bad_image]
    cfg = dataclasses.replace(config, num_epochs=2, global_batch_size=3, shuffle=False)
    with pytest.warns(SkippedExamplesWarning, match="skipped"):
        with make_iterator(cfg, tok, process_index=0, process_count=1, source=records) as it:
            first = next(it)
            state = json.loads(json.dumps(it.get_state()))
            rest = list(it)
            assert it.skipped == {"undecodable_image": 4, "empty_caption": 2}
    assert state["offset"] == 1 and state["skipped"] == {"undecodable_image": 1}
    assert [first["index"].tolist()] + [b["index"].tolist() for b in rest] == [
        [0, 2, 3], [4, 6, 7], [0, 2, 3], [4, 6, 7]]  # the 2nd epoch's last block runs out
    with pytest.warns(SkippedExamplesWarning):
        with make_iterator(cfg, tok, process_index=0, process_count=1, source=records) as it:
            it.set_state(state)
            assert_same(list(it), rest)


def test_vqa_task_masks_only_the_answer(env):
    config, tok, source = env
    cfg = dataclasses.replace(config, task="vqa")
    (batch,) = take(cfg, tok, 1)
    for row in range(4):
        ids, maskable = batch["text_ids"][row], batch["text_maskable"][row]
        record = source[int(batch["index"][row])]
        pairs = {(q.decode(), a.decode()) for q, a in
                 zip(record["vqa"]["question"], record["vqa"]["multiple_choice_answer"])}
        prefix = int(np.argmax(maskable))
        assert not maskable[:prefix].any() and maskable[prefix:].all()
        end = int(batch["text_valid"][row].sum())
        question = tok.decode(ids[None, :prefix])[0]
        answer = tok.decode(ids[None, prefix:end])[0]
        assert (question, answer) in pairs


def test_vqa_question_types_draw_only_those_questions(env):
    config, tok, source = env
    records = [dict(source[i]) for i in range(8)]
    for r in records[:4]:  # these four hold no exists question: skipped, counted
        kinds = [t.decode() for t in r["vqa"]["question_type"]]
        r["vqa"] = dict(r["vqa"], question_type=np.array(
            [b"color" if k == "exists" else k.encode() for k in kinds], object))
    cfg = dataclasses.replace(config, task="vqa", question_types=("exists",), num_epochs=1)
    with pytest.warns(SkippedExamplesWarning):
        with make_iterator(cfg, tok, process_index=0, process_count=1, source=records) as it:
            batches = list(it)
            assert it.get_state()["fingerprint"]["question_types"] == ["exists"]
    assert [sorted(b["index"].tolist()) for b in batches] == [[4, 5, 6, 7]]
    for row in range(4):
        ids, valid = batches[0]["text_ids"][row], batches[0]["text_valid"][row]
        prefix = int(np.argmax(batches[0]["text_maskable"][row]))
        vqa = records[int(batches[0]["index"][row])]["vqa"]
        exists = {(q.decode(), a.decode()) for q, a, t in zip(
            vqa["question"], vqa["multiple_choice_answer"], vqa["question_type"])
            if t == b"exists"}
        pair = (tok.decode(ids[None, :prefix])[0], tok.decode(ids[None, prefix:valid.sum()])[0])
        assert pair in exists
    with make_iterator(dataclasses.replace(cfg, question_types=()), tok, process_index=0,
                       process_count=1, source=records) as it:
        assert "question_types" not in it.get_state()["fingerprint"]  # older states resume


def test_random_crop_of_a_wide_image(env):
    config, tok, source = env
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)  # already 32 tall: crop only
    records = [dict(source[0], image=png(wide))] * 8
    cfg = dataclasses.replace(config, random_crop=True, num_epochs=1, global_batch_size=8)
    (batch,) = take(cfg, tok, 1, source=records)
    lefts = batch["micro_conds"][:, 2].astype(int)
    np.testing.assert_array_equal(batch["micro_conds"][:, [0, 1, 3, 4]], [[48, 32, 0, 6]] * 8)
    assert lefts.min() >= 0 and lefts.max() <= 16 and len(set(lefts)) > 1
    for img, left in zip(batch["images"], lefts):
        np.testing.assert_array_equal(img, wide[:, left : left + 32] / np.float32(255))
    centre = dataclasses.replace(cfg, random_crop=False)
    (batch,) = take(centre, tok, 1, source=records)
    np.testing.assert_array_equal(batch["micro_conds"][:, 2], 8)


def test_config_errors_fail_fast(env, tmp_path):
    config, tok, _ = env
    with pytest.raises(ValueError, match="resolution"):
        DataConfig(resolution=36)
    with pytest.raises(ValueError, match="question_types=.*task='vqa'"):
        DataConfig(question_types=("exists",))  # a caption stream has no questions
    with pytest.raises(ValueError, match="process_count=3"):
        make_iterator(config, tok, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        make_iterator(config, None, process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        make_iterator(dataclasses.replace(config, data_dir=str(tmp_path), build=False), tok,
                      process_index=0, process_count=1)
    with pytest.raises(ValueError, match="unknown DataConfig fields"):
        DataConfig.from_dict({"resoluton": 32})
    with pytest.raises(ValueError, match=r"workers=-1 must be an int >= 0"):
        DataConfig(workers=-1)


def test_to_global_builds_sharded_arrays(env):
    config, tok, _ = env
    (batch,) = take(config, tok, 1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    out = pipeline.to_global(batch, sharding)
    for k, v in batch.items():
        assert isinstance(out[k], jax.Array) and out[k].sharding == sharding
        np.testing.assert_array_equal(np.asarray(out[k]), v)


def test_worker_processes_match_in_process(env):
    config, tok, _ = env
    expected = take(config, tok, 5)
    with make_iterator(dataclasses.replace(config, workers=2), tok, process_index=0,
                       process_count=1) as it:
        got = [next(it) for _ in range(2)]
        state = json.loads(json.dumps(it.get_state()))
        got += [next(it) for _ in range(3)]
    assert_same(got, expected)
    with make_iterator(dataclasses.replace(config, workers=2), tok, process_index=0,
                       process_count=1) as it:
        it.set_state(state)
        assert_same([next(it) for _ in range(3)], expected[2:])


WORKER = """
import json, sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from muddit_jax.parallel import distributed  # stops the runtime in order at exit
distributed.initialize({"coordinator_address": sys.argv[1], "num_processes": 2,
                        "process_id": int(sys.argv[2])})
from muddit_jax.data.pipeline import DataConfig, make_iterator, to_global
config = DataConfig.from_dict(json.loads(sys.argv[3]))
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
gather = jax.jit(lambda x: x, out_shardings=jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec()))
out = []
with make_iterator(config, sys.argv[4]) as it:
    for batch in it:
        arrays = to_global(batch, rows)
        assert arrays["images"].shape == (config.global_batch_size, 32, 32, 3)
        out.append(np.asarray(gather(arrays["index"])).tolist())
print(json.dumps(out))
"""


def test_two_processes_assemble_the_global_batch(env, tmp_path):
    """Real 2-process JAX (CPU, gloo, loopback): each host feeds its rows and the global arrays
    equal the single-host batches row for row, every record once per epoch."""
    config, tok, _ = env
    config = dataclasses.replace(config, num_epochs=1, build=False)
    address = loopback_address()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env_vars = dict(os.environ, JAX_PLATFORMS="cpu")
    args = [json.dumps(dataclasses.asdict(config)), str(Path(config.data_dir).parent / "tok.model")]
    procs = [subprocess.Popen([sys.executable, str(script), address, str(p), *args],
                              env=env_vars, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for p in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert got[0] == got[1] == [b["index"].tolist() for b in take(config, tok, 6)]
    assert sorted(sum(got[0], [])) == list(range(24))


def test_a_state_resumes_only_with_its_worker_count(env):
    config, tok, _ = env
    with make_iterator(config, tok, process_index=0, process_count=1) as it:
        next(it)
        state = json.loads(json.dumps(it.get_state()))
    assert state["workers"] == 0
    with make_iterator(dataclasses.replace(config, workers=2), tok, process_index=0,
                       process_count=1) as it:
        with pytest.raises(ValueError, match=r"saved with workers=0.*resume with workers=0"):
            it.set_state(state)
