"""The trainer's PNG artifacts sample T2I with the evaluation's sampler options."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from configs.shapes_tiny import get_config
from muddit_jax.train.artifacts import run_artifacts


class RecordingPipe:
    """Stands in for ``MudditPipeline``: records the ``generate`` options, returns flat images."""

    image_size = 32

    def __init__(self) -> None:
        self.generate_kwargs: dict[str, Any] = {}

    def generate(self, prompts, **kwargs):
        self.generate_kwargs = kwargs
        return np.full((len(prompts), 32, 32, 3), 200, np.uint8)

    def caption(self, images, **kwargs):
        return ["a red circle"] * len(images)

    def answer(self, images, questions, **kwargs):
        return ["red"] * len(images)


def test_t2i_samples_take_the_eval_sampler_options(tmp_path) -> None:
    config = get_config("smoke")
    config.data.data_dir = str(tmp_path / "data")
    config.data.options.update(num_train=8, num_validation=4, num_test=4)
    config.artifacts.update(num_prompts=2, num_images=2, guidance_scale=2.5)
    config.eval.update(guidance_schedule="decay", guidance_plausibility=0.25, sampling="top_k",
                       top_k=5, guidance_scale=9.0)
    pipe = RecordingPipe()
    out = run_artifacts(config, pipe, tmp_path / "run", step=7)
    got = pipe.generate_kwargs
    assert got["guidance_scale"] == 2.5 and got["steps"] == config.artifacts.steps
    assert (got["guidance_schedule"], got["guidance_plausibility"]) == ("decay", 0.25)
    assert (got["sampling"], got["top_k"]) == ("top_k", 5)
    assert got["seed"] == [config.eval.seed, config.eval.seed + 1]
    assert np.asarray(Image.open(out["t2i"])).shape[-1] == 3
    assert (tmp_path / "run/samples/7/understanding.png").is_file()
