"""The offline text featuriser for MAUVE: TF-IDF of word uni/bi-grams, then PCA by SVD.

MAUVE's reference implementation embeds texts with GPT-2-large, L2-normalises the embeddings and
reduces them with a PCA fitted on the union of both sample sets, keeping the components that
explain 90% of the variance. No download is allowed here, so the embedding is a TF-IDF vector
(L2-normalised rows, like the reference's normalisation) and the PCA is the same: fitted on the
union of the two sets being compared, 90% explained variance. Scores are therefore comparable
between methods of one run, not with GPT-2-featurised MAUVE numbers in papers.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import numpy as np

FEATURIZER = "tfidf-svd"

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens; also the default length measure for length-matched references."""
    return _WORD.findall(text.lower())


def word_ngrams(text: str, max_n: int = 2) -> list[str]:
    toks = words(text)
    grams = list(toks)
    for n in range(2, max_n + 1):
        grams.extend(" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1))
    return grams


def tfidf_matrix(texts: Sequence[str], max_n: int = 2, max_features: int = 8192) -> np.ndarray:
    """(len(texts), <= max_features) float32 TF-IDF matrix with L2-normalised rows.

    Raw counts times the smoothed idf log((1 + n) / (1 + df)) + 1. The vocabulary keeps the
    ``max_features`` n-grams with the highest document frequency (ties by the n-gram itself, so
    it is deterministic): a dense matrix must fit in memory, and an n-gram seen in one document
    only cannot make two documents similar anyway. A text without words is a zero row.
    """
    if max_features < 1:
        raise ValueError(f"max_features must be at least 1, got {max_features}")
    docs = [Counter(word_ngrams(t, max_n)) for t in texts]
    df: Counter[str] = Counter()
    for d in docs:
        df.update(d.keys())
    vocab = sorted(df, key=lambda g: (-df[g], g))[:max_features]
    column = {g: j for j, g in enumerate(vocab)}
    x = np.zeros((len(docs), max(len(vocab), 1)), dtype=np.float32)
    for i, d in enumerate(docs):
        for g, count in d.items():
            j = column.get(g)
            if j is not None:
                x[i, j] = count
    if vocab:
        doc_freq = np.array([df[g] for g in vocab], dtype=np.float64)
        x *= (np.log((1.0 + len(docs)) / (1.0 + doc_freq)) + 1.0).astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def principal_components(x: np.ndarray, explained_variance: float = 0.9) -> np.ndarray:
    """PCA scores of the rows of ``x``, keeping the fewest components whose cumulative share of
    the variance reaches ``explained_variance`` (the reference's rule: the first index where the
    cumulative ratio is >= the target, inclusive).

    Computed from the eigendecomposition of the smaller Gram matrix (n x n when there are fewer
    rows than features, the usual case for a sparse TF-IDF vocabulary), which is much cheaper
    than an SVD of the full matrix and gives the same scores up to the sign of each component;
    k-means is blind to those signs.
    """
    if not 0.0 < explained_variance <= 1.0:
        raise ValueError(f"explained_variance must be in (0, 1], got {explained_variance}")
    xc = np.asarray(x, dtype=np.float64)
    xc = xc - xc.mean(axis=0, keepdims=True)
    n, f = xc.shape
    if n <= f:
        evals, evecs = np.linalg.eigh(xc @ xc.T)
        evals, evecs = np.clip(evals[::-1], 0.0, None), evecs[:, ::-1]
        scores = evecs * np.sqrt(evals)
    else:
        evals, evecs = np.linalg.eigh(xc.T @ xc)
        evals, evecs = np.clip(evals[::-1], 0.0, None), evecs[:, ::-1]
        scores = xc @ evecs
    total = evals.sum()
    if total <= 0.0:  # every row identical: one (constant) coordinate is all there is
        return np.zeros((n, 1))
    keep = int(np.argmax(np.cumsum(evals) / total >= explained_variance - 1e-12)) + 1
    return scores[:, :keep]

