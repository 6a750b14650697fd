"""What a run's training cost, from its own files: parameters trained and time spent per stage.

Parameters are counted in each stage's export (every tensor of the exported state dict is
trained: frozen helpers, such as the source denoiser inside the edit-ratio objective, are not
exported with it). Training time is the time the optimiser steps took, summed from the throughput
that every train record of ``train_log.jsonl`` carries (``samples_per_s`` over the steps since the
previous record), over every run of the stage's learning-rate grid; it leaves out start-up,
validation and checkpoints. A task resumed after a preemption logs the steps it repeats again, so
its time counts them twice.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional

from gtl_dist.config import RunConfig
from gtl_dist.io import read_json_lines
from gtl_dist.paths import RunPaths
from gtl_dist.methods import METHODS
from gtl_dist.stages import STAGES, StageGraph, Task, run_variants
from gtl_dist.exports import read_export


@dataclass(frozen=True)
class StageCost:
    """One stage of a run: its finished tasks, the parameters each trains, their training time."""
    stage: str
    tasks: int
    parameters: int
    minutes: list[float]

    @property
    def mean_minutes(self) -> float:
        return statistics.fmean(self.minutes) if self.minutes else float("nan")


def training_seconds(records: list[dict], global_batch: int) -> float:
    """Seconds of optimiser steps in a train log: each train record covers the steps since the
    previous one at its ``samples_per_s``."""
    seconds, last_step = 0.0, 0
    for rec in sorted((r for r in records if r.get("kind") == "train"), key=lambda r: r["step"]):
        steps = rec["step"] - last_step
        if steps > 0 and rec.get("samples_per_s"):
            seconds += steps * global_batch / rec["samples_per_s"]
        last_step = rec["step"]
    return seconds


def exported_parameters(path) -> Optional[int]:
    """The parameters the stage trained: its export's count where it records one (a low-rank
    fine-tune exports its frozen base too), else the entries of its state dict; None when the
    stage has not exported."""
    if not path.is_file():
        return None
    export = read_export(path, "")
    trained = export["meta"].get("trainable_parameters")
    return trained if trained is not None else sum(t.numel() for t in export["state_dict"].values())


def stage_costs(cfg: RunConfig, paths: RunPaths) -> list[StageCost]:
    """One StageCost per stage the run trains and has exported, in the stage table's order."""
    plan = StageGraph(cfg).plan
    out = []
    for stage in STAGES:
        tasks: list[Task] = [t for t in plan.get(stage, [])
                             if paths.export(stage, t.target, t.fraction, t.seed).is_file()]
        if not tasks:
            continue
        first = tasks[0]
        parameters = exported_parameters(paths.export(stage, first.target, first.fraction, first.seed))
        tc = getattr(cfg.train, stage)
        minutes = [sum(training_seconds(read_json_lines(log), tc.global_batch)
                       for log in paths.train_logs(stage, t.target, t.fraction, t.seed,
                                                   run_variants(cfg, stage, t.fraction))
                       if log.is_file()) / 60 for t in tasks]
        out.append(StageCost(stage, len(tasks), parameters or 0, minutes))
    return out


def render_costs(costs: list[StageCost], source_stage: str, methods: list[str]) -> str:
    """The report's "Cost" section: a table per stage, and what each method trains per target
    against the source denoiser."""
    if not costs:
        return ""
    lines = ["## Cost", "",
             "Parameters each task trains (counted in its export) and the time its optimiser steps "
             "took (from the throughput in its train_log.jsonl; start-up, validation and checkpoints "
             "are not included).", "",
             "| stage | tasks | parameters trained per task | minutes per task (mean) | minutes in all |",
             "|---|---:|---:|---:|---:|"]
    for c in costs:
        lines.append(f"| {c.stage} | {c.tasks} | {c.parameters:,} | {c.mean_minutes:.1f} | {sum(c.minutes):.1f} |")
    by_stage = {c.stage: c for c in costs}
    source = by_stage.get(source_stage)
    trained = {m: METHODS[m].guide or METHODS[m].model for m in methods}
    trained = {m: s for m, s in trained.items() if s in by_stage}
    if source is not None and source.parameters and trained:
        share = [f"{m} trains {by_stage[s].parameters:,} ({s}, "
                 f"{100 * by_stage[s].parameters / source.parameters:.1f}%)" for m, s in trained.items()]
        lines += ["", f"Per target, fraction and seed, against the source denoiser's "
                      f"{source.parameters:,} parameters: " + "; ".join(share) + "."]
    return "\n".join(lines) + "\n\n"
