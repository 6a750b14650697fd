"""Markov chains: matrices from the config, exact log-probabilities, empirical transition matrices."""

import itertools

import numpy as np
import pytest

from gtl_dist.config import MarkovConfig, load_config
from gtl_dist.data import markov


def test_paper_chains_from_the_markov_preset(configs_dir):
    cfg = load_config(configs_dir / "markov.yaml")
    chains = markov.transition_matrices(cfg.data.markov)
    assert set(chains) == {"source", "sticky"}
    # docs/method.md §10: source diagonal 0.10 / off-diagonal 0.225, target 0.80 / 0.05.
    np.testing.assert_allclose(np.diag(chains["source"]), 0.10)
    np.testing.assert_allclose(chains["source"][0, 1:], 0.225)
    np.testing.assert_allclose(np.diag(chains["sticky"]), 0.80)
    np.testing.assert_allclose(chains["sticky"][3, [0, 1, 2, 4]], 0.05)


def test_full_matrices_override_diagonals():
    q = [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]]
    m = MarkovConfig(num_states=3, source_matrix=[[1 / 3] * 3] * 3, target_matrices={"cyc": q})
    chains = markov.transition_matrices(m)
    assert list(chains) == ["source", "cyc"]
    np.testing.assert_array_equal(chains["cyc"], np.array(q))


def test_log_prob_is_a_normalised_distribution_by_enumeration():
    q = np.array([[0.5, 0.5, 0.0], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    seqs = np.array(list(itertools.product(range(3), repeat=4)))
    lp = markov.log_prob(seqs, q)
    assert np.exp(lp).sum() == pytest.approx(1.0, abs=1e-12)
    # One sequence by hand: 1/3 * q[0,1] * q[1,2] * q[2,2].
    assert markov.log_prob(np.array([[0, 1, 2, 2]]), q)[0] == pytest.approx(np.log(1 / 3 * 0.5 * 0.3 * 0.6))
    assert markov.log_prob(np.array([[0, 2, 2, 2]]), q)[0] == -np.inf  # q[0,2] = 0


def test_empirical_transition_matrix_by_hand():
    seqs = np.array([[0, 0, 1], [1, 0, 0]])  # bigrams: 00 01 10 00
    p_hat = markov.empirical_transition_matrix(seqs, 3)
    np.testing.assert_allclose(p_hat, [[2 / 3, 1 / 3, 0], [1, 0, 0], [0, 0, 0]])  # state 2 never seen
    np.testing.assert_array_equal(markov.transition_counts(seqs, 3), [[2, 1, 0], [1, 0, 0], [0, 0, 0]])


def test_samples_reproduce_the_chain():
    q = markov.diagonal_matrix(4, 0.7)
    seqs = markov.sample_sequences(q, 20_000, 12, np.random.default_rng(0))
    assert np.abs(markov.empirical_transition_matrix(seqs, 4) - q).max() < 0.01
    first = np.bincount(seqs[:, 0], minlength=4) / len(seqs)
    np.testing.assert_allclose(first, 0.25, atol=0.015)  # uniform first state


def test_mask_ids_and_bad_matrices_are_rejected():
    q = markov.diagonal_matrix(3, 0.5)
    with pytest.raises(ValueError, match="token id 3 is not a state.*unmask"):
        markov.log_prob(np.array([[0, 3, 1]]), q)
    with pytest.raises(ValueError, match="sum to 1"):
        markov.check_transition_matrix(np.array([[0.5, 0.4], [0.5, 0.5]]), "bad")


def test_generation_is_seeded_per_domain_and_spec_hash_tracks_the_chains():
    m = MarkovConfig(num_states=3, target_diagonals={"a": 0.9})
    chains = markov.transition_matrices(m)
    one = markov.generate_domain(chains["a"], 50, 6, seed=1, domain="a", split="train")
    two = markov.generate_domain(chains["a"], 50, 6, seed=1, domain="a", split="train")
    other = markov.generate_domain(chains["a"], 50, 6, seed=1, domain="a", split="test")
    np.testing.assert_array_equal(one, two)
    assert not np.array_equal(one, other)
    h = markov.chain_spec_hash(m)
    assert h == markov.chain_spec_hash(MarkovConfig(num_states=3, target_diagonals={"a": 0.9}))
    assert h != markov.chain_spec_hash(MarkovConfig(num_states=3, target_diagonals={"a": 0.8}))
