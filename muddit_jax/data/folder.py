"""``image_folder``: user image-caption data in one of three layouts.

* ``sidecar``: images anywhere under the folder, each captioned by a same-stem ``.txt`` file;
* ``jsonl``: ``metadata.jsonl`` (or the folder's only ``*.jsonl``), one JSON object per line
  naming the image (``file_name`` | ``image`` | ``path``, relative to the manifest) and its text
  (``text`` | ``caption`` | ``captions``, a string or a list);
* ``webdataset``: ``*.tar`` shards where adjacent members sharing a key (the member path up to
  the first ``.`` of its basename) form one example: an image (``jpg``/``jpeg``/``png``/``webp``)
  plus a ``txt`` / ``caption`` file or a ``json`` with ``caption`` | ``text``.

``layout="auto"`` picks ``webdataset`` if the folder holds ``*.tar``, else ``jsonl`` if it holds
a ``*.jsonl``, else ``sidecar``. Splits: each of ``train/``, ``validation/``, ``test/`` present
under ``source_dir`` is a split (same layout rules inside); otherwise everything is ``train``.
Keys (``image_id``) are paths relative to the split folder (``<shard>.tar/<key>`` for tars).
Missing or undecodable images, empty captions and unreadable manifest lines / tar shards are
skipped and counted (``metadata.json``). ``config`` names the TFDS config (default ``default``):
give each user dataset its own.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any, Iterator

import tensorflow_datasets as tfds

from muddit_jax.data import builder, schema

LAYOUTS = ("auto", "sidecar", "jsonl", "webdataset")
SPLIT_DIRS = ("train", "validation", "test")
IMAGE_KEYS, TEXT_KEYS = ("file_name", "image", "path"), ("text", "caption", "captions")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TAR_TEXT_EXTS = ("txt", "caption")


def detect_layout(folder: Path) -> str:
    if any(folder.glob("*.tar")):
        return "webdataset"
    if any(folder.glob("*.jsonl")):
        return "jsonl"
    return "sidecar"


def _texts(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value or ())


def sidecar_items(folder: Path, counter: schema.SkipCounter) -> Iterator[builder.Item]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in schema.IMAGE_EXTENSIONS)
    for path in images:
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8") if txt.is_file() else ""
        yield builder.Item(path.relative_to(folder).as_posix(), path, (caption,))


def jsonl_items(folder: Path, counter: schema.SkipCounter) -> Iterator[builder.Item]:
    manifests = sorted(folder.glob("*.jsonl"))
    manifest = folder / "metadata.jsonl"
    if not manifest.is_file():
        if len(manifests) != 1:
            raise FileNotFoundError(
                f"image_folder: {folder} has no metadata.jsonl and {len(manifests)} other *.jsonl "
                "files; name the manifest metadata.jsonl"
            )
        manifest = manifests[0]
    for lineno, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = next(row[k] for k in IMAGE_KEYS if k in row)
        except (ValueError, StopIteration, TypeError):
            counter.add("bad_manifest_line", f"{manifest}:{lineno}")
            continue
        text = next((row[k] for k in TEXT_KEYS if k in row), "")
        yield builder.Item(str(name), manifest.parent / str(name), _texts(text))


def _tar_example(key: str, members: dict[str, bytes]) -> builder.Item | None:
    image = next((members[e] for e in TAR_IMAGE_EXTS if e in members), None)
    if image is None:
        return None
    text: tuple[str, ...] = ()
    for ext in TAR_TEXT_EXTS:
        if ext in members:
            text = (members[ext].decode("utf-8", errors="replace"),)
            break
    else:
        if "json" in members:
            try:
                meta = json.loads(members["json"])
                text = _texts(next((meta[k] for k in TEXT_KEYS if k in meta), ""))
            except (ValueError, AttributeError):
                text = ()
    return builder.Item(key, image, text)


def webdataset_items(folder: Path, counter: schema.SkipCounter) -> Iterator[builder.Item]:
    for shard in sorted(folder.glob("*.tar")):
        key, members = None, {}
        try:
            with tarfile.open(shard, "r:*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    parent, _, base = info.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    this = f"{shard.name}/{parent + '/' if parent else ''}{stem}"
                    if this != key and key is not None:
                        yield from _emit(key, members, counter)
                        members = {}
                    key = this
                    members[ext.lower()] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError) as e:
            counter.add("bad_tar_shard", f"{shard}: {e}")
        if key is not None:
            yield from _emit(key, members, counter)


def _emit(key: str, members: dict[str, bytes], counter: schema.SkipCounter
          ) -> Iterator[builder.Item]:
    item = _tar_example(key, members)
    if item is None:
        counter.add("missing_image", key)
    else:
        yield item


READERS = {"sidecar": sidecar_items, "jsonl": jsonl_items, "webdataset": webdataset_items}


class ImageFolder(builder.Builder):
    """TFDS builder over a user folder; options: ``source_dir``, ``layout``, ``config``,
    ``verify_images``."""

    name = "image_folder"
    DESCRIPTION = "User images with captions (sidecar .txt, JSONL manifest or WebDataset tars)."
    LAYOUT_HINT = "images + .txt captions, a metadata.jsonl, or WebDataset *.tar shards"

    def __init__(self, *, data_dir: Any, layout: str = "auto", config: str = "default",
                 **kwargs: Any):
        if layout not in LAYOUTS:
            raise ValueError(f"image_folder: layout={layout!r} is not one of {LAYOUTS}")
        self.layout = layout
        super().__init__(data_dir=data_dir, **kwargs, config=tfds.core.BuilderConfig(
            name=config, description=f"user folder ({layout})"))

    def _features(self) -> tfds.features.FeaturesDict:
        return schema.features()

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        root = self.require_source()
        folders = {s: root / s for s in SPLIT_DIRS if (root / s).is_dir()} or {"train": root}
        splits = {}
        for split, folder in folders.items():
            layout = detect_layout(folder) if self.layout == "auto" else self.layout
            reader = READERS[layout]
            splits[split] = self._generate_examples(
                split, lambda counter, r=reader, f=folder: r(f, counter))
        return splits
