"""Ancestral samplers: GTL-guided with the stabiliser, exact full-vocabulary guidance, unguided
(docs/method.md §7).

S steps from t = 1 to t_end. At every masked position the source kernel is

    P(stay masked) = (1 − α_s)/(1 − α_t),   P(v) = (1 − P(stay))·p_θ(v | z_t)

Guidance adds γ·ρ to the token logits, with ρ the candidate-normalised log-ratio of the single
edit z_t[ℓ := v] (each position scored on its own, the other masked positions still [MASK]);
the kernel is truncated to the top-K tokens (plus [MASK]) and the stabiliser resets P(stay) to
the unguided value. Positions are then drawn independently: with several positions unmasked in
one step this factorisation is an approximation that vanishes as S grows (the planner sampler
avoids it by revealing one position per step).

With a time-independent denoiser and ratio net (the default, docs/method.md §2) the network outputs
depend on z only, so a sequence that did not change in a step is not re-evaluated ("cached"
sampling); with many steps per token most steps change nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from gtl_dist.sample import checks
from gtl_dist.sample.guidance import (draw_categorical, draw_uniforms, guided_logits, joint_mask_kernel,
                                      keep_top_k, score_edits, stabilise_mask_mass)
from gtl_dist.sample.stats import SampleResult, SamplerStats, counted, sample_in_batches


@dataclass
class Proposals:
    """What the networks say about z, per position: candidate ids [B, L, c] with the denoiser's
    log-probs a [B, L, c] (descending) and, when guided, the edit scores r_φ(z[ℓ := v]) [B, L, c]
    (meaningful at masked positions only)."""
    ids: torch.Tensor
    logp: torch.Tensor
    scores: Optional[torch.Tensor]


@dataclass
class StepKernel:
    """The reverse kernel of one step at every masked position (b, ℓ) = positions[i]."""
    positions: torch.Tensor  # [N, 2]
    ids: torch.Tensor  # [N, K] kept token ids, ordered by id
    token_logprobs: torch.Tensor  # [N, K] float64
    stay_logprob: torch.Tensor  # [N] float64, log P(stay masked)


class AncestralSampler:
    """Guided ancestral sampler; ``ratio_net=None`` with γ = 0 is the unguided sampler.

    ``schedule`` is any object with ``move_chance(t) = 1 − α_t`` (gtl_dist.diffusion.NoiseSchedule).
    ``stabilise=False`` replaces the stabiliser by one softmax over [MASK] and the tokens; it exists
    to show the collapse the stabiliser prevents, not for use.
    """

    def __init__(self, denoiser: Callable, ratio_net: Optional[Callable], schedule: Any, *,
                 vocab: Any = None, seq_len: Optional[int] = None, gamma: float = 5.0, n_ratio: int = 512,
                 top_k: int = 8, steps: int = 128, t_end: float = 1e-5, stabilise: bool = True,
                 cache: bool = True, ratio_batch_size: int = 4096, device: Optional[torch.device] = None):
        vocab, seq_len = checks.resolve_shape(denoiser, vocab, seq_len)
        checks.check_guidance(gamma, n_ratio, top_k, vocab, ratio_net, ratio_batch_size)
        if steps < 1:
            raise checks.SamplerConfigError(f"steps={steps} must be at least 1")
        if not 0.0 < t_end < 1.0:
            raise checks.SamplerConfigError(f"t_end={t_end} must be in (0, 1)")
        self.device = torch.device(device) if device is not None else checks.network_device(denoiser)
        checks.check_networks(denoiser, ratio_net, None, vocab, seq_len, self.device)
        self.denoiser, self.ratio_net = denoiser, ratio_net
        self.vocab, self.seq_len = vocab, seq_len
        self.gamma, self.n_ratio, self.top_k = float(gamma), n_ratio, top_k
        self.steps, self.t_end = steps, t_end
        self.stabilise, self.cache = stabilise, cache
        self.ratio_batch_size = ratio_batch_size
        self.stay_logprobs = _stay_logprobs(schedule, steps, t_end)

    # -- network side -------------------------------------------------------------------------------
    def proposals(self, z: torch.Tensor, stats: SamplerStats) -> Proposals:
        logp = counted(self.denoiser, stats.denoiser, z)
        if self.ratio_net is None:
            a, ids = torch.topk(logp, min(self.top_k, logp.shape[-1]), dim=-1)
            return Proposals(ids, a, None)
        a, ids = torch.topk(logp, self.n_ratio, dim=-1)
        scores = torch.zeros(a.shape, dtype=torch.float64, device=z.device)
        rows, positions = torch.nonzero(z == self.vocab.mask_id, as_tuple=True)
        if rows.numel():
            scores[rows, positions] = score_edits(self.ratio_net, z, rows, positions, ids[rows, positions],
                                                  self.ratio_batch_size, stats.ratio)
        return Proposals(ids, a, scores)

    # -- kernel side --------------------------------------------------------------------------------
    def kernel(self, z: torch.Tensor, prop: Proposals, step: int,
               masked_at: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> StepKernel:
        """The kernel at the masked positions of z (``masked_at``: their nonzero(), if known)."""
        rows, positions = masked_at or torch.nonzero(z == self.vocab.mask_id, as_tuple=True)
        ids, a = prop.ids[rows, positions], prop.logp[rows, positions]
        if prop.scores is None:
            logits = a.double()
        else:
            logits = guided_logits(a, prop.scores[rows, positions], self.gamma)
        kept_ids, kept = keep_top_k(ids, logits, self.top_k)
        stay = self.stay_logprobs[step]
        if self.stabilise:
            token_logp, stay_logp = stabilise_mask_mass(kept, stay)
        else:
            token_logp, stay_logp = joint_mask_kernel(kept + math.log1p(-math.exp(stay)), stay)
        return StepKernel(torch.stack([rows, positions], dim=-1), kept_ids, token_logp, stay_logp)

    def step_distribution(self, z: torch.Tensor, step: int) -> StepKernel:
        """The kernel of reverse step ``step`` (0-based, t_step -> t_{step+1}) at z, uncached."""
        with torch.inference_mode():
            return self.kernel(z, self.proposals(z, SamplerStats()), step)

    # -- the loop -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample_batch(self, batch: int, generator: torch.Generator) -> SampleResult:
        """S steps. The host waits for the device twice per step: once for the decision that
        needs it (which sequences changed, hence whether and on which the networks run) and once
        for the positions still masked (their number varies); steps on which a guided sampler's
        networks run add one, for the masked positions the ratio net scores. Nothing else in a
        step reads a value back (tests/test_host_reads.py)."""
        stats = SamplerStats(sequences=batch)
        mask_id = self.vocab.mask_id
        z = torch.full((batch, self.seq_len), mask_id, dtype=torch.long, device=self.device)
        prop = self.proposals(z, stats)  # every sequence starts all-[MASK]
        stale = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for step in range(self.steps):
            # One uniform per position per step from a CPU generator: the random stream is the
            # same whatever the device, the state or the network outputs.
            u = draw_uniforms((batch, self.seq_len), generator, self.device)
            stats.steps += 1
            masked = z == mask_id
            refresh = (stale if self.cache else True) & masked.any(dim=-1)
            if step > 0:
                prop = self._update(z, prop, refresh, stats)
                stale &= ~refresh
            rows, positions = torch.nonzero(masked, as_tuple=True)
            if not rows.numel():
                continue
            k = self.kernel(z, prop, step, (rows, positions))
            choice = draw_categorical(torch.cat([k.stay_logprob.unsqueeze(-1), k.token_logprobs], dim=-1),
                                      u[rows, positions])
            picked = torch.gather(k.ids, -1, (choice - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
            z[rows, positions] = torch.where(choice == 0, torch.full_like(picked, mask_id), picked)
            revealed = torch.zeros(batch, dtype=torch.long, device=self.device)
            revealed.index_add_(0, rows, (choice != 0).long())
            stale |= revealed > 0
        self._fill_greedily(z, prop, stale, stats)
        return SampleResult(z.cpu(), stats)

    def _update(self, z: torch.Tensor, prop: Proposals, refresh: torch.Tensor, stats: SamplerStats
                ) -> Proposals:
        """Re-run the networks on the sequences in ``refresh`` (one host wait: which they are)."""
        rows = torch.nonzero(refresh).squeeze(-1)
        if len(rows) == len(refresh):
            return self.proposals(z, stats)
        if len(rows):
            return self._refresh(z, prop, rows, stats)
        stats.cached_steps += 1
        return prop

    def _refresh(self, z: torch.Tensor, prop: Proposals, rows: torch.Tensor, stats: SamplerStats
                 ) -> Proposals:
        """New proposals for the sequences ``rows`` (indices: no boolean mask, which would wait)."""
        fresh = self.proposals(z[rows], stats)
        prop.ids[rows], prop.logp[rows] = fresh.ids, fresh.logp
        if prop.scores is not None:
            prop.scores[rows] = fresh.scores
        return prop

    def _fill_greedily(self, z: torch.Tensor, prop: Proposals, stale: torch.Tensor,
                       stats: SamplerStats) -> None:
        """Any [MASK] left after the last step takes the denoiser's most likely token (unguided)."""
        masked = z == self.vocab.mask_id
        if not masked.any():
            return
        stats.filled_at_end += int(masked.sum())
        rows = torch.nonzero(stale & masked.any(dim=-1)).squeeze(-1)
        if len(rows):
            prop = self._refresh(z, prop, rows, stats)
        # Proposals are sorted by descending denoiser log-prob, so column 0 is the argmax.
        z[masked] = prop.ids[..., 0][masked]

    def sample(self, num: int, generator: torch.Generator, batch_size: int = 32) -> SampleResult:
        return sample_in_batches(self.sample_batch, num, generator, batch_size)


def exact_guided_sampler(denoiser: Callable, ratio_net: Callable, schedule: Any, *, vocab: Any = None,
                         seq_len: Optional[int] = None, **kwargs: Any) -> AncestralSampler:
    """The reference for small |V|: the ancestral sampler with every non-[MASK] id as a candidate."""
    vocab, seq_len = checks.resolve_shape(denoiser, vocab, seq_len)
    return AncestralSampler(denoiser, ratio_net, schedule, vocab=vocab, seq_len=seq_len,
                            n_ratio=checks.emittable_tokens(vocab), **kwargs)


def unguided_sampler(denoiser: Callable, schedule: Any, **kwargs: Any) -> AncestralSampler:
    """The source, vanilla and fine-tuned baselines: γ = 0, same top-K truncation and stabiliser."""
    return AncestralSampler(denoiser, None, schedule, gamma=0.0, **kwargs)


def _stay_logprobs(schedule: Any, steps: int, t_end: float) -> list[float]:
    """log P(stay masked) = log[(1 − α_s)/(1 − α_t)] for each step of the uniform grid 1 -> t_end."""
    times = torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64)
    move = [float(schedule.move_chance(t)) for t in times]
    out = []
    for step in range(steps):
        if not 0.0 < move[step + 1] < move[step] <= 1.0:
            raise checks.SamplerConfigError(
                f"schedule: move_chance must increase on (0, 1] with move_chance(t_end) > 0; got "
                f"move_chance({times[step + 1].item():.3g})={move[step + 1]:.3g}, "
                f"move_chance({times[step].item():.3g})={move[step]:.3g}")
        out.append(math.log(move[step + 1] / move[step]))
    return out
