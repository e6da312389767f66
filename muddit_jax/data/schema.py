"""The record layout every muddit dataset shares, and how records are written.

Owns the common TFDS features (``image`` = the encoded file bytes as found on disk, ``image_id``,
``captions``, optional flattened VQA fields), deterministic record serialization, the
:class:`SkipCounter` used at build and read time, and small helpers (bytes -> str, image probing,
atomic file writes). The builder base class is :mod:`muddit_jax.data.builder`.

TensorFlow is not needed: TFDS builds and reads ArrayRecord datasets without it as long as no
feature needs TF to encode. ``tfds.features.Image`` and nested ragged sequences do, so images are
stored as raw encoded bytes (decoded with Pillow by the input pipeline) and VQA fields are
parallel top-level sequences with exactly :data:`NUM_ANSWERS` answers per question.
"""

from __future__ import annotations

import collections
import contextlib
import io
import warnings
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer

from muddit_jax.files import FILE_MODE, write_bytes_atomic  # noqa: F401  (re-exported)

NUM_ANSWERS = 10  # VQAv2 keeps 10 human answers; single-answer datasets repeat theirs 10 times
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VQA_FIELDS = ("question_id", "question", "answers", "question_type", "answer_type",
              "multiple_choice_answer")


class SkippedExamplesWarning(UserWarning):
    """Some examples were dropped (undecodable image, empty caption, missing file, ...)."""


def encoded_bytes() -> tfds.features.Tensor:
    """A scalar bytes feature (an encoded image file, stored as-is)."""
    return tfds.features.Tensor(shape=(), dtype=np.object_)


def vqa_features() -> dict[str, Any]:
    """Flattened per-image VQA lists: ``vqa/<field>[q]``; ``answers`` is ``[q, NUM_ANSWERS]``."""
    text = tfds.features.Sequence(tfds.features.Text())
    return {
        "question_id": tfds.features.Sequence(np.int64),
        "question": text,
        "answers": tfds.features.Sequence(
            tfds.features.Tensor(shape=(NUM_ANSWERS,), dtype=np.object_)
        ),
        "question_type": text,
        "answer_type": text,
        "multiple_choice_answer": text,
    }


def features(*, vqa: bool = False, **extra: Any) -> tfds.features.FeaturesDict:
    """The common features (``image``, ``image_id``, ``captions``) plus ``vqa`` and ``extra``."""
    spec: dict[str, Any] = {
        "image": encoded_bytes(),
        "image_id": tfds.features.Text(),
        "captions": tfds.features.Sequence(tfds.features.Text()),
    }
    if vqa:
        spec["vqa"] = vqa_features()
    spec.update(extra)
    return tfds.features.FeaturesDict(spec)


def serialize(serializer: example_serializer.ExampleSerializer, example: Any) -> bytes:
    """``tf.train.Example`` bytes with map entries in key order (protobuf's default map order
    follows a per-process hash seed, which would make files differ from run to run)."""
    return serializer.get_tf_example(example).SerializeToString(deterministic=True)


@contextlib.contextmanager
def deterministic_serialization() -> Iterator[None]:
    """Make TFDS's writer use :func:`serialize` while the block runs (a scoped patch: TFDS has
    no option for it), so a build gives the same bytes in every process."""
    cls = example_serializer.ExampleSerializer
    original = cls.serialize_example
    cls.serialize_example = serialize
    try:
        yield
    finally:
        cls.serialize_example = original


class RecordEncoder:
    """Record -> deterministic serialized bytes, for files written outside TFDS's writer."""

    def __init__(self, features_dict: tfds.features.FeaturesDict):
        self.features = features_dict
        self.serializer = example_serializer.ExampleSerializer(features_dict.get_serialized_info())

    def __call__(self, record: Mapping[str, Any]) -> bytes:
        return serialize(self.serializer, self.features.encode_example(record))


def as_str(x: Any) -> str:
    """TFDS text (bytes) or str -> str."""
    return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


def probe_image(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` if ``data`` decodes as an image, else ``None``.

    JPEGs are decoded at 1/8 scale (``draft``), which still reads every entropy-coded block, so a
    corrupt or truncated file is caught at a fraction of the full decode cost.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
        return size
    except Exception:  # noqa: BLE001 - Pillow raises many types for bad files
        return None


def clean_captions(captions: Iterable[Any]) -> list[str]:
    """Stripped, non-empty captions."""
    return [c for c in (as_str(x).strip() for x in captions) if c]


class SkipCounter:
    """Counts dropped examples by reason and warns (``SkippedExamplesWarning``) with the count.

    Warns on the 1st, 2nd, 4th, 8th, ... skip so a bad dataset is visible without flooding logs.
    """

    def __init__(self, where: str, counts: dict[str, int] | None = None):
        self.where = where
        self.counts: collections.Counter[str] = collections.Counter(counts or {})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        n = self.total
        if n & (n - 1) == 0:
            self.warn(f" (latest: {reason}{': ' + detail if detail else ''})")

    def warn(self, suffix: str = "") -> None:
        if self.total:
            warnings.warn(
                f"{self.where}: skipped {self.total} example(s) so far {dict(self.counts)}{suffix}",
                SkippedExamplesWarning,
                stacklevel=3,
            )
