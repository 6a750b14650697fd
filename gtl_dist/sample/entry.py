"""Sampling as the pipeline calls it: pick the sampler from SampleConfig, and sample by shard.

Baselines (source, vanilla, fine-tuned; docs/method.md §9) pass no ratio net and get the unguided
ancestral sampler with the same top-K. GTL passes its ratio net (the edit-ratio network of
gtl_edit or the sequence-level ratio network of gtl_paper) and its γ, or a denoiser with its
adapter composed in (gtl), and gets ``cfg.sampler``: ``planner`` (the main algorithm),
``ancestral`` or ``exact`` (full vocabulary, small |V| only). ``first_hitting`` is every method's
sampler alike: one uniformly chosen masked position per step, L steps, which draws exactly from a
model whose conditionals are exact (the Markov task's evaluation sampler, docs/method.md §10).

Shard i of a sampling job holds a fixed slice of the sample indices and draws from a generator
seeded by (seed, replicate, i) alone, so the merged output is the same however many array tasks
ran the shards, in whatever order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from gtl_dist.config import SampleConfig
from gtl_dist.io import atomic_write_text
from gtl_dist.sample.ancestral import AncestralSampler, exact_guided_sampler, unguided_sampler
from gtl_dist.sample.checks import emittable_tokens
from gtl_dist.sample.planner_sampler import PlannerSampler
from gtl_dist.sample.stats import SampleResult, SamplerStats


@dataclass
class MethodNetworks:
    """The networks one method samples with."""
    denoiser: Callable
    ratio_net: Optional[Callable] = None  # GTL only; None gives the unguided baseline sampler
    planner: Optional[Callable] = None  # GTL planner sampler, unless planner_mode is uniform
    gamma: float = 1.0  # guidance strength (SampleConfig.gamma or .paper_gamma)
    vocab: Any = None  # default: denoiser.vocab
    seq_len: Optional[int] = None  # default: denoiser.seq_len
    # A GTL method whose guide is composed into ``denoiser`` (an adapter, gtl_dist/models/adapter.py)
    # has no separate ratio_net but samples with the GTL sampler all the same.
    composed_guide: bool = False

    @property
    def guided(self) -> bool:
        return self.ratio_net is not None or self.composed_guide


def build_sampler(nets: MethodNetworks, cfg: SampleConfig, schedule: Any,
                  device: Optional[torch.device] = None) -> PlannerSampler | AncestralSampler:
    shape = dict(vocab=nets.vocab, seq_len=nets.seq_len, device=device)
    ancestral = dict(top_k=cfg.top_k, steps=cfg.steps, t_end=cfg.t_end, stabilise=cfg.stabilise,
                     ratio_batch_size=cfg.ratio_batch_size, **shape)
    # γ = 0 draws the same tokens with or without the ratio net (tested bit for bit), so skip its cost.
    guide = nets.ratio_net if nets.gamma > 0 else None
    if cfg.sampler == "first_hitting":  # every method alike, every token a candidate: exact for an exact model
        vocab = nets.vocab if nets.vocab is not None else nets.denoiser.vocab
        return PlannerSampler(nets.denoiser, guide, None, gamma=nets.gamma if guide is not None else 0.0,
                              n_ratio=emittable_tokens(vocab), top_k=cfg.top_k, planner_mode="uniform",
                              ratio_batch_size=cfg.ratio_batch_size, **shape)
    if nets.guided and cfg.sampler == "planner":
        return PlannerSampler(nets.denoiser, guide, nets.planner, gamma=nets.gamma, n_ratio=cfg.n_ratio,
                              top_k=cfg.top_k, planner_mode=cfg.planner_mode,
                              planner_temperature=cfg.planner_temperature,
                              ratio_batch_size=cfg.ratio_batch_size, **shape)
    if guide is None:
        return unguided_sampler(nets.denoiser, schedule, **ancestral)
    if cfg.sampler == "exact":
        return exact_guided_sampler(nets.denoiser, guide, schedule, gamma=nets.gamma, **ancestral)
    if cfg.sampler == "ancestral":
        return AncestralSampler(nets.denoiser, guide, schedule, gamma=nets.gamma, n_ratio=cfg.n_ratio,
                                **ancestral)
    raise ValueError(f"sample.sampler='{cfg.sampler}' is not planner, ancestral or exact")


def sample_sequences(nets: MethodNetworks, cfg: SampleConfig, schedule: Any, num: int, seed: int,
                     device: Optional[torch.device] = None) -> SampleResult:
    """``num`` sequences (tokens on the CPU) plus network-evaluation counts, from one seed."""
    sampler = build_sampler(nets, cfg, schedule, device)
    generator = torch.Generator().manual_seed(seed)
    return sampler.sample(num, generator, batch_size=cfg.batch_size)


# -- shards -----------------------------------------------------------------------------------------

def shard_sizes(num_samples: int, shards: int) -> list[int]:
    """Samples per shard: as equal as possible, the first shards one larger."""
    if num_samples < 1 or shards < 1:
        raise ValueError(f"num_samples={num_samples} and shards={shards} must both be at least 1")
    base, extra = divmod(num_samples, shards)
    return [base + (i < extra) for i in range(shards)]


def shard_seed(seed: int, shard: int, replicate: int = 0) -> int:
    """The generator seed of one shard: a hash of (seed, shard[, replicate]), so shards and
    replicates draw unrelated streams (replicate 0 keeps the single-seed streams).

    Not train.recipe.derive_seed, though it does the same job: its formula fixes every sample
    stream, so changing it would change every existing run's samples."""
    tag = f"gtl_dist.sample:{seed}:{shard}" + (f":{replicate}" if replicate else "")
    digest = hashlib.sha256(tag.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class SampleShard:
    shard: int
    first_index: int  # global index of the shard's first sample
    seed: int  # the shard's generator seed
    tokens: torch.Tensor  # LongTensor [n, L]
    stats: SamplerStats


def sample_shard(nets: MethodNetworks, cfg: SampleConfig, schedule: Any, shard: int,
                 device: Optional[torch.device] = None, replicate: int = 0) -> SampleShard:
    """Shard ``shard`` of ``cfg.num_samples`` split into ``cfg.shards``: a function of (cfg, shard,
    replicate) only."""
    if not 0 <= shard < cfg.shards:
        raise ValueError(f"shard={shard} is outside [0, sample.shards={cfg.shards})")
    sizes = shard_sizes(cfg.num_samples, cfg.shards)
    seed = shard_seed(cfg.seed, shard, replicate)
    result = sample_sequences(nets, cfg, schedule, sizes[shard], seed, device)
    return SampleShard(shard, sum(sizes[:shard]), seed, result.tokens, result.stats)


def write_sample_shard(path: str | Path, shard: SampleShard, texts: Optional[Sequence[str]] = None) -> None:
    """One JSON record per sample, ``{"tokens", "text", "seed", "index"}``, written atomically."""
    if texts is not None and len(texts) != len(shard.tokens):
        raise ValueError(f"{path}: {len(texts)} texts for {len(shard.tokens)} samples")
    lines = [json.dumps({"tokens": row, "text": None if texts is None else texts[i], "seed": shard.seed,
                         "index": shard.first_index + i})
             for i, row in enumerate(shard.tokens.tolist())]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
