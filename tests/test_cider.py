"""CIDEr-D / BLEU (muddit_jax.eval.cider) and caption normalisation (muddit_jax.eval.text_norm)."""

import contextlib
import io
import math
import shutil

import pytest

from muddit_jax.eval.cider import CiderD, bleu, bleu4, cider_d
from muddit_jax.eval.text_norm import normalize_caption, normalize_captions

# Already-normalised captions: 4 images, 2-5 references each.
REFS = {
    "img1": ["a man riding a wave on a surfboard", "a surfer rides a large wave",
             "a person surfing in the ocean", "man on a surfboard riding a wave in the ocean"],
    "img2": ["two dogs playing with a frisbee", "dogs play in the grass with a frisbee"],
    "img3": ["a plate of food with broccoli and rice", "a white plate topped with rice and vegetables",
             "broccoli and rice on a plate", "a meal of rice with broccoli on the side",
             "a dinner plate with food"],
    "img4": ["a red bus driving down the street", "a double decker bus on a city street",
             "a red double decker bus"],
}
CANDS = {
    "img1": "a man riding a wave on a surfboard",            # perfect (equals a reference)
    "img2": "dog dog dog dog frisbee frisbee grass",         # repeated words
    "img3": "",                                              # empty candidate
    "img4": "a red bus on a street in a city with many people walking on the side of the road",  # long
}


def _pyco(name):
    mod = pytest.importorskip(f"pycocoevalcap.{name.lower()}.{name.lower()}")
    return getattr(mod, name)()


def _as_lists(cands):
    return {k: [v] for k, v in cands.items()}


def test_cider_d_matches_pycocoevalcap():
    ref_score, ref_per = _pyco("Cider").compute_score(REFS, _as_lists(CANDS))
    score, per = cider_d(CANDS, REFS)
    assert abs(score - ref_score) <= 1e-6
    for i, key in enumerate(REFS):
        assert abs(per[key] - ref_per[i]) <= 1e-6
    assert per["img3"] == 0.0 and per["img1"] > per["img4"] > 0.0


def test_cider_d_matches_pycocoevalcap_on_candidate_variants():
    cider = _pyco("Cider")
    for cands in ({k: v[0] for k, v in REFS.items()},                     # all perfect
                  {k: v[-1].split()[0] for k, v in REFS.items()},         # one word each
                  {k: "a a a a the the" for k in REFS}):                  # degenerate
        ref_score, ref_per = cider.compute_score(REFS, _as_lists(cands))
        score, per = cider_d(cands, REFS)
        assert abs(score - ref_score) <= 1e-6
        assert max(abs(per[k] - r) for k, r in zip(REFS, ref_per)) <= 1e-6


def test_cider_d_hand_computed():
    # 2 images, idf of every n-gram = log 2 - log 1 = L. Perfect "c d": cosine 1 for n=1,2 and 0
    # for n=3,4 -> 10 * mean(1, 1, 0, 0) = 5.
    refs = {"A": ["a b"], "B": ["c d"]}
    _, per = cider_d({"A": "a", "B": "c d"}, refs)
    assert per["B"] == pytest.approx(5.0, abs=1e-12)
    # "a" vs "a b": unigram cosine L^2 / (L * sqrt(2) L) = 1/sqrt(2); lengths 1 vs 2 ->
    # penalty exp(-1 / 72); 10 * (1/sqrt(2)) * penalty / 4.
    assert per["A"] == pytest.approx(2.5 / math.sqrt(2) * math.exp(-1 / 72), abs=1e-12)
    # Clipping: "a a" vs "a b": unigram dot min(2L, L) * L = L^2, norms 2L and sqrt(2) L
    # -> 1 / (2 sqrt(2)); bigram "a a" is absent from the reference -> 0.
    _, per = cider_d({"A": "a a", "B": "c d"}, refs)
    assert per["A"] == pytest.approx(10 * (1 / (2 * math.sqrt(2))) / 4, abs=1e-12)


def test_cider_d_invariants():
    score, per = cider_d(CANDS, REFS)
    reordered = {k: REFS[k] for k in reversed(list(REFS))}
    score2, per2 = cider_d({k: CANDS[k] for k in reordered}, reordered)
    assert score2 == pytest.approx(score, abs=1e-12) and per2 == pytest.approx(per, abs=1e-12)
    assert score == pytest.approx(sum(per.values()) / 4, abs=1e-12)
    partial = dict(CANDS, img1="a man riding a horse")
    assert cider_d(partial, REFS)[1]["img1"] < per["img1"]
    assert CiderD().compute(CANDS, REFS)[0] == pytest.approx(score, abs=1e-12)
    with pytest.raises(ValueError):
        cider_d({"img1": "x"}, REFS)


def test_bleu_matches_pycocoevalcap():
    scorer = _pyco("Bleu")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its statistics
        ref_scores, ref_per = scorer.compute_score(REFS, _as_lists(CANDS))
    scores, per = bleu(CANDS, REFS)
    assert max(abs(a - b) for a, b in zip(scores, ref_scores)) <= 1e-6
    for k in range(4):
        assert max(abs(per[key][k] - ref_per[k][i]) for i, key in enumerate(REFS)) <= 1e-6
    b4, per4 = bleu4(CANDS, REFS)
    assert b4 == scores[3] and per4["img1"] == per["img1"][3]


def test_bleu_hand_computed():
    refs = {"A": ["a b c d e"], "B": ["x y z w"]}
    scores, per = bleu({"A": "a b c d e", "B": "x y z w"}, refs)
    assert scores == pytest.approx([1.0] * 4, abs=1e-8)
    # "a b c" vs "a b c d e": precisions 1, brevity penalty exp(1 - 5/3).
    _, per = bleu4({"A": "a b c", "B": "x y z w"}, refs)
    # No 4-gram at all: pycocoevalcap's smoothing gives p4 = 1e-15 / 1e-9 = 1e-6, not 0.
    assert per["A"] == pytest.approx(1e-6 ** 0.25 * math.exp(1 - 5 / 3), rel=1e-6)
    scores, per = bleu({"A": "a b c", "B": "x y z w"}, refs)
    assert per["A"][2] == pytest.approx(math.exp(1 - 5 / 3), abs=1e-8)


@pytest.mark.parametrize("raw, expected", [
    ("A man riding a horse.", "a man riding a horse"),
    ("Don't go! It's the dog's bone, isn't it?", "do n't go it 's the dog 's bone is n't it"),
    ("He can't, won't, cannot do it: I'm gonna", "he ca n't wo n't can not do it i 'm gon na"),
    ("Kids' toys aren't they're we've you'll I'd", "kids toys are n't they 're we 've you 'll i 'd"),
    ('A sign that says "STOP" -- nice...', "a sign that says stop nice"),
    ("Two (2) kids [playing]", "two -lrb- 2 -rrb- kids -lsb- playing -rsb-"),  # PTB keeps these
    ("The U.S. flag at 5:30 p.m. on St. Patrick's day", "the u.s. flag at 5:30 p.m. on st. patrick 's day"),
    ("a black-and-white photo; 3.5 pounds, 1,000 people", "a black-and-white photo 3.5 pounds 1,000 people"),
    ("a 50% off $5 sign & more", "a 50 % off $ 5 sign & more"),
    ("A  dog\tin the\nsnow!!", "a dog in the snow !!"),
    ("Don\u2019t \u201cquote\u201d \u2014 dash", "do n't quote dash"),
    ("", ""),
    ("...", ""),
])
def test_normalize_caption(raw, expected):
    assert normalize_caption(raw) == expected


def test_normalize_captions_mapping():
    assert normalize_captions({1: ["A Dog.", "a cat!"]}) == {1: ["a dog", "a cat"]}


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java for the real PTB tokenizer")
def test_normalize_caption_matches_ptb_tokenizer():
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    caps = ["A man riding a wave on top of a surfboard.", "Two dogs playing with a frisbee in the grass .",
            "A woman's hand holding a smart phone.", "The kitchen has stainless steel appliances; it's clean.",
            "Is this a pizza? Yes, it is.", "A man in a suit & tie talking on a cell phone",
            "Children's toys scattered across the floor...", "Two people (a man and a woman) on a bench.",
            "A skateboarder doing a trick - mid air.", "The zebras are grazing, aren't they?",
            "Women's soccer team in the 1990's.", "A pizza costs $12.99 at Joe's.", "A man who can't stop"]
    out = ptb.PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(caps)})
    assert [normalize_caption(c) for c in caps] == [out[i][0] for i in range(len(caps))]
