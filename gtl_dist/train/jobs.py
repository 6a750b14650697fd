"""Running a stage: which recipe trains it (RECIPES), the arguments it takes, and the learning-rate
grid. The recipes live in gtl_dist/train/shard_recipe.py (what they share, and the data protocol),
denoiser_recipes.py and guide_recipes.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

from gtl_dist.config import ConfigError, RunConfig, with_model_point
from gtl_dist.exports import read_export, read_export_meta, write_export
from gtl_dist.log import get_logger
from gtl_dist.paths import RunPaths, grid_variant, task_name
from gtl_dist.stages import PER_FRACTION, PER_TARGET, STAGES, StageGraph, stage_input_hash
from gtl_dist.train.checkpoint import retire_stale
from gtl_dist.train.denoiser_recipes import ARRecipe, DiffusionRecipe
from gtl_dist.train.guide_recipes import (AdapterRecipe, ClassifierRecipe, EditRatioRecipe, PlannerRecipe,
                                          RatioRecipe, check_classifier_micro_batch)
from gtl_dist.train.loop import execute
from gtl_dist.train.recipe import StageResult
from gtl_dist.train.shard_recipe import upstream_export

__all__ = ["RECIPES", "check_classifier_micro_batch", "check_stage_args", "run_grid", "run_stage",
           "upstream_export"]

log = get_logger("train.jobs")


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
    exports the best run (:func:`run_grid`).
    """
    check_stage_args(cfg, stage, target, fraction, seed)
    RunPaths(run_dir).root.mkdir(parents=True, exist_ok=True)
    input_hash = stage_input_hash(cfg, stage, target, fraction, seed)
    if STAGES[stage].role == "chain":  # closed form, no optimiser
        from gtl_dist.train.counts import fit_counts
        return fit_counts(cfg, run_dir, stage, target, fraction, seed, input_hash)
    if getattr(cfg.train, stage).grid():
        return run_grid(cfg, run_dir, stage, target, fraction, seed, input_hash)
    return execute(cfg, run_dir, stage, target, fraction, input_hash, RECIPES[stage], seed)


def run_grid(cfg: RunConfig, run_dir: str | Path, stage: str, target: Optional[str],
             fraction: Optional[float], seed: int, input_hash: str) -> StageResult:
    """One run per point of ``train.<stage>``'s grid (each learning rate of ``lr_grid``, crossed
    with each decay of ``weight_decay_grid`` and each entry of ``model_grid``; TrainConfig.grid),
    each in its own folder
    (grid_variant, resumable on its own), then the export of the run whose best held-out
    validation loss is lowest becomes the stage's export, its metadata listing every run under
    ``lr_grid`` (docs/method.md §12)."""
    paths = RunPaths(run_dir)
    final = paths.export(stage, target, fraction, seed)
    meta = read_export_meta(final)
    if meta and meta.get("input_hash") == input_hash and meta.get("finished"):
        return StageResult("finished", stage, target, fraction, meta["trained_steps"], input_hash,
                           export=final, val_loss=meta.get("val_loss"), best_step=meta.get("step"))
    tc = getattr(cfg.train, stage)
    runs = {}
    for lr, wd, model in tc.grid():
        point = replace(tc, lr=lr, lr_grid=None, weight_decay_grid=None, model_grid=None,
                        weight_decay=tc.weight_decay if wd is None else wd)
        one = replace(cfg if model is None else with_model_point(cfg, stage, model),
                      train=replace(cfg.train, **{stage: point}))
        variant = grid_variant(lr, wd, model)
        retire_stale_variant(paths, stage, target, fraction, seed, variant, input_hash)
        result = execute(one, run_dir, stage, target, fraction, input_hash, RECIPES[stage], seed,
                         variant=variant)
        if result.status != "finished":
            return result
        runs[lr, wd, model] = result
    finite = {p: r for p, r in runs.items() if r.val_loss is not None and math.isfinite(r.val_loss)}
    if not finite:
        raise ConfigError(f"train.{stage}.lr_grid: no run of {[grid_variant(*p) for p in runs]} reached a "
                          f"finite held-out validation loss at "
                          f"{task_name(stage, target=target, fraction=fraction, seed=seed)}; "
                          f"lower the learning rates")
    kept = min(finite, key=lambda p: finite[p].val_loss)
    best = runs[kept]
    if int(os.environ.get("RANK", "0")) == 0:
        chosen = read_export(best.export)
        grid = [{"lr": lr, **({} if wd is None else {"weight_decay": wd}),
                 **({} if model is None else {"model": model}), "val_loss": r.val_loss,
                 "step": r.best_step, "trained_steps": r.step} for (lr, wd, model), r in runs.items()]
        kept_model = {} if kept[2] is None else {"model_index": kept[2]}
        write_export(final, chosen["state_dict"], {**chosen["meta"], "lr_grid": grid, **kept_model})
        log.info("%s: %s kept (held-out loss %s; grid %s)", task_name(stage, target=target,
                 fraction=fraction, seed=seed), grid_variant(*kept), best.val_loss, ", ".join(f"{grid_variant(*p)}: {r.val_loss}" for p, r in runs.items()))
    return StageResult("finished", stage, target, fraction, best.step, input_hash, export=final,
                       val_loss=best.val_loss, best_step=best.best_step)


def retire_stale_variant(paths: RunPaths, stage: str, target: Optional[str], fraction: Optional[float],
                         seed: int, variant: str, input_hash: str) -> None:
    """A grid run whose checkpoints were made with other inputs (a run directory that adopted a
    changed config; the launcher retires the stage's own checkpoints, not its runs' folders)
    starts afresh; its old checkpoints and train log are kept aside, as the launcher keeps a
    stage's. Only this task's job writes these folders, so it may move them itself."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    moved = retire_stale(paths.checkpoints(stage, target, fraction, seed, variant), input_hash)
    if moved is not None:
        old_log = paths.stage(stage, target, fraction, seed, variant) / "train_log.jsonl"
        if old_log.exists():
            old_log.rename(moved / old_log.name)
        log.info("%s/%s: checkpoints made with other inputs kept as %s; the run starts afresh",
                 task_name(stage, target=target, fraction=fraction, seed=seed), variant, moved)
