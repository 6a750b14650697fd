"""The text evaluation (docs/method.md §10): every method's masked cross-entropy on held-out text,
MAUVE with its ceiling, the domain score, generative perplexity and diversity. The networks are
loaded by the caller (gtl_dist/cluster/tasks.py) and passed as plain callables: per target the
evaluator's domain classifier and reference LM, trained on the evaluator split no method trains
on, and per (method, target, fraction, seed) the method's conditional."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence
import numpy as np
import torch
from gtl_dist.log import get_logger
from gtl_dist.eval.evaluation import EXAMPLES_PER_SET, Evaluation, sample_cells, sample_tokens, set_label
from gtl_dist.config import RunConfig
from gtl_dist.eval import text
from gtl_dist.eval.mauve import MauveResult, mauve
from gtl_dist.eval.paired import paired_rows
from gtl_dist.eval.results import ResultRow, mauve_row, rows_from_metrics, seed_rows
from gtl_dist.eval.samples import read_samples
from gtl_dist.eval.scores import MaskedViews, masked_ce, masked_views
from gtl_dist.models import VocabSpec
from gtl_dist.paths import RunPaths

log = get_logger("eval.text")



# Reference rows of the text report: held-out text scored by the same instruments as the samples
# (what a perfect sampler of each domain gets): the test text of the target and of the source and,
# for MAUVE, the target's evaluator split against the test text (the ceiling).
HELDOUT_TARGET, HELDOUT_SOURCE = "heldout_target", "heldout_source"
# The unguided source: what ce_gain is measured against.
SOURCE_METHOD = "source"
# The metrics every text method is compared to gtl on, paired over replicates (lower is better).
PAIRED_TEXT_METRICS = ("masked_ce", "domain_distance")
REFERENCE_LM_PPL = "reference_lm_ppl"


@dataclass(frozen=True)
class HeldOut:
    """Held-out text of one domain: decoded (MAUVE's references) and as token ids."""
    texts: Sequence[str]
    tokens: Sequence[Sequence[int]]


# log p(x0^ℓ = v | z) of a method at (target, fraction, seed), as its samplers see it before any
# truncation (gtl_dist/sample/networks.py method_log_probs), or None where it cannot be scored.
Conditional = Callable[[torch.Tensor], torch.Tensor]
Conditionals = Callable[[str, Optional[str], Optional[float], int], Optional[Conditional]]


def evaluate_text(cfg: RunConfig, paths: RunPaths, *, references: Mapping[str, HeldOut],
                  source_heldout: Optional[HeldOut] = None,
                  evaluator_texts: Optional[Mapping[str, HeldOut]] = None,
                  classifier: Optional[Callable[[str], text.Model]] = None,
                  reference_lm: Optional[Callable[[str], text.Model]] = None,
                  conditional: Optional[Conditionals] = None, vocab: Optional[VocabSpec] = None,
                  eos_id: Optional[int] = None, bos_id: Optional[int] = None) -> Evaluation:
    """Score every sample set of every target against its held-out test text ``references``
    (docs/method.md §10): MAUVE and diversity always; with the networks given, the rest.

    - ``conditional(method, target, fraction, seed)``: the method's untruncated conditional; every
      method's masked-token cross-entropy on the test text (identical masks), its ``ce_gain`` over
      the source, and paired differences to gtl over the replicates.
    - ``classifier(target)``: the evaluator's domain classifier (stage domain_classifier, trained
      on the evaluator split); the domain score and its distance to held-out target text's score,
      calibrated on the test text of both domains (rows ``heldout_target`` / ``heldout_source``).
    - ``reference_lm(target)``: the evaluator's causal LM; its own perplexity on the test text,
      and generative perplexity only where that is far enough below |V| (``vocab.size``).
    - ``evaluator_texts[target]``: the target's evaluator split, MAUVE's ceiling against the test
      text at the sample sets' size.

    The findings (the report's Checks) name what makes a number unreadable: identical sample sets,
    a domain classifier that cannot tell the domains apart, poor overlap, a reference LM too poor
    to rank samples, and held-out text too short for equal-size MAUVE sets.
    """
    if (conditional is not None or reference_lm is not None) and vocab is None:
        raise ValueError("evaluate_text: the masked cross-entropy and the reference LM's check need the "
                         "run's vocabulary; pass vocab=VocabSpec.from_manifest(manifest)")
    out = Evaluation()
    out.findings += _sample_size_findings(cfg)
    for target in cfg.targets:
        heldout = references.get(target)
        if heldout is None or not heldout.texts:
            raise ValueError(f"no reference texts for target '{target}': pass its held-out test text")
        ins = _instruments(cfg, target, heldout, out, source_heldout=source_heldout,
                           evaluator=(evaluator_texts or {}).get(target),
                           scorer=classifier(target) if classifier is not None else None,
                           lm=reference_lm(target) if reference_lm is not None else None,
                           conditional=conditional, vocab=vocab, eos_id=eos_id, bos_id=bos_id)
        per_seed = {(method, fraction): _score_text_cell(cfg, paths, target, (method, where, fraction), ins, out)
                    for method, where, fraction in sample_cells(cfg, target)}
        out.rows += paired_rows(per_seed, target, PAIRED_TEXT_METRICS, cfg.data.target_fractions)
    return out.finish()


@dataclass(frozen=True)
class _Instruments:
    """What scores one target's sample sets."""
    heldout: HeldOut
    scorer: Optional[text.Model]
    heldout_score: Optional[float]  # domain_source_prob of the target's held-out text
    lm: Optional[text.Model]  # None also where it is too poor to rank samples
    conditional: Optional[Conditionals]
    views: Optional[MaskedViews]
    source_ce: Optional[float]
    vocab: Optional[VocabSpec]
    eos_id: Optional[int]
    bos_id: Optional[int]


def _instruments(cfg: RunConfig, target: str, heldout: HeldOut, out: Evaluation, *,
                 source_heldout: Optional[HeldOut], evaluator: Optional[HeldOut], scorer: Optional[text.Model],
                 lm: Optional[text.Model], conditional: Optional[Conditionals], vocab: Optional[VocabSpec],
                 eos_id: Optional[int], bos_id: Optional[int]) -> _Instruments:
    """One target's instruments, with their reference rows and findings added to ``out``: the
    held-out texts' own scores, the reference LM's perplexity, the MAUVE ceiling, the source's
    masked cross-entropy."""
    held = _heldout_rows(cfg, target, heldout, source_heldout, scorer, eos_id)
    out.rows += held
    out.findings += _calibration_findings(held, target)
    out.findings += _overlap_findings(held, target, cfg.eval.overlap_warn_accuracy)
    heldout_score = next((r.value for r in held if r.method == HELDOUT_TARGET and r.metric == "domain_source_prob"),
                         None)
    if lm is not None and not _reference_lm_usable(cfg, target, heldout, lm, vocab, eos_id, bos_id, out):
        lm = None
    _mauve_ceiling(cfg, target, evaluator, heldout, out)
    views, source_ce = None, None
    if conditional is not None:
        x = torch.as_tensor([list(t) for t in heldout.tokens[:cfg.eval.ce_sequences]], dtype=torch.long)
        views = masked_views(x, cfg.eval.ce_mask_rates, cfg.sample.seed, vocab.mask_id)
        source_ce = _masked_ce(cfg, conditional(SOURCE_METHOD, None, None, cfg.pipeline.seeds[0]), views, vocab)
    return _Instruments(heldout, scorer, heldout_score, lm, conditional, views, source_ce, vocab, eos_id, bos_id)


def _masked_ce(cfg: RunConfig, log_probs: Conditional, views: MaskedViews, vocab: VocabSpec) -> float:
    return masked_ce(log_probs, views, vocab.mask_id, vocab.pad_id, batch_size=cfg.eval.batch_size)


# Why a method with a sequence-level ratio network has no masked cross-entropy on text.
UNSCORED_NOTE = ("not scored: its sequence-level ratio network would need one pass per single-token edit, "
                 "L·|V| per sequence, for the conditional it samples from")


def _score_text_cell(cfg: RunConfig, paths: RunPaths, target: str,
                     cell: tuple[str, Optional[str], Optional[float]], ins: _Instruments,
                     out: Evaluation) -> dict[int, dict[str, float]]:
    """Every seed's sample set of one (method, fraction) against ``target``: rows into ``out``;
    returns the per-seed values (for the paired differences)."""
    method, folder_target, fraction = cell
    per_seed: dict[int, dict[str, float]] = {}
    mauve_result, unscored = None, False
    seeds = cfg.pipeline.seeds_at(fraction)
    for seed in seeds:
        texts, tokens = _sample_set(cfg, paths.samples(method, folder_target, fraction, seed))
        label = set_label(method, folder_target, fraction, seed)
        out.saw(label, tokens)
        if seed == seeds[0]:
            out.examples.setdefault(label, texts[:EXAMPLES_PER_SET])
        log.info("scoring %s against %s (%d samples)", label, target, len(tokens))
        mauve_result, per_seed[seed] = _text_metrics(cfg, texts, tokens, ins)
        if ins.scorer is not None:
            score = _domain_score(cfg, tokens, ins.scorer)
            per_seed[seed].update(score, domain_distance=abs(score["domain_source_prob"] - ins.heldout_score))
        if ins.conditional is not None:
            scores = _likelihood_scores(cfg, ins, method, folder_target, fraction, seed)
            unscored = scores is None
            per_seed[seed].update(scores or {})
    if len(seeds) == 1:  # keep the spread over MAUVE's own seeds
        out.rows.append(mauve_row(method, target, fraction, mauve_result))
        per_seed[seeds[0]].pop(mauve_result.metric)
    out.rows += seed_rows(method, target, fraction, per_seed, n=cfg.sample.num_samples)
    if unscored:
        out.rows.append(ResultRow(method, target, fraction, "masked_ce", float("nan"), notes=UNSCORED_NOTE))
    return per_seed


def _likelihood_scores(cfg: RunConfig, ins: _Instruments, method: str, folder_target: Optional[str],
                       fraction: Optional[float], seed: int) -> Optional[dict[str, float]]:
    """The method's masked cross-entropy on the target's test text and what it saves over the
    source's (``ce_gain``); None where its conditional cannot be scored."""
    if method == SOURCE_METHOD:  # one network for every seed: scored once
        return {"masked_ce": ins.source_ce}
    log_probs = ins.conditional(method, folder_target, fraction, seed)
    if log_probs is None:
        return None
    ce = _masked_ce(cfg, log_probs, ins.views, ins.vocab)
    return {"masked_ce": ce, "ce_gain": ins.source_ce - ce}


def _sample_set(cfg: RunConfig, folder) -> tuple[list[str], list[list[int]]]:
    records = read_samples(folder, cfg.sample.num_samples)
    texts = [r["text"] for r in records]
    if any(t is None for t in texts):
        raise ValueError(f"{folder}: samples have no decoded text; the sample stage must "
                         f"write 'text' for corpus '{cfg.data.corpus}'")
    return texts, sample_tokens(records)


def _heldout_rows(cfg: RunConfig, target: str, heldout: HeldOut, source: Optional[HeldOut],
                  scorer: Optional[text.Model], eos_id: Optional[int]) -> list[ResultRow]:
    """Diversity of the held-out target text, and the domain score of both domains' held-out text
    (the source's with its distance to the target's: how far a sample set that stayed the source
    would be)."""
    metrics = _diversity(cfg, heldout.tokens, eos_id)
    if scorer is not None:
        metrics.update(_domain_score(cfg, heldout.tokens, scorer))
    rows = rows_from_metrics(HELDOUT_TARGET, target, None, metrics, n=len(heldout.tokens),
                             notes="the target's held-out test text itself")
    if scorer is not None and source is not None:
        score = _domain_score(cfg, source.tokens, scorer)
        score["domain_distance"] = abs(score["domain_source_prob"] - metrics["domain_source_prob"])
        rows += rows_from_metrics(HELDOUT_SOURCE, target, None, score, n=len(source.tokens),
                                  notes="the source's held-out test text")
    return rows


def _reference_lm_usable(cfg: RunConfig, target: str, heldout: HeldOut, lm: text.Model, vocab: VocabSpec,
                         eos_id: Optional[int], bos_id: Optional[int], out: Evaluation) -> bool:
    """The reference LM's own perplexity on the target's test text, as a row; whether it is far
    enough below |V| (a uniform guess) for generative perplexity to mean anything, else a finding."""
    ev = cfg.eval
    ppl = text.perplexity(text.generative_nll(heldout.tokens, lm, eos_id=eos_id, bos_id=bos_id,
                                              batch_size=ev.batch_size))
    limit = ev.gen_ppl_max_vocab_share * vocab.size
    out.rows += rows_from_metrics(HELDOUT_TARGET, target, None, {REFERENCE_LM_PPL: ppl}, n=len(heldout.tokens),
                                  notes=f"the reference LM's own perplexity on the target's test text; "
                                        f"gen_ppl is reported below {limit:,.0f} "
                                        f"(eval.gen_ppl_max_vocab_share · |V|, |V| = {vocab.size:,})")
    if ppl < limit:
        return True
    out.findings.append(
        f"target {target}: gen_ppl dropped: the reference LM's own perplexity on held-out {target} text is "
        f"{ppl:,.0f}, not far below the vocabulary size |V| = {vocab.size:,} that uniform guessing scores "
        f"(eval.gen_ppl_max_vocab_share = {ev.gen_ppl_max_vocab_share:g} allows {limit:,.0f}), so it cannot "
        f"tell good text from bad; give it more text (data.evaluator_fraction) or train it longer "
        f"(train.reference_lm)")
    return False


def _mauve_ceiling(cfg: RunConfig, target: str, evaluator: Optional[HeldOut], heldout: HeldOut,
                   out: Evaluation) -> None:
    """MAUVE of held-out target text (the evaluator split) against the test references, at the
    sample sets' size: what a perfect sampler of the target would score. Findings where the
    held-out text is too short for sets of that size."""
    n = cfg.sample.num_samples
    if len(heldout.texts) < n:
        out.findings.append(
            f"target {target}: MAUVE draws {n} length-matched references per set from {len(heldout.texts)} "
            f"held-out test texts, so references repeat (every row, the ceiling included, is scored so)")
    if evaluator is None:
        return
    m = min(n, len(evaluator.texts))
    if m < 2:
        out.findings.append(f"target {target}: no MAUVE ceiling: the evaluator split holds {len(evaluator.texts)} "
                            f"texts; raise data.evaluator_fraction")
        return
    if m < n:
        out.findings.append(
            f"target {target}: the MAUVE ceiling compares {m} held-out texts (the whole evaluator split) with "
            f"the test references, not {n} like every sample set; MAUVE depends on the set size, so the "
            f"ceiling is not at equal size: raise data.evaluator_fraction or lower sample.num_samples")
    picked = np.sort(np.random.default_rng(cfg.seed).choice(len(evaluator.texts), m, replace=False))
    result = _mauve(cfg, [evaluator.texts[i] for i in picked], heldout.texts)
    out.rows.append(mauve_row(HELDOUT_TARGET, target, None, result,
                              notes=f"the ceiling: {m} texts of the target's evaluator split against the "
                                    f"test references"))


def _sample_size_findings(cfg: RunConfig) -> list[str]:
    n, least = cfg.sample.num_samples, cfg.eval.mauve_min_samples
    if n >= least:
        return []
    return [f"MAUVE compares {n} samples per set, fewer than eval.mauve_min_samples = {least}: on small "
            f"sets its clustering is noisy enough to rank the methods at random; raise sample.num_samples"]


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


def _mauve(cfg: RunConfig, texts: Sequence[str], references: Sequence[str]) -> MauveResult:
    ev = cfg.eval
    return mauve(texts, references, seeds=ev.mauve_seeds, featurizer=ev.mauve_featurizer,
                 length_bins=ev.mauve_length_bins, scaling=ev.mauve_scaling,
                 num_buckets=ev.mauve_num_buckets or None, explained_variance=ev.mauve_explained_variance,
                 max_features=ev.mauve_max_features, seed=cfg.seed)


def _text_metrics(cfg: RunConfig, texts: Sequence[str], tokens: list[list[int]], ins: _Instruments
                  ) -> tuple[MauveResult, dict[str, float]]:
    """MAUVE, diversity over token ids and (with a usable reference LM) generative perplexity of one set."""
    result = _mauve(cfg, texts, ins.heldout.texts)
    metrics = {result.metric: result.mean, **_diversity(cfg, tokens, ins.eos_id)}
    if ins.lm is not None:
        nll = text.generative_nll(tokens, ins.lm, eos_id=ins.eos_id, bos_id=ins.bos_id,
                                  batch_size=cfg.eval.batch_size)
        metrics["gen_ppl"] = text.perplexity(nll)
    return result, metrics


