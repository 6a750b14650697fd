"""The guide adapter of the default GTL recipe (docs/method.md §5a): a low-rank edit of the frozen
source denoiser's own prediction, read off the source's last hidden state.

The source already computes, at every sampling step, a representation u(z) of the masked
sequence (the input of its output projection W, logits = W·u + b). The adapter adds a low-rank
correction to that representation and lets the source's own projection turn it into an edit of
every token's logit at every position:

    δ(z)_ℓ     = B A u(z)_ℓ + M attn_ℓ(Q u, K u, V u)     (rank-r maps; ``heads`` rank-r attention
                                                          heads with rotary positions, ``attention``)
    e_φ(z)[ℓ, v] = (W δ(z)_ℓ)_v                           (``through: output``, the default)
    e_φ(z)[ℓ, v] = (U' δ'(z)_ℓ)_v                          (``through: direct``: maps to |V| of its own)

with B and M zero at the start, so the untrained adapter is no guidance at all. The attention
head lets a position's edit read the others (its neighbours' tokens): the source's feature at a
position carries what the source needed, not necessarily what the target needs. It plays the role of the edit-ratio network's
log q(v | z) − log p(v | z), and a guided step combines it exactly like one (guidance.py):
log q_γ(v | z) ∝ log p_θ(v | z) + γ·e_φ(z)[ℓ, v]. It has (2 + 4·heads)·H·r parameters through the
output layer (2·H·r without attention; |V| more with the per-token ``offset``), a few thousand where the source has millions, and it costs the sampler no network call of its own:
``AdaptedDenoiser`` runs the source once and applies the adapter to the same hidden state.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gtl_dist.config import AdapterConfig
from gtl_dist.models.dit import Rotary, apply_rotary, float32_linear
from gtl_dist.models.heads import Denoiser, VocabSpec, _Network, masked_subs_log_probs, subs_log_probs


class GuideAdapter(_Network):
    """e_φ on the source's features: one edit score per position and token (see the module)."""

    # Reads the source denoiser's features instead of z: the sampler composes it with the source
    # through AdaptedDenoiser (one network call per step).
    reads_features = True

    def __init__(self, cfg: AdapterConfig, vocab: VocabSpec, seq_len: int, hidden: int):
        super().__init__(cfg, vocab, seq_len)
        width = hidden if cfg.through == "output" else vocab.size
        self.down = nn.Linear(hidden, cfg.rank, bias=False)
        self.up = nn.Linear(cfg.rank, width, bias=False)
        nn.init.zeros_(self.up.weight)
        if cfg.attention:
            inner = cfg.heads * cfg.rank  # the heads side by side
            self.query = nn.Linear(hidden, inner, bias=False)
            self.key = nn.Linear(hidden, inner, bias=False)
            self.value = nn.Linear(hidden, inner, bias=False)
            self.mix = nn.Linear(inner, width, bias=False)
            nn.init.zeros_(self.mix.weight)
            self.rotary = Rotary(cfg.rank)
        self.offset = nn.Parameter(torch.zeros(vocab.size)) if cfg.offset else None

    def delta(self, features: torch.Tensor, rows: Optional[torch.Tensor] = None,
              positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """δ [B, L, H] (through the output layer) or the scores themselves [B, L, V] (direct); with
        ``rows`` and ``positions``, δ at those positions only [P, ·]. The attention head reads
        every position's features whichever positions it writes."""
        at = (lambda x: x) if rows is None else (lambda x: x[rows, positions])
        delta = self.up(self.down(at(features)))
        if self.cfg.attention:
            delta = delta + self.mix(at(self.attend(features)))
        return delta

    def forward(self, features: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
        """fp32 edit scores [B, L, V] from the source's ``features`` [B, L, H] and its output
        ``projection`` (used when the edit goes through it)."""
        delta = self.delta(features)
        if self.cfg.through == "direct":
            return self.with_offset(delta.float())
        with torch.autocast(delta.device.type, enabled=False):
            return self.with_offset(nn.functional.linear(delta.to(projection.weight.dtype), projection.weight).float())

    def with_offset(self, scores: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
        """``scores`` [..., V] plus γ·c_v, the per-token edit (``offset``), where the adapter has one."""
        return scores if self.offset is None else scores + gamma * self.offset.float()

    def attend(self, features: torch.Tensor) -> torch.Tensor:
        """``heads`` rank-r attention heads with rotary positions over the source's features,
        concatenated [B, L, heads·r]: what a position's edit may read of the others (its
        neighbours' tokens, say), which the source's own feature at that position need not carry.
        Several heads can read several neighbours at once (the nearest on the left and on the
        right, say); one head averages whatever it reads."""
        batch, length, _ = features.shape
        cos, sin = self.rotary.cos_sin(0, length, features.device)
        q, k, v = (layer(features).view(batch, length, self.cfg.heads, self.cfg.rank).transpose(1, 2)
                   for layer in (self.query, self.key, self.value))
        out = nn.functional.scaled_dot_product_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
        return out.transpose(1, 2).reshape(batch, length, -1)


class AdaptedDenoiser(nn.Module):
    """The source denoiser guided by an adapter at strength γ, as one denoiser: SUBS log-probs of
    logits_θ(z) + γ·e_φ(z). At γ = 1 this is the conditional the adapter is trained to fit; the
    samplers and the evaluation call it like any denoiser (one network call per step)."""

    def __init__(self, denoiser: Denoiser, adapter: GuideAdapter, gamma: float = 1.0):
        super().__init__()
        self.denoiser, self.adapter, self.gamma = denoiser, adapter, float(gamma)
        self.vocab, self.seq_len = denoiser.vocab, denoiser.seq_len

    def logits(self, z: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        """logits_θ(z) + γ·e_φ(z). Through the output layer the edit is added before the
        projection, W·(u + γ·δ) + b: one |V|-wide product per step, as the source alone (equal to
        the sum of the two up to float rounding; exactly the source's at δ = 0)."""
        return self.edited_logits(self.denoiser.features(z, sigma))

    def forward(self, z: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        return subs_log_probs(self.logits(z, sigma), z, self.vocab.mask_id)

    def masked_log_probs(self, z: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """fp32 [P, V]: ``forward(z)[rows, positions]`` where every z[rows[p], positions[p]] is
        [MASK], with the |V|-wide products run at those positions only (as
        ``Denoiser.masked_log_probs``; the planner and first-hitting samplers' route)."""
        return masked_subs_log_probs(self.edited_logits(self.denoiser.features(z), rows, positions),
                                     self.vocab.mask_id)

    def edited_logits(self, features: torch.Tensor, rows: Optional[torch.Tensor] = None,
                      positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """logits_θ + γ·e_φ from the source's ``features`` [B, L, H]: at every position, or at
        (``rows``, ``positions``) only [P, V]."""
        projection = self.denoiser.output.linear
        own = features if rows is None else features[rows, positions]
        if self.gamma == 0.0:
            return float32_linear(own, projection)
        delta = self.adapter.delta(features, rows, positions)
        if self.adapter.cfg.through == "output":
            logits = float32_linear(own + self.gamma * delta, projection)
        else:
            logits = float32_linear(own, projection) + self.gamma * delta.float()
        return self.adapter.with_offset(logits, self.gamma)
