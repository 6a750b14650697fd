"""What a sampler returns: the tokens and its network-evaluation counts.

GTL's point is cost (docs/method.md §3): naive guidance needs O(L·|V|) ratio-net passes per step, the
planner sampler O(n_ratio). Every sampler therefore counts, per network, how many times it was
called and how many sequences those calls processed ("rows"), so the claim can be checked by
counting rather than by timing alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from gtl_dist.log import Progress


@dataclass
class NetworkCount:
    calls: int = 0
    rows: int = 0  # sequences processed, summed over calls

    def add(self, other: "NetworkCount") -> None:
        self.calls += other.calls
        self.rows += other.rows


@dataclass
class SamplerStats:
    sequences: int = 0  # sequences generated
    steps: int = 0  # reverse steps taken, summed over batches
    cached_steps: int = 0  # steps (per batch) in which no sequence changed, so no network ran
    filled_at_end: int = 0  # [MASK] tokens left after the last step and filled greedily
    denoiser: NetworkCount = field(default_factory=NetworkCount)
    ratio: NetworkCount = field(default_factory=NetworkCount)
    planner: NetworkCount = field(default_factory=NetworkCount)

    def add(self, other: "SamplerStats") -> None:
        self.sequences += other.sequences
        self.steps += other.steps
        self.cached_steps += other.cached_steps
        self.filled_at_end += other.filled_at_end
        for name in ("denoiser", "ratio", "planner"):
            getattr(self, name).add(getattr(other, name))

    def per_sequence(self) -> dict[str, float]:
        """Network evaluations (rows) per generated sequence, per network."""
        n = max(self.sequences, 1)
        return {name: getattr(self, name).rows / n for name in ("denoiser", "ratio", "planner")}


def counted(network: Callable[[torch.Tensor], torch.Tensor], count: NetworkCount,
            z: torch.Tensor) -> torch.Tensor:
    """Call ``network(z)`` and record one call of ``len(z)`` rows."""
    count.calls += 1
    count.rows += int(z.shape[0])
    return network(z)


@dataclass
class SampleResult:
    tokens: torch.Tensor  # LongTensor [num, L] on the CPU
    stats: SamplerStats


def sample_in_batches(sample_batch: Callable[[int, torch.Generator], SampleResult], num: int,
                      generator: torch.Generator, batch_size: int) -> SampleResult:
    """Run ``sample_batch`` over ceil(num / batch_size) batches drawing from one generator."""
    if num < 1 or batch_size < 1:
        raise ValueError(f"num={num} and batch_size={batch_size} must both be at least 1")
    stats = SamplerStats()
    parts = []
    bar = Progress(num, "sampling", unit="seq")  # a log line every 10 s off a terminal
    for start in range(0, num, batch_size):
        result = sample_batch(min(batch_size, num - start), generator)
        parts.append(result.tokens)
        stats.add(result.stats)
        bar.update(len(result.tokens))
    bar.close()
    return SampleResult(torch.cat(parts), stats)
