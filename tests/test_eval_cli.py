"""End to end on real data: ``muddit-train`` on ``shapes`` (grain pipeline, raw images through the
frozen VQ), then ``muddit-eval`` of its checkpoint writes predictions and summaries; rerun resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from muddit_jax.cli.eval import main as eval_main
from muddit_jax.cli.train import main as train_main
from muddit_jax.data import shapes
from muddit_jax.models.tokenizers import SentencePieceTokenizer

CONFIG = '''
from configs.train_tiny import get_config as tiny

def get_config(arg=None):
    c = tiny("images,micro")
    c.model.text_vocab_size = {vocab}
    c.data.update(kind="dataset", dataset="shapes", split="train", data_dir="{data}",
                  tokenizer="{tok}", grid=8, text_length=48, global_batch=4)
    c.data.options = dict(resolution=32, num_train=16, num_validation=4, num_test=4)
    c.train.steps = 2
    c.checkpoint.update(every=2, async_save=False)
    c.eval.update(limit=2, steps=2, batch_size=2, shard_size=2, guidance_scale=2.0, every=2,
                  tasks="caption")
    return c
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    cfg = shapes.ShapesConfig(resolution=32, num_train=16)
    texts = [c for i in range(16) for c in shapes.generate(cfg, "train", i).captions]
    tok = SentencePieceTokenizer.train(texts * 4, 96, root / "sp.model")
    path = root / "config.py"
    path.write_text(CONFIG.format(vocab=tok.vocab_size, data=root / "data", tok=root / "sp.model"))
    workdir = root / "run"
    assert train_main(["--config", str(path), "--workdir", str(workdir)]) == 0
    return path, workdir


def test_trainer_ran_the_periodic_evaluation(run):
    _, workdir = run
    summary = json.loads((workdir / "eval" / "2" / "summary.json").read_text())
    assert list(summary) == ["caption"]
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/caption/cider_d" in row for row in logged)


def test_eval_writes_summaries_for_every_task(run, capsys):
    path, workdir = run
    assert eval_main(["--config", str(path), "--workdir", str(workdir), "--task", "all"]) == 0
    out = workdir / "eval" / "2"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"caption", "vqa", "t2i"}
    assert {"cider_d", "bleu4"} <= set(summary["caption"]) and "overall" in summary["t2i"]
    assert "| caption | cider_d |" in (out / "summary.md").read_text()
    preds = json.loads((out / "vqa.json").read_text())["predictions"]
    assert len(preds) >= 2 and all(isinstance(p, str) for p in preds.values())
    assert "step 2 t2i" in capsys.readouterr().out


def test_rerun_skips_finished_shards_and_bad_input_is_clear(run, capsys):
    path, workdir = run
    shard = next((workdir / "eval" / "2" / "shards").glob("caption-*.json"))
    before = shard.stat().st_mtime_ns
    assert eval_main(["--config", str(path), "--workdir", str(workdir), "--task", "caption"]) == 0
    assert shard.stat().st_mtime_ns == before
    assert eval_main(["--config", str(path), "--workdir", str(workdir), "--task", "fid"]) == 2
    assert "eval tasks" in capsys.readouterr().err
    assert eval_main(["--config", str(path), "--workdir", str(workdir / "none")]) == 2
    capsys.readouterr()
    # a model option the run was not trained with (rope_theta has no parameter to tell by)
    assert eval_main(["--config", str(path), "--workdir", str(workdir),
                      "--config.model.rope_theta=16", "--config.model.remat=True"]) == 2
    err = capsys.readouterr().err
    assert "model.rope_theta: checkpoint 10000.0, config 16.0" in err and "remat" not in err


def test_image_sampling_settings_recompute_t2i_shards_only(run, tmp_path):
    """eval.temperature / eval.guidance_scale enter the t2i shards' settings and no others: a
    rerun with another temperature recomputes T2I and reuses the caption shards; another
    eval.timestep_mode recomputes every task."""
    path, workdir = run
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    args = ["--config", str(path), "--workdir", str(tmp_path), "--task", "caption,t2i"]
    assert eval_main(args) == 0
    shards = tmp_path / "eval" / "2" / "shards"

    def settings(task):
        return json.loads(next(shards.glob(f"{task}-*.json")).read_text())["settings"]

    assert settings("t2i")["options"] == {"guidance_scale": 2.0, "temperature": [2.0, 0.0],
                                          "timestep_mode": "pipeline", "sampling": "multinomial",
                                          "top_k": 0, "guidance_schedule": "constant",
                                          "guidance_plausibility": 0.0}
    assert settings("caption")["options"] == {"timestep_mode": "pipeline",
                                              "text_sampling": "multinomial",
                                              "caption_max_tokens": 0}

    def recomputed(*flags: str) -> set[str]:
        """Run the evaluation again with ``flags``; the tasks whose shards were all rewritten
        (a task with only some of its shards rewritten fails)."""
        stamps = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
        assert eval_main(args + list(flags)) == 0
        changed = {name for name, t in stamps.items() if (shards / name).stat().st_mtime_ns != t}
        tasks = {name.split("-")[0] for name in changed}
        assert changed == {name for name in stamps if name.split("-")[0] in tasks}
        return tasks

    flags = ["--config.eval.temperature=(0.0, 0.0)"]
    assert recomputed(*flags) == {"t2i"}
    assert settings("t2i")["options"]["temperature"] == [0.0, 0.0]
    # the fed timestep acts on every task: all shards are recomputed, under the new mode
    flags.append("--config.eval.timestep_mode=ratio")
    assert recomputed(*flags) == {"t2i", "caption"}
    assert settings("caption")["options"]["timestep_mode"] == "ratio"
    # greedy text decoding recomputes the caption shards only
    flags.append("--config.eval.text_sampling=argmax")
    assert recomputed(*flags) == {"caption"}
    assert settings("caption")["options"]["text_sampling"] == "argmax"
    # a bound on the caption's length recomputes the caption shards only
    flags.append("--config.eval.caption_max_tokens=5")
    assert recomputed(*flags) == {"caption"}
    assert settings("caption")["options"]["caption_max_tokens"] == 5
    # a guidance schedule recomputes the t2i shards only
    flags.append("--config.eval.guidance_schedule=linear")
    assert recomputed(*flags) == {"t2i"}
    assert settings("t2i")["options"]["guidance_schedule"] == "linear"
    flags.append("--config.eval.guidance_plausibility=0.1")
    assert recomputed(*flags) == {"t2i"}
    assert settings("t2i")["options"]["guidance_plausibility"] == 0.1


@pytest.mark.parametrize("flags, fragment", [
    (["--config.eval.sampling=greedy"], "eval.sampling='greedy'"),
    (["--config.eval.text_sampling=top_k"], "eval.text_sampling='top_k'"),
    (["--config.eval.sampling=top_k"], "eval.top_k=0 with eval.sampling='top_k'"),
    (["--config.eval.top_k=3"], "eval.top_k=3 with eval.sampling='multinomial'"),
    (["--config.eval.temperature=(1.0,)"], "temperature must be a (start, end) tuple"),
    (["--config.eval.guidance_schedule=cosine"], "guidance_schedule must be one of"),
    (["--config.eval.guidance_plausibility=1.5"], "guidance_plausibility must be in [0, 1)"),
    (["--config.eval.answer_max_tokens=-2"], "eval.answer_max_tokens=-2"),
])
def test_bad_sampling_settings_fail_before_any_work(run, tmp_path, capsys, flags, fragment):
    """muddit-eval and muddit-train refuse a bad eval sampler setting at start, naming it."""
    path, workdir = run
    assert eval_main(["--config", str(path), "--workdir", str(workdir)] + flags) == 2
    assert fragment in capsys.readouterr().err
    assert train_main(["--config", str(path), "--workdir", str(tmp_path / "new")] + flags) != 0
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_same_predictions_on_one_and_eight_devices(run, tmp_path):
    """muddit-eval over the checkpoint: 8 local devices (batch 8) == 1 device (batch 2)."""
    path, workdir = run
    for name in ("one", "eight"):
        shutil.copytree(workdir / "checkpoints", tmp_path / name / "checkpoints")
    args = ["--config", str(path), "--task", "caption,t2i"]
    assert eval_main(args + ["--workdir", str(tmp_path / "one")]) == 0
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root),
               XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    code = ("import sys; from muddit_jax.cli.eval import main; "
            "sys.exit(main(sys.argv[1:]))")
    subprocess.run([sys.executable, "-c", code, *args, "--workdir", str(tmp_path / "eight"),
                    "--config.eval.batch_size=8", "--config.eval.shard_size=8"],
                   check=True, cwd=root, env=env, timeout=600)
    for task in ("caption", "t2i"):
        one = json.loads((tmp_path / "one" / "eval" / "2" / f"{task}.json").read_text())
        eight = json.loads((tmp_path / "eight" / "eval" / "2" / f"{task}.json").read_text())
        assert one["predictions"] == eight["predictions"], task
