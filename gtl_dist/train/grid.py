"""Stages trained more than once per task, the export chosen among the runs (docs/method.md §12).

``run_grid`` (``selection: holdout``): one run per point of ``train.<stage>``'s grid (each
learning rate of ``lr_grid``, crossed with each decay of ``weight_decay_grid`` and each entry of
``model_grid``; TrainConfig.grid), each in its own folder (grid_variant, resumable on its own);
the export of the run whose best held-out validation loss is lowest becomes the stage's export.

``run_kfold`` (``selection: kfold``): selection that uses every one of the replicate's n_T
sequences. Every point of the grid (the stage's own settings where it has none) trains once per
fold: fold f holds out the f-th of ``protocol.folds`` contiguous blocks of the n_T, trains on the
rest and validates on that block every ``val_every`` steps (from step 0 for the stages that start
from the source). Its held-out curves are averaged over the folds (a fold stopped by patience
keeps its last value from then on); the point and the step with the lowest mean win, and a refit
of that point on all n_T, stopped at that step on the same learning-rate schedule, is the
stage's export. Folders ``<grid_variant>/fold-<f>/`` and ``refit/`` (stages.run_variants).

Either export's metadata lists every point under ``lr_grid`` (its held-out loss and step).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from gtl_dist.config import ConfigError, RunConfig, with_model_point
from gtl_dist.exports import read_export, read_export_meta, write_export
from gtl_dist.log import get_logger
from gtl_dist.paths import RunPaths, grid_variant, task_name
from gtl_dist.stages import REFIT, fold_variant, grid_points
from gtl_dist.train.checkpoint import retire_stale
from gtl_dist.train.loop import execute
from gtl_dist.train.metrics import carried, read_val_curve
from gtl_dist.train.recipe import Recipe, StageContext, StageResult

log = get_logger("train.grid")

Point = tuple[float, Optional[float], Optional[int]]  # (lr, weight decay or None, model index or None)
MakeRecipe = Callable[[StageContext], Recipe]


def run_selected(cfg: RunConfig, run_dir: str | Path, stage: str, target: Optional[str],
                 fraction: Optional[float], seed: int, input_hash: str, make_recipe: MakeRecipe,
                 kfold: bool) -> StageResult:
    """The task's export chosen among its runs: by k-fold selection (``kfold``) or by the held-out
    part (see the module); at once when it already finished with these inputs."""
    task = SelectedTask(cfg, RunPaths(run_dir), stage, target, fraction, seed, input_hash, make_recipe)
    final = task.paths.export(stage, target, fraction, seed)
    meta = read_export_meta(final)
    if meta and meta.get("input_hash") == input_hash and meta.get("finished"):
        return StageResult("finished", stage, target, fraction, meta["trained_steps"], input_hash,
                           export=final, val_loss=meta.get("val_loss"), best_step=meta.get("step"))
    return task.run_kfold() if kfold else task.run_grid()


@dataclass(frozen=True)
class SelectedTask:
    """One (stage, target, fraction, replicate) task whose export is chosen among several runs."""
    cfg: RunConfig
    paths: RunPaths
    stage: str
    target: Optional[str]
    fraction: Optional[float]
    seed: int
    input_hash: str
    make_recipe: MakeRecipe

    def run_grid(self) -> StageResult:
        """One run per grid point; the run with the lowest held-out loss is the export."""
        runs = {}
        for point in grid_points(self.cfg, self.stage):
            result = self.run(point, grid_variant(*point))
            if result.status != "finished":
                return result
            runs[point] = result
        kept = self.best_point({p: r.val_loss for p, r in runs.items()})
        best = runs[kept]
        grid = [{**point_record(p), "val_loss": r.val_loss, "step": r.best_step, "trained_steps": r.step}
                for p, r in runs.items()]
        return self.publish(best.export, kept, grid, {}, replace(best, export=self.export))

    def run_kfold(self) -> StageResult:
        """Every grid point once per fold, then a refit of the best point and step."""
        curves = {}
        for point in grid_points(self.cfg, self.stage):
            folds = []
            for fold in range(self.cfg.protocol.folds):
                variant = fold_variant(point, fold)
                result = self.run(point, variant, fold=fold)
                if result.status != "finished":
                    return result
                folds.append(read_val_curve(self.paths.stage(self.stage, self.target, self.fraction, self.seed,
                                                             variant) / "train_log.jsonl"))
            curves[point] = mean_curve(folds)
        scores = {p: curve_minimum(c) for p, c in curves.items()}
        kept = self.best_point({p: loss for p, (loss, _) in scores.items()})
        loss, step = scores[kept]
        refit = self.run(kept, REFIT, stop_at=step)
        if refit.status != "finished":
            return refit
        grid = [{**point_record(p), "val_loss": scores[p][0], "step": scores[p][1], "trained_steps": max(c)}
                for p, c in curves.items()]
        kfold = {"folds": self.cfg.protocol.folds, "curve": {str(s): v for s, v in curves[kept].items()}}
        return self.publish(refit.export, kept, grid,
                            {"step": step, "val_loss": loss, "trained_steps": max(curves[kept]),
                             "weights": "refit", "kfold": kfold},
                            StageResult("finished", self.stage, self.target, self.fraction, step, self.input_hash,
                                        export=self.export, val_loss=loss, best_step=step))

    @property
    def export(self) -> Path:
        return self.paths.export(self.stage, self.target, self.fraction, self.seed)

    @property
    def label(self) -> str:
        return task_name(self.stage, target=self.target, fraction=self.fraction, seed=self.seed)

    def run(self, point: Point, variant: str, fold: Optional[int] = None,
            stop_at: Optional[int] = None) -> StageResult:
        """One run of the task at one grid point, in its own folder ``variant``."""
        lr, wd, model = point
        tc = getattr(self.cfg.train, self.stage)
        one_point = replace(tc, lr=lr, lr_grid=None, weight_decay_grid=None, model_grid=None,
                            weight_decay=tc.weight_decay if wd is None else wd)
        if stop_at is not None:  # a refit trains on, keeping no best: the step was chosen by the folds
            one_point = replace(one_point, select_best=False, patience=None)
        cfg = self.cfg if model is None else with_model_point(self.cfg, self.stage, model)
        cfg = replace(cfg, train=replace(cfg.train, **{self.stage: one_point}))
        self.retire_stale(variant)
        return execute(cfg, self.paths.root, self.stage, self.target, self.fraction, self.input_hash,
                       self.make_recipe, self.seed, variant=variant, fold=fold, stop_at=stop_at)

    def best_point(self, losses: dict[Point, Optional[float]]) -> Point:
        """The point with the lowest finite held-out loss, or a ConfigError if none reached one."""
        finite = {p: v for p, v in losses.items() if v is not None and math.isfinite(v)}
        if not finite:
            raise ConfigError(f"train.{self.stage}.lr_grid: no run of {[grid_variant(*p) for p in losses]} "
                              f"reached a finite held-out validation loss at {self.label}; lower the "
                              f"learning rates")
        return min(finite, key=finite.get)

    def publish(self, chosen_export: Path, kept: Point, grid: list[dict], overrides: dict,
                result: StageResult) -> StageResult:
        """Rank 0 copies the chosen run's export to the task's own, its metadata listing the grid;
        returns ``result``."""
        if int(os.environ.get("RANK", "0")) == 0:
            chosen = read_export(chosen_export)
            kept_model = {} if kept[2] is None else {"model_index": kept[2]}
            write_export(self.export, chosen["state_dict"], {**chosen["meta"], "lr_grid": grid, **kept_model,
                                                             **overrides})
            log.info("%s: %s kept (grid: %s)", self.label, grid_variant(*kept),
                     ", ".join(f"{grid_variant(g['lr'], g.get('weight_decay'), g.get('model'))}: held-out "
                               f"loss {g['val_loss']} at step {g['step']}" for g in grid))
        return result

    def retire_stale(self, variant: str) -> None:
        """A run whose checkpoints were made with other inputs (a run directory that adopted a
        changed config; the launcher retires the stage's own checkpoints, not its runs' folders)
        starts afresh; its old checkpoints and train log are kept aside, as the launcher keeps a
        stage's. Only this task's job writes these folders, so it may move them itself."""
        if int(os.environ.get("RANK", "0")) != 0:
            return
        where = (self.stage, self.target, self.fraction, self.seed, variant)
        moved = retire_stale(self.paths.checkpoints(*where), self.input_hash)
        if moved is not None:
            old_log = self.paths.stage(*where) / "train_log.jsonl"
            if old_log.exists():
                old_log.rename(moved / old_log.name)
            log.info("%s/%s: checkpoints made with other inputs kept as %s; the run starts afresh",
                     self.label, variant, moved)


def point_record(point: Point) -> dict:
    lr, wd, model = point
    return {"lr": lr, **({} if wd is None else {"weight_decay": wd}), **({} if model is None else {"model": model})}


def mean_curve(curves: list[dict[int, float]]) -> dict[int, float]:
    """Step -> the folds' mean held-out loss, over every step any fold validated (each fold's
    curve carried past its end: a fold stopped by patience keeps its last value)."""
    steps = np.array(sorted({s for c in curves for s in c}))
    if not len(steps) or not all(curves):
        return {}
    mean = np.mean([carried(c, steps) for c in curves], axis=0)
    return {int(s): float(v) for s, v in zip(steps, mean)}


def curve_minimum(curve: dict[int, float]) -> tuple[Optional[float], Optional[int]]:
    """(loss, step) of a curve's lowest finite point (the earliest on a tie); (None, None) if none."""
    finite = [(v, s) for s, v in sorted(curve.items()) if math.isfinite(v)]
    return min(finite, key=lambda vs: vs[0]) if finite else (None, None)
