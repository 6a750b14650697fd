"""Running a stage: which recipe trains it (RECIPES), the arguments it takes, and whether it
trains once or once per point of its grid and fold (gtl_dist/train/grid.py). The recipes live in
gtl_dist/train/shard_recipe.py (what they share, and the data protocol), denoiser_recipes.py and
guide_recipes.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from gtl_dist.config import ConfigError, RunConfig
from gtl_dist.paths import RunPaths
from gtl_dist.stages import PER_FRACTION, PER_TARGET, STAGES, StageGraph, kfold_selected, stage_input_hash
from gtl_dist.train.denoiser_recipes import ARRecipe, DiffusionRecipe
from gtl_dist.train.guide_recipes import (AdapterRecipe, ClassifierRecipe, EditRatioRecipe, PlannerRecipe,
                                          RatioRecipe, check_classifier_micro_batch)
from gtl_dist.train.grid import run_selected
from gtl_dist.train.loop import execute
from gtl_dist.train.recipe import StageResult
from gtl_dist.train.shard_recipe import upstream_export

__all__ = ["RECIPES", "check_classifier_micro_batch", "check_stage_args", "run_stage",
           "upstream_export"]


RECIPES = {"denoiser": DiffusionRecipe, "vanilla": DiffusionRecipe, "finetune": DiffusionRecipe,
           "finetune_small": DiffusionRecipe, "scratch_head": DiffusionRecipe,
           "ar2diff": DiffusionRecipe, "ar_pretrain": ARRecipe, "reference_lm": ARRecipe,
           "classifier_ti": ClassifierRecipe, "classifier_td": ClassifierRecipe, "ratio": RatioRecipe,
           "domain_classifier": ClassifierRecipe,
           "edit_ratio": EditRatioRecipe, "adapter": AdapterRecipe, "planner": PlannerRecipe}
# The stages of role "chain" (counts, counts_source) have a closed form and no recipe: run_stage
# fits them without the loop (gtl_dist/train/counts.py).


def check_stage_args(cfg: RunConfig, stage: str, target: Optional[str],
                     fraction: Optional[float], seed: int = 0) -> None:
    """Refuse a stage/target/fraction combination the stage is not trained for, saying which
    arguments it takes."""
    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r}: not a stage; choose one of {', '.join(STAGES)}")
    targets = f"one of {', '.join(cfg.targets)}"
    fractions = f"one of {', '.join(map(str, cfg.data.target_fractions))}"
    scope = StageGraph(cfg).scope(stage)
    if scope == PER_FRACTION:
        if target is None or fraction is None:
            raise ConfigError(f"stage {stage} is trained per target and fraction: pass --target "
                              f"({targets}) and --fraction ({fractions})")
    elif scope == PER_TARGET:
        if target is None or fraction is not None:
            raise ConfigError(f"stage {stage} is trained once per target, on its evaluator split "
                              f"and no fraction of its training data: pass --target ({targets}) "
                              f"and no --fraction")
    elif target is not None or fraction is not None:
        key = STAGES[stage].scope_key
        raise ConfigError(f"stage {stage} is trained once per run (on source data); drop --target and "
                          f"--fraction" + (f" (or set {key}=per_target)" if key else ""))
    if target is not None and target not in cfg.targets:
        raise ConfigError(f"--target {target!r}: this config's targets are {', '.join(cfg.targets)}")
    if fraction is not None and fraction not in cfg.data.target_fractions:
        raise ConfigError(f"--fraction {fraction}: not in data.target_fractions "
                          f"{cfg.data.target_fractions}")
    if seed and fraction is None:
        raise ConfigError(f"--seed {seed}: only per-target stages are replicated over pipeline.seeds; "
                          f"drop --seed for stage {stage}")
    if fraction is not None and seed not in cfg.pipeline.seeds_at(fraction):
        raise ConfigError(f"--seed {seed}: not among the replicates {cfg.pipeline.seeds_at(fraction)} of "
                          f"fraction {fraction} (pipeline.seeds, pipeline.replicates_at)")


def run_stage(cfg: RunConfig, run_dir: str | Path, stage: str, target: Optional[str] = None,
              fraction: Optional[float] = None, seed: int = 0) -> StageResult:
    """Train one stage (this process is one rank of the job) and export it.

    Resumes from the newest committed checkpoint; returns at once when the stage already
    finished with the same inputs; returns ``status="preempted"`` after a preemption signal
    (unless an earlier handler, e.g. submitit's, took over and exited). With
    ``train.<stage>.lr_grid`` (or ``weight_decay_grid``, ``model_grid``) it trains once per point of the grid and
    exports the best run (gtl_dist/train/grid.py); under ``protocol.selection: kfold``
    a stage that selects on its held-out part trains once per point and fold and exports a refit
    (the same module).
    """
    check_stage_args(cfg, stage, target, fraction, seed)
    RunPaths(run_dir).root.mkdir(parents=True, exist_ok=True)
    input_hash = stage_input_hash(cfg, stage, target, fraction, seed)
    if STAGES[stage].role == "chain":  # closed form, no optimiser
        from gtl_dist.train.counts import fit_counts
        return fit_counts(cfg, run_dir, stage, target, fraction, seed, input_hash)
    kfold = kfold_selected(cfg, stage, fraction)
    if kfold or getattr(cfg.train, stage).grid():
        return run_selected(cfg, run_dir, stage, target, fraction, seed, input_hash, RECIPES[stage], kfold)
    return execute(cfg, run_dir, stage, target, fraction, input_hash, RECIPES[stage], seed)

