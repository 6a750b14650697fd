"""The evaluation stage: score every sampled (method, target, fraction) and write the report.

The Markov task needs no network: the chains are known exactly. The text task needs the run's
networks, which the caller loads and passes as plain callables (tokens -> logits), per target
and fraction for the time-independent classifier and per target for the reference LM; this
module only reads samples and computes numbers.

The source model is sampled once (RunPaths.samples("source", None, None)) and scored against
every target; its rows have no fraction, except the domain score, which uses each fraction's
classifier and so has one row per fraction.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from gtl_dist.config import RunConfig
from gtl_dist.data.markov import SOURCE, transition_matrices
from gtl_dist.eval import text
from gtl_dist.eval.markov import empirical_transitions, expected_nll, markov_counts, markov_metrics
from gtl_dist.eval.mauve import mauve
from gtl_dist.eval.report import MarkovMatrices, ReportFiles, write_report
from gtl_dist.eval.results import ResultRow, mauve_row, rows_from_metrics
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
            records = read_samples(paths.samples(method, folder_target, fraction), cfg.sample.num_samples)
            counts = markov_counts(np.asarray(_tokens(records)), q, source)
            rows += rows_from_metrics(method, target, fraction, markov_metrics(counts, q), n=counts.sequences)
            mats.estimated[(method, fraction)] = empirical_transitions(counts.transitions)
        matrices[target] = mats
    return rows, matrices


def evaluate_text(cfg: RunConfig, paths: RunPaths, *, references: Mapping[str, Sequence[str]],
                  classifier: Optional[Callable[[str, float], text.Model]] = None,
                  reference_lm: Optional[Callable[[str], text.Model]] = None,
                  eos_id: Optional[int] = None, bos_id: Optional[int] = None) -> list[ResultRow]:
    """MAUVE against ``references[target]`` (held-out target text), diversity over token ids, and,
    where the networks are given, the classifier domain score and generative perplexity."""
    ev = cfg.eval
    rows: list[ResultRow] = []
    for target in cfg.targets:
        if not references.get(target):
            raise ValueError(f"no reference texts for target '{target}': pass its held-out test text")
        lm = reference_lm(target) if reference_lm is not None else None
        for method, folder_target, fraction in sample_cells(cfg, target):
            folder = paths.samples(method, folder_target, fraction)
            records = read_samples(folder, cfg.sample.num_samples)
            texts = [r["text"] for r in records]
            if any(t is None for t in texts):
                raise ValueError(f"{folder}: samples have no decoded text; the sample stage must "
                                 f"write 'text' for corpus '{cfg.data.corpus}'")
            log.info("scoring %s / %s / %s (%d samples)", method, target, fraction, len(records))
            result = mauve(texts, references[target], seeds=ev.mauve_seeds, featurizer=ev.mauve_featurizer,
                           length_bins=ev.mauve_length_bins, scaling=ev.mauve_scaling,
                           num_buckets=ev.mauve_num_buckets or None,
                           explained_variance=ev.mauve_explained_variance,
                           max_features=ev.mauve_max_features, seed=cfg.seed)
            rows.append(mauve_row(method, target, fraction, result))
            tokens = _tokens(records)
            div = text.diversity(text.diversity_counts(
                [text.truncate_at_eos(t, eos_id) for t in tokens], ev.diversity_max_n, ev.repetition_n))
            rows += rows_from_metrics(method, target, fraction, div, n=len(tokens), notes="over token ids")
            if lm is not None:
                nll = text.generative_nll(tokens, lm, eos_id=eos_id, bos_id=bos_id, batch_size=ev.batch_size)
                rows += rows_from_metrics(method, target, fraction, {"gen_ppl": text.perplexity(nll)},
                                          n=nll.sequences, notes=f"{nll.tokens} tokens scored")
            if classifier is not None:
                # The source model's samples are scored by every fraction's classifier.
                for f in cfg.data.target_fractions if fraction is None else [fraction]:
                    score = text.domain_score(text.domain_counts(tokens, classifier(target, f), ev.batch_size))
                    rows += rows_from_metrics(method, target, f, score, n=len(tokens))
    return rows


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
