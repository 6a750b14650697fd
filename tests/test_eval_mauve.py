"""MAUVE: the divergence-frontier area against closed forms, the quantiser, length matching, and
the text-level score's behaviour (identical -> ~1, disjoint -> the disjoint-histogram value,
monotone in contamination, deterministic under a seed)."""

import math
import sys
import types

import numpy as np
import pytest

from gtl_dist.eval import mauve as mv
from gtl_dist.eval.features import principal_components, tfidf_matrix, word_ngrams


# ---- frontier area: closed forms -------------------------------------------------------------

def test_identical_histograms_score_exactly_one():
    for h in ([1.0], [0.5, 0.5], [0.1, 0.2, 0.7]):
        assert mv.mauve_from_histograms(h, h) == pytest.approx(1.0, abs=1e-12)


def test_disjoint_histograms_with_c1_lie_on_the_antidiagonal():
    # R_w = (w, 1 - w): KL(Q||R) = -log(1 - w), KL(P||R) = -log w, so with c = 1 every frontier
    # point is (1 - w, w); the polygon under x + y = 1 has area exactly 1/2.
    curve = mv.divergence_frontier([1, 0], [0, 1], scaling=1.0)
    assert np.allclose(curve.sum(axis=1), 1.0)
    assert tuple(curve[0]) == (1.0, 0.0) and tuple(curve[-1]) == (0.0, 1.0)
    assert mv.frontier_area(curve) == pytest.approx(0.5, abs=1e-12)


def test_disjoint_histograms_area_matches_beta_integral():
    # x = (1-w)^c, y = w^c: area = ∫ y dx = c·B(c+1, c) = 1/252 for c = 5 (the grid converges to it).
    exact = 5 * math.gamma(6) * math.gamma(5) / math.gamma(11)
    assert exact == pytest.approx(1 / 252)
    assert mv.mauve_from_histograms([1, 0], [0, 1], points=1001) == pytest.approx(exact, rel=1e-4)
    coarse = mv.mauve_from_histograms([1, 0], [0, 1])  # 25 points, the default
    assert 0 < coarse < 0.005


def test_half_vs_point_mass_area_is_a_quarter_circle_plus_half():
    # p = (1/2, 1/2), q = (1, 0), c = 1: x = 1 - w/2, y = sqrt(w (2 - w)).
    # Area = ∫_0^1 sqrt(1 - (1-w)^2) dw / 2 + 1/2 (the closing segment to (0, 1)) = π/8 + 1/2.
    got = mv.mauve_from_histograms([0.5, 0.5], [1.0, 0.0], scaling=1.0, points=2001)
    assert got == pytest.approx(math.pi / 8 + 0.5, abs=3e-6)
    # MAUVE is symmetric in its arguments.
    assert mv.mauve_from_histograms([1.0, 0.0], [0.5, 0.5], scaling=1.0, points=2001) == pytest.approx(got)


def test_kl_divergence_hand_value_and_infinity():
    assert mv.kl_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(
        0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert mv.kl_divergence([0.5, 0.5], [1.0, 0.0]) == math.inf
    assert mv.kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))


def test_histograms_are_validated():
    with pytest.raises(ValueError, match="sum"):
        mv.mauve_from_histograms([0.5, 0.6], [0.5, 0.5])
    with pytest.raises(ValueError, match="shape"):
        mv.kl_divergence([1.0], [0.5, 0.5])


# ---- quantiser --------------------------------------------------------------------------------

def _blobs(rng, centres, per):
    return np.vstack([c + 0.01 * rng.standard_normal((per, len(c))) for c in centres])


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [5, 0], [0, 5], [5, 5]], dtype=float)
    x = _blobs(rng, centres, 30)
    labels = mv.kmeans_labels(x, 4, seed=3)
    truth = np.repeat(np.arange(4), 30)
    # Same partition up to renaming: each true cluster maps to exactly one label and vice versa.
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4 and len({b for _, b in pairs}) == 4
    assert np.array_equal(labels, mv.kmeans_labels(x, 4, seed=3))


def test_quantize_histograms_count_each_set_separately():
    rng = np.random.default_rng(1)
    p = _blobs(rng, np.array([[0.0, 0.0]]), 30)            # all in cluster A
    q = np.vstack([_blobs(rng, np.array([[0.0, 0.0]]), 10),  # 10 in A
                   _blobs(rng, np.array([[9.0, 9.0]]), 30)])  # 30 in B
    p_hist, q_hist = mv.quantize(p, q, 2, seed=0)
    a = int(np.argmax(p_hist))
    assert p_hist[a] == 1.0 and q_hist[a] == pytest.approx(0.25) and q_hist[1 - a] == pytest.approx(0.75)


def test_default_num_buckets_is_a_tenth_of_the_smaller_set():
    assert mv.default_num_buckets(1024, 5000) == 102
    assert mv.default_num_buckets(5, 5) == 2


# ---- featuriser -------------------------------------------------------------------------------

def test_tfidf_hand_computed():
    x = tfidf_matrix(["a b", "a c"])
    # vocabulary by document frequency then alphabetically: a (df 2), "a b", "a c", b, c (df 1)
    assert word_ngrams("A b!", 2) == ["a", "b", "a b"]
    w = 1 + math.log(3 / 2)  # smoothed idf of a df-1 term among 2 documents; idf(a) = 1
    norm = math.sqrt(1 + 2 * w * w)
    assert np.allclose(x, [[1 / norm, w / norm, 0, w / norm, 0], [1 / norm, 0, w / norm, 0, w / norm]],
                       atol=1e-6)
    assert tfidf_matrix(["a b", "a c"], max_features=1).shape == (2, 1)  # keeps the df-2 term
    assert np.all(tfidf_matrix(["", "a"])[0] == 0)


def test_principal_components_keep_the_explained_variance():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((400, 3)) * np.array([3.0, 1.0, 0.1])
    z -= z.mean(axis=0)
    var = (z ** 2).sum(axis=0)
    share = np.cumsum(var) / var.sum()
    kept = principal_components(z, explained_variance=share[0] - 1e-6)
    assert kept.shape == (400, 1)
    assert principal_components(z, explained_variance=share[1]).shape == (400, 2)
    full = principal_components(z, explained_variance=1.0)
    # Scores are the data in the principal basis: distances are preserved.
    assert np.allclose(np.linalg.norm(full, axis=1), np.linalg.norm(z, axis=1), atol=1e-8)
    # The wide branch (fewer rows than columns) gives the same distances as the tall branch.
    wide = np.hstack([z[:5], np.zeros((5, 10))])
    assert np.allclose(np.linalg.norm(principal_components(wide, 1.0), axis=1),
                       np.linalg.norm(wide - wide.mean(axis=0), axis=1), atol=1e-8)


# ---- length matching --------------------------------------------------------------------------

def test_length_matched_references_match_the_generated_length_bins():
    gen = [10] * 4 + [20] * 4 + [30] * 8
    ref = [10] * 20 + [20] * 20 + [30] * 20 + [5] * 3
    idx = mv.length_matched_references(gen, ref, np.random.default_rng(0), bins=8)
    assert len(idx) == len(gen) and len(set(idx.tolist())) == len(idx)  # no repeats when enough
    drawn = sorted(ref[i] for i in idx)
    assert drawn == sorted(gen)


def test_length_matching_falls_back_to_nearest_lengths():
    # No reference is as long as the generated texts: take the nearest lengths, 99 then 50.
    idx = mv.length_matched_references([100, 100], [3, 99, 50], np.random.default_rng(0), bins=2)
    assert idx.tolist() == [1, 2]


# ---- MAUVE of texts ---------------------------------------------------------------------------

def _texts(prefix, n, rng, length=30, vocab=200):
    ids = rng.zipf(1.3, size=(n, length)) % vocab
    return [" ".join(f"{prefix}{j}" for j in row) for row in ids]


@pytest.fixture(scope="module")
def corpora():
    rng = np.random.default_rng(0)
    return {"p": _texts("a", 100, rng), "q": _texts("a", 300, rng), "other": _texts("b", 100, rng)}


def test_same_distribution_scores_near_one(corpora):
    res = mv.mauve(corpora["p"], corpora["q"], seeds=2)
    assert res.mean > 0.85
    assert res.metric == "mauve[tfidf-svd]" and res.num_buckets == 10 and res.n == 100


def test_disjoint_vocabularies_score_the_disjoint_value(corpora):
    # Every cluster is pure, so the histograms have disjoint support whatever k-means does.
    res = mv.mauve(corpora["other"], corpora["q"], seeds=2)
    assert res.mean == pytest.approx(mv.mauve_from_histograms([1, 0], [0, 1]), abs=1e-9)
    assert res.mean < 0.01


def test_mauve_falls_as_foreign_text_is_mixed_in(corpora):
    p, other = corpora["p"], corpora["other"]
    scores = [mv.mauve(p[:100 - m] + other[:m], corpora["q"], seeds=1).mean for m in (0, 25, 50, 75, 100)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


def test_mauve_is_deterministic_under_a_seed(corpora):
    a = mv.mauve(corpora["p"], corpora["q"], seeds=2, seed=7)
    b = mv.mauve(corpora["p"], corpora["q"], seeds=2, seed=7)
    c = mv.mauve(corpora["p"], corpora["q"], seeds=2, seed=8)
    assert a.per_seed == b.per_seed
    assert a.per_seed != c.per_seed
    assert a.std == pytest.approx(np.std(a.per_seed)) and a.mean == pytest.approx(np.mean(a.per_seed))


def test_mauve_text_extra_gets_our_features(corpora, monkeypatch):
    calls = []

    def compute_mauve(p_features, q_features, **kw):
        calls.append((p_features.shape, q_features.shape, kw, p_features))
        return types.SimpleNamespace(mauve=0.5)

    monkeypatch.setitem(sys.modules, "mauve", types.SimpleNamespace(compute_mauve=compute_mauve))
    res = mv.mauve(corpora["p"], corpora["q"], seeds=2, featurizer="mauve-text")
    assert res.metric == "mauve[tfidf-svd/mauve-text]" and res.per_seed == (0.5, 0.5)
    # It gets the TF-IDF vectors (non-negative, unit rows; it normalises and reduces them
    # itself), not our PCA scores.
    assert len(calls) == 2 and calls[0][0][0] == 100 and calls[0][1][0] == 100
    p_feats = calls[0][3]
    assert p_feats.min() >= 0 and np.allclose(np.linalg.norm(p_feats, axis=1), 1.0, atol=1e-5)
    assert calls[0][2]["mauve_scaling_factor"] == 5.0 and calls[0][2]["num_buckets"] == 10
    assert mv.resolve_featurizer("auto") == "mauve-text"


def test_mauve_text_missing_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "mauve", None)  # import fails
    with pytest.raises(ValueError, match=r"pip install 'gtl_dist\[mauve\]'.*eval.mauve_featurizer=tfidf"):
        mv.resolve_featurizer("mauve-text")
    assert mv.resolve_featurizer("auto") == "tfidf"
    with pytest.raises(ValueError, match="eval.mauve_featurizer"):
        mv.resolve_featurizer("gpt2")
