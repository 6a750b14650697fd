"""Exact oracles for Markov chains (forward–backward), as networks the samplers accept.

For a first-order chain (initial law π, transition matrix A) and a partly masked sequence z, the
forward–backward recursions give, in O(L·S²) per sequence and exactly:

- the evidence p(x0 ⊒ z): the probability that a chain sample agrees with z's unmasked tokens;
- the posterior marginals p(x0^ℓ = v | z): the perfect SUBS denoiser (in masked diffusion the
  mask pattern does not depend on x0, so p(x0 | z_t) does not depend on t);
- the pairwise posteriors p(x0^ℓ = a, x0^{ℓ+1} = b | z).

From two chains p (source) and q (target) follow the two guidance targets of docs/method.md §3:

    log h(z) = log E_{p(x0|z)}[q(x0)/p(x0)] = log q(x0 ⊒ z) − log p(x0 ⊒ z)     (exact; γ = 1)
    r(z)     = E_{p(x0|z)}[log q(x0)/p(x0)]                                   (the Jensen form
                                                                                the paper's ratio
                                                                                net regresses on)

Everything is float64 and runs on the device of z. The chain and its exact denoiser live in
gtl_dist/models/chain.py (the ``counts`` stages export one); here are the guidance oracles:
:class:`LogRatioOracle` (one value per sequence, either form) and :class:`EditRatioOracle`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from gtl_dist.models import VocabSpec
from gtl_dist.models.chain import MarkovChain


def log_h(source: MarkovChain, target: MarkovChain, z: torch.Tensor) -> torch.Tensor:
    """log h(z) = log q(x0 ⊒ z) − log p(x0 ⊒ z), [B] float64."""
    return target.log_evidence(z) - source.log_evidence(z)


def jensen_log_ratio(source: MarkovChain, target: MarkovChain, z: torch.Tensor) -> torch.Tensor:
    """r(z) = E_{p(x0|z)}[log q(x0) − log p(x0)], [B] float64 (0·log 0 terms count as 0)."""
    run = source.run(z)
    dev = z.device
    first = torch.nan_to_num(target.log_initial - source.log_initial, neginf=-1e300).to(dev)
    steps = torch.nan_to_num(target.log_matrix - source.log_matrix, neginf=-1e300, posinf=1e300).to(dev)
    init_term = (run.marginals[:, 0] * first).sum(-1)
    return init_term + (run.pairs * steps).sum((-1, -2, -3))


class LogRatioOracle(nn.Module):
    """The exact guidance value per sequence: ``form="h"`` gives log h(z), ``form="jensen"`` r(z),
    each times ``scale`` (to see what a learned ratio of the wrong scale costs)."""

    FORMS = ("h", "jensen")

    def __init__(self, source: MarkovChain, target: MarkovChain, seq_len: int, form: str = "h",
                 scale: float = 1.0):
        super().__init__()
        if form not in self.FORMS:
            raise ValueError(f"form='{form}' is not one of {', '.join(self.FORMS)}")
        self.source, self.target, self.form, self.scale = source, target, form, float(scale)
        self.vocab = VocabSpec(size=source.num_states + 1, mask_id=source.mask_id,
                               data_ids=source.num_states)
        self.seq_len = seq_len
        self.eval()

    def forward(self, z: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        fn = log_h if self.form == "h" else jensen_log_ratio
        return self.scale * fn(self.source, self.target, z)


class EditRatioOracle(nn.Module):
    """The exact edit-ratio network: log h(z[ℓ := v]) − log h(z) = log q(x0^ℓ = v | z) −
    log p(x0^ℓ = v | z) at masked ℓ, from one forward–backward pass per chain (what a learned
    gtl_dist.models.EditRatioNet estimates)."""

    edit_form = True

    def __init__(self, source: MarkovChain, target: MarkovChain, seq_len: int):
        super().__init__()
        self.source, self.target = source, target
        self.vocab = VocabSpec(size=source.num_states + 1, mask_id=source.mask_id,
                               data_ids=source.num_states)
        self.seq_len = seq_len
        self.eval()

    def forward(self, z: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, L, V] float64: the score of every token at every position ([MASK] column 0)."""
        with np.errstate(divide="ignore"):
            diff = torch.log(self.target.run(z).marginals) - torch.log(self.source.run(z).marginals)
        return torch.cat([diff, torch.zeros_like(diff[..., :1])], dim=-1)

    def edit_scores(self, z: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self(z)[rows, positions]
