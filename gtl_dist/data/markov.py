"""Synthetic Markov chains (docs/method.md §10): the exact math the data, the evaluation and the tests share.

Token ids are the chain states 0..S-1 and [MASK] is S, so the vocabulary has S + 1 ids. The first
token is uniform over the states; every later token follows the row of the previous one in the
transition matrix. Because the distribution is known exactly, sequence log-probabilities and the
transition matrix a sampler should reproduce can be checked without any learned model.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from gtl_dist.config import MarkovConfig

SOURCE = "source"


def diagonal_matrix(num_states: int, diagonal: float) -> np.ndarray:
    """Stay with probability ``diagonal``; the rest is spread evenly over the other states."""
    off = (1.0 - diagonal) / (num_states - 1)
    matrix = np.full((num_states, num_states), off, dtype=np.float64)
    np.fill_diagonal(matrix, diagonal)
    return matrix


def dirichlet_matrix(num_states: int, concentration: float, seed: int, name: str) -> np.ndarray:
    """Rows drawn from a symmetric Dirichlet, from a seed and the chain's name alone (adding a
    chain leaves the others unchanged)."""
    tag = int.from_bytes(hashlib.sha256(f"dirichlet/{name}".encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, tag])
    return rng.dirichlet(np.full(num_states, float(concentration)), size=num_states)


def transition_matrices(mcfg: MarkovConfig) -> dict[str, np.ndarray]:
    """``{"source": P, <target>: Q, ...}`` from the config: per chain a full matrix wins over
    Dirichlet rows, which win over a diagonal; perturbed targets mix the source with Dirichlet rows."""
    s = mcfg.num_states
    if mcfg.source_matrix is not None:
        source = np.asarray(mcfg.source_matrix, dtype=np.float64)
    elif mcfg.source_dirichlet is not None:
        source = dirichlet_matrix(s, mcfg.source_dirichlet, mcfg.dirichlet_seed, SOURCE)
    else:
        source = diagonal_matrix(s, mcfg.source_diagonal)
    out = {SOURCE: source}
    if mcfg.target_matrices:
        for name, mat in mcfg.target_matrices.items():
            out[name] = np.asarray(mat, dtype=np.float64)
    elif mcfg.target_dirichlet:
        for name, conc in mcfg.target_dirichlet.items():
            out[name] = dirichlet_matrix(s, conc, mcfg.dirichlet_seed, name)
    elif mcfg.target_perturbations:
        for name, lam in mcfg.target_perturbations.items():
            fresh = dirichlet_matrix(s, mcfg.perturbation_dirichlet, mcfg.dirichlet_seed, name)
            out[name] = (1.0 - lam) * source + lam * fresh
    else:
        for name, diag in mcfg.target_diagonals.items():
            out[name] = diagonal_matrix(s, diag)
    for name, mat in out.items():
        check_transition_matrix(mat, name)
    return out


def check_transition_matrix(matrix: np.ndarray, name: str = "matrix") -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"Markov chain '{name}': transition matrix must be square, got shape {matrix.shape}")
    if (matrix < 0).any() or not np.allclose(matrix.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError(f"Markov chain '{name}': rows must be non-negative and sum to 1, "
                         f"got row sums {matrix.sum(axis=1).round(6).tolist()}")


def chain_spec(mcfg: MarkovConfig) -> dict:
    """What the token ids mean: the state count and every chain's transition matrix."""
    return {"kind": "markov", "num_states": mcfg.num_states,
            "chains": {k: v.tolist() for k, v in transition_matrices(mcfg).items()}}


def chain_spec_hash(mcfg: MarkovConfig) -> str:
    """Stands in for the tokenizer hash of text corpora (manifest ``tokenizer_hash``)."""
    return hashlib.sha256(json.dumps(chain_spec(mcfg), sort_keys=True).encode()).hexdigest()


def sample_sequences(matrix: np.ndarray, num: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` sequences of ``length`` states: uniform first state, then rows of ``matrix``."""
    s = matrix.shape[0]
    cdf = np.cumsum(matrix, axis=1)
    cdf[:, -1] = 1.0  # rounding must never push a uniform draw past the last state
    seqs = np.empty((num, length), dtype=np.int64)
    seqs[:, 0] = rng.integers(0, s, size=num)
    uniforms = rng.random((num, length - 1))
    for t in range(1, length):
        rows = cdf[seqs[:, t - 1]]
        seqs[:, t] = (uniforms[:, t - 1, None] >= rows).sum(axis=1)
    return seqs


def _check_states(seqs: np.ndarray, num_states: int) -> np.ndarray:
    seqs = np.asarray(seqs)
    if seqs.ndim != 2:
        raise ValueError(f"expected a [num_sequences, length] array of states, got shape {seqs.shape}")
    if seqs.size and (seqs.min() < 0 or seqs.max() >= num_states):
        bad = seqs[(seqs < 0) | (seqs >= num_states)][0]
        raise ValueError(f"token id {int(bad)} is not a state of a {num_states}-state chain "
                         f"(ids 0..{num_states - 1}; {num_states} is [MASK]): unmask every position first")
    return seqs.astype(np.int64, copy=False)


def log_prob(seqs: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Exact log-probability (float64, natural log) of each sequence under the chain.

    log p(x) = log(1/S) + sum_t log P[x_t, x_{t+1}]; -inf for a transition of probability zero.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    seqs = _check_states(seqs, matrix.shape[0])
    with np.errstate(divide="ignore"):
        log_p = np.log(matrix)
    first = -np.log(matrix.shape[0])
    return first + log_p[seqs[:, :-1], seqs[:, 1:]].sum(axis=1)


def transition_counts(seqs: np.ndarray, num_states: int) -> np.ndarray:
    """Bigram counts C[i, j] = number of positions with x_t = i and x_{t+1} = j."""
    seqs = _check_states(seqs, num_states)
    flat = seqs[:, :-1].ravel() * num_states + seqs[:, 1:].ravel()
    return np.bincount(flat, minlength=num_states * num_states).reshape(num_states, num_states)


def empirical_transition_matrix(seqs: np.ndarray, num_states: int) -> np.ndarray:
    """Bigram counts with rows normalised (the P̂ of docs/method.md §10).

    A state that never occurs before the last position has no evidence: its row stays all zeros,
    so |P̂ - Q| charges the full row of Q against a sampler that never visits it.
    """
    counts = transition_counts(seqs, num_states).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def generate_domain(matrix: np.ndarray, num: int, length: int, seed: int, domain: str,
                    split: str) -> np.ndarray:
    """The sequences of one (domain, split), from a seed that depends only on its own name.

    Adding a target or changing another domain's size leaves these sequences unchanged.
    """
    tag = int.from_bytes(hashlib.sha256(f"{domain}/{split}".encode()).digest()[:8], "little")
    return sample_sequences(matrix, num, length, np.random.default_rng([seed, tag]))
