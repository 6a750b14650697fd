"""What a method samples with: its row of the methods table (gtl_dist/methods.py) turned into
networks, and the conditional those networks give at every masked position.

``method_networks`` loads a method's exports for one (target, fraction, seed): the denoiser of its
row (the source stage's, or a per-target stage's), its guide and, when its sampler reads one, the
planner. An adapter guide (gtl_dist/models/adapter.py) is composed with the source into one
denoiser, so a guided step costs one network call. ``method_log_probs`` is the untruncated
conditional log p(x0^ℓ = v | z) a method's samplers draw from, which the evaluation scores
(docs/method.md §10): the denoiser's, or the guided one, log_softmax(log p_θ + γ·edit scores).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from gtl_dist.config import RunConfig
from gtl_dist.exports import load_upstream
from gtl_dist.methods import METHODS
from gtl_dist.models.adapter import AdaptedDenoiser
from gtl_dist.paths import RunPaths
from gtl_dist.sample.checks import emittable_tokens
from gtl_dist.sample.entry import MethodNetworks
from gtl_dist.sample.guidance import score_edits
from gtl_dist.sample.stats import NetworkCount
from gtl_dist.stages import StageGraph


def method_networks(cfg: RunConfig, paths: RunPaths, method: str, target: Optional[str],
                    fraction: Optional[float], seed: int, *, needed_by: str, device: Any = "cpu") -> MethodNetworks:
    """The networks ``method`` samples with at (target, fraction, seed), and its γ."""
    spec, graph = METHODS[method], StageGraph(cfg)

    def load(stage: str):
        t = graph.stage_task(graph.method_stage(stage), target, fraction, seed)
        return load_upstream(cfg, paths, t.kind, t.target, t.fraction, t.seed, needed_by=needed_by, device=device)

    denoiser = load(spec.model)
    guide = load(spec.guide) if spec.guided else None
    planner = load("planner") if spec.needs_planner(cfg.sample) else None
    if getattr(guide, "reads_features", False):
        # γ is inside the composed denoiser; the sampler sees no separate guide.
        return MethodNetworks(AdaptedDenoiser(denoiser, guide, spec.gamma(cfg.sample)).eval(), planner=planner,
                              gamma=0.0, composed_guide=True)
    return MethodNetworks(denoiser, ratio_net=guide, planner=planner,
                          gamma=spec.gamma(cfg.sample) if spec.guided else 1.0)


def sequence_level_guide(nets: MethodNetworks) -> bool:
    """Whether the method is guided by a sequence-level ratio network (gtl_paper), whose
    conditional costs one pass per single-token edit: L·|V| per sequence."""
    return nets.ratio_net is not None and not getattr(nets.ratio_net, "edit_form", False)


@torch.inference_mode()
def method_log_probs(nets: MethodNetworks, z: torch.Tensor, ratio_batch_size: int = 4096) -> torch.Tensor:
    """float64 [B, L, V]: log p(x0^ℓ = v | z) at masked positions, as the method's samplers see
    it before any top-K truncation ([MASK] column −inf; rows of unmasked positions unspecified).

    A sequence-level ratio network (gtl_paper) scores every single-token edit of every masked
    position, L·|V| passes per sequence: fine for the Markov task, out of reach for text."""
    logp = nets.denoiser(z).double()
    if nets.ratio_net is None or nets.gamma == 0:
        return logp
    if getattr(nets.ratio_net, "edit_form", False):
        edits = nets.ratio_net(z).double()
        return torch.log_softmax(logp + nets.gamma * edits.masked_fill(torch.isinf(logp), 0.0), dim=-1)
    rows, positions = torch.nonzero(z == nets.denoiser.vocab.mask_id, as_tuple=True)
    vocab = nets.denoiser.vocab
    candidates = torch.topk(logp[rows, positions], emittable_tokens(vocab), dim=-1).indices
    scores = score_edits(nets.ratio_net, z, rows, positions, candidates, ratio_batch_size, NetworkCount())
    guided = torch.full_like(logp, float("-inf"))
    picked = logp[rows, positions].gather(-1, candidates) + nets.gamma * torch.log_softmax(scores, dim=-1)
    guided[rows, positions] = torch.full_like(logp[rows, positions], float("-inf")).scatter(-1, candidates, picked)
    return torch.log_softmax(guided, dim=-1).where(
        (z == vocab.mask_id).unsqueeze(-1), logp)
