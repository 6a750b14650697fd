"""Exact, enumerated quantities for tiny vocabularies and lengths (used by the exactness tests).

Everything here is float64 numpy over ALL sequences x in V^L and ALL partially masked states
z in (V + 1)^L, so the tests compare the training code against numbers with no sampling error.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import nn

from gtl_dist.models import VocabSpec


def chain_matrix(states: int, diagonal: float) -> np.ndarray:
    """A transition matrix with the given diagonal and the rest spread uniformly (docs/method.md §10)."""
    off = (1.0 - diagonal) / (states - 1)
    return np.full((states, states), off) + np.eye(states) * (diagonal - off)


def enumerate_chain(matrix: np.ndarray, length: int, initial: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """All sequences [S^L, L] and their probabilities under a Markov chain (uniform first state)."""
    states = matrix.shape[0]
    initial = np.full(states, 1.0 / states) if initial is None else initial
    seqs = np.array(list(itertools.product(range(states), repeat=length)), dtype=np.int64)
    probs = initial[seqs[:, 0]].copy()
    for i in range(1, length):
        probs *= matrix[seqs[:, i - 1], seqs[:, i]]
    return seqs, probs


def all_states(vocab_size: int, length: int) -> np.ndarray:
    """Every z in {0..vocab_size-1}^L, row index = base-vocab_size code (see state_index)."""
    return np.array(list(itertools.product(range(vocab_size), repeat=length)), dtype=np.int64)


def state_index(z: np.ndarray | torch.Tensor, vocab_size: int):
    """Row of ``all_states`` holding z (first position most significant)."""
    length = z.shape[-1]
    weights = vocab_size ** np.arange(length - 1, -1, -1)
    if isinstance(z, torch.Tensor):
        return (z * torch.as_tensor(weights, device=z.device)).sum(-1)
    return (z * weights).sum(-1)


def consistent(states: np.ndarray, seqs: np.ndarray, mask_id: int) -> np.ndarray:
    """[Z, N] boolean: x agrees with z at every unmasked position of z."""
    observed = states[:, None, :] != mask_id
    return np.all(~observed | (states[:, None, :] == seqs[None, :, :]), axis=-1)


def posterior_table(seqs: np.ndarray, probs: np.ndarray, vocab: VocabSpec) -> np.ndarray:
    """The perfect SUBS denoiser: log p(x0^l = v | z) for every state z, [Z, L, V] float64.

    Masked rows hold the exact posterior marginal under the data distribution (the mask pattern
    does not depend on x0, so p(x0 | z_t) does not depend on t); unmasked rows are one-hot on
    the observed token; the [MASK] column is -inf. States with no consistent sequence get a
    uniform row over the data ids (they never occur).
    """
    L = seqs.shape[1]
    states = all_states(vocab.size, L)
    weights = consistent(states, seqs, vocab.mask_id) * probs[None, :]  # [Z, N]
    total = weights.sum(1, keepdims=True)
    data_ids = int(seqs.max()) + 1
    table = np.full((len(states), L, vocab.size), -np.inf)
    for l in range(L):
        for v in range(data_ids):
            mass = (weights * (seqs[None, :, l] == v)).sum(1, keepdims=True)
            p = np.where(total > 0, mass / np.where(total > 0, total, 1), 1.0 / data_ids)
            with np.errstate(divide="ignore"):  # zero at observed positions; overwritten below
                table[:, l, v] = np.log(p[:, 0])
    observed = states != vocab.mask_id
    for l in range(L):
        rows = observed[:, l]
        table[rows, l, :] = -np.inf
        table[rows, l, states[rows, l]] = 0.0
    return table


class TableDenoiser(nn.Module):
    """A SUBS denoiser given as a lookup table over all states (the oracle, or a frozen net)."""

    def __init__(self, table: np.ndarray, vocab: VocabSpec, seq_len: int):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32))
        self.vocab = vocab
        self.seq_len = seq_len
        self.calls = 0

    def forward(self, z: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        return self.table[state_index(z, self.vocab.size)]

    def logits(self, z: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        return self(z, sigma)  # log-probabilities are scores whose softmax is the prediction


def table_of(denoiser: nn.Module, vocab: VocabSpec, length: int) -> np.ndarray:
    """Evaluate a (time-independent) denoiser on every state: its exact table [Z, L, V]."""
    states = torch.as_tensor(all_states(vocab.size, length))
    with torch.no_grad():
        return denoiser(states).double().numpy()


def pattern_integral(schedule, k: int, L: int, t_lo: float, t_hi: float) -> float:
    """∫_{t_lo}^{t_hi} w(t) m^k (1 - m)^(L - k) dt for k >= 1, exactly.

    w(t) dt = dm / m for every schedule (w = -alpha'/(1 - alpha), m = 1 - alpha), so this is the
    polynomial integral ∫ u^(k-1) (1-u)^(L-k) du over u in [m(t_lo), m(t_hi)]: it uses only the
    schedule's move chance, which makes it an independent check of its loss weight.
    """
    a = float(schedule.move_chance(torch.tensor(t_lo, dtype=torch.float64)))
    b = float(schedule.move_chance(torch.tensor(t_hi, dtype=torch.float64)))
    total = 0.0
    for j in range(L - k + 1):
        e = k + j
        total += math.comb(L - k, j) * (-1) ** j * (b ** e - a ** e) / e
    return total


def exact_nelbo(table: np.ndarray, seqs: np.ndarray, probs: np.ndarray, vocab: VocabSpec,
                schedule, t_lo: float, t_hi: float) -> float:
    """E_x ∫_{t_lo}^{t_hi} w(t) E_z[sum_{masked l} -log p(x^l | z)] dt / L, by enumeration.

    Sums over every sequence x and every mask pattern M: P_t(M) = m^|M| (1 - m)^(L - |M|).
    """
    L = seqs.shape[1]
    total = 0.0
    for pattern in itertools.product((False, True), repeat=L):
        masked = np.array(pattern)
        k = int(masked.sum())
        if k == 0:
            continue
        z = np.where(masked[None, :], vocab.mask_id, seqs)
        logp = table[state_index(z, vocab.size)]  # [N, L, V]
        ce = -np.take_along_axis(logp, seqs[:, :, None], axis=-1)[:, :, 0]  # [N, L]
        total += pattern_integral(schedule, k, L, t_lo, t_hi) * float(probs @ ce[:, masked].sum(1))
    return total / L


def entropy(probs: np.ndarray) -> float:
    p = probs[probs > 0]
    return float(-(p * np.log(p)).sum())


def state_probabilities(seqs: np.ndarray, probs: np.ndarray, vocab: VocabSpec, schedule) -> np.ndarray:
    """P(z) over all states when x ~ probs and t ~ U[t_min, 1], z = mask(x, m(t)) [Z]."""
    L = seqs.shape[1]
    states = all_states(vocab.size, L)
    out = np.zeros(len(states))
    t_min = schedule.t_min
    # E_t[m^k (1-m)^(L-k)] for t ~ U[t_min, 1]: computed by quadrature on t (smooth integrand).
    nodes, w = np.polynomial.legendre.leggauss(64)
    t = t_min + (1 - t_min) * (nodes + 1) / 2
    m = schedule.move_chance(torch.as_tensor(t, dtype=torch.float64)).numpy()
    pattern_prob = [float((w / 2) @ (m ** k * (1 - m) ** (L - k))) for k in range(L + 1)]
    for pattern in itertools.product((False, True), repeat=L):
        masked = np.array(pattern)
        z = np.where(masked[None, :], vocab.mask_id, seqs)
        np.add.at(out, state_index(z, vocab.size), probs * pattern_prob[int(masked.sum())])
    return out
