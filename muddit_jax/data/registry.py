"""Dataset names -> TFDS builders, and the random-access sources the input pipeline reads.

``shapes``, ``coco_captions``, ``vqav2``, ``image_folder`` and ``llava`` are built (once) into
``data_dir/<name>/<config>/<version>/`` as ArrayRecord; ``pretokenized`` reads a
``muddit-pretokenize`` output folder (option ``path``). Options are each builder's keyword
arguments (e.g. ``source_dir``, ``config``, the :class:`~muddit_jax.data.shapes.ShapesConfig`
fields). Building is single-writer: in a multi-host run prepare the dataset first
(``muddit-pretokenize --prepare-only ...`` or :func:`prepare`) or let process 0 do it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import tensorflow_datasets as tfds

from muddit_jax.data.builder import Builder
from muddit_jax.data.coco import CocoCaptions
from muddit_jax.data.folder import ImageFolder
from muddit_jax.data.llava import Llava
from muddit_jax.data.shapes_tfds import Shapes
from muddit_jax.data.vqav2 import VQAv2

BUILDERS: dict[str, type[Builder]] = {
    "shapes": Shapes,
    "coco_captions": CocoCaptions,
    "vqav2": VQAv2,
    "image_folder": ImageFolder,
    "llava": Llava,
}
PRETOKENIZED = "pretokenized"
DATASETS = (*BUILDERS, PRETOKENIZED)
DATA_DIR_ENV = "MUDDIT_DATA_DIR"


def default_data_dir() -> str:
    """``$MUDDIT_DATA_DIR`` or ``~/muddit_data``."""
    return os.environ.get(DATA_DIR_ENV, str(Path("~/muddit_data").expanduser()))


def get_builder(name: str, data_dir: str | os.PathLike | None = None,
                **options: Any) -> Builder:
    """The TFDS builder of dataset ``name`` (nothing is built yet)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return BUILDERS[name](data_dir=data_dir or default_data_dir(), **options)


def prepare(name: str, data_dir: str | os.PathLike | None = None, **options: Any) -> Builder:
    """Build dataset ``name`` unless it already is; returns its builder."""
    builder = get_builder(name, data_dir, **options)
    if not builder.is_prepared:
        tfds.disable_progress_bar()
        builder.download_and_prepare()
    return builder


def pretokenized_builder(path: str | os.PathLike) -> tfds.core.DatasetBuilder:
    """The read-only TFDS builder of a ``muddit-pretokenize`` output folder."""
    path = Path(path).expanduser()
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a finished muddit-pretokenize output (no dataset_info.json); run "
            "muddit-pretokenize --out " + str(path) + " for every split first"
        )
    return tfds.builder_from_directory(os.fspath(path))


@dataclasses.dataclass
class FieldSource:
    """A TFDS data source that decodes only ``fields`` of each record.

    TFDS's numpy decoding costs ~10x more than reading the bytes when records carry large ragged
    fields the pipeline does not use (``shapes``' objects and VQA lists), so the input pipeline
    reads through this. Picklable (grain worker processes).
    """

    source: Any  # a TFDS data source (its raw-bytes ``data_source`` is read)
    fields: tuple[str, ...]

    def __post_init__(self) -> None:
        features = self.source.dataset_info.features
        missing = [f for f in self.fields if f not in features]
        if missing:
            raise ValueError(f"{self.source.dataset_info.name} records have no field(s) {missing};"
                             f" they have {sorted(features)}")
        self._features = tfds.features.FeaturesDict({f: features[f] for f in self.fields})

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._features.deserialize_example_np(self.source.data_source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        raw = self.source.data_source.__getitems__(indices)
        return [self._features.deserialize_example_np(r) for r in raw]

    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source, "fields": self.fields}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


def data_source(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                build: bool = True, fields: Sequence[str] | None = None,
                **options: Any) -> Sequence[Mapping[str, Any]]:
    """A random-access source (``len`` + ``__getitem__``) of ``split`` of dataset ``name``.

    ``build=False`` fails fast (naming the folder) instead of building a missing dataset.
    ``split`` accepts TFDS slicing (``"train[:90%]"``). ``fields`` restricts decoding to those
    top-level fields (:class:`FieldSource`).
    """
    if name == PRETOKENIZED:
        if "path" not in options:
            raise ValueError("dataset 'pretokenized' needs the option path=<pretokenize --out>")
        builder = pretokenized_builder(options["path"])
    elif build:
        builder = prepare(name, data_dir, **options)
    else:
        builder = get_builder(name, data_dir, **options)
        if not builder.is_prepared:
            raise FileNotFoundError(
                f"dataset {name!r} is not built at {builder.data_dir}; build it first "
                f"(muddit-pretokenize --prepare-only --dataset {name} ...)"
            )
    splits = sorted(builder.info.splits)
    base = split.split("[", 1)[0]
    if base not in splits:
        raise ValueError(f"dataset {name!r} has no split {base!r}; available: {splits}")
    source = builder.as_data_source(split)
    return source if fields is None else FieldSource(source, tuple(fields))
