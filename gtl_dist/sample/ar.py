"""Autoregressive sampling from an ``ARLM`` with a KV cache (docs/method.md §11).

Greedy (temperature 0), temperature and top-K sampling, batched and seeded. Categorical draws
are made in float64 by inverting the CDF with uniforms from the caller's generator, so a seed
gives the same tokens on every device. Without the cache every step re-runs the whole prefix:
the reference the cached path is tested against, and the baseline for AR-vs-diffusion timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gtl_dist.models import ARLM
from gtl_dist.sample.guidance import draw_categorical


@dataclass
class ARStats:
    """Work done by one ``sample_ar`` call.

    network_evals: forward passes of the AR model; positions: token positions those passes
    computed, summed over the batch (the cached path computes each position once).
    """
    network_evals: int = 0
    positions: int = 0


def draw_next_token(logits: torch.Tensor, generator: torch.Generator | None, *,
                    temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """One token per row of logits [B, V]; temperature 0 is greedy (argmax). The uniforms come
    from ``generator`` (on its own device), the draw is the samplers' inverse-CDF one."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.double() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.rand(scores.shape[0], generator=generator, dtype=torch.float64, device=gen_device)
    return draw_categorical(scores, u.to(scores.device))


@torch.no_grad()
def sample_ar(model: ARLM, prompt: torch.Tensor, num_tokens: int, *,
              generator: torch.Generator | None = None, temperature: float = 1.0,
              top_k: int | None = None, use_cache: bool = True,
              banned_ids: tuple[int, ...] | None = None) -> tuple[torch.Tensor, ARStats]:
    """Continue ``prompt`` [B, P >= 1] by ``num_tokens`` tokens; returns ([B, P + num_tokens], stats).

    ``banned_ids`` are never sampled (default: the [MASK] id, which the data never contains).
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be token ids [batch, length >= 1], got {tuple(prompt.shape)}; "
                         f"start from a BOS token (or a first state for Markov data)")
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens} must be >= 0")
    total = prompt.shape[1] + num_tokens
    if total > model.seq_len:
        raise ValueError(f"prompt ({prompt.shape[1]}) + num_tokens ({num_tokens}) = {total} exceeds "
                         f"the model's seq_len {model.seq_len}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None for the full vocabulary)")
    banned = (model.vocab.mask_id,) if banned_ids is None else tuple(banned_ids)
    was_training = model.training
    model.eval()
    stats = ARStats()
    tokens = prompt.to(next(model.parameters()).device)
    B = tokens.shape[0]
    try:
        cache = model.new_cache(B, total) if use_cache else None
        pending = tokens
        for _ in range(num_tokens):
            if cache is not None:
                logits = model.forward_cached(pending, cache)[:, -1]
                stats.positions += B * pending.shape[1]
            else:
                logits = model(tokens)[:, -1]
                stats.positions += B * tokens.shape[1]
            stats.network_evals += 1
            if banned:
                logits[:, list(banned)] = float("-inf")
            nxt = draw_next_token(logits, generator, temperature=temperature, top_k=top_k)
            pending = nxt[:, None]
            tokens = torch.cat([tokens, pending], dim=1)
    finally:
        model.train(was_training)
    return tokens, stats
