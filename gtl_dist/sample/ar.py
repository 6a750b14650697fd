"""Autoregressive sampling from an ``ARLM`` with a static KV cache (docs/method.md §11).

Greedy (temperature 0), temperature and top-K sampling, batched and seeded. Categorical draws
are made in float64 by inverting the CDF with uniforms from the caller's generator, so a seed
gives the same tokens on every device; a generator on the model's device keeps the draw there.

The cached decoder follows the static-cache pattern: the cache and the output are allocated
once, the prompt is checked and encoded in one pass, and every further token is one
single-position pass with fixed shapes (``ARLM.logits_at``), which does not wait for the device
and can be replayed as a CUDA graph (``cuda_graph=True``). Without the cache every step re-runs
the whole prefix: the reference the cached path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from gtl_dist.models import ARLM, KVCache, check_token_ids
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


class GraphedStep:
    """One cached decoding step (one token per sequence) captured as a CUDA graph.

    The inputs are copied into static buffers and the captured kernels replay: no per-kernel
    launch cost and no host synchronisation. Capture runs the step on slot 0 of the cache, so
    build it before the prompt is written (``sample_ar`` does).
    """

    def __init__(self, model: ARLM, cache: KVCache):
        device = cache.keys[0].device
        self.token = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy initialisation)
            for _ in range(2):
                model.logits_at(self.token, cache, self.position)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.logits_at(self.token, cache, self.position)

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        self.token.copy_(token)
        self.position.fill_(position)
        self.graph.replay()
        return self.logits


def eager_step(model: ARLM, cache: KVCache) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """One cached decoding step, run op by op."""
    def step(token: torch.Tensor, position: int) -> torch.Tensor:
        return model.logits_at(token, cache, torch.full((1,), position, device=token.device))
    return step


@torch.no_grad()
def sample_ar(model: ARLM, prompt: torch.Tensor, num_tokens: int, *,
              generator: torch.Generator | None = None, temperature: float = 1.0,
              top_k: int | None = None, use_cache: bool = True, cuda_graph: bool = False,
              banned_ids: tuple[int, ...] | None = None) -> tuple[torch.Tensor, ARStats]:
    """Continue ``prompt`` [B, P >= 1] by ``num_tokens`` tokens; returns ([B, P + num_tokens], stats).

    The prompt's ids are checked here, once, on the host. With the cache (default) the prompt is
    encoded once, then each token costs one
    single-position pass over a preallocated cache: no tensor is grown, and nothing waits for
    the device except what the caller's generator needs (pass a generator on the model's device
    to draw there). ``cuda_graph`` replays each step as a CUDA graph (CUDA only). Without the
    cache every step re-runs the whole prefix: the reference the cached path is tested against.
    ``banned_ids`` are never sampled (default: the [MASK] id, which the data never contains).
    """
    _check_request(model, prompt, num_tokens, temperature, top_k, use_cache, cuda_graph)
    banned = (model.vocab.mask_id,) if banned_ids is None else tuple(banned_ids)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    B, P = prompt.shape
    total = P + num_tokens
    tokens = torch.empty(B, total, dtype=torch.long, device=device)
    tokens[:, :P] = prompt.to(device)
    banned_index = torch.tensor(banned, dtype=torch.long, device=device) if banned else None
    stats = ARStats()
    try:
        cache = model.new_cache(B, total) if use_cache else None
        step = None if cache is None else GraphedStep(model, cache) if cuda_graph else eager_step(model, cache)
        for pos in range(P, total):
            if cache is None:
                logits = model(tokens[:, :pos])[:, -1]
                stats.positions += B * pos
            elif pos == P:
                logits = model.forward_cached(tokens[:, :P], cache)[:, -1]  # the prompt, checked once
                stats.positions += B * P
            else:
                logits = step(tokens[:, pos - 1:pos], pos - 1)[:, -1]
                cache.length = pos
                stats.positions += B
            stats.network_evals += 1
            if banned_index is not None:
                logits = logits.index_fill(-1, banned_index, float("-inf"))
            tokens[:, pos] = draw_next_token(logits, generator, temperature=temperature, top_k=top_k)
    finally:
        model.train(was_training)
    return tokens, stats


def _check_request(model: ARLM, prompt: torch.Tensor, num_tokens: int, temperature: float,
                   top_k: int | None, use_cache: bool, cuda_graph: bool) -> None:
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
    if cuda_graph and (not use_cache or next(model.parameters()).device.type != "cuda"):
        raise ValueError("cuda_graph=True needs the KV cache and a model on a CUDA device")
    check_token_ids(prompt, model.vocab.size, "prompt")
