"""VQAv2 accuracy and answer normalisation (muddit_jax.eval.vqa_accuracy)."""

import pytest

from muddit_jax.eval.vqa_accuracy import (normalize_answer, process_punctuation, vqa_accuracy,
                                          vqa_score)


@pytest.mark.parametrize("k, expected", [
    # k of 10 humans gave the predicted answer. Leaving out one of the k matching humans leaves
    # k-1 matches, leaving out one of the 10-k others leaves k; accuracy =
    # [k * min(1, (k-1)/3) + (10-k) * min(1, k/3)] / 10:
    (0, 0.0),
    (1, 0.3),   # [1 * 0   + 9 * 1/3] / 10 = 3/10
    (2, 0.6),   # [2 * 1/3 + 8 * 2/3] / 10 = (2/3 + 16/3) / 10 = 6/10
    (3, 0.9),   # [3 * 2/3 + 7 * 1  ] / 10 = (2 + 7) / 10
    (4, 1.0),   # [4 * 1   + 6 * 1  ] / 10
    (7, 1.0),
    (10, 1.0),  # 10 identical answers
])
def test_leave_one_out_accuracy(k, expected):
    humans = ["cat"] * k + ["dog", "horse", "bird"] * 4
    humans = humans[:10]
    assert vqa_accuracy("cat", humans) == pytest.approx(expected, abs=1e-12)


def test_accuracy_with_normalised_prediction():
    humans = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("Two", humans) == pytest.approx(0.9)       # "two" -> "2"
    assert vqa_accuracy("the 3.", humans) == pytest.approx(1.0)    # article and period dropped
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes!", ["yes"] * 10) == 1.0


def test_human_answers_processing_follows_official_rule():
    # Identical human answers are left untouched, so an un-normalised "two" never matches "2"...
    assert vqa_accuracy("two", ["two"] * 10) == 0.0
    # ...unless the caller asks for full normalisation of raw human answers.
    assert vqa_accuracy("two", ["Two"] * 10, normalize_humans=True) == 1.0
    # Differing answers get the punctuation rule only (no strip, no articles): "yes." -> "yes"
    # matches, "yes!" -> "yes " does not, "a dog" keeps its "a".
    assert vqa_accuracy("yes", ["yes."] * 2 + ["no"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("yes", ["yes!"] * 2 + ["no"] * 8) == 0.0
    assert vqa_accuracy("a dog", ["a dog"] * 5 + ["cat"] * 5) == 0.0


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("a dog.", "dog"), ("dont", "don't"), ("yes!", "yes"), ("None", "0"),
    ("The Ten apples", "10 apples"), ("3.5", "3.5"), ("1,000", "1000"), ("left, right", "left right"),
    ("black/white", "black white"), ("don't", "don't"), ("yes.\n", "yes"), ("an  (old) tree?", "old tree"),
    ("im", "im"),  # the official map's "Im" key is unreachable after lower-casing
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_process_punctuation_spacing_rule():
    assert process_punctuation("t-shirt") == "t shirt"     # no space next to '-': becomes a space
    assert process_punctuation("t - shirt") == "t  shirt"  # a space next to '-': deleted
    assert process_punctuation("1,000 t-shirts") == "1000 tshirts"  # digit,digit: all deleted


def test_vqa_score():
    preds = {1: "yes", 2: "two", 3: "red"}
    answers = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["blue"] * 10}
    mean, per = vqa_score(preds, answers)
    assert per == pytest.approx({1: 1.0, 2: 0.6, 3: 0.0})
    assert mean == pytest.approx(1.6 / 3)
    with pytest.raises(ValueError):
        vqa_score({1: "yes"}, answers)
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])
