"""``vqav2``: VQA v2 open-ended questions with their 10 human answers, over local COCO images.

``source_dir`` holds the official files, directly or in ``questions/`` / ``annotations/``:

* ``v2_OpenEnded_mscoco_<subset>_questions.json``: ``{"questions": [{"image_id", "question",
  "question_id"}]}``;
* ``v2_mscoco_<subset>_annotations.json``: ``{"annotations": [{"question_id", "answers":
  [{"answer", ...}] x 10, "multiple_choice_answer", "question_type", "answer_type", ...}]}``;

and the COCO images ``<image_subset>/COCO_<image_subset>_<image_id:012d>.jpg`` under
``image_root`` (default: ``source_dir``, or its ``images/`` subfolder). Splits: ``train``
(train2014), ``validation`` (val2014) and ``test_dev`` (test-dev2015 questions over test2015
images, no answers: they are empty strings); each is built when its questions file is present.

One record per image, its questions (sorted by id) as the parallel ``vqa/*`` lists with all 10
human answers kept for the official accuracy metric; ``captions`` is empty.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from muddit_jax.data import builder, schema

# split -> (question subset, image subset, has annotations)
SUBSETS = {
    "train": ("train2014", "train2014", True),
    "validation": ("val2014", "val2014", True),
    "test_dev": ("test-dev2015", "test2015", False),
}
JSON_DIRS = ("questions", "annotations")


def questions_file(subset: str) -> str:
    return f"v2_OpenEnded_mscoco_{subset}_questions.json"


def annotations_file(subset: str) -> str:
    return f"v2_mscoco_{subset}_annotations.json"


def vqa_fields(questions: list[dict[str, Any]], answers: dict[int, dict[str, Any]]
               ) -> dict[str, list[Any]]:
    """The ``vqa/*`` lists of one image's questions (annotations looked up by question id)."""
    out: dict[str, list[Any]] = {k: [] for k in schema.VQA_FIELDS}
    for q in questions:
        ann = answers.get(q["question_id"], {})
        human = [a["answer"] for a in ann.get("answers", [])] or [""]
        out["question_id"].append(int(q["question_id"]))
        out["question"].append(q["question"])
        out["answers"].append(np.array((human * schema.NUM_ANSWERS)[: schema.NUM_ANSWERS], object))
        out["question_type"].append(ann.get("question_type", ""))
        out["answer_type"].append(ann.get("answer_type", ""))
        out["multiple_choice_answer"].append(ann.get("multiple_choice_answer", ""))
    return out


def items(questions: Path, annotations: Path | None, image_dir: Path, image_subset: str,
          counter: schema.SkipCounter) -> Iterator[builder.Item]:
    """One item per image; questions without an annotation (when expected) are counted."""
    qs = json.loads(questions.read_text(encoding="utf-8"))["questions"]
    answers: dict[int, dict[str, Any]] = {}
    if annotations is not None:
        anns = json.loads(annotations.read_text(encoding="utf-8"))["annotations"]
        answers = {a["question_id"]: a for a in anns}
    by_image: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for q in qs:
        if annotations is not None and q["question_id"] not in answers:
            counter.add("missing_annotation", str(q["question_id"]))
            continue
        by_image[q["image_id"]].append(q)
    for image_id in sorted(by_image):
        group = sorted(by_image[image_id], key=lambda q: q["question_id"])
        path = image_dir / f"COCO_{image_subset}_{image_id:012d}.jpg"
        yield builder.Item(str(image_id), path, extra={"vqa": vqa_fields(group, answers)},
                          require_caption=False)


class VQAv2(builder.Builder):
    """TFDS builder over local VQAv2 JSON + COCO images; options: ``source_dir``,
    ``image_root``, ``verify_images``."""

    name = "vqav2"
    DESCRIPTION = "VQA v2 (open-ended) read from the official local files."
    LAYOUT_HINT = "v2_OpenEnded_mscoco_*_questions.json, v2_mscoco_*_annotations.json"

    def __init__(self, *, data_dir: Any, image_root: Any = None, **kwargs: Any):
        self.image_root = None if image_root is None else Path(image_root).expanduser()
        super().__init__(data_dir=data_dir, **kwargs)

    def _features(self) -> tfds.features.FeaturesDict:
        return schema.features(vqa=True)

    def _image_dir(self, image_subset: str) -> Path:
        roots = ([self.image_root] if self.image_root
                 else [self.source_dir, self.source_dir / "images"])
        for root in roots:
            if (root / image_subset).is_dir():
                return root / image_subset
        raise FileNotFoundError(
            f"vqav2: no image folder {image_subset}/ under {[str(r) for r in roots]}; "
            "set image_root to the folder holding the COCO image folders"
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        root = self.require_source()
        splits = {}
        for split, (subset, image_subset, annotated) in SUBSETS.items():
            try:
                questions = builder.find_file(root, questions_file(subset), JSON_DIRS)
            except FileNotFoundError:
                continue
            annotations = (builder.find_file(root, annotations_file(subset), JSON_DIRS)
                           if annotated else None)
            image_dir = self._image_dir(image_subset)
            splits[split] = self._generate_examples(
                split, lambda counter, q=questions, a=annotations, d=image_dir, s=image_subset:
                items(q, a, d, s, counter))
        if not splits:
            raise FileNotFoundError(
                f"vqav2: no {questions_file('<subset>')} under {root} (or its {JSON_DIRS} "
                "subfolders)"
            )
        return splits
