"""Rulers for `convsim eval`: measures of how well generated replies pass for a person's own.

Each ruler is a small pure function over bursts (a burst is the list of messages one person sends in a
row); `convsim eval` calls them per speaker and `bench/fidelity_suite.py` collects them over many pairs.

  judge            the computational Turing test: a classifier trained on the training split's real and
                   generated replies scores a held-out (real, generated) pair; it is right when it scores
                   the real one higher. Accuracy 0.5 is chance: lower is more human.
  speaker_auc      speaker verification: ROC-AUC of the speaker classifier on real held-out bursts, so a
                   speaker-ID ratio is only read where the ruler itself works.
  copy_rate        privacy: the share of replies holding a span of `COPY_SPAN` word tokens that occurs in
                   the training messages, beside the same share for real held-out replies.
  repeat_rate      the share of messages that repeat the message before them in the same burst.
  distinct_n       distinct n-grams / all n-grams (diversity).
  bootstrap_ppl_ratio_ci / bootstrap_mean_ci   95 % intervals by resampling examples.

    from convsim.evaluation import rulers
    rulers.copy_rate(generated, rulers.span_index(training_texts))
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

COPY_SPAN = 8
_WORD = re.compile(r"\w+|[^\w\s]")

Burst = Sequence[str]


def words(text: str) -> list[str]:
    """Word tokens (runs of letters/digits, or single punctuation marks), lower-cased."""
    return _WORD.findall(text.lower())


# ----------------------------------------------------------------------------- copying


def _spans(text: str, n: int) -> list[tuple[str, ...]]:
    w = words(text)
    return [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]


def span_index(texts: Sequence[str], n: int = COPY_SPAN) -> set[int]:
    """Hashes of every n-token span within one message of `texts` (spans never cross messages)."""
    return {hash(s) for t in texts for s in _spans(t, n)}


def copies(burst: Burst, index: set[int], n: int = COPY_SPAN) -> bool:
    """Does any message of the burst contain an n-token span found in the index?"""
    return any(hash(s) in index for m in burst for s in _spans(m, n))


def copy_flags(bursts: Sequence[Burst], index: set[int], n: int = COPY_SPAN) -> list[float]:
    return [float(copies(b, index, n)) for b in bursts if b]


def copy_rate(bursts: Sequence[Burst], index: set[int], n: int = COPY_SPAN) -> float | None:
    flags = copy_flags(bursts, index, n)
    return float(np.mean(flags)) if flags else None


# ----------------------------------------------------------------------------- repetition and diversity


def _same(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def repeat_flags(bursts: Sequence[Burst]) -> list[float]:
    """One flag per message after the first of its burst: 1 when it repeats the message before it."""
    return [float(_same(b[i], b[i - 1])) for b in bursts for i in range(1, len(b))]


def repeat_rate(bursts: Sequence[Burst]) -> float | None:
    """Identical consecutive messages within a burst, per message that follows another (None: no such)."""
    flags = repeat_flags(bursts)
    return float(np.mean(flags)) if flags else None


def distinct_n(bursts: Sequence[Burst], n: int) -> float | None:
    grams = [tuple(w[i : i + n]) for b in bursts for m in b for w in [words(m)] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


# ----------------------------------------------------------------------------- intervals


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> list[float] | None:
    """95 % percentile interval of the mean of `values`, resampling the values."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def ppl_ratio(nll_a: Sequence[float], nll_b: Sequence[float], counts: Sequence[int]) -> float:
    """Perplexity of system a ÷ system b over the same scored tokens (summed NLLs per example)."""
    return math.exp((float(np.sum(nll_a)) - float(np.sum(nll_b))) / max(int(np.sum(counts)), 1))


def bootstrap_ppl_ratio_ci(
    nll_a: Sequence[float], nll_b: Sequence[float], counts: Sequence[int], n_boot: int = 1000, seed: int = 0
) -> list[float] | None:
    """95 % percentile interval of `ppl_ratio`, resampling examples (each keeps its tokens together)."""
    a, b, c = (np.asarray(x, dtype=float) for x in (nll_a, nll_b, counts))
    if a.size == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    ratios = np.exp((a[idx].sum(1) - b[idx].sum(1)) / np.maximum(c[idx].sum(1), 1))
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


# ----------------------------------------------------------------------------- speaker verification


def speaker_classifier(texts: Sequence[str], labels: Sequence[str]):
    """Who wrote this burst? Character and word n-gram TF-IDF, logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    feats = make_union(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True, min_df=2),
        TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=2, token_pattern=r"\S+"),
    )
    clf = make_pipeline(feats, LogisticRegression(max_iter=3000, C=4.0))
    clf.fit(list(texts), list(labels))
    return clf


def speaker_scores(clf, bursts: Sequence[Burst], speaker: str) -> list[float]:
    """The classifier's probability that each burst (messages joined) was written by `speaker`."""
    texts = [" ".join(b) for b in bursts if b]
    if not texts:
        return []
    col = list(clf.classes_).index(speaker)
    return [float(p) for p in clf.predict_proba(texts)[:, col]]


def speaker_auc(clf, bursts_by_speaker: dict[str, Sequence[Burst]], speaker: str) -> float | None:
    """ROC-AUC of "written by `speaker`" over real held-out bursts of every speaker (None: one class only)."""
    from sklearn.metrics import roc_auc_score

    scores, labels = [], []
    for who, bursts in bursts_by_speaker.items():
        s = speaker_scores(clf, bursts, speaker)
        scores += s
        labels += [int(who == speaker)] * len(s)
    if len(set(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


# ----------------------------------------------------------------------------- the judge


def _judge_text(context: Sequence[str], burst: Burst) -> str:
    return " ⏎ ".join(burst)


def _judge_numbers(context: Sequence[str], burst: Burst) -> list[float]:
    msgs = list(burst)
    ctx = {w for m in list(context)[-3:] for w in words(m)}
    rep = [w for m in msgs for w in words(m)]
    overlap = len(ctx & set(rep)) / len(set(rep)) if rep else 0.0
    chars = "".join(msgs)
    return [
        math.log1p(len(msgs)),
        math.log1p(np.mean([len(m) for m in msgs]) if msgs else 0.0),
        float(np.mean(repeat_flags([msgs]))) if len(msgs) > 1 else 0.0,
        sum(c.isdigit() for c in chars) / max(len(chars), 1),
        overlap,
        float(not msgs),
    ]


class Judge:
    """Real or generated? Trained pointwise on (context, burst) pairs labelled real=1 / generated=0;
    `pair_accuracy` asks it to pick the real burst of each held-out (real, generated) pair."""

    def fit(self, contexts: Sequence[Sequence[str]], real: Sequence[Burst], generated: Sequence[Burst]) -> "Judge":
        from scipy.sparse import csr_matrix, hstack
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        self._hstack, self._csr = hstack, csr_matrix
        rows = [(c, b, 1) for c, b in zip(contexts, real)] + [(c, b, 0) for c, b in zip(contexts, generated)]
        self.vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True, min_df=2)
        self.vec.fit([_judge_text(c, b) for c, b, _ in rows])
        self.scale = StandardScaler().fit([_judge_numbers(c, b) for c, b, _ in rows])
        self.clf = LogisticRegression(max_iter=3000, C=1.0)
        self.clf.fit(self._features([(c, b) for c, b, _ in rows]), [y for _, _, y in rows])
        return self

    def _features(self, items):
        text = self.vec.transform([_judge_text(c, b) for c, b in items])
        nums = self._csr(self.scale.transform([_judge_numbers(c, b) for c, b in items]))
        return self._hstack([text, nums]).tocsr()

    def score(self, contexts: Sequence[Sequence[str]], bursts: Sequence[Burst]) -> np.ndarray:
        """Probability of "real" for each (context, burst)."""
        return self.clf.predict_proba(self._features(list(zip(contexts, bursts))))[:, 1]

    def pair_flags(self, contexts, real: Sequence[Burst], generated: Sequence[Burst]) -> list[float]:
        """1 where the judge scores the real burst above the generated one, 0.5 on a tie, else 0."""
        r, g = self.score(contexts, real), self.score(contexts, generated)
        return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(r, g)]


def judge_accuracy(
    train: tuple[Sequence[Sequence[str]], Sequence[Burst], Sequence[Burst]],
    held: tuple[Sequence[Sequence[str]], Sequence[Burst], Sequence[Burst]],
) -> tuple[float | None, list[float]]:
    """Train a judge on `train` = (contexts, real, generated), then its pair accuracy on `held`, and the
    per-pair flags (for intervals). None when there is too little to train on."""
    if len(train[0]) < 4 or not held[0]:
        return None, []
    flags = Judge().fit(*train).pair_flags(*held)
    return float(np.mean(flags)), flags
