"""Record -> training example: decode, resize + crop, [0, 1] pixels, micro-conditions, text.

:class:`Preprocessor` is the picklable per-example transform the pipeline maps over
``(position, (record_index, record))``. Its randomness (crop offset, which caption / question)
comes from ``default_rng([seed, position])``, so an example depends only on its position in the
global stream, never on threads, workers or the host count. A record that cannot be used comes
back as :class:`Skipped` (the iterator counts it and moves on) instead of raising.

Images: the shorter side is resized to ``resolution`` (antialiased bilinear, torchvision's
default that aMUSEd / Meissonic training uses, 2x cheaper than bicubic; JPEGs are decoded at the
smallest DCT scale that is still large enough), then a ``resolution`` square is cropped:
centred, or at a random offset when ``random_crop``. An image already at the target size is
used as is. No flips: captions state left/right relations. ``micro_conds`` = (original width,
original height, crop left, crop top (in resized pixels), aesthetic score), as
:mod:`muddit_jax.diffusion.loss` expects.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Mapping

import numpy as np

from muddit_jax.data import text
from muddit_jax.data.schema import as_str, clean_captions
from muddit_jax.models.tokenizers import Tokenizer

TASKS = ("caption", "vqa")
DEFAULT_AESTHETIC = 6.0
MICRO_CONDS = ("orig_width", "orig_height", "crop_left", "crop_top", "aesthetic_score")


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A dropped record: why, and its index in the source."""

    reason: str
    index: int


class ImageError(ValueError):
    """The bytes are not a decodable image."""


def load_image(data: bytes, resolution: int, rng: np.random.Generator | None = None
               ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Decode + resize + crop -> ``(uint8 [R, R, 3], (orig_w, orig_h, crop_left, crop_top))``.

    ``rng=None`` crops the centre. Raises :class:`ImageError` for undecodable bytes.
    """
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        if img.format == "JPEG" and size != (w, h):
            img.draft("RGB", size)
        img = img.convert("RGB")
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        pixels = np.asarray(img, np.uint8)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from e
    ex, ey = size[0] - resolution, size[1] - resolution
    if rng is None:
        left, top = ex // 2, ey // 2
    else:
        left, top = int(rng.integers(ex + 1)), int(rng.integers(ey + 1))
    return pixels[top : top + resolution, left : left + resolution], (w, h, left, top)


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """``uint8`` -> ``float32`` in [0, 1]."""
    return pixels.astype(np.float32) / 255.0


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """``(position, (index, record)) -> example dict | Skipped`` (see the module docstring).

    Example keys: ``images`` uint8 [R, R, 3] (the iterator turns batches into [0, 1] floats) or
    ``image_ids`` int32 [h, w] for pre-tokenized records, ``text_ids`` int32 [L],
    ``text_valid`` bool [L], ``text_maskable`` bool [L] (VQA only), ``micro_conds`` float32 [5],
    ``index`` int32 (the record's index in the source).
    """

    resolution: int
    text_length: int
    tokenizer: Tokenizer | None
    task: str = "caption"
    seed: int = 0
    random_crop: bool = False
    aesthetic_score: float = DEFAULT_AESTHETIC
    question_types: tuple[str, ...] = ()  # VQA: draw only these ``question_type`` s (() = all)

    def fields(self, pretokenized: bool) -> tuple[str, ...]:
        """The record fields this preprocessor reads."""
        image = ("codes", "micro_conds", "index") if pretokenized else ("image",)
        if self.task == "vqa":
            return (*image, "vqa")
        return (*image, "text_ids", "text_lengths") if pretokenized else (*image, "captions")

    def __call__(self, position: int, item: tuple[int, Mapping[str, Any]]) -> dict | Skipped:
        index, record = item
        rng = np.random.default_rng([self.seed, position])
        out = self._text(record, rng)
        if isinstance(out, str):
            return Skipped(out, index)
        if "codes" in record:
            out["image_ids"] = np.asarray(record["codes"], np.int32)
            out["micro_conds"] = np.asarray(record["micro_conds"], np.float32)
        else:
            try:
                pixels, micro = load_image(record["image"], self.resolution,
                                           rng if self.random_crop else None)
            except ImageError:
                return Skipped("undecodable_image", index)
            out["images"] = pixels
            out["micro_conds"] = np.array([*micro, self.aesthetic_score], np.float32)
        out["index"] = np.int32(record.get("index", index))
        return out

    def _text(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict | str:
        """Text arrays, or the skip reason."""
        if self.task == "vqa":
            vqa = record["vqa"]
            if not len(vqa["question"]):
                return "no_question"
            choices = np.arange(len(vqa["question"]))
            if self.question_types:
                kinds = [as_str(t) for t in vqa["question_type"]]
                choices = choices[[k in self.question_types for k in kinds]]
                if not len(choices):
                    return "no_question_of_type"
            q = int(choices[rng.integers(len(choices))])
            answer = as_str(vqa["multiple_choice_answer"][q]).strip()
            if not answer:
                return "empty_answer"
            enc = text.encode_vqa(self.tokenizer, as_str(vqa["question"][q]), answer,
                                  self.text_length)
            if enc is None:
                return "question_too_long"
            ids, valid, maskable = enc
            return {"text_ids": ids, "text_valid": valid, "text_maskable": maskable}
        if "text_ids" in record:  # pre-tokenized: one row (and length) per non-empty caption
            rows = np.asarray(record["text_ids"], np.int32)
            if not len(rows):
                return "empty_caption"
            row = int(rng.integers(len(rows)))
            valid = np.arange(rows.shape[1]) < int(record["text_lengths"][row])
            return {"text_ids": rows[row], "text_valid": valid}
        captions = clean_captions(record["captions"])
        if not captions:
            return "empty_caption"
        ids, valid = text.encode_caption(
            self.tokenizer, captions[int(rng.integers(len(captions)))], self.text_length
        )
        return {"text_ids": ids, "text_valid": valid}
