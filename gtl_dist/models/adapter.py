"""The guide adapter of the default GTL recipe (docs/method.md §5a): a low-rank edit of the frozen
source denoiser's own prediction, read off the source's last hidden state.

The source already computes, at every sampling step, a representation u(z) of the masked
sequence (the input of its output projection W, logits = W·u + b). The adapter adds a low-rank
correction to that representation and lets the source's own projection turn it into an edit of
every token's logit at every position:

    e_φ(z)[ℓ, v] = (W · B A u(z)_ℓ)_v                    (``through: output``, the default)
    e_φ(z)[ℓ, v] = (U A u(z)_ℓ)_v                         (``through: direct``: its own |V| x r map)

with A (r x H) and B (H x r) or U (|V| x r) trainable and B, U zero at the start, so the untrained
adapter is no guidance at all. It plays the role of the edit-ratio network's
log q(v | z) − log p(v | z), and a guided step combines it exactly like one (guidance.py):
log q_γ(v | z) ∝ log p_θ(v | z) + γ·e_φ(z)[ℓ, v]. It has 2·H·r (or (H + |V|)·r) parameters, a few
thousand where the source has millions, and it costs the sampler no network call of its own:
``AdaptedDenoiser`` runs the source once and applies the adapter to the same hidden state.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gtl_dist.config import AdapterConfig
from gtl_dist.models.dit import float32_linear
from gtl_dist.models.heads import Denoiser, VocabSpec, _Network, subs_log_probs


class GuideAdapter(_Network):
    """e_φ on the source's features: one edit score per position and token (see the module)."""

    # Reads the source denoiser's features instead of z: the sampler composes it with the source
    # through AdaptedDenoiser (one network call per step).
    reads_features = True

    def __init__(self, cfg: AdapterConfig, vocab: VocabSpec, seq_len: int, hidden: int):
        super().__init__(cfg, vocab, seq_len)
        self.down = nn.Linear(hidden, cfg.rank, bias=False)
        width = hidden if cfg.through == "output" else vocab.size
        self.up = nn.Linear(cfg.rank, width, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, features: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
        """fp32 edit scores [..., V] from the source's ``features`` [..., H] and its output
        ``projection`` (used when the edit goes through it)."""
        delta = self.up(self.down(features))
        if self.cfg.through == "direct":
            return delta.float()
        with torch.autocast(delta.device.type, enabled=False):
            return nn.functional.linear(delta.to(projection.weight.dtype), projection.weight).float()


class AdaptedDenoiser(nn.Module):
    """The source denoiser guided by an adapter at strength γ, as one denoiser: SUBS log-probs of
    logits_θ(z) + γ·e_φ(z). At γ = 1 this is the conditional the adapter is trained to fit; the
    samplers and the evaluation call it like any denoiser (one network call per step)."""

    def __init__(self, denoiser: Denoiser, adapter: GuideAdapter, gamma: float = 1.0):
        super().__init__()
        self.denoiser, self.adapter, self.gamma = denoiser, adapter, float(gamma)
        self.vocab, self.seq_len = denoiser.vocab, denoiser.seq_len

    def logits(self, z: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        features = self.denoiser.features(z, sigma)
        base = float32_linear(features, self.denoiser.output.linear)
        if self.gamma == 0.0:
            return base
        return base + self.gamma * self.adapter(features, self.denoiser.output.linear)

    def forward(self, z: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        return subs_log_probs(self.logits(z, sigma), z, self.vocab.mask_id)
