"""The embedded default end to end, shortened (``configs/shapes_tiny.py:smoke``): tokenizer ->
VQ stage -> MM-DiT stage on the shapes mixture -> evaluation + artifacts; resume; the sample and
eval CLIs on the run folder."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from muddit_jax.cli import eval as eval_cli
from muddit_jax.cli import sample as sample_cli
from muddit_jax.train.metrics import read_jsonl

CONFIG = "configs/shapes_tiny.py:smoke"


def _train(workdir, *overrides: str) -> str:
    cmd = [sys.executable, "-m", "muddit_jax.cli.train", f"--config={CONFIG}",
           f"--workdir={workdir}", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("shapes")
    first = _train(workdir)
    return workdir, first


def test_every_stage_runs_and_writes_its_artifacts(run) -> None:
    workdir, log = run
    assert "trained a" in log and "stage vq" in log and "done at step 30" in log
    assert "codes of shapes/train (256 records, 1 shards written, 0 reused)" in log
    for name in ("tokenizer.model", "codes/captions/dataset_info.json", "vq/recon.png",
                 "vq/eval.json", "vq/metrics.jsonl", "metrics.jsonl", "loss.png",
                 "samples/30/t2i.png", "samples/30/understanding.png", "eval/30/summary.json",
                 "eval/30/summary.md"):
        assert (workdir / name).is_file(), name
    for png in ("loss.png", "vq/recon.png", "samples/30/t2i.png", "samples/30/understanding.png"):
        img = np.asarray(Image.open(workdir / png))
        assert img.ndim == 3 and img.std() > 1.0, png  # not a blank canvas
    summary = json.loads((workdir / "eval/30/summary.json").read_text())
    assert {"cider_d", "bleu4", "attribute_accuracy"} <= set(summary["caption"])
    assert "vqa_accuracy" in summary["vqa"] and "overall" in summary["t2i"]
    by_answer = {k.split("/", 1)[1] for k in summary["vqa"] if k.startswith("answer_type/")}
    by_question = {k.split("/", 1)[1] for k in summary["vqa"] if k.startswith("question_type/")}
    assert by_answer and by_answer <= {"yes_no", "number", "other"}
    assert by_question and by_question <= {"color", "shape", "count", "position", "exists",
                                           "relation"}
    vq = json.loads((workdir / "vq/eval.json").read_text())
    assert {"psnr", "usage", "perplexity", "recon_detector_overall"} <= set(vq)
    assert 0 < vq["usage"] <= 1 and 0 <= vq["recon_detector_overall"] <= 1


def test_losses_decrease(run) -> None:
    workdir, _ = run
    log = read_jsonl(workdir / "metrics.jsonl")
    losses = [log[s]["loss"] for s in sorted(log) if "loss" in log[s]]
    assert len(losses) == 15
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    vq = read_jsonl(workdir / "vq/metrics.jsonl")
    assert vq[max(vq)]["psnr"] > vq[min(vq)]["psnr"]


def test_rerun_resumes_both_stages(run) -> None:
    workdir, _ = run
    log = _train(workdir, "--config.train.steps=32")
    assert "stage vq" in log and "resumed at step 6" in log  # VQ finished: nothing to redo
    assert "resumed at step 30" in log and "done at step 32" in log
    assert "0 shards written, 1 reused" in log  # the codes too
    again = _train(workdir, "--config.train.steps=32", "--stage=mmdit")
    assert "stage vq" not in again and "done at step 32" in again


def test_sample_and_eval_clis_read_the_run(run, tmp_path, capsys) -> None:
    workdir, _ = run
    out = tmp_path / "a.png"
    assert sample_cli.main(["--workdir", str(workdir), "--prompt", "a red circle",
                            "--out", str(out), "--steps", "2"]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (32, 32, 3)
    assert sample_cli.main(["--workdir", str(workdir), "--image", str(out), "--steps", "2"]) == 0
    assert sample_cli.main(["--workdir", str(workdir), "--image", str(out), "--question",
                            "what color is the circle?", "--steps", "2"]) == 0
    assert sample_cli.main(["--workdir", str(workdir), "--image", str(out), "--question",
                            "what color is the circle?", "--steps", "2", "--sampling", "argmax"]) == 0
    assert eval_cli.main([f"--config={CONFIG}", f"--workdir={workdir}", "--task=vqa",
                          "--config.eval.split=validation"]) == 0
    printed = capsys.readouterr().out
    assert "muddit-sample: wrote" in printed and "vqa_accuracy=" in printed
    step = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    summary = json.loads((workdir / "eval" / f"{step}-validation" / "summary.json").read_text())
    assert set(summary) == {"vqa"}
    assert sample_cli.main(["--workdir", str(workdir), "--prompt", "a red circle", "--out",
                            str(tmp_path / "b.png"), "--steps", "2", "--temperature", "0", "0"]) == 0
    assert "wrote" in capsys.readouterr().out
    base = ["--workdir", str(workdir), "--prompt", "x"]
    _, t2i = sample_cli.load_pipeline(sample_cli.parse_args(base))  # the run's eval settings
    assert t2i == {"guidance_scale": 4.0, "guidance_schedule": "constant",
                   "guidance_plausibility": 0.1, "temperature": (2.0, 0.0),
                   "sampling": "multinomial", "top_k": 0}
    _, t2i = sample_cli.load_pipeline(sample_cli.parse_args(
        base + ["--temperature", "1", "0", "--sampling", "top_k", "--top-k", "3",
                "--guidance-schedule", "decay", "--guidance-plausibility", "0.3"]))
    assert t2i["temperature"] == [1.0, 0.0] and (t2i["sampling"], t2i["top_k"]) == ("top_k", 3)
    assert t2i["guidance_schedule"] == "decay" and t2i["guidance_plausibility"] == 0.3
    image_args = ["--workdir", str(workdir), "--image", str(out)]
    _, text = sample_cli.load_pipeline(sample_cli.parse_args(image_args))
    assert text == {"sampling": "multinomial"}  # the run's eval.text_sampling
    _, text = sample_cli.load_pipeline(sample_cli.parse_args(image_args + ["--sampling", "argmax"]))
    assert text == {"sampling": "argmax"}
    _, text = sample_cli.load_pipeline(sample_cli.parse_args(image_args + ["--max-tokens", "3"]))
    assert text == {"sampling": "multinomial", "max_tokens": 3}
    for bad, fragment in [(["--sampling", "top_k"], "apply to text-to-image"),
                          (["--max-tokens", "0"], "needs a value >= 1"),
                          (["--top-k", "2"], "apply to text-to-image"),
                          (["--guidance-schedule", "decay"], "applies to text-to-image")]:
        with pytest.raises(SystemExit):
            sample_cli.parse_args(image_args + bad)
        assert fragment in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_cli.parse_args(base + ["--top-k", "2"])
    assert "--top-k needs --sampling top_k" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_cli.main(["--workdir", str(workdir), "--image", str(out), "--temperature", "0", "0"])
    assert "--temperature applies to text-to-image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_cli.parse_args(base + ["--max-tokens", "2"])
    assert "--max-tokens applies to captions" in capsys.readouterr().err


def test_code_probe_reads_the_run(run, tmp_path) -> None:
    """``bench.code_probe`` on a trained run adds the MM-DiT's embedding row and one linear
    probe per block (the smoke MM-DiT has one dual and one single block)."""
    from bench import code_probe

    workdir, _ = run
    out = code_probe.main(["--smoke", "--workdir", str(workdir), "--config", CONFIG,
                           "--json", str(tmp_path / "probe.json")])
    codes, blocks = out["tables"].values()
    assert [r["inputs"] for r in codes] == ["scratch", "codebook", "mmdit"]
    assert [r["block"] for r in blocks] == ["transformer_blocks_0", "single_transformer_blocks_0"]
    assert all(0 <= r[k] <= 1 for r in codes + blocks for k in ("seen_pairs", "held_out_pairs"))


def test_prompt_effect_reads_the_run(run, tmp_path) -> None:
    """``bench.prompt_effect`` on a trained run: one row per mask ratio, scored on masked codes
    over object pixels (there are some), the prompt effect = the two cross-entropies' gap."""
    from bench import prompt_effect

    workdir, _ = run
    out = prompt_effect.main(["--smoke", "--workdir", str(workdir), "--ratios", "1.0,0.5"])
    rows = next(iter(out["tables"].values()))
    assert [r["mask_ratio"] for r in rows] == [1.0, 0.5]
    assert rows[0]["masked_object_codes"] > rows[1]["masked_object_codes"] > 0
    for r in rows:
        assert r["object_ce"] > 0 and 0 <= r["object_acc"] <= 1
        assert r["prompt_effect"] == pytest.approx(r["object_ce_other_prompt"] - r["object_ce"],
                                                   abs=2e-3)
    with pytest.raises(SystemExit):
        prompt_effect.main(["--workdir", str(workdir), "--ratios", "0"])


def test_image_effect_reads_the_run(run, tmp_path) -> None:
    """``bench.image_effect``: one row per question type plus ``all`` (their sum), the effect is
    the two cross-entropies' gap, and scoring the own image twice gives no effect at all."""
    from bench import image_effect

    workdir, _ = run
    out = image_effect.main(["--smoke", "--workdir", str(workdir)])
    rows = next(iter(out["tables"].values()))
    kinds = [r["question_type"] for r in rows]
    assert kinds[-1] == "all" and kinds[:-1] == sorted(kinds[:-1]) and len(kinds) > 2
    assert rows[-1]["questions"] == sum(r["questions"] for r in rows[:-1]) > 8
    for r in rows:
        assert 0 <= r["acc"] <= 1 and 0 <= r["acc_other_image"] <= 1 and r["ce"] > 0
        assert r["image_effect"] == pytest.approx(r["ce_other_image"] - r["ce"], abs=2e-3)
    same = image_effect.measure(workdir, 4, "test", shift=0)
    assert all(r["acc"] == r["acc_other_image"] and r["image_effect"] == 0 for r in same)
    assert "acc_guided" not in same[0]
    # guidance against the own image, or at scale 1, answers as the own image does
    for scale, null in ((3.0, "other"), (1.0, "mask")):
        guided = image_effect.measure(workdir, 4, "test", shift=0, guidance=scale, null=null)
        assert all(r["acc_guided"] == r["acc"] for r in guided)
        assert all(r["ce_guided"] == pytest.approx(r["ce"], abs=2e-3) for r in guided)
    # a masked image as the null moves every answer (scores are rounded to 1e-3)
    masked = image_effect.measure(workdir, 4, "test", shift=0, guidance=3.0, null="mask")
    assert all(r["ce_guided"] != r["ce"] for r in masked)
    assert abs(masked[-1]["ce_guided"] - masked[-1]["ce"]) > 1e-2
    with pytest.raises(ValueError, match="null='blank': use one of"):
        image_effect.measure(workdir, 4, "test", guidance=2.0, null="blank")
    visible = image_effect.measure(workdir, 4, "test", shift=0, padding="visible")
    assert [r["questions"] for r in visible] == [r["questions"] for r in same]
    assert any(r["ce"] != s["ce"] for r, s in zip(visible, same))  # the padding is an input
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) >= 2
    earlier = image_effect.measure(workdir, 4, "test", shift=0, step=steps[0])
    latest = image_effect.measure(workdir, 4, "test", shift=0, step=steps[-1])
    assert latest == same and earlier != same  # --step picks the checkpoint scored
    kept = re.escape(f"(have {steps})")
    with pytest.raises(FileNotFoundError, match=rf"step {steps[-1] + 1} not in .*{kept}"):
        image_effect.measure(workdir, 4, "test", step=steps[-1] + 1)
    with pytest.raises(SystemExit):
        image_effect.main(["--workdir", str(workdir), "--scenes", "1"])


def test_t2i_settings_reads_the_run(run, tmp_path) -> None:
    """``bench.t2i_settings``: one row per setting, in order; a repeated setting reproduces its
    row; at the run's own settings it reproduces the evaluation job's t2i score (same prompts,
    seeds and batches); a bad setting fails before any sampling."""
    from bench import t2i_settings
    from muddit_jax.eval.compositional import CATEGORIES

    workdir, _ = run
    step = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    job = json.loads((workdir / "eval" / str(step) / "summary.json").read_text())["t2i"]
    settings = ["g=4", "g=4", "g=none,sampling=argmax,temp=0:0"]  # smoke eval: 8 prompts, g=4
    out = t2i_settings.main(["--workdir", str(workdir), "--split", "test", "--prompts", "8",
                             "--settings", *settings])
    rows = next(iter(out["tables"].values()))
    assert [r["setting"] for r in rows] == settings
    assert rows[0] == rows[1]
    assert rows[0]["t2i_overall"] == pytest.approx(job["overall"], abs=1e-3)
    for key in CATEGORIES:  # counting is > 0 on the smoke run
        assert rows[0][key] == pytest.approx(job.get(key, float("nan")), abs=1e-3, nan_ok=True)
    for r in rows:
        assert 0 <= r["object_code_match"] <= 1 and 0 <= r["code_match"] <= 1
    with pytest.raises(SystemExit):
        t2i_settings.main(["--workdir", str(workdir), "--settings", "guidance=4"])


def test_bad_stage_and_missing_run_fail_clearly(tmp_path, capsys) -> None:
    from muddit_jax.train.stages import run_stages
    from muddit_jax.train.config import base_config

    with pytest.raises(ValueError, match="--stage"):
        run_stages(base_config(), tmp_path, "decoder")
    c = base_config()
    c.vq.steps = 5
    with pytest.raises(ValueError, match="data.images=True"):
        run_stages(c, tmp_path, "vq")
    assert sample_cli.main(["--workdir", str(tmp_path), "--prompt", "x"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_device_scripts_stage_the_run_and_score_each_evaluation(run, tmp_path) -> None:
    """``launch/device_prepare.sh`` stages the run's tokenizer, last VQ checkpoint and dataset
    (wheels skipped: no network); ``launch/device_shapes.sh`` trains the MM-DiT from them for a
    fixed ``STEPS`` and writes one held-out evaluation per ``EVALS`` into ``summary.json``, also
    for a run cut at ``DEADLINE``."""
    workdir, _ = run
    root = Path(__file__).resolve().parents[1]
    dev, out = tmp_path / "dev", tmp_path / "out"
    env = {**os.environ, "CONFIG": CONFIG, "DEVICE_DIR": str(dev), "NO_WHEELS": "1",
           "PYTHON": sys.executable}
    staged = subprocess.run(["bash", str(root / "launch/device_prepare.sh"), str(workdir)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert staged.returncode == 0, staged.stdout[-2000:] + staged.stderr[-2000:]
    last = max(int(p.name) for p in (workdir / "vq/checkpoints").iterdir() if p.name.isdigit())
    assert [p.name for p in (dev / "run/vq/checkpoints").iterdir()] == [str(last)]
    assert (dev / "run/tokenizer.model").read_bytes() == (workdir / "tokenizer.model").read_bytes()
    assert len(list((dev / "data/shapes").iterdir())) == 1
    no_vq = tmp_path / "no_vq"
    no_vq.mkdir()
    (no_vq / "tokenizer.model").write_bytes(b"")
    for args, message in [([], "usage: launch/device_prepare.sh RUN_DIR"),
                          ([str(no_vq)], "no VQ checkpoint under")]:
        bad = subprocess.run(["bash", str(root / "launch/device_prepare.sh"), *args], env=env,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and message in bad.stdout, bad.stdout + bad.stderr
    env.update(OUT=str(out), WORK=str(tmp_path / "work"), STEPS="4", EVALS="2", LIMIT="4",
               EXTRA="--config.eval.batch_size=4 --config.eval.shard_size=4 "
                     "--config.artifacts.num_prompts=2 --config.artifacts.num_images=2")
    ran = subprocess.run(["bash", str(root / "launch/device_shapes.sh")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenes"] == 256 and summary["batch"] == 32
    assert [e["step"] for e in summary["evals"]] == [2, 4]
    for e in summary["evals"]:
        assert e["passes"] == pytest.approx(e["step"] * 32 / 256)
        assert {"t2i/overall", "vqa/vqa_accuracy", "caption/attribute_accuracy"} <= set(e)
    with tarfile.open(out / "run.tar.gz") as tar:
        names = tar.getnames()
    assert "metrics.jsonl" in names and any(n.startswith("eval/4") for n in names)
    assert summary["completed"] is True
    parts = sorted(out.glob("ckpt.tar.gz.*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        assert "checkpoints/4/commit_success.txt" in tar.getnames()
    # a run cut at DEADLINE still leaves summary.json (no evaluation finished: none listed);
    # the SIGTERM may come during the compile, which a loaded CI machine can stretch past 30 s
    env.update(STEPS="100000", DEADLINE="30", KILL_AFTER="150")
    cut = subprocess.run(["bash", str(root / "launch/device_shapes.sh")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert cut.returncode == 124, cut.stdout[-2000:] + cut.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is False and summary["evals"] == []
    env["DEVICE_DIR"] = str(tmp_path / "missing")
    bad = subprocess.run(["bash", str(root / "launch/device_shapes.sh")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "is incomplete (run launch/device_prepare.sh)" in bad.stdout
