"""The GTL planner sampler, the main algorithm (docs/method.md §7).

L steps; each step reveals exactly one masked position per sequence, chosen by the planner.
Because only one token changes per step, the factorised guided step is the exact guided step
(docs/method.md §3), and it needs only n_ratio ratio-net evaluations: the top-n_ratio candidate
tokens of the denoiser at that position.

    ℓ ~ softmax(planner(z)/T) over masked positions     (or argmax, or uniform)
    a = log p_θ(x^ℓ = · | z);  C = top-n_ratio of a
    ρ = log_softmax_C r_φ(z[ℓ := v]);  g = a + γ·ρ on C
    z^ℓ ~ softmax(top-K of g)

The ancestral sampler's stabiliser is not applied here: with SUBS the unguided probability of
staying masked is exactly 0 (the [MASK] column is −∞), so the stabiliser would be the identity
and the chosen position is always filled.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from gtl_dist.sample import checks
from gtl_dist.sample.guidance import draw_categorical, draw_uniforms, guided_logits, keep_top_k, score_edits
from gtl_dist.sample.stats import NetworkCount, SampleResult, SamplerStats, counted, sample_in_batches


class PlannerSampler:
    """GTL planner sampler; ``ratio_net=None`` (γ = 0) gives the unguided planner sampler.

    Networks are callables on LongTensor [B, L] (see gtl_dist.models): ``denoiser`` returns SUBS
    log-probs [B, L, V], ``ratio_net`` a log-ratio [B], ``planner`` logits [B, L].
    """

    def __init__(self, denoiser: Callable, ratio_net: Optional[Callable], planner: Optional[Callable], *,
                 vocab: Any = None, seq_len: Optional[int] = None, gamma: float = 5.0, n_ratio: int = 512,
                 top_k: int = 8, planner_mode: str = "sample", planner_temperature: float = 0.5,
                 ratio_batch_size: int = 4096, device: Optional[torch.device] = None):
        vocab, seq_len = checks.resolve_shape(denoiser, vocab, seq_len)
        checks.check_guidance(gamma, n_ratio, top_k, vocab, ratio_net, ratio_batch_size)
        checks.check_planner_mode(planner_mode, planner_temperature, planner)
        self.device = torch.device(device) if device is not None else checks.network_device(denoiser)
        self.planner = planner if planner_mode != "uniform" else None
        checks.check_networks(denoiser, ratio_net, self.planner, vocab, seq_len, self.device)
        self.denoiser, self.ratio_net = denoiser, ratio_net
        self.vocab, self.seq_len = vocab, seq_len
        self.gamma, self.n_ratio, self.top_k = float(gamma), n_ratio, top_k
        self.planner_mode, self.planner_temperature = planner_mode, planner_temperature
        self.ratio_batch_size = ratio_batch_size

    # -- one step, exposed so tests can compare it with exact guidance ----------------------------
    def position_logits(self, z: torch.Tensor, stats: SamplerStats) -> torch.Tensor:
        """float64 log-weights of revealing each position; −inf at unmasked positions."""
        masked = z == self.vocab.mask_id
        if self.planner is None:
            weights = torch.zeros(z.shape, dtype=torch.float64, device=z.device)
        else:
            weights = counted(self.planner, stats.planner, z).double() / self.planner_temperature
        return weights.masked_fill(~masked, float("-inf"))

    def choose_positions(self, z: torch.Tensor, uniforms: torch.Tensor, stats: SamplerStats) -> torch.Tensor:
        logits = self.position_logits(z, stats)
        if self.planner_mode == "argmax":
            return torch.argmax(logits, dim=-1)
        return draw_categorical(logits, uniforms)

    def token_distribution(self, z: torch.Tensor, positions: torch.Tensor, stats: SamplerStats
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept token ids [B, K] (ordered by id) and their float64 log-probabilities for z^ℓ."""
        rows = torch.arange(z.shape[0], device=z.device)
        a = denoiser_log_probs_at(self.denoiser, z, rows, positions, stats.denoiser)  # [B, V]
        if self.ratio_net is None:
            ids = torch.arange(a.shape[-1], device=z.device).expand_as(a)
            kept_ids, kept = keep_top_k(ids, a.double(), self.top_k)
        else:
            cand_a, cand_ids = torch.topk(a, self.n_ratio, dim=-1)
            scores = score_edits(self.ratio_net, z, rows, positions, cand_ids, self.ratio_batch_size,
                                 stats.ratio)
            kept_ids, kept = keep_top_k(cand_ids, guided_logits(cand_a, scores, self.gamma), self.top_k)
        return kept_ids, torch.log_softmax(kept, dim=-1)

    # -- the loop -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample_batch(self, batch: int, generator: torch.Generator) -> SampleResult:
        stats = SamplerStats(sequences=batch)
        z = torch.full((batch, self.seq_len), self.vocab.mask_id, dtype=torch.long, device=self.device)
        rows = torch.arange(batch, device=self.device)
        for _ in range(self.seq_len):
            # Uniforms come from a CPU generator in a fixed shape per step, so the random stream
            # (and hence the samples) does not depend on the device or on the network outputs.
            u = draw_uniforms((2, batch), generator, self.device)
            positions = self.choose_positions(z, u[0], stats)
            ids, logp = self.token_distribution(z, positions, stats)
            choice = draw_categorical(logp, u[1])
            z[rows, positions] = ids[rows, choice]
            stats.steps += 1
        return SampleResult(z.cpu(), stats)

    def sample(self, num: int, generator: torch.Generator, batch_size: int = 32) -> SampleResult:
        return sample_in_batches(self.sample_batch, num, generator, batch_size)


def denoiser_log_probs_at(denoiser: Callable, z: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                          count: NetworkCount) -> torch.Tensor:
    """The denoiser's log-probabilities [P, V] at the masked positions (rows[p], positions[p]) of z:
    from ``masked_log_probs`` where the network has it (gtl_dist.models.Denoiser: its output layer
    runs at those positions only), else read from its full [B, L, V] output."""
    if not hasattr(denoiser, "masked_log_probs"):
        return counted(denoiser, count, z)[rows, positions]
    count.calls += 1
    count.rows += int(z.shape[0])
    return denoiser.masked_log_probs(z, rows, positions)

