"""Evaluation examples from the registered datasets (``muddit_jax.data.registry``).

Turns dataset records into the evaluators' example dicts: ``caption`` (image + reference
captions), ``vqa`` (one example per question, with its 10 human answers) and ``t2i`` (the
``shapes`` first caption as the prompt + its ground-truth objects for the detector). Images are
decoded and centre-cropped to the evaluation resolution.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

from muddit_jax.data import registry
from muddit_jax.data.preprocess import load_image
from muddit_jax.data.schema import as_str

TASKS = ("caption", "vqa", "t2i")


def _records(dataset: str, split: str, limit: int | None, data_dir: Any, options: Mapping[str, Any]
             ) -> Iterator[Mapping[str, Any]]:
    source = registry.data_source(dataset, split, data_dir, **options)
    for i in range(len(source) if limit is None else min(limit, len(source))):
        yield source[i]


def _objects(rec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A ``shapes`` record's ground-truth objects as dicts."""
    objs = rec["objects"]
    return [dict(color=as_str(c), shape=as_str(s), size=as_str(z), bbox=[int(v) for v in b])
            for c, s, z, b in zip(objs["color"], objs["shape"], objs["size"], objs["bbox"])]


def _object_scale(options: Mapping[str, Any]) -> dict[str, float]:
    """``shapes``' ``object_scale`` option, which the detector needs to name sizes (1 if unset)."""
    return {"object_scale": float(options.get("object_scale", 1.0))}


def eval_examples(
    task: str,
    dataset: str,
    split: str,
    *,
    image_size: int,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """The first ``limit`` records of ``dataset/split`` as ``task`` examples, images at
    ``image_size``; ``options`` are the dataset builder's (e.g. the ``shapes`` config fields)."""
    if task not in TASKS:
        raise ValueError(f"unknown evaluation task {task!r}; expected one of {TASKS}")
    out: list[dict[str, Any]] = []
    for rec in _records(dataset, split, limit, data_dir, options):
        rid = as_str(rec["image_id"])
        if task == "t2i":
            if "objects" not in rec:
                raise ValueError(f"t2i evaluation needs object ground truth; {dataset!r} has none "
                                 "(use dataset 'shapes')")
            out.append(dict(id=rid, prompt=as_str(rec["captions"][0]), objects=_objects(rec),
                            **_object_scale(options)))
            continue
        image = load_image(rec["image"], image_size)[0]
        if task == "caption":
            ex = dict(id=rid, image=image, captions=[as_str(c) for c in rec["captions"]])
            if "objects" in rec:
                ex.update(objects=_objects(rec), **_object_scale(options))
            out.append(ex)
            continue
        vqa = rec.get("vqa") or {}
        n = len(vqa.get("question_id", []))
        types = {k: vqa.get(k) if len(vqa.get(k, [])) == n else [""] * n
                 for k in ("question_type", "answer_type")}
        for qid, q, answers, qtype, atype in zip(
            vqa.get("question_id", []), vqa.get("question", []), vqa.get("answers", []),
            types["question_type"], types["answer_type"],
        ):
            out.append(dict(id=f"{rid}/{int(qid)}", image=image, question=as_str(q),
                            answers=[as_str(a) for a in answers], question_type=as_str(qtype),
                            answer_type=as_str(atype)))
    if not out:
        raise ValueError(f"no {task} examples in {dataset}/{split} (limit={limit})")
    return out
