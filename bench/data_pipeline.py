"""Benchmark: examples/s of the input pipeline vs decoding the same images and nothing else.

Workloads (built in a temp folder, or ``--data-dir``):

* ``shapes-64``: the embedded dataset, 64 px PNGs, fed at 64 px (decode + tokenize + batch);
* ``jpeg-640x480->256``: an ``image_folder`` of 640x480 JPEGs, resized + random-cropped to 256
  (the COCO-like case; the pipeline decodes JPEGs at a reduced DCT scale);
* ``codes``: ``shapes-64`` pre-tokenized by a random-init tiny VQ (``muddit-pretokenize``), read
  as ``image_ids`` (no pixels at all).

The baseline, measured in the same run on the same records, is a single-threaded loop of
Pillow decode to an RGB array (no resize, no text). Pipeline rows vary ``read_threads`` (grain
prefetch threads) and ``workers`` (grain worker processes). The ratio is pipeline / baseline.

``python -m bench.data_pipeline [--smoke] [--json PATH] [--data-dir DIR]``
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from muddit_jax.data import registry, text
from muddit_jax.data.pipeline import DataConfig, make_iterator

BATCH = 32


def decode_only(source: Any, n: int) -> float:
    """Examples/s of ``Image.open(bytes).convert("RGB")`` -> array over ``n`` records."""
    from PIL import Image

    start = time.perf_counter()
    for i in range(n):
        np.asarray(Image.open(io.BytesIO(source[i % len(source)]["image"])).convert("RGB"))
    return n / (time.perf_counter() - start)


def pipeline_rate(config: DataConfig, tok: Any, n: int) -> float:
    """Examples/s of host batches after one warm-up batch (threads / workers started)."""
    with make_iterator(config, tok, process_index=0, process_count=1) as it:
        next(it)
        batches = max(1, n // config.global_batch_size)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * config.global_batch_size / (time.perf_counter() - start)


def jpeg_folder(root: Path, n: int) -> Path:
    """``n`` smooth-plus-noise 640x480 JPEGs with sidecar captions."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    for i in range(n):
        base = np.stack([(xx * (i + 1) + yy * c) % 256 for c in (1, 2, 3)], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i:05d}.jpg", quality=90)
        (root / f"{i:05d}.txt").write_text(f"a synthetic photo number {i}")
    return root


def pretokenized(root: Path, data_dir: Path, tok_path: Path, n: int) -> Path:
    from muddit_jax.cli import pretokenize as cli

    out = root / "codes"
    cli.main(["--vq", "random-tiny", "--dataset", "shapes", "--split", "train", "--out", str(out),
              "--data-dir", str(data_dir), "--resolution", "64", "--text-length", "48",
              "--tokenizer", str(tok_path), "--option", f"num_train={n}", "--batch-size", "64"])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__)
    p.add_argument("--data-dir", type=Path, default=None)
    args = p.parse_args(argv)
    n_shapes, n_jpeg, n_timed = (128, 24, 256) if args.smoke else (1024, 96, 2048)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = args.data_dir or root / "data"
        shapes_opts = {"num_train": n_shapes, "num_validation": 8, "num_test": 8}
        shapes = registry.data_source("shapes", "train", data_dir, resolution=64, **shapes_opts)
        tok = text.train_tokenizer(text.dataset_texts([shapes]), 256, root / "tok.model")
        folder = jpeg_folder(Path(tempfile.mkdtemp(dir=root)), n_jpeg)
        jpegs = registry.data_source("image_folder", "train", data_dir, source_dir=folder,
                                     config=f"bench{n_jpeg}")
        codes = pretokenized(root, data_dir, root / "tok.model", n_shapes)
        base = dict(data_dir=str(data_dir), text_length=48, global_batch_size=BATCH)
        workloads = {
            "shapes-64": (shapes, DataConfig(options=shapes_opts, resolution=64, **base)),
            "jpeg-640x480->256": (jpegs, DataConfig(
                dataset="image_folder", options={"source_dir": str(folder),
                                                 "config": f"bench{n_jpeg}"},
                resolution=256, random_crop=True, **base)),
            "codes": (shapes, DataConfig(dataset="pretokenized", options={"path": str(codes)},
                                         resolution=64, **base)),
        }
        variants = [(1, 0), (4, 0), (4, 2)]
        rows = []
        for name, (source, config) in workloads.items():
            n = n_timed if name != "jpeg-640x480->256" else n_timed // 8
            baseline = decode_only(source, n)
            rows.append({"workload": name, "path": "baseline: decode only", "threads": 1,
                         "workers": 0, "examples_per_s": baseline, "ratio": 1.0})
            for threads, workers in variants:
                cfg = DataConfig.from_dict({**config.__dict__, "read_threads": threads,
                                            "workers": workers})
                rate = pipeline_rate(cfg, tok, n)
                rows.append({"workload": name, "path": "pipeline", "threads": threads,
                             "workers": workers, "examples_per_s": rate,
                             "ratio": rate / baseline})
    columns = ["workload", "path", "threads", "workers", "examples_per_s", "ratio"]
    return common.finish("data_pipeline", args, {"examples/s": (rows, columns)},
                         batch_size=BATCH)


if __name__ == "__main__":
    main()
