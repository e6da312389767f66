"""The README's main job (``muddit-smoke``) runs and writes its artifacts."""

import json

from muddit_jax.cli.smoke import caption_corpus, main


def test_smoke_writes_grid_and_report(tmp_path):
    assert main(["--out", str(tmp_path), "--image-size", "16", "--steps", "2"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) >= {"t2i", "i2t", "vqa", "build_s"}
    assert len(report["i2t"]["outputs"]) == 4
    from PIL import Image

    assert Image.open(tmp_path / "t2i_grid.png").size == (4 * 16 * 4, 16 * 4)
    assert len(caption_corpus()) == len(set(caption_corpus())) == 2 * 6 * 3 * 6 * 3 * 2
