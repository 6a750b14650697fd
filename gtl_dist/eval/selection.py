"""What each per-target method's selection kept (docs/method.md §12): the report's equal-budget table.

Every per-target stage trains for at most ``train.<stage>.steps`` steps, validates every
``val_every`` steps on its held-out part, tries each learning rate of ``lr_grid``, and keeps the
weights with the lowest held-out loss (the start too, for stages that start from the source).
Read from each export's metadata: the learning rate and the step kept, and whether the kept step
is the last one trained, i.e. the run ran out of budget before its held-out loss turned up. From
the kept learning rate's ``train_log.jsonl``: its held-out curve, the loss at every validation,
so the report shows where a method's held-out loss turned (memorisation) and what selection
stopped it at (``heldout_ce[kept]``, ``heldout_ce[last]``, and the plot of the curves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from gtl_dist.config import RunConfig
from gtl_dist.eval.results import ResultRow, seed_rows
from gtl_dist.exports import read_export_meta
from gtl_dist.methods import METHODS, SOURCE
from gtl_dist.paths import RunPaths, grid_variant
from gtl_dist.train.metrics import carried, read_val_curve

SELECTION_METRICS = ("kept_lr", "kept_weight_decay", "kept_model", "kept_step", "out_of_budget", "prior_strength")


def trained_stage(method: str) -> Optional[str]:
    """The per-target stage a method trains (its guide, else its own denoiser), or None."""
    spec = METHODS[method]
    stage = spec.guide or spec.model
    return None if stage == SOURCE else stage


def kept(meta: dict) -> dict[str, float]:
    if "prior_strength" in meta:  # a counts stage: its prior's strength is what selection picks
        return {"prior_strength": float(meta["prior_strength"])}
    tc = meta["config"]["train"][meta["stage"]]
    step, trained = meta.get("step") or 0, meta.get("trained_steps") or 0
    decay = {"kept_weight_decay": float(tc["weight_decay"])} if searched_decay(meta) else {}
    model = {"kept_model": float(meta["model_index"])} if "model_index" in meta else {}
    return {"kept_lr": float(tc["lr"]), **decay, **model, "kept_step": float(step),
            "out_of_budget": float(trained > 0 and step == trained)}


def searched_decay(meta: dict) -> bool:
    """Whether the export's stage searched a weight-decay grid (its runs list their decays)."""
    return any("weight_decay" in run for run in meta.get("lr_grid") or [])


def kept_variant(meta: dict) -> Optional[str]:
    """The folder of the grid run an export kept (grid_variant), None where it trained once."""
    if not meta.get("lr_grid"):
        return None
    tc = meta["config"]["train"][meta["stage"]]
    return grid_variant(tc["lr"], tc["weight_decay"] if searched_decay(meta) else None, meta.get("model_index"))


def heldout_curve(paths: RunPaths, meta: dict, seed: int) -> dict[int, float]:
    """Step -> held-out loss of the kept grid run, from its train_log.jsonl (read_val_curve), or
    under k-fold selection the kept point's loss averaged over its folds (gtl_dist/train/grid.py);
    empty when the run validated on nothing (selection: budget) or has no log (a closed-form stage)."""
    if "kfold" in meta:
        return {int(s): float(v) for s, v in meta["kfold"]["curve"].items()}
    stage, target, fraction = meta["stage"], meta.get("target"), meta.get("fraction")
    return read_val_curve(paths.stage(stage, target, fraction, seed, kept_variant(meta)) / "train_log.jsonl")


def selection_metas(cfg: RunConfig, paths: RunPaths):
    """(method, stage, target, fraction, {seed: export metadata}) of every per-target method's
    finished tasks."""
    for method in cfg.sample.methods:
        stage = trained_stage(method)
        if stage is None:
            continue
        for target in cfg.targets:
            for fraction in cfg.data.target_fractions:
                metas = {s: read_export_meta(paths.export(stage, target, fraction, s))
                         for s in cfg.pipeline.seeds_at(fraction)}
                metas = {s: m for s, m in metas.items() if m is not None}
                if metas:
                    yield method, stage, target, fraction, metas


def selection_rows(cfg: RunConfig, paths: RunPaths) -> list[ResultRow]:
    """kept_lr, kept_step and out_of_budget (the share of replicates whose kept step is their
    last) per method, target and fraction, over the replicates; with a held-out curve also the
    held-out loss at the kept step and at the last validation (how far it climbed after it)."""
    rows = []
    for method, stage, target, fraction, metas in selection_metas(cfg, paths):
        per_seed = {}
        for seed, meta in metas.items():
            per_seed[seed] = kept(meta)
            curve = heldout_curve(paths, meta, seed)
            if curve and meta.get("val_loss") is not None:
                per_seed[seed].update({"heldout_ce[kept]": float(meta["val_loss"]),
                                       "heldout_ce[last]": curve[max(curve)]})
        common = set.intersection(*(set(v) for v in per_seed.values()))  # a replicate may lack a curve
        per_seed = {s: {k: v for k, v in d.items() if k in common} for s, d in per_seed.items()}
        rows += seed_rows(method, target, fraction, per_seed, notes=f"stage {stage}: held-out selection")
    return rows


@dataclass(frozen=True)
class HeldOutCurve:
    """One method's held-out curve in one cell, over its replicates: at each validated step the
    mean loss (a replicate that stopped early keeps its last value), and the mean kept step."""
    steps: np.ndarray
    mean_loss: np.ndarray
    kept_step: float
    replicates: int


def heldout_curves(cfg: RunConfig, paths: RunPaths) -> dict[str, dict[float, dict[str, HeldOutCurve]]]:
    """target -> fraction -> method -> its held-out curve (methods with validation logs only)."""
    out: dict[str, dict[float, dict[str, HeldOutCurve]]] = {}
    for method, _, target, fraction, metas in selection_metas(cfg, paths):
        curves = {s: heldout_curve(paths, m, s) for s, m in metas.items()}
        curves = {s: c for s, c in curves.items() if c}
        if not curves:
            continue
        steps = np.array(sorted({step for c in curves.values() for step in c}))
        losses = np.stack([carried(curves[s], steps) for s in curves])
        kept_steps = [float(metas[s].get("step") or 0) for s in curves]
        out.setdefault(target, {}).setdefault(fraction, {})[method] = HeldOutCurve(
            steps, losses.mean(axis=0), sum(kept_steps) / len(kept_steps), len(curves))
    return out


def render_budgets(cfg: RunConfig) -> str:
    """The report's budget section: what every per-target method was allowed, side by side."""
    lines = ["## Budgets and selection", "",
             "Every per-target stage: at most `steps` optimiser steps of `global_batch` sequences, "
             "validated every `val_every` steps on its own held-out sequences, once per learning rate "
             "of `lr_grid` (and per weight decay of `weight_decay_grid` and model of `model_grid`, where "
             "set); the kept weights are those with the lowest held-out masked-token cross-entropy"
             + (f", averaged over {cfg.protocol.folds} folds of the n_T sequences (each point trains once "
                f"per fold), refitted on all n_T for the kept number of steps"
                if cfg.protocol.selection == "kfold" else "") + ". The "
             "tables `kept_lr`, `kept_weight_decay`, `kept_model`, `kept_step` and `out_of_budget` above "
             "give what was kept (`out_of_budget`: share of replicates whose kept step was their last).", "",
             "| method | stage | steps | global batch | val every | learning rates | weight decays | models |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for method in cfg.sample.methods:
        stage = trained_stage(method)
        if stage is None:
            continue
        tc = getattr(cfg.train, stage)
        lrs = ", ".join(f"{lr:g}" for lr in tc.lr_grid or [tc.lr])
        decays = ", ".join(f"{wd:g}" for wd in tc.weight_decay_grid or [tc.weight_decay])
        if METHODS[method].model.startswith("counts"):
            lines.append(f"| {method} | {stage} | closed form | | | | prior strengths "
                         f"{', '.join(f'{s:g}' for s in cfg.models.counts.strengths)} | |")
            continue
        models = "; ".join(f"{i}: " + ", ".join(f"{k} {v}" for k, v in m.items())
                           for i, m in enumerate(tc.model_grid or []))
        lines.append(f"| {method} | {stage} | {tc.steps} | {tc.global_batch} | {tc.val_every} | {lrs} "
                     f"| {decays} | {models or 'as configured'} |")
    return "\n".join(lines) + "\n\n"
