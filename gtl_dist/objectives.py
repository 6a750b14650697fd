"""Training objectives of the small GTL networks and of the AR model (docs/method.md §4-§6, §8, §11).

Each loss returns ``(loss, stats)``: a scalar fp32 tensor to back-propagate and its statistics as
a :class:`~gtl_dist.batch_stats.BatchStats` (floats by name, kept on the device until read). The
MDLM denoiser loss lives with the process in ``gtl_dist.diffusion``.

Conventions: domain labels are source = 1, target = 0, so -logit d(x0) = log q(x0)/p(x0) plus
the class-prior constant. Networks used as frozen teachers (classifiers for the ratio net, the
denoiser for the planner) must be in eval mode (``freeze``); the losses never send gradients
into them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gtl_dist.batch_stats import BatchStats
from gtl_dist.config import DEFAULT_LABEL_SMOOTHING, POOR_OVERLAP_ACCURACY
from gtl_dist.diffusion import NoiseSchedule, mask_tokens
from gtl_dist.log import get_logger
from gtl_dist.models.heads import subs_token_log_probs

log = get_logger("objectives")

SOURCE_LABEL, TARGET_LABEL = 1.0, 0.0


def freeze(module: nn.Module) -> nn.Module:
    """Make a teacher network constant: eval mode (no dropout) and no gradients."""
    module.eval()
    module.requires_grad_(False)
    return module


def _require_frozen(teacher: Any, name: str) -> None:
    if getattr(teacher, "training", False):
        raise ValueError(f"the {name} is in training mode (dropout would make its targets noisy); "
                         f"freeze it first: gtl_dist.objectives.freeze({name})")


# ----------------------------------------------------------------------------------------------
# Domain classifiers (docs/method.md §4)
# ----------------------------------------------------------------------------------------------

def smoothed_labels(labels: torch.Tensor, beta: Sequence[float] | None,
                    generator: torch.Generator | None) -> torch.Tensor:
    """y (1 - eps) + (1 - y) eps with eps ~ Beta(a, b) drawn per example; ``beta`` None/[] = off.

    The Beta draws come from numpy seeded by one draw of ``generator``, so they are a
    deterministic function of the generator's state (bit-exact resume).
    """
    if not beta:
        return labels
    a, b = beta
    seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                             device=generator.device if generator is not None else "cpu"))
    eps = np.random.default_rng(seed).beta(a, b, size=labels.shape[0])
    eps = torch.as_tensor(eps, dtype=torch.float32, device=labels.device)
    return labels * (1 - eps) + (1 - labels) * eps


def _domain_bce(logits: torch.Tensor, n_source: int, training: bool, beta: Sequence[float] | None,
                generator: torch.Generator | None) -> tuple[torch.Tensor, BatchStats]:
    labels = torch.full_like(logits, TARGET_LABEL)
    labels[:n_source] = SOURCE_LABEL
    # Label smoothing is for training only: validation measures the real cross-entropy.
    targets = smoothed_labels(labels, beta, generator) if training else labels
    loss = F.binary_cross_entropy_with_logits(logits, targets)
    with torch.no_grad():
        hard_bce = F.binary_cross_entropy_with_logits(logits, labels)
        correct = ((logits > 0).float() == labels).float()
        prob = torch.sigmoid(logits)
        stats = BatchStats(
            ("loss", "bce", "accuracy", "source_prob", "target_prob"),
            (loss, hard_bce, correct.mean(), prob[:n_source].mean(), prob[n_source:].mean()))
    return loss, stats


def classifier_ti_loss(classifier: Any, x_source: torch.Tensor, x_target: torch.Tensor,
                       generator: torch.Generator | None = None, *,
                       label_smoothing: Sequence[float] | None = DEFAULT_LABEL_SMOOTHING
                       ) -> tuple[torch.Tensor, BatchStats]:
    """BCE of the time-independent classifier d(x0) on clean source (label 1) and target (0).

    Label smoothing applies only while ``classifier.training``; the caller forms balanced
    batches. Stats: loss, bce (against hard labels: the validation cross-entropy), accuracy,
    source_prob, target_prob (mean sigmoid per domain).
    """
    logits = classifier(torch.cat([x_source, x_target]))
    return _domain_bce(logits, x_source.shape[0], getattr(classifier, "training", False),
                       label_smoothing, generator)


def classifier_td_loss(classifier: Any, x_source: torch.Tensor, x_target: torch.Tensor,
                       schedule: NoiseSchedule, t: torch.Tensor, generator: torch.Generator | None,
                       *, mask_id: int | None = None,
                       label_smoothing: Sequence[float] | None = DEFAULT_LABEL_SMOOTHING
                       ) -> tuple[torch.Tensor, BatchStats]:
    """BCE of the time-dependent classifier d(z_t, t) on masked source and target sequences.

    ``t`` has one entry per row of cat([x_source, x_target]) (use ``sample_t``).
    """
    x0 = torch.cat([x_source, x_target])
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t must have one entry per sequence ({x0.shape[0]}), got {tuple(t.shape)}")
    mask_id = classifier.vocab.mask_id if mask_id is None else mask_id
    t = t.to(x0.device, torch.float32)
    z = mask_tokens(x0, schedule.move_chance(t), mask_id, generator)
    logits = classifier(z, schedule.sigma(t))
    return _domain_bce(logits, x_source.shape[0], getattr(classifier, "training", False),
                       label_smoothing, generator)


# ----------------------------------------------------------------------------------------------
# Ratio network (docs/method.md §5)
# ----------------------------------------------------------------------------------------------

def ratio_loss(ratio_net: Any, classifier_ti: Any, classifier_td: Any, x_source: torch.Tensor,
               x_target: torch.Tensor, schedule: NoiseSchedule, t_source: torch.Tensor,
               t_target: torch.Tensor, generator: torch.Generator | None, *,
               eta_cycle: float = 0.1, mask_id: int | None = None
               ) -> tuple[torch.Tensor, BatchStats]:
    """L_ratio + eta_cycle * L_cycle with both classifiers frozen:

        L_ratio = MSE(r(mask(x_src, t)),   -logit d_ti(x_src))
        L_cycle = MSE(r(mask(x_tgt, t')),  -logit d_td(mask(x_tgt, t'), t'))

    The L_cycle regression uses the same masked target sequence for the ratio net and the
    time-dependent classifier. Stats: loss, ratio_mse, cycle_mse, target_mean, target_std.
    """
    _require_frozen(classifier_ti, "classifier_ti")
    _require_frozen(classifier_td, "classifier_td")
    mask_id = ratio_net.vocab.mask_id if mask_id is None else mask_id
    t_source = t_source.to(x_source.device, torch.float32)
    t_target = t_target.to(x_target.device, torch.float32)
    z_source = mask_tokens(x_source, schedule.move_chance(t_source), mask_id, generator)
    z_target = mask_tokens(x_target, schedule.move_chance(t_target), mask_id, generator)
    with torch.no_grad():
        target_ratio = -classifier_ti(x_source).float()
        target_cycle = -classifier_td(z_target, schedule.sigma(t_target)).float()
    ratio_mse = F.mse_loss(ratio_net(z_source, schedule.sigma(t_source)), target_ratio)
    cycle_mse = F.mse_loss(ratio_net(z_target, schedule.sigma(t_target)), target_cycle)
    loss = ratio_mse + eta_cycle * cycle_mse
    stats = BatchStats(("loss", "ratio_mse", "cycle_mse", "target_mean", "target_std"),
                       (loss, ratio_mse, cycle_mse, target_ratio.mean(),
                        target_ratio.std() if target_ratio.numel() > 1 else target_ratio.new_zeros(())))
    return loss, stats


# ----------------------------------------------------------------------------------------------
# Edit-ratio network: the default GTL recipe (docs/method.md §5)
# ----------------------------------------------------------------------------------------------

def edit_ratio_loss(edit_net: Any, denoiser: Any, x_target: torch.Tensor, mask_rate: torch.Tensor,
                    generator: torch.Generator | None, *, mask_id: int | None = None,
                    pad_id: int | None = None) -> tuple[torch.Tensor, BatchStats]:
    """Cross-entropy of the target's masked tokens under the guided conditional

        q_phi(x0^l = v | z)  ∝  p_theta(x0^l = v | z) · exp(e_phi(z)[l, v])

    with the source denoiser p_theta frozen. Where the exact h is in reach, e_phi = log h(z[l:=v])
    − log h(z) is the minimiser (q(v | z) = p(v | z) h(z[l:=v]) / h(z)), so the fit is calibrated by
    construction: its scale comes from the target data, not from a classifier's confidence.

    ``mask_rate`` has one entry per sequence: the networks see z alone, so the mask rate is drawn
    uniformly rather than through the noise schedule. Pad tokens are never scored. Stats: loss,
    source_nll (the same positions under p_theta alone; loss < source_nll is what the network
    adds), accuracy (greedy, guided), masked_fraction.
    """
    _require_frozen(denoiser, "denoiser")
    mask_id = edit_net.vocab.mask_id if mask_id is None else mask_id
    if pad_id is None and hasattr(edit_net, "vocab"):
        pad_id = edit_net.vocab.pad_id
    z = mask_tokens(x_target, mask_rate.to(x_target.device, torch.float32), mask_id, generator)
    scored = z == mask_id
    if pad_id is not None:
        scored &= x_target != pad_id
    with torch.no_grad():
        source_logp = denoiser(z).float()
    guided = torch.log_softmax(source_logp + edit_net(z).float(), dim=-1)
    truth = x_target.unsqueeze(-1)
    num_scored = scored.sum().clamp_min(1)
    nll = torch.where(scored, -guided.gather(-1, truth).squeeze(-1), torch.zeros((), device=z.device))
    loss = nll.sum() / num_scored
    with torch.no_grad():
        source_nll = torch.where(scored, -source_logp.gather(-1, truth).squeeze(-1),
                                 torch.zeros((), device=z.device)).sum() / num_scored
        correct = (guided.argmax(-1) == x_target) & scored
        stats = BatchStats(("loss", "source_nll", "accuracy", "masked_fraction"),
                           (loss, source_nll, correct.sum() / num_scored, scored.float().mean()))
    return loss, stats


def masked_token_ce(model: Any, x0: torch.Tensor, mask_rate: torch.Tensor, generator: torch.Generator | None,
                    *, vocab: Any, reference: Any = None) -> tuple[torch.Tensor, BatchStats]:
    """Cross-entropy of x0's masked tokens under ``model``'s prediction: the adapter's objective
    and the one held-out rule by which every per-target stage is selected (docs/method.md §12).

    ``model.logits(z)`` (or ``model(z)`` for a network without raw logits, e.g. an exact chain's
    log-probabilities) gives scores whose softmax without [MASK] is the prediction at masked
    positions; ``mask_rate`` has one entry per sequence (the networks see z alone, so rates are
    uniform rather than through a noise schedule). Pad tokens are never scored. Stats: loss,
    accuracy (greedy), masked_fraction and, with a ``reference`` (the frozen source), source_nll:
    the same positions under it (loss < source_nll is what the stage adds).
    """
    z = mask_tokens(x0, mask_rate.to(x0.device, torch.float32), vocab.mask_id, generator)
    scored = z == vocab.mask_id
    if vocab.pad_id is not None:
        scored &= x0 != vocab.pad_id
    num_scored = scored.sum().clamp_min(1)

    def nll_of(net: Any) -> tuple[torch.Tensor, torch.Tensor]:
        scores = (net.logits(z) if hasattr(net, "logits") else net(z)).float().clone()
        log_p_true, greedy = subs_token_log_probs(scores, x0, vocab.mask_id)
        return torch.where(scored, -log_p_true, torch.zeros((), device=z.device)).sum() / num_scored, greedy

    loss, greedy = nll_of(model)
    with torch.no_grad():
        names, values = ["loss", "accuracy", "masked_fraction"], [
            loss, ((greedy == x0) & scored).sum() / num_scored, scored.float().mean()]
        if reference is not None:
            names.append("source_nll")
            values.append(nll_of(reference)[0])
        stats = BatchStats(names, values)
    return loss, stats


# ----------------------------------------------------------------------------------------------
# Planner (docs/method.md §6)
# ----------------------------------------------------------------------------------------------

def planner_loss(planner: Any, denoiser: Any, x0: torch.Tensor, schedule: NoiseSchedule,
                 t: torch.Tensor, generator: torch.Generator | None, *, mask_id: int | None = None
                 ) -> tuple[torch.Tensor, BatchStats]:
    """BCE over masked positions; label 1 where the frozen denoiser's greedy guess is right.

    Stats: loss, accuracy (logit > 0 vs label), positive_rate (share of masked positions the
    denoiser gets right), masked_fraction.
    """
    _require_frozen(denoiser, "denoiser")
    mask_id = denoiser.vocab.mask_id if mask_id is None else mask_id
    t = t.to(x0.device, torch.float32)
    z = mask_tokens(x0, schedule.move_chance(t), mask_id, generator)
    masked = z == mask_id
    with torch.no_grad():
        greedy = denoiser(z, schedule.sigma(t)).argmax(-1)
        labels = (masked & (greedy == x0)).float()
    logits = planner(z).float()
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    num_masked = masked.sum().clamp_min(1)
    loss = torch.where(masked, bce, torch.zeros_like(bce)).sum() / num_masked
    with torch.no_grad():
        correct = ((logits > 0).float() == labels) & masked
        stats = BatchStats(("loss", "accuracy", "positive_rate", "masked_fraction"),
                           (loss, correct.sum() / num_masked, labels.sum() / num_masked,
                            masked.float().mean()))
    return loss, stats


# ----------------------------------------------------------------------------------------------
# Autoregressive LM (docs/method.md §11)
# ----------------------------------------------------------------------------------------------

def ar_loss(model: Any, x: torch.Tensor, *, pad_id: int | None = None
            ) -> tuple[torch.Tensor, BatchStats]:
    """Next-token cross-entropy: position i predicts x[i + 1]; pad targets are not counted.

    ``pad_id`` defaults to model.vocab.pad_id. Stats: loss, accuracy, perplexity.
    """
    if x.shape[1] < 2:
        raise ValueError(f"AR loss needs sequences of length >= 2, got {x.shape[1]}")
    if pad_id is None and hasattr(model, "vocab"):
        pad_id = model.vocab.pad_id
    logits = model(x)[:, :-1].float()
    targets = x[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    valid = (targets != pad_id).reshape(-1) if pad_id is not None else torch.ones_like(ce, dtype=torch.bool)
    num_valid = valid.sum().clamp_min(1)
    loss = torch.where(valid, ce, torch.zeros_like(ce)).sum() / num_valid
    with torch.no_grad():
        correct = (logits.argmax(-1).reshape(-1) == targets.reshape(-1)) & valid
        perplexity = loss.detach().double().clamp(max=50.0).exp()
        stats = BatchStats(("loss", "accuracy", "perplexity"),
                           (loss, correct.sum() / num_valid, perplexity))
    return loss, stats


# ----------------------------------------------------------------------------------------------
# Poor-overlap guard (docs/method.md §8)
# ----------------------------------------------------------------------------------------------

def overlap_report(logits_source: torch.Tensor, logits_target: torch.Tensor,
                   warn_accuracy: float = POOR_OVERLAP_ACCURACY) -> dict[str, float | bool]:
    """Validation accuracy of a domain classifier and the spread of its ratio targets -logit.

    ``accuracy`` is the balanced accuracy (mean of the per-domain accuracies), so unequal
    validation sets do not hide a classifier that separates the domains perfectly. The ratio
    targets are -logit on source sequences (what L_ratio regresses). Logs a WARNING when
    accuracy >= warn_accuracy: the domains barely overlap.
    """
    src = torch.as_tensor(logits_source).detach().double().reshape(-1).cpu()
    tgt = torch.as_tensor(logits_target).detach().double().reshape(-1).cpu()
    if src.numel() == 0 or tgt.numel() == 0:
        raise ValueError("overlap_report needs classifier logits on both source and target "
                         "validation sequences")
    source_accuracy = float((src > 0).double().mean())
    target_accuracy = float((tgt < 0).double().mean())
    targets = -src
    qs = torch.quantile(targets, torch.tensor([0.01, 0.05, 0.5, 0.95, 0.99], dtype=torch.float64))
    report: dict[str, float | bool] = {
        "accuracy": 0.5 * (source_accuracy + target_accuracy),
        "pooled_accuracy": float(((src > 0).sum() + (tgt < 0).sum()) / (src.numel() + tgt.numel())),
        "source_accuracy": source_accuracy,
        "target_accuracy": target_accuracy,
        "ratio_target_mean": float(targets.mean()),
        "ratio_target_std": float(targets.std()) if targets.numel() > 1 else 0.0,
        "ratio_target_min": float(targets.min()),
        "ratio_target_max": float(targets.max()),
        **{f"ratio_target_q{int(round(q * 100)):02d}": float(v)
           for q, v in zip((0.01, 0.05, 0.5, 0.95, 0.99), qs)},
        "target_side_ratio_mean": float((-tgt).mean()),
    }
    report["poor_overlap"] = report["accuracy"] >= warn_accuracy
    if report["poor_overlap"]:
        log.warning(
            "poor source/target overlap: the domain classifier reaches %.4f validation accuracy "
            "(>= %.2f) and its ratio targets -logit span [%.1f, %.1f] (std %.1f). The density ratio "
            "q/p is nearly unbounded, so the ratio net will extrapolate and strong guidance drives "
            "samples off the data manifold (docs/method.md §8). Reduce sample.gamma, or raise data.overlap "
            "so the source sees some target-like data.", report["accuracy"], warn_accuracy,
            report["ratio_target_min"], report["ratio_target_max"], report["ratio_target_std"])
    return report
