"""Markov metrics: hand-computed P̂ and NLL, exact expected NLL by enumeration, convergence of
samples drawn from Q itself, merging shards."""

import itertools
import math

import numpy as np
import pytest

from gtl_dist.data.markov import diagonal_matrix, log_prob, sample_sequences
from gtl_dist.eval.markov import (empirical_transitions, expected_nll, markov_counts,
                                  markov_metrics, transition_error)

Q2 = np.array([[0.8, 0.2], [0.3, 0.7]])
P2 = np.array([[0.5, 0.5], [0.5, 0.5]])


def test_hand_computed_transition_matrix_and_error():
    seqs = np.array([[0, 0, 1], [1, 0, 0]])
    counts = markov_counts(seqs, P2, P2)
    # bigrams (0,0) (0,1) | (1,0) (0,0)
    assert counts.transitions.tolist() == [[2, 1], [1, 0]]
    assert np.allclose(empirical_transitions(counts.transitions), [[2 / 3, 1 / 3], [1, 0]])
    m = markov_metrics(counts, P2)
    # |P̂ - P2| = [[1/6, 1/6], [1/2, 1/2]]
    assert m["transition_mean_abs_err"] == pytest.approx(1 / 3)
    assert m["transition_max_abs_err"] == pytest.approx(0.5)


def test_hand_computed_nll_under_target_and_source():
    seqs = np.array([[0, 0, 1], [1, 1, 1]])
    m = markov_metrics(markov_counts(seqs, Q2, P2), Q2)
    nll_a = math.log(2) - math.log(0.8) - math.log(0.2)
    nll_b = math.log(2) - 2 * math.log(0.7)
    assert m["nll_target_per_seq"] == pytest.approx((nll_a + nll_b) / 2)
    assert m["nll_target_per_token"] == pytest.approx((nll_a + nll_b) / 6)
    assert m["nll_source_per_seq"] == pytest.approx(3 * math.log(2))  # every path has prob 1/8
    assert m["nll_source_per_token"] == pytest.approx(math.log(2))


def test_unvisited_state_is_charged_the_whole_target_row():
    seqs = np.array([[0, 0, 0]])  # state 1 never precedes a transition
    p_hat = empirical_transitions(markov_counts(seqs, Q2, P2).transitions)
    assert p_hat.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    mean_err, max_err = transition_error(p_hat, Q2)
    assert mean_err == pytest.approx((0.2 + 0.2 + 0.3 + 0.7) / 4) and max_err == pytest.approx(0.7)


@pytest.mark.exact
@pytest.mark.parametrize("length", [1, 2, 4])
def test_expected_nll_matches_enumeration(length):
    a = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])
    b = diagonal_matrix(3, 0.5)
    seqs = np.array(list(itertools.product(range(3), repeat=length)))
    prob_a = np.exp(log_prob(seqs, a))
    assert prob_a.sum() == pytest.approx(1.0)
    assert expected_nll(a, b, length) == pytest.approx(float(-(prob_a * log_prob(seqs, b)).sum()))
    assert expected_nll(a, a, length) == pytest.approx(float(-(prob_a * log_prob(seqs, a)).sum()))


def test_expected_nll_is_infinite_where_the_model_forbids_a_transition():
    assert expected_nll(P2, np.array([[1.0, 0.0], [0.0, 1.0]]), 3) == math.inf


def test_samples_from_the_target_converge_to_it():
    q = diagonal_matrix(5, 0.8)
    p = diagonal_matrix(5, 0.1)
    rng = np.random.default_rng(0)
    errors = []
    for n in (50, 500, 20_000):
        m = markov_metrics(markov_counts(sample_sequences(q, n, 20, rng), q, p), q)
        errors.append(m["transition_mean_abs_err"])
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.003
    # 20,000 sequences: the mean NLL is within a few standard errors of the chain's entropy.
    seqs = sample_sequences(q, 20_000, 20, rng)
    nll = -log_prob(seqs, q)
    m = markov_metrics(markov_counts(seqs, q, p), q)
    assert m["nll_target_per_seq"] == pytest.approx(expected_nll(q, q, 20), abs=4 * nll.std() / math.sqrt(len(nll)))
    # Target samples are far less likely under the switching source chain.
    assert m["nll_source_per_seq"] > m["nll_target_per_seq"] + 10


def test_counts_merge_across_shards():
    q, p = diagonal_matrix(4, 0.7), diagonal_matrix(4, 0.25)
    seqs = sample_sequences(q, 100, 8, np.random.default_rng(1))
    whole = markov_counts(seqs, q, p)
    parts = markov_counts(seqs[:30], q, p) + markov_counts(seqs[30:], q, p)
    assert np.array_equal(parts.transitions, whole.transitions)
    assert parts.nll_target == pytest.approx(whole.nll_target) and parts.tokens == whole.tokens == 800
    assert markov_metrics(parts, q) == pytest.approx(markov_metrics(whole, q))


def test_masked_samples_are_rejected():
    with pytest.raises(ValueError, match="MASK"):
        markov_counts(np.array([[0, 2, 1]]), Q2, P2)  # 2 is [MASK] for a 2-state chain
