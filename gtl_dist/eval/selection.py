"""What each per-target method's selection kept (docs/method.md §12): the report's equal-budget table.

Every per-target stage trains for at most ``train.<stage>.steps`` steps, validates every
``val_every`` steps on its held-out part, tries each learning rate of ``lr_grid``, and keeps the
weights with the lowest held-out loss (the start too, for stages that start from the source).
Read from each export's metadata: the learning rate and the step kept, and whether the kept step
is the last one trained, i.e. the run ran out of budget before its held-out loss turned up.
"""

from __future__ import annotations

from typing import Optional

from gtl_dist.config import RunConfig
from gtl_dist.eval.results import ResultRow, seed_rows
from gtl_dist.exports import read_export_meta
from gtl_dist.methods import METHODS, SOURCE
from gtl_dist.paths import RunPaths

SELECTION_METRICS = ("kept_lr", "kept_step", "out_of_budget", "prior_strength")


def trained_stage(method: str) -> Optional[str]:
    """The per-target stage a method trains (its guide, else its own denoiser), or None."""
    spec = METHODS[method]
    stage = spec.guide or spec.model
    return None if stage == SOURCE else stage


def kept(meta: dict) -> dict[str, float]:
    if "prior_strength" in meta:  # a counts stage: its prior's strength is what selection picks
        return {"prior_strength": float(meta["prior_strength"])}
    stage = meta["stage"]
    step, trained = meta.get("step") or 0, meta.get("trained_steps") or 0
    return {"kept_lr": float(meta["config"]["train"][stage]["lr"]), "kept_step": float(step),
            "out_of_budget": float(trained > 0 and step == trained)}


def selection_rows(cfg: RunConfig, paths: RunPaths) -> list[ResultRow]:
    """kept_lr, kept_step and out_of_budget (the share of replicates whose kept step is their
    last) per method, target and fraction, over the replicates."""
    rows = []
    for method in cfg.sample.methods:
        stage = trained_stage(method)
        if stage is None:
            continue
        for target in cfg.targets:
            for fraction in cfg.data.target_fractions:
                metas = {s: read_export_meta(paths.export(stage, target, fraction, s)) for s in cfg.pipeline.seeds_at(fraction)}
                per_seed = {s: kept(m) for s, m in metas.items() if m is not None}
                if per_seed:
                    rows += seed_rows(method, target, fraction, per_seed,
                                      notes=f"stage {stage}: held-out selection")
    return rows


def render_budgets(cfg: RunConfig) -> str:
    """The report's budget section: what every per-target method was allowed, side by side."""
    lines = ["## Budgets and selection", "",
             "Every per-target stage: at most `steps` optimiser steps of `global_batch` sequences, "
             "validated every `val_every` steps on its own held-out sequences, once per learning rate "
             "of `lr_grid`; the kept weights are those with the lowest held-out masked-token "
             "cross-entropy. The tables `kept_lr`, `kept_step` and `out_of_budget` above give what "
             "was kept (`out_of_budget`: share of replicates whose kept step was their last).", "",
             "| method | stage | steps | global batch | val every | learning rates |", "|---|---|---:|---:|---:|---|"]
    for method in cfg.sample.methods:
        stage = trained_stage(method)
        if stage is None:
            continue
        tc = getattr(cfg.train, stage)
        lrs = ", ".join(f"{lr:g}" for lr in tc.lr_grid) if tc.lr_grid else f"{tc.lr:g}"
        if METHODS[method].model.startswith("counts"):
            lines.append(f"| {method} | {stage} | closed form | | | prior strengths "
                         f"{', '.join(f'{s:g}' for s in cfg.models.counts.strengths)} |")
            continue
        lines.append(f"| {method} | {stage} | {tc.steps} | {tc.global_batch} | {tc.val_every} | {lrs} |")
    return "\n".join(lines) + "\n\n"
