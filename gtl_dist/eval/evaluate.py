"""The evaluation stage: score every sampled (method, target, fraction) and write the report.

The Markov task needs no network: the chains are known exactly. The text task needs the run's
networks, which the caller loads and passes as plain callables (tokens -> logits), per target
and fraction for the time-independent classifier and per target for the reference LM; this
module only reads samples and computes numbers.

The source model is sampled once per seed (RunPaths.samples("source", None, None, seed)) and
scored against every target; its rows have no fraction, except the domain score, which uses each
fraction's classifier and so has one row per fraction.

Every sample set exists once per seed of pipeline.seeds; a metric is reported as the mean over
seeds with their standard deviation (gtl_dist.eval.results.seed_rows). A Markov run adds the
oracle ladder and the calibration diagnostics (gtl_dist.eval.ladder).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from gtl_dist.config import RunConfig
from gtl_dist.data.markov import SOURCE, transition_matrices
from gtl_dist.eval import text
from gtl_dist.eval.ladder import calibration_rows, ladder_rows
from gtl_dist.eval.markov import empirical_transitions, expected_nll, markov_counts, markov_metrics
from gtl_dist.eval.mauve import MauveResult, mauve
from gtl_dist.eval.report import MarkovMatrices, ReportFiles, write_report
from gtl_dist.eval.results import ResultRow, mauve_row, rows_from_metrics, seed_rows
from gtl_dist.eval.samples import read_samples
from gtl_dist.log import get_logger
from gtl_dist.paths import RunPaths

log = get_logger("eval")

# The exact chain (samples drawn from the true target), as a reference row in the report.
TARGET_CHAIN = "target_chain"


def sample_cells(cfg: RunConfig, target: str) -> list[tuple[str, Optional[str], Optional[float]]]:
    """(method, sample-folder target, fraction) of every sample set scored against ``target``."""
    cells = []
    for method in cfg.sample.methods:
        if method == "source":
            cells.append((method, None, None))
        else:
            cells += [(method, target, f) for f in cfg.data.target_fractions]
    return cells


def _tokens(records: Sequence[dict]) -> list[list[int]]:
    return [r["tokens"] for r in records]


def evaluate_markov(cfg: RunConfig, paths: RunPaths) -> tuple[list[ResultRow], dict[str, MarkovMatrices]]:
    chains = transition_matrices(cfg.data.markov)
    source, length = chains[SOURCE], cfg.data.markov.length
    rows: list[ResultRow] = []
    matrices = {}
    for target in cfg.targets:
        q = chains[target]
        h_q, x_qp = expected_nll(q, q, length), expected_nll(q, source, length)
        rows += rows_from_metrics(TARGET_CHAIN, target, None, {
            "nll_target_per_seq": h_q, "nll_target_per_token": h_q / length,
            "nll_source_per_seq": x_qp, "nll_source_per_token": x_qp / length,
        }, notes="exact expectation over sequences drawn from the target chain")
        mats = MarkovMatrices(source, q)
        for method, folder_target, fraction in sample_cells(cfg, target):
            per_seed, merged = {}, None
            for seed in cfg.pipeline.seeds:
                records = read_samples(paths.samples(method, folder_target, fraction, seed),
                                       cfg.sample.num_samples)
                counts = markov_counts(np.asarray(_tokens(records)), q, source)
                per_seed[seed] = markov_metrics(counts, q)
                merged = counts if merged is None else merged + counts
            rows += seed_rows(method, target, fraction, per_seed, n=cfg.sample.num_samples)
            mats.estimated[(method, fraction)] = empirical_transitions(merged.transitions)
        matrices[target] = mats
    if cfg.eval.ladder and any(m in cfg.sample.methods for m in ("gtl", "gtl_paper")):
        rows += ladder_rows(cfg, paths) + calibration_rows(cfg, paths)
    return rows, matrices


def evaluate_text(cfg: RunConfig, paths: RunPaths, *, references: Mapping[str, Sequence[str]],
                  classifier: Optional[Callable[[str, float], text.Model]] = None,
                  reference_lm: Optional[Callable[[str], text.Model]] = None,
                  eos_id: Optional[int] = None, bos_id: Optional[int] = None) -> list[ResultRow]:
    """MAUVE against ``references[target]`` (held-out target text), diversity over token ids, and,
    where the networks are given, the classifier domain score and generative perplexity."""
    rows: list[ResultRow] = []
    seeds = cfg.pipeline.seeds
    for target in cfg.targets:
        if not references.get(target):
            raise ValueError(f"no reference texts for target '{target}': pass its held-out test text")
        lm = reference_lm(target) if reference_lm is not None else None
        for method, folder_target, fraction in sample_cells(cfg, target):
            # The source model's samples are scored by every fraction's classifier.
            scored_by = cfg.data.target_fractions if fraction is None else [fraction]
            per_seed: dict[int, dict[str, float]] = {}
            per_fraction: dict[float, dict[int, dict[str, float]]] = {f: {} for f in scored_by}
            mauve_result = None
            for seed in seeds:
                folder = paths.samples(method, folder_target, fraction, seed)
                records = read_samples(folder, cfg.sample.num_samples)
                texts = [r["text"] for r in records]
                if any(t is None for t in texts):
                    raise ValueError(f"{folder}: samples have no decoded text; the sample stage must "
                                     f"write 'text' for corpus '{cfg.data.corpus}'")
                log.info("scoring %s / %s / %s / seed %d (%d samples)", method, target, fraction, seed,
                         len(records))
                tokens = _tokens(records)
                mauve_result, per_seed[seed] = _text_metrics(cfg, texts, tokens, references[target], lm,
                                                             eos_id, bos_id)
                if classifier is not None:
                    for f in scored_by:
                        per_fraction[f][seed] = text.domain_score(
                            text.domain_counts(tokens, classifier(target, f), cfg.eval.batch_size))
            if len(seeds) == 1:  # keep the spread over MAUVE's own seeds
                rows.append(mauve_row(method, target, fraction, mauve_result))
                per_seed[seeds[0]].pop(mauve_result.metric)
            rows += seed_rows(method, target, fraction, per_seed, n=cfg.sample.num_samples)
            for f, scores in per_fraction.items():
                if scores:
                    rows += seed_rows(method, target, f, scores, n=cfg.sample.num_samples)
    return rows


def _text_metrics(cfg: RunConfig, texts: Sequence[str], tokens: list[list[int]], references: Sequence[str],
                  lm: Optional[text.Model], eos_id: Optional[int], bos_id: Optional[int]
                  ) -> tuple[MauveResult, dict[str, float]]:
    """MAUVE, diversity over token ids and (with a reference LM) generative perplexity of one set."""
    ev = cfg.eval
    result = mauve(texts, references, seeds=ev.mauve_seeds, featurizer=ev.mauve_featurizer,
                   length_bins=ev.mauve_length_bins, scaling=ev.mauve_scaling,
                   num_buckets=ev.mauve_num_buckets or None, explained_variance=ev.mauve_explained_variance,
                   max_features=ev.mauve_max_features, seed=cfg.seed)
    metrics = {result.metric: result.mean}
    metrics.update(text.diversity(text.diversity_counts(
        [text.truncate_at_eos(t, eos_id) for t in tokens], ev.diversity_max_n, ev.repetition_n)))
    if lm is not None:
        nll = text.generative_nll(tokens, lm, eos_id=eos_id, bos_id=bos_id, batch_size=ev.batch_size)
        metrics["gen_ppl"] = text.perplexity(nll)
    return result, metrics


def run_eval(cfg: RunConfig, paths: RunPaths, *, command: Optional[str] = None,
             **text_inputs) -> ReportFiles:
    """Score the run's samples and write results.csv, report.md, plots and TensorBoard.

    For text corpora pass ``references`` and optionally ``classifier``, ``reference_lm``,
    ``eos_id``, ``bos_id`` (see :func:`evaluate_text`).
    """
    if cfg.data.corpus == "markov":
        if text_inputs:
            raise TypeError(f"the Markov evaluation takes no text inputs, got {sorted(text_inputs)}")
        rows, matrices = evaluate_markov(cfg, paths)
        return write_report(rows, paths, cfg, command=command, markov=matrices)
    rows = evaluate_text(cfg, paths, **text_inputs)
    return write_report(rows, paths, cfg, command=command)
