"""``llava``: LLaVA-style instruction data (the public JSON format) from a local folder.

A JSON file is a list of records ``{"id", "image" (path relative to ``image_root``, absent for
text-only records), "conversations": [{"from": "human" | "gpt", "value": ...}, ...]}``; the
``<image>`` placeholder of the human turn is stripped. Each human turn is paired with the gpt
turn that follows it. ``multi_turn="flatten"``: every pair is its own (question, answer);
``"prefix"``: a turn's question is the earlier turns (``question answer`` lines) followed by it.

Files: ``train.json`` / ``validation.json`` / ``test.json`` in ``source_dir`` are splits;
otherwise ``annotation`` names the file (default: the folder's only ``*.json``), read as
``train``. Images are under ``image_root`` (default ``source_dir``).

One record per conversation, its pairs as the ``vqa/*`` lists (the answer repeated to
``NUM_ANSWERS``, ``multiple_choice_answer`` = the answer), so ``task="vqa"`` reads it like
``vqav2``. Records without an image, without a gpt turn, or not in the format, and missing or
undecodable images are skipped and counted (``metadata.json``, warnings).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from muddit_jax.data import builder, schema

IMAGE_TOKEN = "<image>"
MULTI_TURN = ("flatten", "prefix")
SPLIT_FILES = {s: f"{s}.json" for s in ("train", "validation", "test")}
HUMAN, GPT = "human", "gpt"


def strip_image_token(text: str) -> str:
    """``text`` without the ``<image>`` placeholder and the blank lines around it."""
    return " ".join(line.strip() for line in text.replace(IMAGE_TOKEN, "").splitlines()
                    if line.strip())


def qa_pairs(conversations: Any, multi_turn: str = "flatten") -> list[tuple[str, str]]:
    """``(question, answer)`` pairs of one conversation (see the module docstring).

    Raises ``TypeError`` when ``conversations`` is not a list of ``{"from", "value"}`` turns.
    """
    if not isinstance(conversations, list):
        raise TypeError("conversations is not a list")
    pairs: list[tuple[str, str]] = []
    history: list[str] = []
    question: str | None = None
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise TypeError(f"bad turn {turn!r}")
        role, value = turn.get("from"), strip_image_token(turn["value"])
        if role == HUMAN:
            question = value
        elif role == GPT and question is not None and value:
            asked = " ".join([*history, question]) if multi_turn == "prefix" else question
            pairs.append((asked, value))
            history.append(f"{question} {value}")
            question = None
    return pairs


def vqa_fields(pairs: list[tuple[str, str]], first_id: int) -> dict[str, list[Any]]:
    """The ``vqa/*`` lists of one conversation's pairs (question ids from ``first_id``)."""
    return {
        "question_id": [first_id + k for k in range(len(pairs))],
        "question": [q for q, _ in pairs],
        "answers": [np.array([a] * schema.NUM_ANSWERS, object) for _, a in pairs],
        "question_type": ["instruction"] * len(pairs),
        "answer_type": ["other"] * len(pairs),
        "multiple_choice_answer": [a for _, a in pairs],
    }


def items(annotation: Path, image_root: Path, multi_turn: str,
          counter: schema.SkipCounter) -> Iterator[builder.Item]:
    """One item per usable conversation of ``annotation``; bad records are counted."""
    rows = json.loads(annotation.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ValueError(  # noqa: TRY004 - bad file content, not a programming error
            f"llava: {annotation} must hold a JSON list of records (the LLaVA format), got "
            f"{type(rows).__name__}; point annotation / source_dir at the instruction JSON")
    seen: dict[str, int] = {}
    next_id = 0
    for index, row in enumerate(rows):
        where = f"{annotation.name}[{index}]"
        if not isinstance(row, dict):
            counter.add("bad_record", where)
            continue
        try:
            pairs = qa_pairs(row.get("conversations"), multi_turn)
        except TypeError as e:
            counter.add("bad_record", f"{where}: {e}")
            continue
        if not row.get("image"):
            counter.add("no_image", where)
            continue
        if not pairs:
            counter.add("no_gpt_turn", where)
            continue
        rid = str(row.get("id", index))
        seen[rid] = seen.get(rid, 0) + 1
        key = rid if seen[rid] == 1 else f"{rid}#{seen[rid]}"
        yield builder.Item(key, image_root / str(row["image"]),
                           extra={"vqa": vqa_fields(pairs, next_id)}, require_caption=False)
        next_id += len(pairs)


class Llava(builder.Builder):
    """TFDS builder over a local LLaVA-format folder; options: ``source_dir``, ``annotation``,
    ``image_root``, ``multi_turn``, ``config``, ``verify_images``."""

    name = "llava"
    DESCRIPTION = "LLaVA-format instruction data (image + human/gpt conversations), local files."
    LAYOUT_HINT = "train.json / validation.json / test.json or one *.json in the LLaVA format"

    def __init__(self, *, data_dir: Any, annotation: str = "", image_root: Any = None,
                 multi_turn: str = "flatten", config: str = "default", **kwargs: Any):
        if multi_turn not in MULTI_TURN:
            raise ValueError(f"llava: multi_turn={multi_turn!r} is not one of {MULTI_TURN}")
        self.annotation, self.multi_turn = annotation, multi_turn
        self.image_root = None if image_root is None else Path(image_root).expanduser()
        super().__init__(data_dir=data_dir, **kwargs, config=tfds.core.BuilderConfig(
            name=f"{config}-{multi_turn}", description=f"LLaVA folder ({multi_turn})"))

    def _features(self) -> tfds.features.FeaturesDict:
        return schema.features(vqa=True)

    def annotations(self) -> dict[str, Path]:
        """split -> JSON file (see the module docstring)."""
        root = self.require_source()
        if self.annotation:
            return {"train": builder.find_file(root, self.annotation)}
        splits = {s: root / f for s, f in SPLIT_FILES.items() if (root / f).is_file()}
        if splits:
            return splits
        found = sorted(root.glob("*.json"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"llava: {root} holds {len(found)} *.json files and no {sorted(SPLIT_FILES.values())}"
                "; set the option annotation=<file name>"
            )
        return {"train": found[0]}

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        image_root = self.image_root or self.require_source()
        return {
            split: self._generate_examples(
                split, lambda counter, a=path: items(a, image_root, self.multi_turn, counter))
            for split, path in self.annotations().items()
        }
