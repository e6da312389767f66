"""The record layout every muddit dataset shares, and the TFDS builder base class.

Owns the common TFDS features (``image`` = the encoded file bytes as found on disk, ``image_id``,
``captions``, optional flattened VQA fields), the :class:`Builder` base (ArrayRecord output, a
local ``source_dir`` checked up front, skip counts saved in ``metadata.json``), the
:class:`SkipCounter` used at build and read time, and small helpers (bytes -> str, image probing,
atomic file writes).

TensorFlow is not needed: TFDS builds and reads ArrayRecord datasets without it as long as no
feature needs TF to encode. ``tfds.features.Image`` and nested ragged sequences do, so images are
stored as raw encoded bytes (decoded with Pillow by the input pipeline) and VQA fields are
parallel top-level sequences with exactly :data:`NUM_ANSWERS` answers per question.
"""

from __future__ import annotations

import collections
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import tensorflow_datasets as tfds

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


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the muddit TFDS builders (not registered in TFDS's global catalog).

    Writes ArrayRecord (random access, what grain reads). ``source_dir`` is the local folder a
    builder reads raw files from (``None`` for generated data); it is only needed to build.
    Skip counts per split end up in ``metadata.json`` under ``"skipped"``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    DESCRIPTION = ""
    LAYOUT_HINT = "the raw files"  # what source_dir must hold, for error messages

    def __init__(self, *, data_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None,
                 **kwargs: Any):
        self.source_dir = None if source_dir is None else Path(source_dir).expanduser()
        kwargs.setdefault("file_format", "array_record")
        super().__init__(data_dir=os.fspath(Path(data_dir).expanduser()), **kwargs)

    def _features(self) -> tfds.features.FeaturesDict:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=self._features(),
            metadata=tfds.core.MetadataDict(),
        )

    @property
    def is_prepared(self) -> bool:
        return (Path(self.data_dir) / "dataset_info.json").is_file()

    def require_source(self, *parts: str) -> Path:
        """``source_dir / parts`` or a clear error naming the missing path and the option."""
        if self.source_dir is None:
            raise ValueError(f"dataset {self.name!r} needs source_dir=<folder with the raw files>")
        path = self.source_dir.joinpath(*parts)
        if not path.exists():
            raise FileNotFoundError(
                f"{self.name}: {path} does not exist; set source_dir to the folder with "
                f"{self.LAYOUT_HINT}"
            )
        return path

    def skip_counter(self, split: str) -> SkipCounter:
        return SkipCounter(f"{self.name}/{split}")

    def finish_split(self, split: str, counter: SkipCounter) -> None:
        """Record ``counter`` in the dataset metadata and warn once with the split's total."""
        skipped = dict(self.info.metadata.get("skipped", {}))
        skipped[split] = dict(sorted(counter.counts.items()))
        self.info.metadata["skipped"] = skipped
        counter.warn(" (build finished)")
