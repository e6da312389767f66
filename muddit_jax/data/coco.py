"""``coco_captions``: MS-COCO images with all their human captions, from the official local layout.

Configs and what ``source_dir`` must hold:

* ``2014`` / ``2017``: ``annotations/captions_{train,val}<year>.json`` (``{"images": [{"id",
  "file_name", ...}], "annotations": [{"image_id", "caption", ...}]}``) and the image folders
  ``train<year>/`` / ``val<year>/``; splits ``train`` and ``validation``.
* ``karpathy``: Karpathy's ``dataset_coco.json`` (in ``source_dir``, ``annotations/`` or
  ``karpathy/``): ``{"images": [{"filepath": "val2014", "filename", "cocoid", "split",
  "sentences": [{"raw"}]}]}`` with the 2014 image folders; splits ``train`` (train + restval),
  ``validation`` (val) and ``test``.

A split is built when its annotation file is present (an error lists what was looked for when
none is). Every caption is kept (5 for nearly all images, a few have 6-7); ``image_id`` is the
COCO id. Images that are missing or undecodable and images without captions are skipped and
counted (``metadata.json``).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any, Iterator

import tensorflow_datasets as tfds

from muddit_jax.data import builder, schema

KARPATHY_FILE = "dataset_coco.json"
KARPATHY_SPLITS = {"train": ("train", "restval"), "validation": ("val",), "test": ("test",)}
OFFICIAL_SPLITS = {"train": "train", "validation": "val"}


def official_items(annotations: Path, image_dir: Path) -> Iterator[builder.Item]:
    """Items of one official ``captions_*.json``, ordered by image id."""
    data = json.loads(annotations.read_text(encoding="utf-8"))
    captions: dict[int, list[str]] = collections.defaultdict(list)
    for ann in data["annotations"]:
        captions[ann["image_id"]].append(ann["caption"])
    for image in sorted(data["images"], key=lambda im: im["id"]):
        yield builder.Item(str(image["id"]), image_dir / image["file_name"],
                          tuple(captions.get(image["id"], ())))


def karpathy_items(path: Path, root: Path, splits: tuple[str, ...]) -> Iterator[builder.Item]:
    """Items of ``dataset_coco.json`` whose ``split`` is in ``splits``, ordered by COCO id."""
    data = json.loads(path.read_text(encoding="utf-8"))
    chosen = [im for im in data["images"] if im["split"] in splits]
    for image in sorted(chosen, key=lambda im: im["cocoid"]):
        yield builder.Item(str(image["cocoid"]), root / image["filepath"] / image["filename"],
                          tuple(s["raw"] for s in image["sentences"]))


class CocoCaptions(builder.Builder):
    """TFDS builder over a local COCO tree; options: ``source_dir``, ``config``,
    ``verify_images``."""

    name = "coco_captions"
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=f"COCO captions ({n})")
                       for n in ("2014", "2017", "karpathy")]
    DESCRIPTION = "MS-COCO captions read from the official local layout."
    LAYOUT_HINT = "annotations/captions_*.json + image folders, or dataset_coco.json (Karpathy)"

    def __init__(self, *, data_dir: Any, config: str = "2014", **kwargs: Any):
        names = [c.name for c in self.BUILDER_CONFIGS]
        if config not in names:
            raise ValueError(f"coco_captions: config={config!r} is not one of {names}")
        super().__init__(data_dir=data_dir, config=config, **kwargs)

    def _features(self) -> tfds.features.FeaturesDict:
        return schema.features()

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        root = self.require_source()
        config = self.builder_config.name
        if config == "karpathy":
            path = builder.find_file(root, KARPATHY_FILE, ("annotations", "karpathy"))
            return {split: self._generate_examples(split, karpathy_items(path, root, names))
                    for split, names in KARPATHY_SPLITS.items()}
        splits = {}
        for split, sub in OFFICIAL_SPLITS.items():
            annotations = root / "annotations" / f"captions_{sub}{config}.json"
            if annotations.is_file():
                items = official_items(annotations, self.require_source(f"{sub}{config}"))
                splits[split] = self._generate_examples(split, items)
        if not splits:
            raise FileNotFoundError(
                f"coco_captions: no annotations/captions_{{train,val}}{config}.json under {root}"
            )
        return splits
