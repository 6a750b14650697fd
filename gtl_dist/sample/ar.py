"""Autoregressive sampling from an ``ARLM`` with a static KV cache (docs/method.md §11).

Greedy (temperature 0), temperature and top-K sampling, batched and seeded. Categorical draws
are made in float64 by inverting the CDF with uniforms from the caller's generator, all drawn
before the first token (``num_tokens`` x batch, in the order a per-token draw would take them),
so a seed gives the same tokens on every device and no step calls the generator.

The cached decoder follows the static-cache pattern: the cache and the output are allocated
once, the prompt is checked on the host and encoded in one pass, and every further token is one
call of :func:`decode_step`: the single-position pass (``ARLM.logits_at``, fixed shapes) and the
draw, as one tensor function that never waits for the device. It runs op by op, compiled as one
graph (``compile=True``; on CUDA ``mode="reduce-overhead"``, whose CUDA graphs replay it), or
with the op-by-op kernels captured whole as a CUDA graph (``cuda_graph=True``). Without the cache
every step re-runs the whole prefix and draws with the same function: the reference the cached
path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch

from gtl_dist.models import ARLM, KVCache, check_token_ids
from gtl_dist.sample.guidance import draw_categorical, draw_uniforms

# One step of a decoder: (previous token [B, 1], its position [1], uniforms [B] or None) -> next token [B].
DecodeStep = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class ARStats:
    """Work done by one ``sample_ar`` call.

    network_evals: forward passes of the AR model; positions: token positions those passes
    computed, summed over the batch (the cached path computes each position once).
    """
    network_evals: int = 0
    positions: int = 0


def draw_next_token(logits: torch.Tensor, uniforms: Optional[torch.Tensor], *,
                    temperature: float = 1.0, top_k: int | None = None,
                    banned: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row of logits [B, V], never one of the ``banned`` ids; temperature 0 is
    greedy (argmax, ``uniforms`` unused), else the samplers' inverse-CDF draw in float64 with one
    uniform per row. Tensor code only: it compiles into the decoding step's graph."""
    if banned is not None:
        logits = logits.index_fill(-1, banned, float("-inf"))
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.double() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return draw_categorical(scores, uniforms)


def decode_step(model: ARLM, cache: KVCache, token: torch.Tensor, position: torch.Tensor,
                uniforms: Optional[torch.Tensor], *, temperature: float, top_k: int | None,
                banned: Optional[torch.Tensor]) -> torch.Tensor:
    """The cached decoding step, pass and draw: the token after ``token`` [B, 1] at ``position``
    (a device tensor [1]), one uniform per row. Tensor code only, with no host read: what
    ``compile=True`` compiles as one graph and ``cuda_graph=True`` captures."""
    logits = model.logits_at(token, cache, position)[:, -1]
    return draw_next_token(logits, uniforms, temperature=temperature, top_k=top_k, banned=banned)


def compiled_decode_step(cache: KVCache) -> Callable[..., torch.Tensor]:
    """:func:`decode_step` compiled as one graph for fixed shapes: once per model, batch size and
    cache length, which later calls reuse (past torch's recompile limit, 8 by default, a new one
    runs op by op). On CUDA in ``reduce-overhead`` mode, whose CUDA graphs replay it, with the
    cache marked static (written in place, never copied into the graphs' memory pool)."""
    if cache.keys[0].device.type != "cuda":
        return torch.compile(decode_step, fullgraph=True, dynamic=False)
    for tensor in cache.keys + cache.values:
        torch._dynamo.mark_static_address(tensor)
    return torch.compile(decode_step, fullgraph=True, dynamic=False, mode="reduce-overhead")


class GraphedStep:
    """One cached decoding step, pass and draw, captured as a CUDA graph.

    The inputs are copied into static buffers and the captured kernels replay: no per-kernel
    launch cost and no host synchronisation. Capture runs the step on slot 0 of the cache, so
    build it before the prompt is written (``sample_ar`` does).
    """

    def __init__(self, step: DecodeStep, cache: KVCache, sampled: bool):
        device = cache.keys[0].device
        self.token = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.uniforms = (torch.full((cache.batch_size,), 0.5, dtype=torch.float64, device=device)
                         if sampled else None)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy initialisation)
            for _ in range(2):
                step(self.token, self.position, self.uniforms)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.next_token = step(self.token, self.position, self.uniforms)

    def __call__(self, token: torch.Tensor, position: torch.Tensor,
                 uniforms: Optional[torch.Tensor]) -> torch.Tensor:
        self.token.copy_(token)
        self.position.copy_(position)
        if self.uniforms is not None:
            self.uniforms.copy_(uniforms)
        self.graph.replay()
        return self.next_token


@torch.no_grad()
def sample_ar(model: ARLM, prompt: torch.Tensor, num_tokens: int, *,
              generator: torch.Generator | None = None, temperature: float = 1.0,
              top_k: int | None = None, use_cache: bool = True, compile: bool = False,
              cuda_graph: bool = False, banned_ids: tuple[int, ...] | None = None
              ) -> tuple[torch.Tensor, ARStats]:
    """Continue ``prompt`` [B, P >= 1] by ``num_tokens`` tokens; returns ([B, P + num_tokens], stats).

    The prompt's ids are checked here, once, on the host (pass it on the CPU: a prompt on a device
    is read back for the check). With the cache (default) the prompt is encoded once, then each
    token costs one :func:`decode_step` over a preallocated cache: no tensor is grown and nothing
    waits for the device. ``compile`` compiles that step as one graph (on CUDA with CUDA graphs);
    ``cuda_graph`` captures it as a CUDA graph instead (CUDA only). Without the cache every step
    re-runs the whole prefix: the reference the cached path is tested against. ``banned_ids`` are
    never sampled (default: the [MASK] id, which the data never contains).
    """
    _check_request(model, prompt, num_tokens, temperature, top_k, use_cache, compile, cuda_graph)
    banned = (model.vocab.mask_id,) if banned_ids is None else tuple(banned_ids)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    B, P = prompt.shape
    total = P + num_tokens
    tokens = torch.empty(B, total, dtype=torch.long, device=device)
    tokens[:, :P] = prompt.to(device)
    banned_index = torch.tensor(banned, dtype=torch.long, device=device) if banned else None
    uniforms = draw_uniforms((num_tokens, B), generator, device) if temperature > 0 else None
    positions = torch.arange(P - 1, total - 1, device=device)  # of each step's input token
    draw = dict(temperature=temperature, top_k=top_k, banned=banned_index)
    stats = ARStats()
    try:
        cache = model.new_cache(B, total) if use_cache else None
        if cache is not None:
            step: DecodeStep = partial(compiled_decode_step(cache) if compile else decode_step,
                                       model, cache, **draw)
            if cuda_graph:
                step = GraphedStep(step, cache, sampled=uniforms is not None)
        for i, pos in enumerate(range(P, total)):
            u = None if uniforms is None else uniforms[i]
            if cache is not None and pos > P:
                tokens[:, pos] = step(tokens[:, pos - 1:pos], positions[i:i + 1], u)
                cache.length = pos
                stats.positions += B
            else:
                if cache is None:
                    logits = model(tokens[:, :pos])[:, -1]
                    stats.positions += B * pos
                else:
                    logits = model.forward_cached(tokens[:, :P], cache)[:, -1]  # the prompt in one pass
                    stats.positions += B * P
                tokens[:, pos] = draw_next_token(logits, u, **draw)
            stats.network_evals += 1
    finally:
        model.train(was_training)
    return tokens, stats


def _check_request(model: ARLM, prompt: torch.Tensor, num_tokens: int, temperature: float,
                   top_k: int | None, use_cache: bool, compile: bool, cuda_graph: bool) -> None:
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
    if compile and (not use_cache or cuda_graph):
        raise ValueError("compile=True compiles the cached decoding step: it needs the KV cache, "
                         "and cuda_graph=True captures that step instead; choose one")
    check_token_ids(prompt, model.vocab.size, "prompt")
