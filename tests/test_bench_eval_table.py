"""``bench.eval_table``: the evaluation job's summaries of several runs side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import eval_table
from muddit_jax.eval.job import eval_dir


def _write(workdir: Path, step: int, summary: dict, split: str = "test") -> None:
    out = eval_dir(workdir, step, split)
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps(summary))


def _summary(shape: float, cider: float) -> dict:
    return {"vqa": {"vqa_accuracy": 0.5, "question_type/shape": shape,
                    "question_type/color": 0.75},
            "caption": {"cider_d": cider, "attribute_accuracy": 0.25, "bleu4": 0.3},
            "t2i": {"overall": 0.125, "colors": 0.5, "counting": 0.6}}


def test_rows_take_each_runs_latest_step_and_the_default_columns(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, 500, _summary(0.1, 1.0))
    _write(a, 4200, _summary(0.6014, 2.787))
    _write(a, 6000, _summary(0.9, 9.0), split="validation")  # another split: not read
    _write(b, 2100, {"vqa": {"vqa_accuracy": 0.25, "question_type/shape": 0.333}})
    rows, columns = eval_table.table([a, b])
    assert columns == ["run", "step", "vqa/vqa_accuracy", "vqa/question_type/color",
                       "vqa/question_type/shape", "caption/cider_d",
                       "caption/attribute_accuracy", "t2i/overall", "t2i/colors"]
    assert rows[0] == {"run": "a", "step": 4200, "vqa/vqa_accuracy": 0.5,
                       "vqa/question_type/color": 0.75, "vqa/question_type/shape": 0.601,
                       "caption/cider_d": 2.787, "caption/attribute_accuracy": 0.25,
                       "t2i/overall": 0.125, "t2i/colors": 0.5}
    assert rows[1] == {"run": "b", "step": 2100, "vqa/vqa_accuracy": 0.25,
                       "vqa/question_type/shape": 0.333}


def test_step_split_and_metric_patterns(tmp_path):
    a = tmp_path / "a"
    _write(a, 500, _summary(0.1, 1.0))
    _write(a, 4200, _summary(0.6, 2.8))
    _write(a, 4200, _summary(0.9, 9.0), split="validation")
    rows, columns = eval_table.table([a], step=500, metrics=["t2i/*", "caption/bleu4"])
    assert columns == ["run", "step", "t2i/colors", "t2i/counting", "t2i/overall",
                       "caption/bleu4"]
    assert rows[0]["step"] == 500 and rows[0]["caption/bleu4"] == 0.3
    rows, _ = eval_table.table([a], split="validation", metrics=["vqa/question_type/shape"])
    assert rows[0]["step"] == 4200 and rows[0]["vqa/question_type/shape"] == 0.9


def test_missing_summaries_name_the_run_and_the_fix(tmp_path):
    a = tmp_path / "a"
    (a / "eval").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run muddit-eval --workdir"):
        eval_table.table([a])
    _write(a, 4200, _summary(0.6, 2.8))
    with pytest.raises(FileNotFoundError, match=r"evaluated steps on 'test': \[4200\]"):
        eval_table.table([a], step=500)


def test_main_prints_a_markdown_table(tmp_path, capsys):
    a = tmp_path / "a"
    _write(a, 4200, _summary(0.6, 2.8))
    out = eval_table.main([str(a), "--json", str(tmp_path / "t.json")])
    printed = capsys.readouterr().out
    assert "| run | step | vqa/vqa_accuracy |" in printed and "| a | 4200 | 0.5 |" in printed
    assert json.loads((tmp_path / "t.json").read_text())["tables"] == out["tables"]
