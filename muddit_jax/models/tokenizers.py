"""Text tokenizers behind one small interface: a trainable SentencePiece model and CLIP's BPE.

Both turn a batch of strings into ``int32`` ids ``[b, max_length]`` laid out as
``bos, tokens..., eos, pad...`` (tokens truncated to ``max_length - 2``) and back, and expose
``pad_id``, ``bos_id``, ``eos_id``, ``mask_id`` (Muddit's ``<mask>`` text token, ``None`` if
absent) and ``vocab_size`` (rows the text encoder's token table needs).

* :class:`SentencePieceTokenizer`: trained in-process from an iterator of strings (from-scratch
  runs); fixed special layout ``pad 0, unk 1, bos 2, eos 3, <mask> 4``.
* :class:`CLIPTokenizer`: OpenAI CLIP's byte-level BPE read from a transformers/diffusers
  ``tokenizer/`` folder (``vocab.json`` + ``merges.txt``), pure Python, matching
  ``transformers.CLIPTokenizer`` ids.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from muddit_jax.files import write_bytes_atomic

MASK_TOKEN = "<mask>"


class Tokenizer(Protocol):
    """What the data pipeline and samplers rely on."""

    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int | None
    vocab_size: int

    def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray: ...

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]: ...


def pack(
    token_ids: Sequence[Sequence[int]], max_length: int, bos: int, eos: int, pad: int
) -> np.ndarray:
    """``[bos] + ids[: max_length - 2] + [eos]``, right-padded: ``int32 [b, max_length]``."""
    if max_length < 2:
        raise ValueError(f"max_length must leave room for bos and eos, got {max_length}")
    out = np.full((len(token_ids), max_length), pad, np.int32)
    for row, ids in enumerate(token_ids):
        seq = [bos, *list(ids)[: max_length - 2], eos]
        out[row, : len(seq)] = seq
    return out


def _rows(ids: Any) -> list[list[int]]:
    """``[b, l]`` array-like (or one ``[l]`` sequence) -> list of int lists."""
    arr = np.asarray(ids)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"expected ids of shape [b, l], got {arr.shape}")
    return [[int(i) for i in row] for row in arr]


# ---------------------------------------------------------------------------------------------
# SentencePiece


class SentencePieceTokenizer:
    """A SentencePiece model with reserved ``pad 0, unk 1, bos 2, eos 3`` and ``<mask>`` (4)."""

    PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.pad_id, self.bos_id = self.sp.pad_id(), self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        mask = self.sp.piece_to_id(MASK_TOKEN)
        self.mask_id: int | None = None if mask == self.sp.unk_id() else mask
        self.vocab_size = self.sp.get_piece_size()
        if min(self.pad_id, self.bos_id, self.eos_id) < 0:
            raise ValueError(
                "the SentencePiece model lacks a pad, bos or eos id; train it with "
                "SentencePieceTokenizer.train()"
            )

    @classmethod
    def load(cls, model_path: str | os.PathLike) -> "SentencePieceTokenizer":
        """Load a ``.model`` file written by :meth:`train`."""
        return cls(Path(model_path).read_bytes())

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        model_path: str | os.PathLike,
        *,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        byte_fallback: bool = False,
    ) -> "SentencePieceTokenizer":
        """Train on ``texts`` in-process and write ``model_path`` atomically.

        Deterministic: one training thread and no sentence sampling, so the same corpus gives the
        same model bytes. ``vocab_size`` is an upper bound (a tiny corpus may yield fewer pieces).
        """
        import sentencepiece as spm

        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=(t for t in texts if t.strip()),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            pad_id=cls.PAD_ID,
            unk_id=cls.UNK_ID,
            bos_id=cls.BOS_ID,
            eos_id=cls.EOS_ID,
            user_defined_symbols=[MASK_TOKEN],
            hard_vocab_limit=False,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
        write_bytes_atomic(buf.getvalue(), Path(model_path))
        return cls(buf.getvalue())

    def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        """Texts -> ``int32 [b, max_length]`` (``bos, pieces..., eos, pad...``)."""
        # one call per string: a list argument costs ~25x more per text in sentencepiece
        pieces = [self.sp.encode(t, out_type=int) for t in texts]
        return pack(pieces, max_length, self.bos_id, self.eos_id, self.pad_id)

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]:
        """``[b, l]`` ids -> texts; drops pad/bos/eos/``<mask>`` when ``skip_special_tokens``."""
        skip = {self.pad_id, self.bos_id, self.eos_id, self.mask_id}
        if not skip_special_tokens:
            skip = set()
        return [self.sp.decode([i for i in row if i not in skip]) for row in _rows(ids)]


# ---------------------------------------------------------------------------------------------
# CLIP byte-level BPE

END_OF_WORD = "</w>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (printable bytes map to themselves)."""
    table = {b: chr(b) for b in [*range(33, 127), *range(161, 173), *range(174, 256)]}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _is_letter(c: str) -> bool:
    return unicodedata.category(c).startswith("L")


def _is_number(c: str) -> bool:
    return unicodedata.category(c).startswith("N")


def split_words(text: str) -> list[str]:
    """CLIP's pre-tokenizer on normalized text: contractions, letter runs, single digits and runs
    of other non-space symbols, i.e. the regex
    ``'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`` without a regex engine."""
    words, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        start = i
        if c == "'" and (hit := next((t for t in _CONTRACTIONS if text.startswith(t, i)), None)):
            i += len(hit)
        elif _is_letter(c):
            while i < n and _is_letter(text[i]):
                i += 1
        elif _is_number(c):
            i += 1
        else:
            while i < n and not (text[i].isspace() or _is_letter(text[i]) or _is_number(text[i])):
                i += 1
        words.append(text[start:i])
    return words


def normalize(text: str) -> str:
    """NFC, collapse whitespace runs to one space, lower-case (transformers' CLIP normalizer)."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()


def _split_on(text: str, tokens: Sequence[str]) -> list[tuple[str, bool]]:
    """Split ``text`` around literal occurrences of ``tokens`` -> ``[(piece, is_token)]``."""
    if not tokens:
        return [(text, False)]
    pattern = "(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")"
    return [(p, k % 2 == 1) for k, p in enumerate(re.split(pattern, text)) if p]


class CLIPTokenizer:
    """OpenAI CLIP BPE (lower-cased, ``<|startoftext|>`` / ``<|endoftext|>``), pure Python.

    ``pad_token`` is ``<|endoftext|>`` for OpenAI's tokenizers and ``!`` (id 0) for the OpenCLIP
    ViT-H/bigG ones (``tokenizer_config.json``); like transformers, the special tokens are split
    out of raw text before BPE. ``mask_token`` is an added token (non-special, matched after
    normalization), as Muddit's ``tokenizer.add_tokens("<mask>")``.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        unk_token: str = "<|endoftext|>",
        added_tokens: dict[str, int] | None = None,
        mask_token: str | None = None,
        model_max_length: int = 77,
    ):
        self.encoder = dict(vocab)
        self.added = dict(added_tokens or {})
        if mask_token is not None and mask_token not in {**self.encoder, **self.added}:
            self.added[mask_token] = max([*self.encoder.values(), *self.added.values()]) + 1
        self.decoder = {i: t for t, i in {**self.encoder, **self.added}.items()}
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.specials = [bos_token, eos_token, pad_token, unk_token]
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (self._id(t) for t in self.specials)
        self.mask_token = mask_token
        self.mask_id: int | None = None if mask_token is None else self._id(mask_token)
        self.vocab_size = max(self.decoder) + 1
        self.model_max_length = model_max_length
        self._byte_enc = byte_to_unicode()
        self._byte_dec = {c: b for b, c in self._byte_enc.items()}
        self._cache: dict[str, tuple[int, ...]] = {}

    def _id(self, token: str) -> int:
        if token in self.added:
            return self.added[token]
        if token not in self.encoder:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return self.encoder[token]

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, *, add_mask_token: bool = False
    ) -> "CLIPTokenizer":
        """Read a transformers/diffusers ``tokenizer/`` folder (``vocab.json`` + ``merges.txt``, or
        ``tokenizer.json``) with its special tokens and added tokens; ``add_mask_token`` appends
        ``<mask>`` when the folder does not already hold it."""
        folder = Path(folder)
        vocab, merges = _read_bpe(folder)
        cfg: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                cfg.update(json.loads((folder / name).read_text(encoding="utf-8")))
        specials = {
            key: _content(cfg[key])
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
            if cfg.get(key) is not None
        }
        added = {_content(tok): int(i) for i, tok in cfg.get("added_tokens_decoder", {}).items()}
        if (folder / "added_tokens.json").is_file():
            added.update(json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")))
        if (folder / "tokenizer.json").is_file():
            listed = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            added.update({t["content"]: int(t["id"]) for t in listed.get("added_tokens", [])})
        added = {t: i for t, i in added.items() if t not in vocab}
        has_mask = MASK_TOKEN in added or MASK_TOKEN in vocab
        return cls(
            vocab,
            merges,
            **specials,
            added_tokens=added,
            mask_token=MASK_TOKEN if (add_mask_token or has_mask) else None,
            model_max_length=_max_length(cfg.get("model_max_length")),
        )

    # -- encoding ---------------------------------------------------------------------------

    def _bpe(self, word: str) -> tuple[int, ...]:
        """One pre-token (byte-mapped) -> BPE ids; the last symbol carries ``</w>``."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = list(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = tuple(self.encoder.get(s, self.unk_id) for s in symbols)
        if len(self._cache) < 65536:
            self._cache[word] = ids
        return ids

    def tokenize(self, text: str) -> list[int]:
        """One string -> ids without bos/eos."""
        ids: list[int] = []
        for piece, is_special in _split_on(text, sorted(set(self.specials))):
            if is_special:
                ids.append(self._id(piece))
                continue
            added = [t for t in self.added if t not in self.specials]
            for part, is_added in _split_on(normalize(piece), added):
                if is_added:
                    ids.append(self.added[part])
                    continue
                for word in split_words(part):
                    ids.extend(self._bpe("".join(self._byte_enc[b] for b in word.encode("utf-8"))))
        return ids

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> np.ndarray:
        """Texts -> ``int32 [b, max_length]`` (default ``model_max_length``, 77 for CLIP)."""
        max_length = self.model_max_length if max_length is None else max_length
        ids = [self.tokenize(t) for t in texts]
        return pack(ids, max_length, self.bos_id, self.eos_id, self.pad_id)

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]:
        """``[b, l]`` ids -> texts (``</w>`` becomes a space); drops bos/eos/pad/unk/``<mask>``."""
        skip = {self.bos_id, self.eos_id, self.pad_id, self.unk_id, self.mask_id}
        out = []
        for row in _rows(ids):
            kept = [i for i in row if not (skip_special_tokens and i in skip)]
            chars = "".join(self.decoder[i] for i in kept)
            raw = bytes(self._byte_dec[c] for c in chars if c in self._byte_dec)
            out.append(raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip())
        return out


def _max_length(value: Any, default: int = 77) -> int:
    """``model_max_length`` from a config; transformers writes a huge sentinel when unset."""
    return int(value) if value is not None and int(value) <= 100_000 else default


def _content(token: Any) -> str:
    """A token as written in tokenizer configs: a string or an ``AddedToken`` dict."""
    return token["content"] if isinstance(token, dict) else str(token)


def _read_bpe(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``vocab.json`` + ``merges.txt`` (preferred) or the BPE model inside ``tokenizer.json``."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [
            tuple(line.split())
            for line in lines
            if line.strip() and not line.startswith("#version")
        ]
    elif (folder / "tokenizer.json").is_file():
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    else:
        raise FileNotFoundError(
            f"{folder} holds neither vocab.json + merges.txt nor tokenizer.json; pass a CLIP "
            "tokenizer folder"
        )
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"malformed merges in {folder}: {bad[:5]}")
    return vocab, merges  # type: ignore[return-value]


def load_tokenizer(path: str | os.PathLike, *, add_mask_token: bool = False) -> Tokenizer:
    """A ``.model`` file -> :class:`SentencePieceTokenizer`, a folder -> :class:`CLIPTokenizer`."""
    path = Path(path)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer.load(path)
    return CLIPTokenizer.from_pretrained(path, add_mask_token=add_mask_token)
