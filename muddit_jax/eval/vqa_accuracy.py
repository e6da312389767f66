"""VQAv2 accuracy with the official answer normalisation (GT-Vision-Lab ``vqaEval.py``).

Facts reproduced from the official evaluation (latest, Python 3 version):
  * a prediction: newlines/tabs -> spaces, stripped, then :func:`process_punctuation`, then
    :func:`process_digit_article` (lower-case, number words -> digits, drop ``a an the``,
    contractions map);
  * human answers are NOT fully normalised: only when the 10 answers are not all identical
    are they passed through :func:`process_punctuation` (the released annotations are already
    normalised). ``normalize_humans=True`` applies :func:`normalize_answer` to them instead,
    which is what you want for raw, unprocessed answers;
  * accuracy of one question = mean over the leave-one-out subsets (each human answer left
    out once) of min(#matching answers among the others / 3, 1). Scores here are fractions;
    the official tool reports 100x, rounded to 2 decimals.
Quirks kept on purpose: ``'`` is not a punctuation mark (``don't`` stays); the period rule
removes any ``.`` not followed by a digit, at most 32 per answer (the official code passes
``re.UNICODE`` (= 32) as ``count``); contraction keys the lower-casing makes unreachable in
the official map (``Im``, ``Ive``, ``Id've``, ``I'dve``) and identity entries are omitted.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence

# Punctuation handled by process_punctuation ('.' has its own rule, "'" is absent).
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
NUMBER_WORDS: dict[str, str] = dict(
    zip("none zero one two three four five six seven eight nine ten".split(),
        "0 0 1 2 3 4 5 6 7 8 9 10".split())
)
# "written=normalised" pairs of the official contractions map (the 'somebody'd' entry is
# reversed in the original and kept that way).
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've
she'dve=she'd've shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
somethingd=something'd somethingd've=something'd've something'dve=something'd've
somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's
whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll
whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've
youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(p.split("=", 1) for p in _CONTRACTION_PAIRS.split())

_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32  # official code passes re.UNICODE (== 32) as the ``count`` argument


def process_punctuation(text: str) -> str:
    """Official punctuation rule: a mark next to a space (or any mark when the text has a
    digit,digit comma) is deleted, otherwise replaced by a space; periods not followed by a
    digit are deleted."""
    strip_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in PUNCTUATION:
        spaced = strip_all or (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if spaced else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def process_digit_article(text: str) -> str:
    """Lower-case, number words -> digits, drop articles, expand contractions; space-joined."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(s: str) -> str:
    """Full official normalisation of a predicted answer."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(s))


def vqa_accuracy(prediction: str, human_answers: Sequence[str], *,
                 normalize_humans: bool = False) -> float:
    """Leave-one-out VQA accuracy of one prediction against the human answers (usually 10)."""
    humans = list(human_answers)
    if not humans:
        raise ValueError("need at least one human answer")
    if normalize_humans:
        humans = [normalize_answer(h) for h in humans]
    elif len(set(humans)) > 1:
        humans = [process_punctuation(h) for h in humans]
    pred = normalize_answer(prediction)
    hits = [h == pred for h in humans]
    total = sum(hits)
    return sum(min(1.0, (total - hit) / 3.0) for hit in hits) / len(humans)


def vqa_score(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]], *,
              normalize_humans: bool = False) -> tuple[float, dict[Hashable, float]]:
    """Mean VQA accuracy over questions and the per-question accuracies (fractions)."""
    if set(predictions) != set(answers):
        raise ValueError("predictions and answers must have the same question ids")
    per = {q: vqa_accuracy(predictions[q], answers[q], normalize_humans=normalize_humans)
           for q in answers}
    return (sum(per.values()) / len(per) if per else 0.0), per
