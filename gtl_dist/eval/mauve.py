"""MAUVE (Pillutla et al., NeurIPS 2021) with an offline featuriser.

MAUVE compares a model's text distribution P with human text Q through a quantised
representation: embed both sample sets, cluster the union with k-means (k ~ n/10), and compare
the two cluster histograms p, q along the divergence frontier

    R_w = w p + (1 - w) q,        C(P, Q) = { (exp(-c KL(Q || R_w)), exp(-c KL(P || R_w))) }

for w on a grid of 25 points in (0, 1), closed by the extreme points (1, 0) and (0, 1). MAUVE is
the area under that curve, in [0, 1]; 1 means the histograms are identical. c = 5 as in the
paper. The text-level entry point (`mauve`) also draws length-matched references and repeats
over seeds, as the GTL evaluation does (mean ± std over 5 seeds).

With ``featurizer="mauve-text"`` the optional GPLv3 package ``mauve-text`` (never vendored, never
required) gets our TF-IDF vectors and does its own L2-normalisation, PCA and k-means (faiss), so
only the embedding differs from the reference and nothing is downloaded. On the same vectors the
two quantisers agree within the spread over seeds (benchmarks/bench_mauve.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from gtl_dist.config import FEATURIZER_CHOICES
from gtl_dist.eval.features import FEATURIZER, principal_components, tfidf_matrix, words
from gtl_dist.log import get_logger

log = get_logger("eval.mauve")

SCALING = 5.0          # the constant c of the paper
FRONTIER_POINTS = 25   # mixture weights on the frontier, as in the reference implementation


# ----------------------------------------------------------------------------------------------
# Divergence frontier and its area
# ----------------------------------------------------------------------------------------------

def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) in nats for histograms; inf where p has mass that q lacks."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"histograms differ in shape: {p.shape} vs {q.shape}")
    if np.any((p > 0) & (q == 0)):
        return float("inf")
    both = (p > 0) & (q > 0)
    return float(np.sum(p[both] * np.log(p[both] / q[both])))


def divergence_frontier(p: np.ndarray, q: np.ndarray, scaling: float = SCALING,
                        points: int = FRONTIER_POINTS) -> np.ndarray:
    """The frontier as a (points + 2, 2) array ordered by w: (1, 0), the w-grid, then (0, 1).

    Along increasing w, x = exp(-c KL(Q || R_w)) falls and y = exp(-c KL(P || R_w)) rises, so
    this order traces the curve once from the x-axis to the y-axis.
    """
    p = _histogram(p, "p")
    q = _histogram(q, "q")
    if points < 2:
        raise ValueError(f"the frontier needs at least 2 points, got {points}")
    curve = [(1.0, 0.0)]
    for w in np.linspace(1e-6, 1.0 - 1e-6, points):
        r = w * p + (1.0 - w) * q
        curve.append((np.exp(-scaling * kl_divergence(q, r)), np.exp(-scaling * kl_divergence(p, r))))
    curve.append((0.0, 1.0))
    return np.asarray(curve, dtype=np.float64)


def frontier_area(curve: np.ndarray) -> float:
    """Area under the frontier polygon (trapezoids along the curve's own order).

    Walking the curve in w-order instead of sorting by x keeps the area well defined when
    several points share an x (e.g. p == q puts every interior point at (1, 1)); on a strictly
    monotone curve it equals the reference's sorted trapezoid rule.
    """
    x, y = np.asarray(curve, dtype=np.float64).T
    return float(np.sum((x[:-1] - x[1:]) * (y[:-1] + y[1:]) / 2.0))


def mauve_from_histograms(p: np.ndarray, q: np.ndarray, scaling: float = SCALING,
                          points: int = FRONTIER_POINTS) -> float:
    return frontier_area(divergence_frontier(p, q, scaling, points))


def _histogram(h: np.ndarray, name: str) -> np.ndarray:
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 1 or h.size == 0 or np.any(h < 0) or not np.isclose(h.sum(), 1.0):
        raise ValueError(f"{name}: expected a 1-d histogram of non-negative numbers summing to 1, "
                         f"got shape {h.shape} and sum {h.sum() if h.size else 0}")
    return h


# ----------------------------------------------------------------------------------------------
# Quantisation: k-means on the union of both feature sets
# ----------------------------------------------------------------------------------------------

def kmeans_labels(points: np.ndarray, k: int, seed: int, restarts: int = 5,
                  max_iter: int = 500) -> np.ndarray:
    """Cluster index of every row: k-means++ starts, Lloyd iterations, best of ``restarts``."""
    # float32 like the reference's faiss k-means: the distance products dominate the cost.
    x = np.asarray(points, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"k-means needs a non-empty (n, d) array, got shape {x.shape}")
    k = min(k, len(x))
    rng = np.random.default_rng(seed)
    best_labels, best_inertia = None, np.inf
    for _ in range(max(restarts, 1)):
        labels, inertia = _lloyd(x, _kmeans_pp(x, k, rng), max_iter)
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    sq = (x ** 2).sum(axis=1)
    chosen = [int(rng.integers(len(x)))]
    closest = np.maximum(sq - 2.0 * x @ x[chosen[0]] + sq[chosen[0]], 0.0)
    for _ in range(1, k):
        weights = closest.astype(np.float64)
        total = weights.sum()
        # All points already coincide with a centroid: any further choice is as good as another.
        i = int(rng.choice(len(x), p=weights / total)) if total > 0 else int(rng.integers(len(x)))
        chosen.append(i)
        closest = np.minimum(closest, np.maximum(sq - 2.0 * x @ x[i] + sq[i], 0.0))
    return x[chosen].copy()


def _lloyd(x: np.ndarray, centroids: np.ndarray, max_iter: int) -> tuple[np.ndarray, float]:
    sq = (x ** 2).sum(axis=1)
    labels = None
    for _ in range(max_iter):
        dist = sq[:, None] - 2.0 * x @ centroids.T + (centroids ** 2).sum(axis=1)[None, :]
        new = dist.argmin(axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        members = np.zeros((len(centroids), len(x)), dtype=x.dtype)
        members[labels, np.arange(len(x))] = 1.0
        counts = members.sum(axis=1)
        sums = members @ x
        filled = counts > 0  # an empty cluster keeps its centroid
        centroids[filled] = sums[filled] / counts[filled, None]
    dist = sq[:, None] - 2.0 * x @ centroids.T + (centroids ** 2).sum(axis=1)[None, :]
    labels = dist.argmin(axis=1)
    return labels, float(np.maximum(dist[np.arange(len(x)), labels], 0.0).sum(dtype=np.float64))


def default_num_buckets(n_p: int, n_q: int) -> int:
    """The reference's heuristic: one cluster per ten samples of the smaller set, at least 2."""
    return max(2, int(round(min(n_p, n_q) / 10)))


def quantize(p_features: np.ndarray, q_features: np.ndarray, num_buckets: int, seed: int,
             restarts: int = 5, max_iter: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the union of both feature sets; return the two normalised cluster histograms."""
    p_features, q_features = np.asarray(p_features), np.asarray(q_features)
    if p_features.ndim != 2 or q_features.ndim != 2 or p_features.shape[1] != q_features.shape[1]:
        raise ValueError(f"feature arrays must be (n, d) with the same d, got {p_features.shape} "
                         f"and {q_features.shape}")
    labels = kmeans_labels(np.vstack([p_features, q_features]), num_buckets, seed, restarts, max_iter)
    p_hist = np.bincount(labels[:len(p_features)], minlength=num_buckets).astype(np.float64)
    q_hist = np.bincount(labels[len(p_features):], minlength=num_buckets).astype(np.float64)
    return p_hist / p_hist.sum(), q_hist / q_hist.sum()


def mauve_from_features(p_features: np.ndarray, q_features: np.ndarray, seed: int,
                        num_buckets: Optional[int] = None, scaling: float = SCALING,
                        points: int = FRONTIER_POINTS, restarts: int = 5, max_iter: int = 500) -> float:
    """MAUVE of two feature sets (already normalised and reduced, as our featuriser returns them)."""
    k = num_buckets or default_num_buckets(len(p_features), len(q_features))
    p, q = quantize(p_features, q_features, k, seed, restarts, max_iter)
    return mauve_from_histograms(p, q, scaling, points)


# ----------------------------------------------------------------------------------------------
# Length-matched references
# ----------------------------------------------------------------------------------------------

def length_matched_references(generated_lengths: Sequence[int], reference_lengths: Sequence[int],
                              rng: np.random.Generator, bins: int = 8) -> np.ndarray:
    """Indices of references whose length distribution matches the generated one.

    Cut the generated lengths at their quantiles into ``bins`` bins and draw, from the
    references falling in each bin, as many as there are generated texts in it (without
    replacement while the bin has enough). Lengths outside the generated range fall into the
    outermost bins. A bin with too few references is completed with replacement; a bin with
    none takes the references nearest in length. Both are logged, since they weaken the match.
    """
    gen = np.asarray(generated_lengths, dtype=np.float64)
    ref = np.asarray(reference_lengths, dtype=np.float64)
    if len(gen) == 0 or len(ref) == 0:
        raise ValueError(f"length matching needs generated and reference texts, got {len(gen)} "
                         f"generated and {len(ref)} references")
    if bins < 1:
        raise ValueError(f"length bins must be at least 1, got {bins}")
    inner_edges = np.quantile(gen, np.linspace(0.0, 1.0, bins + 1))[1:-1]
    gen_bin = np.searchsorted(inner_edges, gen, side="right")
    ref_bin = np.searchsorted(inner_edges, ref, side="right")
    chosen = []
    for b in range(bins):
        need = int(np.sum(gen_bin == b))
        if need == 0:
            continue
        pool = np.flatnonzero(ref_bin == b)
        if len(pool) >= need:
            chosen.append(rng.choice(pool, size=need, replace=False))
        elif len(pool) > 0:
            log.warning("length bin %d: %d references for %d generated texts; drawing with "
                        "replacement", b, len(pool), need)
            chosen.append(rng.choice(pool, size=need, replace=True))
        else:
            centre = np.median(gen[gen_bin == b])
            order = np.argsort(np.abs(ref - centre), kind="stable")
            log.warning("length bin %d (around %g): no reference of that length; using the "
                        "nearest lengths", b, centre)
            chosen.append(order[np.arange(need) % len(order)])
    return np.concatenate(chosen)


# ----------------------------------------------------------------------------------------------
# MAUVE of texts over seeds
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MauveResult:
    mean: float
    std: float  # population std over seeds
    per_seed: tuple[float, ...]
    featurizer: str
    num_buckets: int
    n: int  # generated texts (and drawn references) per seed

    @property
    def metric(self) -> str:
        """The result name, naming the featuriser: scores from different ones are not comparable."""
        return f"mauve[{self.featurizer}]"


def resolve_featurizer(choice: str) -> str:
    """``eval.mauve_featurizer`` -> "tfidf" or "mauve-text".

    "auto" uses the reference quantiser when the user installed the optional extra, else ours.
    """
    if choice not in FEATURIZER_CHOICES:
        raise ValueError(f"eval.mauve_featurizer: '{choice}' is not one of {', '.join(FEATURIZER_CHOICES)}")
    if choice == "tfidf":
        return "tfidf"
    available = _mauve_text() is not None
    if choice == "mauve-text" and not available:
        raise ValueError("eval.mauve_featurizer = 'mauve-text' needs the optional package: "
                         "pip install 'gtl_dist[mauve]' (mauve-text, GPLv3); or set "
                         "eval.mauve_featurizer=tfidf")
    return "mauve-text" if available else "tfidf"


def _mauve_text():
    try:
        return importlib.import_module("mauve")
    except ImportError:
        return None


def mauve(generated: Sequence[str], references: Sequence[str], *, seeds: int = 5,
          featurizer: str = "tfidf", length_bins: int = 8, scaling: float = SCALING,
          points: int = FRONTIER_POINTS, num_buckets: Optional[int] = None,
          explained_variance: float = 0.9, max_features: int = 8192, kmeans_restarts: int = 5,
          kmeans_max_iter: int = 500, generated_lengths: Optional[Sequence[int]] = None,
          reference_lengths: Optional[Sequence[int]] = None, seed: int = 0) -> MauveResult:
    """MAUVE of generated texts against length-matched references, mean ± std over seeds.

    Seed ``seed + i`` draws run i's references and starts its k-means. Lengths default to word
    counts; pass token counts to match on tokens. The featuriser is fitted per run on the union
    of the generated texts and that run's references.
    """
    if seeds < 1:
        raise ValueError(f"eval.mauve_seeds must be at least 1, got {seeds}")
    if len(generated) < 2:
        raise ValueError(f"MAUVE needs at least 2 generated texts, got {len(generated)}")
    quantiser = resolve_featurizer(featurizer)
    gen_len = [len(words(t)) for t in generated] if generated_lengths is None else generated_lengths
    ref_len = [len(words(t)) for t in references] if reference_lengths is None else reference_lengths
    if len(gen_len) != len(generated) or len(ref_len) != len(references):
        raise ValueError("generated_lengths / reference_lengths must have one entry per text")
    if len(references) < len(generated):
        log.warning("MAUVE: %d references for %d generated texts; references repeat",
                    len(references), len(generated))
    n = len(generated)
    k = num_buckets or default_num_buckets(n, n)
    scores = []
    for i in range(seeds):
        rng = np.random.default_rng(seed + i)
        picked = length_matched_references(gen_len, ref_len, rng, length_bins)
        tfidf = tfidf_matrix(list(generated) + [references[j] for j in picked], max_features=max_features)
        if quantiser == "mauve-text":
            out = _mauve_text().compute_mauve(
                p_features=tfidf[:n], q_features=tfidf[n:], num_buckets=k, mauve_scaling_factor=scaling,
                divergence_curve_discretization_size=points, kmeans_explained_var=explained_variance,
                kmeans_num_redo=kmeans_restarts, kmeans_max_iter=kmeans_max_iter, seed=seed + i,
                device_id=-1, verbose=False)
            scores.append(float(out.mauve))
        else:
            feats = principal_components(tfidf, explained_variance)
            scores.append(mauve_from_features(feats[:n], feats[n:], seed + i, k, scaling, points,
                                              kmeans_restarts, kmeans_max_iter))
    name = FEATURIZER if quantiser == "tfidf" else f"{FEATURIZER}/mauve-text"
    return MauveResult(float(np.mean(scores)), float(np.std(scores)), tuple(scores), name, k, n)
