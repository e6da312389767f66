"""The TFDS builder of the embedded ``shapes`` dataset (:mod:`muddit_jax.data.shapes`).

Records: the common fields (PNG ``image``, ``image_id`` = ``<split>/<index:08d>``, three
``captions``), the ``vqa/*`` lists (each single answer repeated to
:data:`~muddit_jax.data.schema.NUM_ANSWERS`), ``objects`` (shape, color, size, bbox), the
``background`` name and ``held_out`` (the image shows a held-out (colour, shape) pair).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from muddit_jax.data import builder, schema
from muddit_jax.data.shapes import (
    HELD_OUT,
    SPLITS,
    ShapesConfig,
    ShapesExample,
    encode_png,
    generate,
)


def record_id(split: str, index: int) -> str:
    """``image_id`` of example ``index`` of ``split`` (the evaluation job seeds samples by it)."""
    return f"{split}/{index:08d}"


def record_index(image_id: str) -> int:
    """The example index of a :func:`record_id` (``"test/00000042"`` -> 42)."""
    return int(image_id.rpartition("/")[2])


def to_record(example: ShapesExample, split: str, index: int) -> dict[str, Any]:
    """The TFDS record of an example (see :meth:`Shapes._features`)."""
    scene, qa = example.scene, example.qa
    return {
        "image": encode_png(example.image),
        "image_id": record_id(split, index),
        "captions": list(example.captions),
        "vqa": {
            "question_id": [index * 16 + k for k in range(len(qa))],
            "question": [q.question for q in qa],
            "answers": [np.array([q.answer] * schema.NUM_ANSWERS, dtype=object) for q in qa],
            "question_type": [q.question_type for q in qa],
            "answer_type": [q.answer_type for q in qa],
            "multiple_choice_answer": [q.answer for q in qa],
        },
        "objects": {
            "shape": [o.shape for o in scene.objects],
            "color": [o.color for o in scene.objects],
            "size": [o.size for o in scene.objects],
            "bbox": [np.array(o.bbox, np.int32) for o in scene.objects],
        },
        "background": scene.background,
        "held_out": any((o.color, o.shape) in HELD_OUT for o in scene.objects),
    }


class Shapes(builder.Builder):
    """TFDS builder of :func:`generate`; options are the :class:`ShapesConfig` fields."""

    name = "shapes"
    DESCRIPTION = "Synthetic flat-coloured shapes with captions, VQA and object ground truth."

    def __init__(self, *, data_dir: Any, config: ShapesConfig | None = None, **options: Any):
        if config is not None and not isinstance(config, ShapesConfig):
            raise TypeError(f"shapes: config must be a ShapesConfig, got {config!r}; pass its "
                            "fields (resolution, seed, num_train, ...) as options instead")
        self.shapes = config if config is not None else ShapesConfig(**options)
        super().__init__(data_dir=data_dir, config=tfds.core.BuilderConfig(
            name=self.shapes.name, description=repr(self.shapes)))

    def _features(self) -> tfds.features.FeaturesDict:
        text = tfds.features.Text()
        return schema.features(
            vqa=True,
            objects=tfds.features.Sequence({
                "shape": text, "color": text, "size": text,
                "bbox": tfds.features.Tensor(shape=(4,), dtype=np.int32),
            }),
            background=text,
            held_out=np.bool_,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        for index in range(self.shapes.num_examples(split)):
            yield index, to_record(generate(self.shapes, split, index), split, index)
