"""The evaluation stage: score every sampled (method, target, fraction) and write the report.

The Markov task compares with the chains, which are known exactly, and loads each method's
networks itself. The text task's networks are loaded by the caller (gtl_dist/cluster/tasks.py) and
passed as plain callables: per target the evaluator's domain classifier and reference LM (tokens ->
logits), both trained on the evaluator split that no method trains on, and per (method, target,
fraction, seed) the method's conditional for the masked cross-entropy, the primary text score.

The source model is sampled once per seed (RunPaths.samples("source", None, None, seed)) and
scored against every target; its rows have no fraction. The domain score of a target comes from
one evaluator's classifier, the same for every method and fraction, and the held-out text of
both domains calibrates it.

Every sample set exists once per seed of pipeline.seeds; a metric is reported as the mean over
seeds with their standard deviation (gtl_dist.eval.results.seed_rows). A Markov run adds the
oracle ladder and the calibration diagnostics (gtl_dist.eval.ladder).
"""

from __future__ import annotations

from typing import Optional
from gtl_dist.eval.evaluate_markov import evaluate_markov
from gtl_dist.eval.evaluate_text import evaluate_text
from gtl_dist.config import RunConfig
from gtl_dist.eval.cost import render_costs, stage_costs
from gtl_dist.data import load_run_manifest
from gtl_dist.eval.report import ReportFiles, write_report
from gtl_dist.eval.selection import heldout_curves, render_budgets, selection_rows
from gtl_dist.log import get_logger
from gtl_dist.paths import RunPaths
from gtl_dist.stages import StageGraph

log = get_logger("eval")

def run_eval(cfg: RunConfig, paths: RunPaths, *, command: Optional[str] = None,
             **text_inputs) -> ReportFiles:
    """Score the run's samples and write results.csv, report.md, plots and TensorBoard.

    For text corpora pass ``references`` and optionally the other inputs of :func:`evaluate_text`.
    """
    if cfg.data.corpus == "markov":
        if text_inputs:
            raise TypeError(f"the Markov evaluation takes no text inputs, got {sorted(text_inputs)}")
        out = evaluate_markov(cfg, paths)
    else:
        out = evaluate_text(cfg, paths, **text_inputs)
    cost = render_budgets(cfg) + render_costs(stage_costs(cfg, paths), StageGraph(cfg).source_stage,
                                              cfg.sample.methods)
    return write_report(out.rows + selection_rows(cfg, paths), paths, cfg, command=command, markov=out.matrices,
                        findings=out.findings, examples=out.examples, cost=cost,
                        notes=overlap_notes(cfg, paths), curves=heldout_curves(cfg, paths))


def overlap_notes(cfg: RunConfig, paths: RunPaths) -> list[str]:
    """The report header's line on data.overlap (docs/method.md §8): how much of each target's
    training text the source's training set holds, from the built data's document counts."""
    if not cfg.data.overlap:
        return []
    info = load_run_manifest(cfg, paths.root).info
    moved = info["domain_documents"]["source/train"]
    counts = ", ".join(f"{t}: {moved.get(t, 0):,} of {moved.get(t, 0) + info['documents'][f'{t}/train']:,}"
                       for t in cfg.targets)
    return [f"**data overlap**: data.overlap = {cfg.data.overlap:g} moved part of each target's training "
            f"documents into the source's training set ({counts}), so the source model has seen target "
            f"text and its gain over the source is not a transfer from the source alone (docs/method.md §8)"]
