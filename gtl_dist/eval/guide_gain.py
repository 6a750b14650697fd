"""Does gtl's edit-ratio network make the source model better at the target's held-out text?

The text counterpart of the Markov ladder's "learned guide" rung (gtl_dist/eval/ladder.py), where
no exact target model exists: every edit-ratio network is scored on the same partly masked copies
of the target's held-out test text, with the cross-entropy of the masked tokens under the source
denoiser alone and under the source reweighted by the network (the guided conditional that gtl
samples from at γ = 1, docs/method.md §5). Their difference, in nats per masked token, is
``guide_ce_gain``: positive where the network moved the source toward the target's text, zero for
a network that learned nothing (its zero-initialised output), negative where it learned noise.
Read with MAUVE: a positive gain with no MAUVE gain puts the loss in sampling (steps, top-K, γ),
a gain near zero puts it in the network (too little target data to learn an edit ratio from).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from gtl_dist.config import RunConfig
from gtl_dist.eval.results import ResultRow, seed_rows
from gtl_dist.log import get_logger
from gtl_dist.objectives import edit_ratio_loss, freeze
from gtl_dist.paths import RunPaths
from gtl_dist.stages import StageGraph
from gtl_dist.exports import load_exported, upstream_export_path

log = get_logger("eval.guide_gain")

GAIN_METRIC = "guide_ce_gain"
MAX_SEQUENCES = 256   # held-out sequences scored per target (the first ones)
VIEWS = 2             # masked copies of each, at mask rates uniform in MASK_RATES
MASK_RATES = (0.1, 0.9)


def masked_views(tokens: Sequence[Sequence[int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scored sequences, each ``VIEWS`` times, and one mask rate per copy (seeded)."""
    x = torch.as_tensor([list(t) for t in tokens[:MAX_SEQUENCES]], dtype=torch.long).repeat(VIEWS, 1)
    g = torch.Generator().manual_seed(seed)
    lo, hi = MASK_RATES
    return x, lo + (hi - lo) * torch.rand(len(x), generator=g)


@torch.inference_mode()
def guided_and_source_ce(edit_net: torch.nn.Module, denoiser: torch.nn.Module, x: torch.Tensor,
                         rates: torch.Tensor, seed: int, batch_size: int) -> tuple[float, float]:
    """Masked-token cross-entropy (guided, source alone), averaged over masked tokens, on the
    same masks for every network (the generator restarts at ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    guided = source = weight = 0.0
    for xb, rb in zip(torch.split(x, batch_size), torch.split(rates, batch_size)):
        _, stats = edit_ratio_loss(edit_net, denoiser, xb, rb, g)
        n = stats["masked_fraction"] * xb.numel()
        guided, source, weight = guided + stats["loss"] * n, source + stats["source_nll"] * n, weight + n
    return guided / weight, source / weight


def guide_gain_rows(cfg: RunConfig, paths: RunPaths,
                    heldout_tokens: Mapping[str, Sequence[Sequence[int]]]) -> list[ResultRow]:
    """One ``guide_ce_gain`` row per (target, fraction) over the seeds, for runs that sample gtl."""
    if "gtl" not in cfg.sample.methods:
        return []
    who = "the evaluation's guide diagnostic"
    denoiser = freeze(load_exported(upstream_export_path(cfg, paths, StageGraph(cfg).source_stage,
                                                         needed_by=who)))
    rows = []
    for target in cfg.targets:
        x, rates = masked_views(heldout_tokens[target], cfg.sample.seed)
        for fraction in cfg.data.target_fractions:
            per_seed = {}
            for seed in cfg.pipeline.seeds:
                net = load_exported(upstream_export_path(cfg, paths, "edit_ratio", target, fraction, seed,
                                                         needed_by=who))
                guided, source = guided_and_source_ce(net, denoiser, x, rates, cfg.sample.seed,
                                                      cfg.eval.batch_size)
                per_seed[seed] = {GAIN_METRIC: source - guided}
            log.info("guide gain %s @ %g: %s", target, fraction,
                     ", ".join(f"{v[GAIN_METRIC]:.4f}" for v in per_seed.values()))
            rows += seed_rows("gtl", target, fraction, per_seed, n=len(x),
                              notes=f"held-out {target} text, source cross-entropy {source:.4f} nats "
                                    f"per masked token (seed {seed})")
    return rows
