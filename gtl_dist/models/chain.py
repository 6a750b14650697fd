"""A first-order Markov chain and its exact denoiser (forward–backward), for the synthetic task.

For a chain (initial law π, transition matrix A) and a partly masked sequence z, the scaled
forward–backward recursions give, in O(L·S²) per sequence and exactly, the evidence p(x0 ⊒ z), the
posterior marginals p(x0^ℓ = v | z) (the perfect SUBS denoiser: in masked diffusion the mask pattern
does not depend on x0, so p(x0 | z_t) does not depend on t) and the pairwise posteriors. The
guidance oracles built on them are in gtl_dist/eval/oracles.py. Everything is float64 and runs on
the device of z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from gtl_dist.models.heads import VocabSpec


@dataclass(frozen=True)
class ChainPass:
    """What one forward–backward pass over a batch gives (float64)."""
    log_evidence: torch.Tensor  # [B]    log p(x0 ⊒ z)
    marginals: torch.Tensor  # [B, L, S]     p(x0^ℓ = s | z)
    pairs: torch.Tensor  # [B, L-1, S, S]    p(x0^ℓ = a, x0^{ℓ+1} = b | z)


class MarkovChain:
    """A first-order chain over states 0..S-1 with [MASK] = S (the Markov task's vocabulary)."""

    def __init__(self, matrix: np.ndarray, initial: Optional[np.ndarray] = None):
        matrix = np.asarray(matrix, dtype=np.float64)
        s = matrix.shape[0]
        self.num_states = s
        self.matrix = torch.as_tensor(matrix)
        self.initial = torch.as_tensor(np.full(s, 1.0 / s) if initial is None
                                       else np.asarray(initial, dtype=np.float64))
        with np.errstate(divide="ignore"):
            self.log_matrix = torch.as_tensor(np.log(matrix))
            self.log_initial = torch.log(self.initial)

    @property
    def mask_id(self) -> int:
        return self.num_states

    def evidence(self, z: torch.Tensor) -> torch.Tensor:
        """[B, L, S]: 1 where state s agrees with z^ℓ (every state where z^ℓ is [MASK])."""
        s = self.num_states
        if z.dim() != 2 or (z < 0).any() or (z > s).any():
            raise ValueError(f"expected [batch, length] ids in 0..{s} ({s} = [MASK]), got "
                             f"shape {tuple(z.shape)}")
        onehot = torch.nn.functional.one_hot(z.clamp(max=s - 1), s).double()
        return torch.where((z == s).unsqueeze(-1), torch.ones_like(onehot), onehot)

    def run(self, z: torch.Tensor) -> ChainPass:
        """Scaled forward–backward over every sequence of the batch."""
        e = self.evidence(z)
        a_mat, init = self.matrix.to(z.device), self.initial.to(z.device)
        B, L, S = e.shape
        alpha = torch.empty(B, L, S, dtype=torch.float64, device=z.device)
        scale = torch.empty(B, L, dtype=torch.float64, device=z.device)
        a = init * e[:, 0]
        for pos in range(L):
            if pos:
                a = (a @ a_mat) * e[:, pos]
            scale[:, pos] = a.sum(-1)
            a = a / scale[:, pos, None]
            alpha[:, pos] = a
        beta = torch.empty_like(alpha)
        b = torch.ones(B, S, dtype=torch.float64, device=z.device)
        beta[:, L - 1] = b
        for pos in range(L - 2, -1, -1):
            b = ((e[:, pos + 1] * b) @ a_mat.T) / scale[:, pos + 1, None]
            beta[:, pos] = b
        marginals = alpha * beta
        marginals = marginals / marginals.sum(-1, keepdim=True)
        pairs = (alpha[:, :-1, :, None] * a_mat * (e[:, 1:] * beta[:, 1:])[:, :, None, :]
                 / scale[:, 1:, None, None])
        pairs = pairs / pairs.sum((-1, -2), keepdim=True)
        return ChainPass(torch.log(scale).sum(-1), marginals, pairs)

    def log_evidence(self, z: torch.Tensor) -> torch.Tensor:
        """log p(x0 ⊒ z), [B]: the forward recursion alone."""
        e = self.evidence(z)
        a_mat = self.matrix.to(z.device)
        a = self.initial.to(z.device) * e[:, 0]
        total = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
        for pos in range(z.shape[1]):
            if pos:
                a = (a @ a_mat) * e[:, pos]
            norm = a.sum(-1)
            total += torch.log(norm)
            a = a / norm[:, None]
        return total


class ChainDenoiser(nn.Module):
    """The exact SUBS denoiser of a chain: log p(x0^ℓ = v | z), [MASK] column −inf, observed
    positions one-hot on their token; float32 like a trained network's output. Its chain is kept
    as buffers, so it exports and loads like a trained network (role ``chain``, the ``counts``
    stages' estimate)."""

    def __init__(self, chain: MarkovChain, seq_len: int):
        super().__init__()
        self.register_buffer("matrix", chain.matrix.clone())
        self.register_buffer("initial", chain.initial.clone())
        self.vocab = VocabSpec(size=chain.num_states + 1, mask_id=chain.mask_id, data_ids=chain.num_states)
        self.seq_len = seq_len
        self.eval()  # no dropout to switch off: the samplers accept it as it is

    @property
    def chain(self) -> MarkovChain:
        return MarkovChain(self.matrix.cpu().numpy(), self.initial.cpu().numpy())

    def forward(self, z: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        with np.errstate(divide="ignore"):
            logp = torch.log(self.chain.run(z).marginals)
        out = torch.full((*z.shape, self.vocab.size), float("-inf"), dtype=torch.float64, device=z.device)
        out[..., :-1] = logp
        observed = z != self.vocab.mask_id
        out[observed] = float("-inf")
        out[observed.nonzero(as_tuple=True) + (z[observed],)] = 0.0
        return out.float()
