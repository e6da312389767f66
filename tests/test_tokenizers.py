"""Tokenizers: SentencePiece train/load round trip and CLIP BPE parity with transformers."""

import collections
import json

import numpy as np
import pytest

from muddit_jax.models.tokenizers import (
    CLIPTokenizer,
    SentencePieceTokenizer,
    byte_to_unicode,
    load_tokenizer,
    normalize,
    split_words,
)

CORPUS = [
    f"{a} photo of {b} {c} on the {d}"
    for a in ["a", "the", "one more", "another"]
    for b in ["a red", "a blue", "two small", "many old"]
    for c in ["cat", "dog", "bird", "car", "house"]
    for d in ["mat", "table", "street", "beach"]
]


# ---------------------------------------------------------------------------------------------
# SentencePiece


@pytest.fixture(scope="module")
def sp_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    SentencePieceTokenizer.train(iter(CORPUS), 80, root / "a.model")
    SentencePieceTokenizer.train(list(CORPUS), 80, root / "b.model")
    return root / "a.model", root / "b.model"


def test_sentencepiece_round_trip(sp_paths):
    tok = SentencePieceTokenizer.load(sp_paths[0])
    texts = ["a red cat on the mat", "two small dogs on the beach"]
    ids = tok.encode(texts, 32)
    assert ids.dtype == np.int32 and ids.shape == (2, 32)
    assert (ids[:, 0] == tok.bos_id).all()
    assert tok.decode(ids) == texts
    # layout: bos, pieces, eos, then pad only
    for row in ids:
        end = int(np.argmax(row == tok.eos_id))
        assert end > 1 and (row[end + 1 :] == tok.pad_id).all()
        assert tok.eos_id not in row[1:end] and tok.pad_id not in row[:end]


def test_sentencepiece_specials_and_mask(sp_paths):
    tok = SentencePieceTokenizer.load(sp_paths[0])
    specials = [tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.sp.unk_id()]
    assert specials == [0, 2, 3, 4, 1] and len(set(specials)) == 5
    assert 20 < tok.vocab_size <= 80
    ids = tok.encode(["a <mask> cat"], 16)[0]
    assert (ids == tok.mask_id).sum() == 1
    assert tok.decode([ids])[0].split() == ["a", "cat"]  # skipped like the other specials
    assert "<mask>" in tok.decode([ids], skip_special_tokens=False)[0]


def test_sentencepiece_deterministic(sp_paths):
    a, b = sp_paths
    assert a.read_bytes() == b.read_bytes()
    texts = ["another photo of many old houses", "one more bird"]
    ids_a = SentencePieceTokenizer.load(a).encode(texts, 24)
    np.testing.assert_array_equal(ids_a, SentencePieceTokenizer.load(b).encode(texts, 24))
    assert not list(a.parent.glob("*.tmp"))  # atomic write left no temp file


def test_sentencepiece_truncation_and_padding(sp_paths):
    tok = load_tokenizer(sp_paths[0])
    long = " ".join(CORPUS[:10])
    ids = tok.encode([long, "cat", ""], 8)
    assert ids.shape == (3, 8)
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id and tok.pad_id not in ids[0]
    full = tok.sp.encode(long)
    np.testing.assert_array_equal(ids[0, 1:-1], full[:6])
    assert ids[2].tolist() == [tok.bos_id, tok.eos_id] + [tok.pad_id] * 6
    with pytest.raises(ValueError):
        tok.encode(["x"], 1)


# ---------------------------------------------------------------------------------------------
# CLIP BPE

CLIP_CORPUS = [
    "a photo of a cat sitting on the mat",
    "the quick brown fox jumps over the lazy dog!!",
    "a painting of a dog, in the style of van gogh",
    "it's a photo; they're cats. i'll go",
    "photographs of cats and dogs 12345",
    "hello world!!! what's that?",
]
CLIP_TEXTS = CLIP_CORPUS + [
    "A  PHOTO\tof\n a CAT!!",
    "Héllo WÖRLD café ñ 日本語 😀",
    "don't stop'S'll  ?'s !'t x'y",
    "<|endoftext|> inside <|startoftext|>x",
    "3.14159 1,000 -- (parens) [brackets] #hash @at",
    "  leading and trailing  ",
    "",
    "hello! a!b!!c",
    "photo " * 40,
]


def _train_clip_bpe(corpus, num_merges):
    """A tiny CLIP-format BPE: byte symbols (+``</w>``), greedily learned merges, then specials."""
    enc = byte_to_unicode()
    tokens = list(enc.values()) + [c + "</w>" for c in enc.values()]
    words = collections.Counter()
    for text in corpus:
        for w in split_words(normalize(text)):
            m = "".join(enc[b] for b in w.encode())
            words[(*m[:-1], m[-1] + "</w>")] += 1
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(sorted(pairs), key=pairs.__getitem__)
        merges.append(best)
        merged = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i : i + 2] == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    tokens += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """Two folders over one BPE: OpenAI-style (pad = eos) and OpenCLIP-style (pad '!')."""
    vocab, merges = _train_clip_bpe(CLIP_CORPUS, 150)
    out = {}
    for name, pad in (("openai", None), ("openclip", "!")):
        d = tmp_path_factory.mktemp(name)
        (d / "vocab.json").write_text(json.dumps(vocab))
        (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        if pad is not None:
            (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad}))
        out[name] = d
    return out


@pytest.mark.parametrize("flavour", ["openai", "openclip"])
@pytest.mark.parametrize("max_length", [77, 12])
def test_clip_ids_match_transformers(clip_folders, flavour, max_length):
    transformers = pytest.importorskip("transformers")
    folder = clip_folders[flavour]
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    tok = CLIPTokenizer.from_pretrained(folder)
    specials = (ref.pad_token_id, ref.bos_token_id, ref.eos_token_id)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == specials
    assert tok.pad_id == (0 if flavour == "openclip" else tok.eos_id)
    want = ref(CLIP_TEXTS, padding="max_length", truncation=True, max_length=max_length)
    want = want["input_ids"]
    got = tok.encode(CLIP_TEXTS, max_length)
    assert got.dtype == np.int32 and got.shape == (len(CLIP_TEXTS), max_length)
    for text, w, g in zip(CLIP_TEXTS, want, got.tolist()):
        assert g == w, f"{text!r}: {g} != {w}"
    assert ((got >= 512) & (got < tok.bos_id)).sum() > 20  # learned merges are exercised
    assert tok.decode(got) == [ref.decode(w, skip_special_tokens=True) for w in want]


def test_clip_mask_token_matches_transformers_add_tokens(clip_folders):
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer.from_pretrained(str(clip_folders["openclip"]))
    ref.add_tokens("<mask>", special_tokens=False)
    tok = CLIPTokenizer.from_pretrained(clip_folders["openclip"], add_mask_token=True)
    assert tok.mask_id == ref.convert_tokens_to_ids("<mask>") == len(ref) - 1
    assert tok.vocab_size == len(ref)
    texts = ["a <mask> cat", "a<MASK>dog <mask><mask>!"]
    want = ref(texts, padding="max_length", max_length=16)["input_ids"]
    np.testing.assert_array_equal(tok.encode(texts, 16), np.array(want))
    assert tok.decode(tok.encode(texts, 16))[0] == "a cat"
    # a folder saved after add_tokens carries the mask already
    saved = clip_folders["openclip"].parent / "saved"
    ref.save_pretrained(str(saved))
    again = CLIPTokenizer.from_pretrained(saved)
    assert again.mask_id == tok.mask_id and again.pad_id == 0 and again.model_max_length == 77
    np.testing.assert_array_equal(again.encode(texts, 16), np.array(want))


def test_clip_without_mask_and_bad_folder(clip_folders, tmp_path):
    tok = load_tokenizer(clip_folders["openai"])
    assert isinstance(tok, CLIPTokenizer) and tok.mask_id is None
    assert tok.vocab_size == len(json.loads((clip_folders["openai"] / "vocab.json").read_text()))
    with pytest.raises(FileNotFoundError):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_split_words_matches_clip_regex():
    regex = pytest.importorskip("regex")
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    for text in CLIP_TEXTS:
        norm = normalize(text)
        assert split_words(norm) == pat.findall(norm), text


def test_trained_bpe_keeps_every_shapes_word_whole(tmp_path):
    """The default trained tokenizer (BPE) makes each word of the ``shapes`` language one piece,
    so parallel decoding can only mix whole words; unigram on the same corpus splits ``small``,
    ``yes`` and the digits into sub-words."""
    from muddit_jax.data import shapes
    from muddit_jax.data.text import train_tokenizer

    config = shapes.ShapesConfig(resolution=32, max_objects=3, textures=("plain",))
    texts = []
    for i in range(400):
        ex = shapes.generate(config, "train", i)
        texts += list(ex.captions) + [f"{q.question} {q.answer}" for q in ex.qa]
    words = {w.strip("?,;:") for t in texts for w in t.split()}
    bpe = train_tokenizer(texts, 256, tmp_path / "bpe.model")
    unigram = train_tokenizer(texts, 256, tmp_path / "unigram.model", model_type="unigram")
    assert not [w for w in words if len(bpe.sp.encode(w)) > 1]
    split = [w for w in words if len(unigram.sp.encode(w)) > 1]
    assert {"small", "yes"} <= set(split)
    ids = bpe.encode(["is there a small red circle? yes"], 16)[0]
    assert bpe.decode([ids])[0] == "is there a small red circle? yes"
    assert int(np.argmax(ids == bpe.eos_id)) == 9  # bos + 7 words + "?" piece
