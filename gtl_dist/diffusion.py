"""The masking (absorbing-state) diffusion process of MDLM and its training loss (docs/method.md §2).

Forward process: every token independently becomes [MASK] with probability 1 - alpha_t (the
"move chance"). The continuous-time NELBO of a SUBS denoiser is

    NELBO = ∫ w(t) E_{z_t} [ sum over masked l of -log p_theta(x0^l | z_t) ] dt,
    w(t)  = -alpha'_t / (1 - alpha_t).

Substituting u = 1 - alpha_t gives w(t) dt = du / u, which is why the weight diverges like 1/t
while the chance of a position being masked vanishes like t: the integrand stays finite.

Training draws t ~ U[t_min, 1] (stratified over the global batch) and averages over all valid
tokens, so exp(loss) is MDLM's perplexity bound. As in MDLM the estimator is the mean over
t in [t_min, 1] (no (1 - t_min) factor).
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch

from gtl_dist.batch_stats import BatchStats
from gtl_dist.config import NoiseConfig
from gtl_dist.models.heads import subs_token_log_probs


class NoiseSchedule(abc.ABC):
    """alpha_t through the move chance 1 - alpha_t, its NELBO weight, and sigma(t) = -log alpha_t."""

    name = "base"

    def __init__(self, t_min: float = 1e-3, antithetic: bool = True):
        if not 0.0 < t_min < 1.0:
            raise ValueError(f"noise.t_min={t_min} must lie in (0, 1)")
        self.t_min = t_min
        self.antithetic = antithetic

    @abc.abstractmethod
    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        """1 - alpha_t: the probability that a token is [MASK] at time t."""

    @abc.abstractmethod
    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'_t / (1 - alpha_t)."""

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """-log alpha_t: the noise level a time-conditioned network sees."""
        return -torch.log1p(-self.move_chance(t))

    def time_at(self, move_chance: torch.Tensor) -> torch.Tensor:
        """The t whose move chance is ``move_chance`` (float64 bisection: every schedule's move
        chance increases in t), e.g. to give a time-conditioned network the t of a mask rate."""
        target = torch.as_tensor(move_chance, dtype=torch.float64)
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(60):
            mid = (lo + hi) / 2
            below = self.move_chance(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    @staticmethod
    def from_config(cfg: NoiseConfig) -> "NoiseSchedule":
        if cfg.schedule == "loglinear":
            return LogLinearSchedule(cfg.eps, t_min=cfg.t_min, antithetic=cfg.antithetic)
        if cfg.schedule == "geometric":
            return GeometricSchedule(cfg.sigma_min, cfg.sigma_max, t_min=cfg.t_min,
                                     antithetic=cfg.antithetic)
        raise ValueError(f"noise.schedule='{cfg.schedule}' is not loglinear or geometric")


class LogLinearSchedule(NoiseSchedule):
    """1 - alpha_t = (1 - eps) t (MDLM's text schedule).

    alpha'_t = -(1 - eps), so w(t) = (1 - eps) / ((1 - eps) t) = 1/t exactly: eps changes
    where the process ends (a fraction eps of tokens survive at t = 1), not the weight.
    """

    name = "loglinear"

    def __init__(self, eps: float = 1e-3, **kw: Any):
        super().__init__(**kw)
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"noise.eps={eps} must lie in [0, 1)")
        self.eps = eps

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) * _float(t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / _float(t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log1p(-(1.0 - self.eps) * _float(t))


class GeometricSchedule(NoiseSchedule):
    """sigma(t) = sigma_min^(1-t) sigma_max^t, 1 - alpha_t = 1 - exp(-sigma) (the synthetic code's).

    w(t) = sigma'(t) e^{-sigma} / (1 - e^{-sigma}) = sigma'(t) / expm1(sigma),
    sigma'(t) = sigma(t) log(sigma_max / sigma_min).
    """

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0, **kw: Any):
        super().__init__(**kw)
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"noise.sigma_min={sigma_min}, noise.sigma_max={sigma_max}: need "
                             f"0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.log_ratio = math.log(sigma_max / sigma_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * torch.exp(self.log_ratio * _float(t))

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(-self.sigma(t))

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        s = self.sigma(t)
        return s * self.log_ratio / torch.expm1(s)


def _float(t: torch.Tensor | float) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.float()


def sample_t(batch_size: int, generator: torch.Generator | None, *, t_min: float,
             antithetic: bool = True, rank: int = 0, world_size: int = 1,
             device: torch.device | str | None = None) -> torch.Tensor:
    """Diffusion times for this rank's share of one global batch, t in [t_min, 1).

    ``generator`` must give the same draws on every rank (seed it by step): all ranks draw the
    same global batch of size batch_size * world_size and rank r keeps entries r, r + W, ...
    With ``antithetic`` the global draw is stratified, u_i = (u_0 + i / n) mod 1, so each
    rank's share is itself stratified. Gradient accumulation: pass world_size = W * steps and
    rank = r * steps + micro_step to stratify over the accumulated batch.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"sample_t: need batch_size >= 1 and 0 <= rank < world_size, got "
                         f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
    n = batch_size * world_size
    gen_device = generator.device if generator is not None else "cpu"
    if antithetic:
        u0 = torch.rand((), generator=generator, dtype=torch.float64, device=gen_device)
        u = torch.remainder(u0 + torch.arange(n, dtype=torch.float64, device=gen_device) / n, 1.0)
    else:
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=gen_device)
    t = t_min + (1.0 - t_min) * u[rank::world_size]
    return t.float().to(device if device is not None else gen_device)


def mask_tokens(x0: torch.Tensor, move_chance: torch.Tensor | float, mask_id: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """z_t: each token of x0 independently replaced by mask_id with probability move_chance.

    ``move_chance`` is a scalar or one value per sequence ([B]).
    """
    move = torch.as_tensor(move_chance, dtype=torch.float32, device=x0.device)
    if move.dim() == 1:
        if move.shape[0] != x0.shape[0]:
            raise ValueError(f"move_chance has {move.shape[0]} entries for a batch of {x0.shape[0]}")
        move = move[:, None]
    gen_device = generator.device if generator is not None else x0.device
    u = torch.rand(x0.shape, generator=generator, device=gen_device).to(x0.device)
    return torch.where(u < move, torch.full_like(x0, mask_id), x0)


# The statistics mdlm_loss reports, in the order of mdlm_terms' statistics tensor.
MDLM_STATS = ("loss", "nll", "accuracy", "masked_fraction")


def mdlm_loss(denoiser: Any, x0: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor,
              generator: torch.Generator | None, *, vocab: Any = None, terms: Any = None
              ) -> tuple[torch.Tensor, BatchStats]:
    """The MDLM NELBO estimate for a batch (fp32): weighted masked-position cross-entropy,
    averaged over all valid tokens (tokens equal to vocab.pad_id, if any, are not counted).

    ``denoiser.logits(z, sigma)`` gives the scores the loss reads (:func:`mdlm_terms`); ``vocab``
    defaults to denoiser.vocab.
    The masking runs here, eagerly; the network and the loss are ``terms`` (:func:`mdlm_terms`,
    or a compiled copy of it: ``train.<stage>.compile``). ``x0``'s ids were checked on the host
    where it was loaded (gtl_dist.models.check_token_ids): nothing here reads the batch back.
    Stats: loss, nll (mean CE over masked positions), accuracy (greedy, masked positions),
    masked_fraction.
    """
    vocab = denoiser.vocab if vocab is None else vocab
    t = t.to(x0.device, torch.float32)
    z = mask_tokens(x0, schedule.move_chance(t), vocab.mask_id, generator)
    loss, stats = (terms or mdlm_terms)(denoiser, x0, z, t, schedule, vocab)
    return loss, BatchStats(MDLM_STATS, stats)


def mdlm_terms(denoiser: Any, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
               schedule: NoiseSchedule, vocab: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of a masked batch ``z`` of ``x0`` at times ``t``, and its statistics as one tensor
    (MDLM_STATS). Tensor code only, with no data-dependent Python: what train.<stage>.compile
    compiles as one graph, the network's forward included.

    Reads ``denoiser.logits(z, sigma)``, scores over V whose softmax without [MASK] is the
    prediction at masked positions (a table of log-probabilities qualifies), and never builds the
    SUBS log-probability tensor: only masked positions are scored, where SUBS is that softmax.
    """
    logits = denoiser.logits(z, schedule.sigma(t))
    log_p_true, greedy = subs_token_log_probs(logits, x0, vocab.mask_id)
    masked = z == vocab.mask_id
    valid = torch.ones_like(masked) if vocab.pad_id is None else x0 != vocab.pad_id
    scored = masked & valid
    nll = torch.where(scored, -log_p_true, torch.zeros_like(log_p_true))
    num_valid = valid.sum().clamp_min(1)
    loss = (schedule.loss_weight(t).to(nll.device)[:, None] * nll).sum() / num_valid

    with torch.no_grad():
        num_scored = scored.sum().clamp_min(1)
        correct = (greedy == x0) & scored
        stats = torch.stack([loss.detach(), nll.sum() / num_scored, correct.sum() / num_scored,
                             scored.sum() / num_valid])
    return loss, stats
