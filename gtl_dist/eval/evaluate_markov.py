"""The Markov evaluation (docs/method.md §10): every method's samples against the known chains, its
masked cross-entropy on held-out sequences, paired differences to gtl over replicates, the exact
references and the ladder (what selection kept is added for every corpus, gtl_dist/eval/evaluate.py)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional
import numpy as np
from gtl_dist.eval.evaluation import Evaluation, sample_cells, sample_tokens, set_label
from gtl_dist.config import RunConfig
from gtl_dist.data.markov import SOURCE, transition_matrices
from gtl_dist.data import load_run_manifest
from gtl_dist.data import read_samples as read_set
from gtl_dist.diffusion import NoiseSchedule
from gtl_dist.eval.ladder import calibration_rows, ladder_rows
from gtl_dist.eval.markov import empirical_transitions, expected_nll, markov_counts, markov_metrics
from gtl_dist.eval.paired import paired_rows
from gtl_dist.eval.report import MarkovMatrices
from gtl_dist.eval.results import ResultRow, rows_from_metrics, seed_rows
from gtl_dist.eval.samples import read_samples
from gtl_dist.eval.scores import MaskedViews, masked_ce, masked_views
from gtl_dist.io import atomic_write_json, dict_hash, read_json
from gtl_dist.models.chain import ChainDenoiser, MarkovChain
from gtl_dist.sample import MethodNetworks, sample_sequences as draw_samples, shard_seed
from gtl_dist.sample.networks import method_log_probs, method_networks
from gtl_dist.methods import METHODS
from gtl_dist.paths import RunPaths

# The exact chain (samples drawn from the true target), as a reference row in the report.
TARGET_CHAIN = "target_chain"


def evaluate_markov(cfg: RunConfig, paths: RunPaths) -> Evaluation:
    """Rows, the sampled transition matrices per target, and the findings (identical sets).

    Per (method, fraction, replicate): the transition error and NLLs of the run's samples, the
    masked-token cross-entropy on the target's held-out sequences (scores.py) and, with
    ``eval.paper_sampler_steps``, the transition error of samples drawn with the paper's sampler;
    then every method's paired differences to gtl over the replicates (paired.py), the exact
    references and the ladder."""
    chains = transition_matrices(cfg.data.markov)
    source, length = chains[SOURCE], cfg.data.markov.length
    manifest = load_run_manifest(cfg, paths.root)
    mask_id = manifest.mask_id
    out = Evaluation()
    rows, matrices = out.rows, out.matrices
    for target in cfg.targets:
        q = chains[target]
        h_q, x_qp = expected_nll(q, q, length), expected_nll(q, source, length)
        rows += rows_from_metrics(TARGET_CHAIN, target, None, {
            "nll_target_per_seq": h_q, "nll_target_per_token": h_q / length,
            "nll_source_per_seq": x_qp, "nll_source_per_token": x_qp / length,
        }, notes="exact expectation over sequences drawn from the target chain")
        views = heldout_views(cfg, manifest, target)
        rows += exact_reference_rows(cfg, target, q, source, views, mask_id)
        mats = MarkovMatrices(source, q)
        per_seed_all: dict[tuple[str, Optional[float]], dict[int, dict[str, float]]] = {}
        for method, folder_target, fraction in sample_cells(cfg, target):
            per_seed, merged = {}, None
            for seed in cfg.pipeline.seeds_at(fraction):
                tokens = sample_tokens(read_samples(paths.samples(method, folder_target, fraction, seed),
                                              cfg.sample.num_samples))
                out.saw(set_label(method, folder_target, fraction, seed), tokens)
                counts = markov_counts(np.asarray(tokens), q, source)
                per_seed[seed] = {**markov_metrics(counts, q), **cached_scores(
                    cfg, paths, target, (method, folder_target, fraction, seed),
                    lambda: network_scores(cfg, method_networks(cfg, paths, method, folder_target, fraction, seed,
                                                                needed_by="the evaluation"),
                                           views, mask_id, q, source, seed))}
                merged = counts if merged is None else merged + counts
            rows += seed_rows(method, target, fraction, per_seed, n=cfg.sample.num_samples)
            per_seed_all[(method, fraction)] = per_seed
            mats.estimated[(method, fraction)] = empirical_transitions(merged.transitions)
        rows += paired_rows(per_seed_all, target, PAIRED_METRICS, cfg.data.target_fractions)
        matrices[target] = mats
    if cfg.eval.ladder and any(METHODS[m].guided for m in cfg.sample.methods):
        rows += ladder_rows(cfg, paths) + calibration_rows(cfg, paths)
    return out.finish()


# The metrics every method is compared to gtl on: the primary score, then the sample errors.
EXACT_TARGET, EXACT_SOURCE = "exact target chain", "exact source chain"
PAIRED_METRICS = ("masked_ce", "transition_mean_abs_err", "transition_mean_abs_err[paper sampler]")
def heldout_views(cfg: RunConfig, manifest, target: str) -> MaskedViews:
    """The target's held-out sequences the masked cross-entropy is scored on, masked once per rate."""
    n = min(cfg.eval.ce_sequences, manifest.num_samples(f"{target}/test"))
    x = read_set(manifest, f"{target}/test", 0, n, manifest.tokenizer_hash)
    return masked_views(x, cfg.eval.ce_mask_rates, cfg.sample.seed, manifest.mask_id)


def cached_scores(cfg: RunConfig, paths: RunPaths, target: str, cell: tuple, score: Callable[[], dict[str, float]]
                  ) -> dict[str, float]:
    """``score()`` of one sample set (``cell``: method, sample-folder target, fraction, seed)
    against ``target``, kept in ``eval/scores/`` under a key of the set's sample tasks' input
    hashes (which cover the method's networks) and the settings that score it. An evaluation cut
    off part-way keeps what it scored, and one rerun after a single method changed (its networks,
    so its samples) scores that method's sets alone."""
    folder = paths.samples(*cell)
    sets = sorted(read_json(done)["input_hash"] for done in folder.glob("DONE-*.json"))
    if not sets:  # shards written by hand, with no task's marker: nothing says what made them
        return score()
    key = dict_hash({"sets": sets, "settings": cfg.section_hash("data", "noise", "sample", "eval")})
    cache = paths.eval / "scores" / target / folder.relative_to(paths.root / "samples") / "scores.json"
    kept = read_json(cache) if cache.exists() else {}
    if kept.get("key") == key:
        return kept["scores"]
    scores = score()
    atomic_write_json(cache, {"key": key, "scores": scores})
    return scores


def network_scores(cfg: RunConfig, nets: MethodNetworks, views: MaskedViews, mask_id: int, q: np.ndarray,
                   source: np.ndarray, replicate: int) -> dict[str, float]:
    """What a method's networks score: the masked cross-entropy and, when asked for, the
    transition error of samples from the paper's sampler."""
    scores = {"masked_ce": masked_ce(lambda z: method_log_probs(nets, z), views, mask_id)}
    if cfg.eval.paper_sampler_steps:
        settings = dataclasses.replace(cfg.sample, sampler="exact", steps=cfg.eval.paper_sampler_steps)
        tokens = draw_samples(nets, settings, NoiseSchedule.from_config(cfg.noise), settings.num_samples,
                              shard_seed(cfg.sample.seed, 0, replicate)).tokens.numpy()
        error = markov_metrics(markov_counts(tokens, q, source), q)["transition_mean_abs_err"]
        scores["transition_mean_abs_err[paper sampler]"] = error
    return scores


def exact_reference_rows(cfg: RunConfig, target: str, q: np.ndarray, source: np.ndarray,
                         views: MaskedViews, mask_id: int) -> list[ResultRow]:
    """The exact target chain (the floor of every score) and the exact source chain, scored and
    sampled exactly like the methods."""
    rows = []
    for label, matrix in ((EXACT_TARGET, q), (EXACT_SOURCE, source)):
        nets = MethodNetworks(ChainDenoiser(MarkovChain(matrix), cfg.data.markov.length))
        tokens = draw_samples(nets, cfg.sample, NoiseSchedule.from_config(cfg.noise), cfg.sample.num_samples,
                              shard_seed(cfg.sample.seed, 0)).tokens.numpy()
        metrics = {**markov_metrics(markov_counts(tokens, q, source), q),
                   **network_scores(cfg, nets, views, mask_id, q, source, 0)}
        rows += rows_from_metrics(label, target, None, metrics, n=cfg.sample.num_samples,
                                  notes=f"the {label.split()[1]} chain's exact denoiser, sampled and scored "
                                        f"like the methods")
    return rows


