"""Training text: tokenized captions, VQA question+answer sequences, tokenizer fingerprint and
SentencePiece training over a dataset's texts.

Layouts (``L`` = ``text_length``, ids as :func:`muddit_jax.models.tokenizers.pack` writes them):

* caption: ``bos caption eos pad...``; ``text_valid`` is True up to and including the eos (so it
  is right when ``pad_id == eos_id``, as in OpenAI's CLIP tokenizer);
* VQA: ``bos question answer eos pad...``; ``text_maskable`` is True from the first answer
  position on (answer, eos and padding are what the model generates), which is the prefix
  :meth:`muddit_jax.pipeline.MudditPipeline.answer` keeps fixed at inference.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from muddit_jax.data.schema import as_str
from muddit_jax.models.tokenizers import SentencePieceTokenizer, Tokenizer, pack

PROBE = ("a small red circle to the left of a large blue square.",
         "what color is the triangle? 3 yes")


def valid_mask(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """``bool [L]``: positions up to and including the first eos after position 0."""
    hits = np.flatnonzero(ids[1:] == eos_id)
    end = int(hits[0]) + 1 if hits.size else len(ids) - 1
    return np.arange(len(ids)) <= end


def pieces(tokenizer: Tokenizer, text: str, length: int) -> list[int]:
    """Token ids of ``text`` without bos/eos (at most ``length - 2``)."""
    ids = tokenizer.encode([text], length)[0]
    return ids[1 : int(valid_mask(ids, tokenizer.eos_id).sum()) - 1].tolist()


def encode_caption(tokenizer: Tokenizer, caption: str, length: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(text_ids int32 [L], text_valid bool [L])``."""
    ids = tokenizer.encode([caption], length)[0].astype(np.int32)
    return ids, valid_mask(ids, tokenizer.eos_id)


def encode_vqa(tokenizer: Tokenizer, question: str, answer: str, length: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(text_ids, text_valid, text_maskable)`` of ``bos question answer eos``; the answer is
    truncated to fit, ``None`` when the question leaves no room for one answer token."""
    q = pieces(tokenizer, question, length)
    prefix = 1 + len(q)
    room = length - 1 - prefix
    if room < 1:
        return None
    a = pieces(tokenizer, answer, length)[:room]
    ids = pack([q + a], length, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)[0]
    return ids, valid_mask(ids, tokenizer.eos_id), np.arange(length) >= prefix


def fingerprint(tokenizer: Tokenizer) -> str:
    """A short hash of the tokenizer's behaviour (special ids, vocab size, ids of probe texts)."""
    spec = [type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id,
            tokenizer.pad_id, tokenizer.encode(list(PROBE), 32).tolist()]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def record_texts(record: Mapping[str, Any]) -> Iterator[str]:
    """Captions, questions and ``question answer`` strings of one record."""
    yield from (as_str(c) for c in record.get("captions", ()))
    vqa = record.get("vqa")
    if vqa:
        for q, a in zip(vqa["question"], vqa["multiple_choice_answer"]):
            yield f"{as_str(q)} {as_str(a)}"


def dataset_texts(sources: Iterable[Sequence[Mapping[str, Any]]]) -> Iterator[str]:
    """Every non-empty text of every record of ``sources`` (random-access sources)."""
    for source in sources:
        for i in range(len(source)):
            yield from (t for t in record_texts(source[i]) if t.strip())


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_path: str | os.PathLike,
                    model_type: str = "bpe") -> SentencePieceTokenizer:
    """Train a SentencePiece model (with Muddit's ``<mask>``) on ``texts``, written atomically.

    ``model_type="bpe"`` by default: on a small closed vocabulary (the ``shapes`` templates) BPE
    merges every frequent word into one piece, while unigram pruning keeps odd sub-word splits
    (``small`` -> ``s ma ll``) that parallel decoding then mixes into non-words."""
    return SentencePieceTokenizer.train(texts, vocab_size, model_path, model_type=model_type)
