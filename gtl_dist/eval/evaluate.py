"""The evaluation stage: score every sampled (method, target, fraction) and write the report.

The Markov task needs no network: the chains are known exactly. The text task needs the run's
networks, which the caller loads and passes as plain callables (tokens -> logits), per target
and fraction for the time-independent classifier and per target for the reference LM; this
module only reads samples and computes numbers.

The source model is sampled once per seed (RunPaths.samples("source", None, None, seed)) and
scored against every target; its rows have no fraction. The domain score of a target comes from
one evaluator's classifier (trained on all of the target's training data against the source), the
same for every method and fraction, and the held-out text of both domains calibrates it.

Every sample set exists once per seed of pipeline.seeds; a metric is reported as the mean over
seeds with their standard deviation (gtl_dist.eval.results.seed_rows). A Markov run adds the
oracle ladder and the calibration diagnostics (gtl_dist.eval.ladder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from gtl_dist.config import RunConfig
from gtl_dist.data.markov import SOURCE, transition_matrices
from gtl_dist.eval import text
from gtl_dist.eval.cost import render_costs, stage_costs
from gtl_dist.eval.guide_gain import guide_gain_rows
from gtl_dist.data import load_run_manifest
from gtl_dist.data import read_samples as read_set
from gtl_dist.diffusion import NoiseSchedule
from gtl_dist.eval.ladder import calibration_rows, ladder_rows
from gtl_dist.eval.markov import empirical_transitions, expected_nll, markov_counts, markov_metrics
from gtl_dist.eval.mauve import MauveResult, mauve
from gtl_dist.eval.paired import paired_rows
from gtl_dist.eval.report import MarkovMatrices, ReportFiles, write_report
from gtl_dist.eval.results import ResultRow, mauve_row, rows_from_metrics, seed_rows
from gtl_dist.eval.samples import read_samples
from gtl_dist.eval.scores import MaskedViews, masked_ce, masked_views
from gtl_dist.eval.selection import render_budgets, selection_rows
from gtl_dist.models.chain import ChainDenoiser, MarkovChain
from gtl_dist.sample import MethodNetworks, sample_sequences as draw_samples, shard_seed
from gtl_dist.sample.networks import method_log_probs, method_networks
from gtl_dist.log import get_logger
from gtl_dist.methods import METHODS
from gtl_dist.paths import RunPaths
from gtl_dist.stages import StageGraph

log = get_logger("eval")

# The exact chain (samples drawn from the true target), as a reference row in the report.
TARGET_CHAIN = "target_chain"


def sample_cells(cfg: RunConfig, target: str) -> list[tuple[str, Optional[str], Optional[float]]]:
    """(method, sample-folder target, fraction) of every sample set scored against ``target``."""
    cells = []
    for method in cfg.sample.methods:
        if METHODS[method].per_target:
            cells += [(method, target, f) for f in cfg.data.target_fractions]
        else:
            cells.append((method, None, None))
    return cells


def _tokens(records: Sequence[dict]) -> list[list[int]]:
    return [r["tokens"] for r in records]


def evaluate_markov(cfg: RunConfig, paths: RunPaths) -> Evaluation:
    """Rows, the sampled transition matrices per target, and the findings (identical sets).

    Per (method, fraction, replicate): the transition error and NLLs of the run's samples, the
    masked-token cross-entropy on the target's held-out sequences (scores.py) and, with
    ``eval.paper_sampler_steps``, the transition error of samples drawn with the paper's sampler;
    then every method's paired differences to gtl over the replicates (paired.py), what each
    method's selection kept (selection.py), the exact references and the ladder."""
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
            for seed in cfg.pipeline.seeds:
                tokens = _tokens(read_samples(paths.samples(method, folder_target, fraction, seed),
                                              cfg.sample.num_samples))
                out.saw(_set_label(method, folder_target, fraction, seed), tokens)
                counts = markov_counts(np.asarray(tokens), q, source)
                nets = method_networks(cfg, paths, method, folder_target, fraction, seed,
                                       needed_by="the evaluation")
                per_seed[seed] = {**markov_metrics(counts, q), **network_scores(cfg, nets, views, mask_id, q,
                                                                                source, seed)}
                merged = counts if merged is None else merged + counts
            rows += seed_rows(method, target, fraction, per_seed, n=cfg.sample.num_samples)
            per_seed_all[(method, fraction)] = per_seed
            mats.estimated[(method, fraction)] = empirical_transitions(merged.transitions)
        rows += paired_rows(per_seed_all, target, PAIRED_METRICS, cfg.data.target_fractions)
        matrices[target] = mats
    rows += selection_rows(cfg, paths)
    if cfg.eval.ladder and any(METHODS[m].guided for m in cfg.sample.methods):
        rows += ladder_rows(cfg, paths) + calibration_rows(cfg, paths)
    return out.finish()


# The metrics every method is compared to gtl on: the primary score, then the sample errors.
PAIRED_METRICS = ("masked_ce", "transition_mean_abs_err", "transition_mean_abs_err[paper sampler]")
EXACT_TARGET, EXACT_SOURCE = "exact target chain", "exact source chain"


def heldout_views(cfg: RunConfig, manifest, target: str) -> MaskedViews:
    """The target's held-out sequences the masked cross-entropy is scored on, masked once per rate."""
    n = min(cfg.eval.ce_sequences, manifest.num_samples(f"{target}/test"))
    x = read_set(manifest, f"{target}/test", 0, n, manifest.tokenizer_hash)
    return masked_views(x, cfg.eval.ce_mask_rates, cfg.sample.seed, manifest.mask_id)


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


# Reference rows of the text report: the held-out test text of the target and of the source,
# scored by the same instruments as the samples (what a perfect sampler of each domain gets).
HELDOUT_TARGET, HELDOUT_SOURCE = "heldout_target", "heldout_source"


@dataclass(frozen=True)
class HeldOut:
    """One domain's held-out test text: decoded (MAUVE's references) and as token ids."""
    texts: Sequence[str]
    tokens: Sequence[Sequence[int]]


@dataclass
class Evaluation:
    """What the evaluation found: result rows, findings in words (the report's "Checks"), a few
    decoded samples per sample set (text runs), and the sampled transition matrices (Markov)."""
    rows: list[ResultRow] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)
    matrices: dict[str, MarkovMatrices] = field(default_factory=dict)
    fingerprints: dict[str, list[str]] = field(default_factory=dict)  # tokens' hash -> set labels

    def saw(self, label: str, tokens: Sequence[Sequence[int]]) -> None:
        """Record one sample set (the source's, scored against every target, once)."""
        labels = self.fingerprints.setdefault(_fingerprint(tokens), [])
        if label not in labels:
            labels.append(label)

    def finish(self) -> "Evaluation":
        self.findings += identical_set_findings(self.fingerprints)
        return self


# Decoded samples shown per sample set (seed 0) in samples.md and TensorBoard.
EXAMPLES_PER_SET = 3


def evaluate_text(cfg: RunConfig, paths: RunPaths, *, references: Mapping[str, HeldOut],
                  source_heldout: Optional[HeldOut] = None,
                  classifier: Optional[Callable[[str], text.Model]] = None,
                  reference_lm: Optional[Callable[[str], text.Model]] = None,
                  eos_id: Optional[int] = None, bos_id: Optional[int] = None,
                  diagnose_guide: bool = False) -> Evaluation:
    """MAUVE against ``references[target]`` (held-out target text) and diversity over token ids
    for every sample set; where the networks are given, the domain score and generative perplexity.

    ``classifier(target)`` is the evaluator's domain classifier of ``target`` against the source:
    one instrument for every method and fraction, calibrated by scoring the held-out text of both
    domains (rows ``heldout_target`` / ``heldout_source``). The findings name sample sets that are
    identical where they must differ, and a domain score that cannot tell the two domains apart.
    With ``diagnose_guide`` (the run's exports are on disk) gtl's edit-ratio networks are scored on
    the held-out text too (gtl_dist/eval/guide_gain.py).
    """
    out = Evaluation()
    for target in cfg.targets:
        heldout = references.get(target)
        if heldout is None or not heldout.texts:
            raise ValueError(f"no reference texts for target '{target}': pass its held-out test text")
        scorer = classifier(target) if classifier is not None else None
        held = _heldout_rows(cfg, target, heldout, source_heldout, scorer, eos_id)
        out.rows += held
        out.findings += _calibration_findings(held, target)
        out.findings += _overlap_findings(held, target, cfg.eval.overlap_warn_accuracy)
        instruments = _Instruments(heldout, scorer, reference_lm(target) if reference_lm else None,
                                   eos_id, bos_id)
        for cell in sample_cells(cfg, target):
            _score_text_cell(cfg, paths, target, cell, instruments, out)
    if diagnose_guide:
        out.rows += guide_gain_rows(cfg, paths, {t: references[t].tokens for t in cfg.targets})
    return out.finish()


@dataclass(frozen=True)
class _Instruments:
    """What scores one target's sample sets."""
    heldout: HeldOut
    scorer: Optional[text.Model]
    lm: Optional[text.Model]
    eos_id: Optional[int]
    bos_id: Optional[int]


def _score_text_cell(cfg: RunConfig, paths: RunPaths, target: str,
                     cell: tuple[str, Optional[str], Optional[float]], ins: _Instruments,
                     out: Evaluation) -> None:
    """Every seed's sample set of one (method, fraction) against ``target``: rows into ``out``."""
    method, folder_target, fraction = cell
    per_seed: dict[int, dict[str, float]] = {}
    mauve_result = None
    for seed in cfg.pipeline.seeds:
        texts, tokens = _sample_set(cfg, paths.samples(method, folder_target, fraction, seed))
        label = _set_label(method, folder_target, fraction, seed)
        out.saw(label, tokens)
        if seed == cfg.pipeline.seeds[0]:
            out.examples.setdefault(label, texts[:EXAMPLES_PER_SET])
        log.info("scoring %s against %s (%d samples)", label, target, len(tokens))
        mauve_result, per_seed[seed] = _text_metrics(cfg, texts, tokens, ins.heldout.texts, ins.lm,
                                                     ins.eos_id, ins.bos_id)
        if ins.scorer is not None:
            per_seed[seed].update(_domain_score(cfg, tokens, ins.scorer))
    if len(cfg.pipeline.seeds) == 1:  # keep the spread over MAUVE's own seeds
        out.rows.append(mauve_row(method, target, fraction, mauve_result))
        per_seed[cfg.pipeline.seeds[0]].pop(mauve_result.metric)
    out.rows += seed_rows(method, target, fraction, per_seed, n=cfg.sample.num_samples)


def _sample_set(cfg: RunConfig, folder) -> tuple[list[str], list[list[int]]]:
    records = read_samples(folder, cfg.sample.num_samples)
    texts = [r["text"] for r in records]
    if any(t is None for t in texts):
        raise ValueError(f"{folder}: samples have no decoded text; the sample stage must "
                         f"write 'text' for corpus '{cfg.data.corpus}'")
    return texts, _tokens(records)


def _heldout_rows(cfg: RunConfig, target: str, heldout: HeldOut, source: Optional[HeldOut],
                  scorer: Optional[text.Model], eos_id: Optional[int]) -> list[ResultRow]:
    """Diversity of the held-out target text, and the domain score of both domains' held-out text."""
    metrics = _diversity(cfg, heldout.tokens, eos_id)
    if scorer is not None:
        metrics.update(_domain_score(cfg, heldout.tokens, scorer))
    rows = rows_from_metrics(HELDOUT_TARGET, target, None, metrics, n=len(heldout.tokens),
                             notes="the target's held-out test text itself")
    if scorer is not None and source is not None:
        rows += rows_from_metrics(HELDOUT_SOURCE, target, None, _domain_score(cfg, source.tokens, scorer),
                                  n=len(source.tokens), notes="the source's held-out test text")
    return rows


def _diversity(cfg: RunConfig, tokens: Sequence[Sequence[int]], eos_id: Optional[int]) -> dict[str, float]:
    ev = cfg.eval
    return text.diversity(text.diversity_counts([text.truncate_at_eos(t, eos_id) for t in tokens],
                                                ev.diversity_max_n, ev.repetition_n))


def _domain_score(cfg: RunConfig, tokens: Sequence[Sequence[int]], scorer: text.Model) -> dict[str, float]:
    return text.domain_score(text.domain_counts(tokens, scorer, cfg.eval.batch_size))


# The domain score is read as a score only if held-out target text is called target-like this much
# more often (percentage points) than held-out source text.
MIN_DOMAIN_SEPARATION = 50.0


def _calibration_findings(heldout_rows: Sequence[ResultRow], target: str) -> list[str]:
    pct = {r.method: r.value for r in heldout_rows if r.metric == "domain_pct_target"}
    if len(pct) < 2 or pct[HELDOUT_TARGET] - pct[HELDOUT_SOURCE] >= MIN_DOMAIN_SEPARATION:
        return []
    return [f"target {target}: the domain classifier calls {pct[HELDOUT_TARGET]:.0f}% of held-out {target} "
            f"text and {pct[HELDOUT_SOURCE]:.0f}% of held-out source text target-like; it does not separate "
            f"the domains, so domain_pct_target / domain_source_prob say nothing about the samples"]


def _overlap_findings(heldout_rows: Sequence[ResultRow], target: str, warn_accuracy: float) -> list[str]:
    """The poor-overlap guard: a domain classifier that tells held-out target text from held-out
    source text almost always means the source model puts little mass where the target lives, the
    regime in which guiding it helps least (docs/method.md §8)."""
    pct = {r.method: r.value for r in heldout_rows if r.metric == "domain_pct_target"}
    if len(pct) < 2:
        return []
    accuracy = (pct[HELDOUT_TARGET] + 100.0 - pct[HELDOUT_SOURCE]) / 200.0
    if accuracy < warn_accuracy:
        return []
    return [f"target {target}: poor overlap with the source: the evaluator's domain classifier tells "
            f"held-out {target} text from held-out source text with {accuracy:.1%} balanced accuracy "
            f"(eval.overlap_warn_accuracy = {warn_accuracy:g}); guidance of the source model can only "
            f"reweight what it already generates, so expect GTL's gain over the source to be small here"]


def _fingerprint(tokens: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(map(int, t)) for t in tokens]).encode()).hexdigest()


def _set_label(method: str, target: Optional[str], fraction: Optional[float], seed: int) -> str:
    where = "" if target is None else f" {target} @ {fraction * 100:g}%"
    return f"{method}{where} (seed {seed})"


def identical_set_findings(fingerprints: Mapping[str, Sequence[str]]) -> list[str]:
    """One finding per group of sample sets with the same tokens: every set is drawn from its own
    networks or seed, so equal sets mean guidance or training changed nothing."""
    return [f"identical samples: {', '.join(labels)} drew exactly the same token "
            f"sequences; whatever distinguishes them (guidance, target, fraction, seed) changed nothing"
            for labels in fingerprints.values() if len(labels) > 1]


def _text_metrics(cfg: RunConfig, texts: Sequence[str], tokens: list[list[int]], references: Sequence[str],
                  lm: Optional[text.Model], eos_id: Optional[int], bos_id: Optional[int]
                  ) -> tuple[MauveResult, dict[str, float]]:
    """MAUVE, diversity over token ids and (with a reference LM) generative perplexity of one set."""
    ev = cfg.eval
    result = mauve(texts, references, seeds=ev.mauve_seeds, featurizer=ev.mauve_featurizer,
                   length_bins=ev.mauve_length_bins, scaling=ev.mauve_scaling,
                   num_buckets=ev.mauve_num_buckets or None, explained_variance=ev.mauve_explained_variance,
                   max_features=ev.mauve_max_features, seed=cfg.seed)
    metrics = {result.metric: result.mean, **_diversity(cfg, tokens, eos_id)}
    if lm is not None:
        nll = text.generative_nll(tokens, lm, eos_id=eos_id, bos_id=bos_id, batch_size=ev.batch_size)
        metrics["gen_ppl"] = text.perplexity(nll)
    return result, metrics


def run_eval(cfg: RunConfig, paths: RunPaths, *, command: Optional[str] = None,
             **text_inputs) -> ReportFiles:
    """Score the run's samples and write results.csv, report.md, plots and TensorBoard.

    For text corpora pass ``references`` and optionally ``source_heldout``, ``classifier``,
    ``reference_lm``, ``eos_id``, ``bos_id``, ``diagnose_guide`` (see :func:`evaluate_text`).
    """
    if cfg.data.corpus == "markov":
        if text_inputs:
            raise TypeError(f"the Markov evaluation takes no text inputs, got {sorted(text_inputs)}")
        out = evaluate_markov(cfg, paths)
    else:
        out = evaluate_text(cfg, paths, **text_inputs)
    cost = render_budgets(cfg) + render_costs(stage_costs(cfg, paths), StageGraph(cfg).source_stage,
                                              cfg.sample.methods)
    return write_report(out.rows, paths, cfg, command=command, markov=out.matrices, findings=out.findings,
                        examples=out.examples, cost=cost)
