"""Markov-chain metrics (docs/method.md §10, synthetic task): how close samples are to the target chain.

- The empirical transition matrix P̂ of the samples (bigram counts, rows normalised) against the
  true target Q: mean and max |P̂ − Q| over all S x S entries (the paper's numbers).
- The exact NLL of the samples under the true target chain and under the source chain, per
  sequence and per token (tokens = sequence length, the uniform first state included).
  Low NLL under Q alone is not "good": a sampler stuck on the most likely path scores below the
  chain's own entropy. ``expected_nll`` gives the value samples drawn from Q itself would have.

The chain math (log-probabilities, bigram counts) is the data layer's, gtl_dist/data/markov.py.
Counts from several sample shards add up; metrics are computed once on the merged counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gtl_dist.data.markov import log_prob, transition_counts


@dataclass(frozen=True)
class MarkovCounts:
    transitions: np.ndarray  # (S, S) bigram counts
    nll_target: float        # summed over sequences, nats
    nll_source: float
    sequences: int
    tokens: int

    def __add__(self, other: "MarkovCounts") -> "MarkovCounts":
        if self.transitions.shape != other.transitions.shape:
            raise ValueError(f"cannot merge counts of {self.transitions.shape[0]}- and "
                             f"{other.transitions.shape[0]}-state chains")
        return MarkovCounts(self.transitions + other.transitions, self.nll_target + other.nll_target,
                            self.nll_source + other.nll_source, self.sequences + other.sequences,
                            self.tokens + other.tokens)


def markov_counts(samples: np.ndarray, target_matrix: np.ndarray,
                  source_matrix: np.ndarray) -> MarkovCounts:
    """Sufficient statistics of one shard of samples ([num, length] states, no [MASK] left)."""
    samples = np.asarray(samples)
    num_states = np.asarray(target_matrix).shape[0]
    return MarkovCounts(transition_counts(samples, num_states),
                        float(-log_prob(samples, target_matrix).sum()),
                        float(-log_prob(samples, source_matrix).sum()),
                        int(samples.shape[0]), int(samples.size))


def empirical_transitions(counts: np.ndarray) -> np.ndarray:
    """P̂ from bigram counts. A state never seen before the last position keeps a zero row (the
    data layer's convention): |P̂ − Q| then charges Q's whole row to a sampler that never visits it.
    """
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def transition_error(p_hat: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """(mean, max) of |P̂ − Q| over all entries."""
    p_hat, q = np.asarray(p_hat, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p_hat.shape != q.shape:
        raise ValueError(f"P̂ has shape {p_hat.shape} but the target matrix has {q.shape}")
    err = np.abs(p_hat - q)
    return float(err.mean()), float(err.max())


def markov_metrics(counts: MarkovCounts, target_matrix: np.ndarray) -> dict[str, float]:
    if counts.sequences == 0:
        raise ValueError("Markov metrics of zero samples")
    mean_err, max_err = transition_error(empirical_transitions(counts.transitions), target_matrix)
    return {
        "transition_mean_abs_err": mean_err,
        "transition_max_abs_err": max_err,
        "nll_target_per_seq": counts.nll_target / counts.sequences,
        "nll_target_per_token": counts.nll_target / counts.tokens,
        "nll_source_per_seq": counts.nll_source / counts.sequences,
        "nll_source_per_token": counts.nll_source / counts.tokens,
    }


def expected_nll(sample_matrix: np.ndarray, model_matrix: np.ndarray, length: int) -> float:
    """E over x drawn from the ``sample_matrix`` chain of −log p(x) under the ``model_matrix`` chain.

    Exact: log S for the uniform first state, plus for each later step the state marginal
    π_t (π_0 uniform, π_t = π_{t−1} A) times each row's cross-entropy −Σ_j A_ij log B_ij.
    With the same matrix twice this is the chain's entropy: the NLL a perfect sampler scores.
    """
    a = np.asarray(sample_matrix, dtype=np.float64)
    b = np.asarray(model_matrix, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected two square matrices of one shape, got {a.shape} and {b.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        row_xent = -np.where(a > 0, a * np.log(b), 0.0).sum(axis=1)
    marginal = np.full(a.shape[0], 1.0 / a.shape[0])
    total = np.log(a.shape[0])
    for _ in range(length - 1):
        total += float(marginal @ row_xent)
        marginal = marginal @ a
    return float(total)
