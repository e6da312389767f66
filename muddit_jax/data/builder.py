"""The base of the muddit TFDS builders and the raw-file -> record step they share.

:class:`Builder` writes ArrayRecord, never downloads, checks its local ``source_dir`` up front,
builds with deterministic bytes, pickles (for grain worker processes) and saves per-split skip
counts in ``metadata.json``. :func:`records` turns :class:`Item` s found in raw files into
records, dropping (and counting) missing / undecodable images and caption-less items.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import tensorflow_datasets as tfds

from muddit_jax.data.schema import (
    SkipCounter,
    clean_captions,
    deterministic_serialization,
    probe_image,
)


def find_file(root: Path, name: str, subdirs: Iterable[str] = ()) -> Path:
    """``root/name`` or ``root/<subdir>/name``, the first that exists; else an error listing all."""
    tried = [root / name] + [root / d / name for d in subdirs]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"none of {[str(p) for p in tried]} exists")


@dataclasses.dataclass(frozen=True)
class Item:
    """One example as found in the raw files: an image (path or bytes) and its texts."""

    key: str
    image: Path | bytes
    captions: tuple[str, ...] = ()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    require_caption: bool = True


def records(items: Iterable[Item], counter: SkipCounter, verify_images: bool = True
            ) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(key, record)`` per usable item; missing / undecodable images and items without a
    non-empty caption (when one is required) are counted in ``counter`` and dropped."""
    for item in items:
        caps = clean_captions(item.captions)
        if item.require_caption and not caps:
            counter.add("empty_caption", item.key)
            continue
        if isinstance(item.image, bytes):
            data = item.image
        else:
            try:
                data = item.image.read_bytes()
            except OSError:
                counter.add("missing_image", str(item.image))
                continue
        if verify_images and probe_image(data) is None:
            counter.add("undecodable_image", item.key)
            continue
        yield item.key, {"image": data, "image_id": item.key, "captions": caps, **item.extra}


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

    def __init_subclass__(cls, **kwargs: Any):
        """Record the keyword arguments of the outermost ``__init__`` call: pickling (grain
        worker processes) re-creates a builder from them (TFDS would replay only its own)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def recording_init(self: Builder, **options: Any) -> None:
            if not hasattr(self, "_init_options"):
                self._init_options = dict(options)
            init(self, **options)

        cls.__init__ = recording_init

    def __getstate__(self) -> dict[str, Any]:
        return {"_original_state": self._init_options}

    def __init__(self, *, data_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None,
                 verify_images: bool = True, **kwargs: Any):
        if not hasattr(self, "_init_options"):
            self._init_options = dict(data_dir=data_dir, source_dir=source_dir,
                                      verify_images=verify_images, **kwargs)
        self.source_dir = None if source_dir is None else Path(source_dir).expanduser()
        self.verify_images = verify_images
        kwargs.setdefault("file_format", "array_record")
        super().__init__(data_dir=os.fspath(Path(data_dir).expanduser()), **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No code path, hence no download-checksums file: these builders never download. (TFDS's
        own lookup imports ``importlib_resources``, which it does not declare as a dependency.)"""
        return None

    def _create_builder_config(self, builder_config: Any, version: Any) -> Any:
        """Per-instance configs (``shapes``, ``image_folder``) are expected: accept them without
        TFDS's "custom data configuration" warning."""
        if isinstance(builder_config, tfds.core.BuilderConfig) and not self.BUILDER_CONFIGS:
            return builder_config
        return super()._create_builder_config(builder_config, version)

    def _features(self) -> tfds.features.FeaturesDict:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=self._features(),
            metadata=tfds.core.MetadataDict(),
        )

    def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
        """TFDS's build, with deterministic record bytes (see :func:`serialize`)."""
        with deterministic_serialization():
            super().download_and_prepare(*args, **kwargs)

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

    def _generate_examples(self, split: str, items: Any):
        """Records of ``items`` (an iterable of :class:`Item`, or a callable taking the split's
        :class:`SkipCounter` and returning one); skip counts go to the metadata at the end."""
        counter = self.skip_counter(split)
        if callable(items):
            items = items(counter)
        yield from records(items, counter, self.verify_images)
        self.finish_split(split, counter)

    def finish_split(self, split: str, counter: SkipCounter) -> None:
        """Record ``counter`` in the dataset metadata and warn once with the split's total."""
        skipped = dict(self.info.metadata.get("skipped", {}))
        skipped[split] = dict(sorted(counter.counts.items()))
        self.info.metadata["skipped"] = skipped
        counter.warn(" (build finished)")
