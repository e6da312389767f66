"""CIDEr-D and corpus BLEU for captioning, numerically equal to pycocoevalcap 1.2.

Inputs are already-normalised, space-tokenised strings (see :mod:`muddit_jax.eval.text_norm`).

CIDEr-D (Vedantam et al. 2015, as in pycocoevalcap's ``Cider`` class, which despite its name
is CIDEr-D):
  * an n-gram's document frequency df = number of images whose reference set contains it
    (references only); idf = log(#images) - log(max(1, df));
  * per n in 1..4, TF-IDF vectors of candidate and of each reference; the dot product uses
    min(candidate, reference) weights (clipping) and is divided by both norms;
  * each (candidate, reference, n) similarity is multiplied by exp(-(l_c - l_r)^2 / (2 sigma^2))
    with sigma = 6 and l the token count;
  * image score = 10 * mean over n of the sum over references / #references; corpus = mean.
pycocoevalcap measures l as the bigram count (max(tokens - 1, 0)); the difference of the two
lengths only changes when a side is empty, and then the similarity is 0 anyway, so token
counts give identical scores.

BLEU (pycocoevalcap's ``Bleu``): clipped n-gram counts against the per-ngram max over
references, "closest" reference length (ties -> shorter), smoothing constants 1e-15/1e-9,
corpus-level brevity penalty; also per-image sentence BLEU with the same rules.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

NGram = tuple[str, ...]
_TINY = 1e-15  # pycocoevalcap BleuScorer smoothing of the numerator
_SMALL = 1e-9  # ... and of the denominator


def ngram_counts(sentence: str, n: int = 4) -> Counter[NGram]:
    """Counts of all 1..n-grams of a space-tokenised sentence."""
    words = sentence.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(candidates: Mapping, references: Mapping) -> list:
    if set(candidates) != set(references):
        raise ValueError("candidates and references must have the same ids")
    ids = list(references)
    for i in ids:
        if not isinstance(candidates[i], str) or isinstance(references[i], str) or not references[i]:
            raise ValueError(f"id {i!r}: need one candidate string and a non-empty list of references")
    return ids


class CiderD:
    """CIDEr-D scorer; ``df`` comes from the references given to :meth:`compute`."""

    def __init__(self, n: int = 4, sigma: float = 6.0):
        self.n = n
        self.sigma = sigma

    def _vector(self, counts: Counter[NGram], df: Mapping[NGram, float], log_n_docs: float):
        vec: list[dict[NGram, float]] = [{} for _ in range(self.n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_n_docs - math.log(max(1.0, df.get(gram, 0.0))))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms

    def _sim(self, cand, ref, len_c: int, len_r: int) -> float:
        """Sum over n of the clipped, penalised cosine similarity of one candidate/reference pair."""
        (vc, nc), (vr, nr) = cand, ref
        penalty = math.exp(-((len_c - len_r) ** 2) / (2 * self.sigma ** 2))
        total = 0.0
        for k in range(self.n):
            dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
            if nc[k] != 0 and nr[k] != 0:
                dot /= nc[k] * nr[k]
            total += dot * penalty
        return total

    def compute(self, candidates: Mapping[Hashable, str],
                references: Mapping[Hashable, Sequence[str]]) -> tuple[float, dict[Hashable, float]]:
        """Corpus CIDEr-D and per-image scores."""
        ids = _check(candidates, references)
        if not ids:
            return 0.0, {}
        ref_counts = {i: [ngram_counts(r, self.n) for r in references[i]] for i in ids}
        df: Counter[NGram] = Counter()
        for refs in ref_counts.values():
            df.update(set().union(*refs))
        log_n_docs = math.log(float(len(ids)))
        per_image: dict[Hashable, float] = {}
        for i in ids:
            cand = self._vector(ngram_counts(candidates[i], self.n), df, log_n_docs)
            len_c = len(candidates[i].split())
            total = sum(self._sim(cand, self._vector(rc, df, log_n_docs), len_c, len(r.split()))
                        for rc, r in zip(ref_counts[i], references[i]))
            per_image[i] = 10.0 * total / self.n / len(references[i])
        return sum(per_image.values()) / len(per_image), per_image


def cider_d(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
            n: int = 4, sigma: float = 6.0) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D (pycocoevalcap ``Cider``): ``(corpus_score, {id: image_score})``."""
    return CiderD(n, sigma).compute(candidates, references)


def _closest_ref_len(test_len: int, ref_lens: Sequence[int]) -> int:
    return min(ref_lens, key=lambda r: (abs(r - test_len), r))


def bleu(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
         n: int = 4) -> tuple[list[float], dict[Hashable, list[float]]]:
    """Corpus BLEU-1..n (pycocoevalcap ``Bleu``) and per-image sentence BLEU-1..n lists."""
    ids = _check(candidates, references)
    correct, guess = [0] * n, [0] * n
    test_total, ref_total = 0, 0
    per_image: dict[Hashable, list[float]] = {}
    for i in ids:
        cand = ngram_counts(candidates[i], n)
        max_ref: Counter[NGram] = Counter()
        for r in references[i]:
            max_ref |= ngram_counts(r, n)  # element-wise max
        t_len = len(candidates[i].split())
        r_len = _closest_ref_len(t_len, [len(r.split()) for r in references[i]])
        c_k = [0] * n
        for gram, cnt in cand.items():
            c_k[len(gram) - 1] += min(cnt, max_ref[gram])
        g_k = [max(0, t_len - k) for k in range(n)]
        per_image[i] = _bleu_from_stats(c_k, g_k, t_len, r_len)
        test_total += t_len
        ref_total += r_len
        for k in range(n):
            correct[k] += c_k[k]
            guess[k] += g_k[k]
    return _bleu_from_stats(correct, guess, test_total, ref_total), per_image


def _bleu_from_stats(correct: Sequence[int], guess: Sequence[int], test_len: float,
                     ref_len: float) -> list[float]:
    scores, prod = [], 1.0
    for k, (c, g) in enumerate(zip(correct, guess)):
        prod *= (c + _TINY) / (g + _SMALL)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu4(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
          ) -> tuple[float, dict[Hashable, float]]:
    """Corpus BLEU-4 and per-image sentence BLEU-4."""
    corpus, per = bleu(candidates, references, 4)
    return corpus[3], {i: s[3] for i, s in per.items()}
