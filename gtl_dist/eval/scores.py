"""Scores that read a method's networks rather than its samples (docs/method.md §10).

The primary score of every method is its masked-token cross-entropy on held-out target sequences:
each sequence masked once at each rate of ``eval.ce_mask_rates``, the same masks for every method,
and at every masked position −log q(x0^ℓ | z) under the conditional the method's samplers draw
from (gtl_dist/sample/networks.py ``method_log_probs``: the guided one for GTL, no top-K
truncation). It needs no sampling, so no sampler's time discretisation enters it, and sharpening
cannot game it: it is a proper score, which the exact target model minimises in expectation
(on the Markov task the exact target's value is its forward–backward posterior, the floor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from gtl_dist.diffusion import mask_tokens


@dataclass(frozen=True)
class MaskedViews:
    """Held-out sequences, each masked once per rate: x and z are [R, N, L]."""
    x: torch.Tensor
    z: torch.Tensor
    rates: tuple[float, ...]


def masked_views(x: torch.Tensor, rates: Sequence[float], seed: int, mask_id: int) -> MaskedViews:
    """The evaluation's masks: a fixed generator per (seed, rate), so every method is scored on the
    same masked positions."""
    zs = []
    for i, rate in enumerate(rates):
        g = torch.Generator().manual_seed(seed * 1_000 + i)
        zs.append(mask_tokens(x, float(rate), mask_id, g))
    return MaskedViews(x.expand(len(rates), *x.shape), torch.stack(zs), tuple(float(r) for r in rates))


@torch.inference_mode()
def masked_ce(log_probs: Callable[[torch.Tensor], torch.Tensor], views: MaskedViews, mask_id: int,
              pad_id: Optional[int] = None, batch_size: int = 512) -> float:
    """Mean over rates of the mean −log q(x0^ℓ | z) per masked (non-pad) position, nats.

    ``log_probs(z)`` returns [B, L, V] log-probabilities at masked positions."""
    per_rate = []
    for x, z in zip(views.x, views.z):
        total, count = 0.0, 0
        for xb, zb in zip(torch.split(x, batch_size), torch.split(z, batch_size)):
            logp = log_probs(zb).double()
            xb, zb = xb.to(logp.device), zb.to(logp.device)  # the networks may sit on a GPU
            scored = zb == mask_id
            if pad_id is not None:
                scored &= xb != pad_id
            logp = logp.gather(-1, xb.unsqueeze(-1)).squeeze(-1)
            total += float(-logp[scored].sum())
            count += int(scored.sum())
        per_rate.append(total / max(count, 1))
    return sum(per_rate) / len(per_rate)
