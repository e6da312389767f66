"""The embedded ``shapes`` VQA pairs written as a LLaVA-format folder (read by ``llava``).

Layout under ``out_dir``: ``<split>.json`` (one record per image, its questions as one multi-turn
conversation, ``<image>`` in the first human turn) and ``images/<split>/<index:08d>.png`` (the
same PNG bytes the ``shapes`` builder stores). Every file is written atomically; the content is a
pure function of the :class:`~muddit_jax.data.shapes.ShapesConfig`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from muddit_jax.data.llava import GPT, HUMAN, IMAGE_TOKEN
from muddit_jax.data.shapes import (
    SPLITS,
    ShapesConfig,
    ShapesExample,
    encode_png,
    generate,
)
from muddit_jax.files import write_bytes_atomic, write_json_atomic


def llava_record(example: ShapesExample, rid: str, image: str) -> dict[str, Any]:
    """One LLaVA record: the example's questions as alternating human / gpt turns."""
    turns = []
    for k, qa in enumerate(example.qa):
        question = f"{IMAGE_TOKEN}\n{qa.question}" if k == 0 else qa.question
        turns += [{"from": HUMAN, "value": question}, {"from": GPT, "value": qa.answer}]
    return {"id": rid, "image": image, "conversations": turns}


def write_shapes_llava(out_dir: str | os.PathLike, config: ShapesConfig | None = None,
                       splits: Sequence[str] = SPLITS, limit: int | None = None
                       ) -> dict[str, int]:
    """Write ``splits`` (at most ``limit`` images each) under ``out_dir``; returns the counts.

    ``config`` defaults to ``ShapesConfig()`` (the ``shapes`` dataset's default build).
    """
    config = ShapesConfig() if config is None else config
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"write_shapes_llava: splits {bad} are not shapes splits {SPLITS}")
    out = Path(out_dir).expanduser()
    counts = {}
    for split in splits:
        n = config.num_examples(split) if limit is None else min(limit, config.num_examples(split))
        records = []
        for index in range(n):
            example = generate(config, split, index)
            image = f"images/{split}/{index:08d}.png"
            write_bytes_atomic(encode_png(example.image), out / image)
            records.append(llava_record(example, f"{split}/{index:08d}", image))
        write_json_atomic(records, out / f"{split}.json")
        counts[split] = n
    return counts
