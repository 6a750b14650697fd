"""Text-sample metrics besides MAUVE (docs/method.md §10): classifier domain score, generative
perplexity under a reference model, diversity.

Each metric comes as mergeable counts (one shard of samples at a time, combined with ``+``) and
a function turning the merged counts into the reported numbers. Models are plain callables on
int64 numpy arrays, so this module needs no torch and tests can pass hand-written functions.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence

import numpy as np

# tokens (B, L) int64 -> logits: (B,) for a classifier, (B, T, V) for a next-token model.
Model = Callable[[np.ndarray], object]


def _numpy(out: object) -> np.ndarray:
    """Accept numpy arrays or torch tensors (on any device) from a model callable."""
    if hasattr(out, "detach"):
        out = out.detach().float().cpu().numpy()
    return np.asarray(out, dtype=np.float64)


def _batches(sequences: Sequence[Sequence[int]], batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(sequences), batch_size):
        yield sequences[start:start + batch_size]


# ----------------------------------------------------------------------------------------------
# Classifier domain score: how source-like the samples look to the time-independent classifier
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DomainCounts:
    source_prob_sum: float = 0.0
    target_like: int = 0  # samples with p(source) < 0.5
    n: int = 0

    def __add__(self, other: "DomainCounts") -> "DomainCounts":
        return DomainCounts(self.source_prob_sum + other.source_prob_sum,
                            self.target_like + other.target_like, self.n + other.n)


def source_probability(logits: np.ndarray) -> np.ndarray:
    """sigmoid(d(x)) without overflow: labels are source = 1, so this is p(source | x)."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def domain_counts_from_logits(logits: np.ndarray) -> DomainCounts:
    p = source_probability(np.asarray(logits, dtype=np.float64).reshape(-1))
    return DomainCounts(float(p.sum()), int(np.sum(p < 0.5)), int(p.size))


def domain_counts(sequences: Sequence[Sequence[int]], classifier: Model,
                  batch_size: int = 64) -> DomainCounts:
    """Score samples with the time-independent classifier (tokens (B, L) -> one logit each)."""
    total = DomainCounts()
    for batch in _batches(sequences, batch_size):
        tokens = _stack(batch, "domain score")
        logits = _numpy(classifier(tokens)).reshape(-1)
        if logits.size != len(batch):
            raise ValueError(f"the classifier returned {logits.size} logits for {len(batch)} "
                             f"sequences; it must return one logit per sequence")
        total = total + domain_counts_from_logits(logits)
    return total


def domain_score(counts: DomainCounts) -> dict[str, float]:
    """Mean p(source) (lower = more target-like) and the percentage of samples with p < 0.5."""
    if counts.n == 0:
        raise ValueError("domain score of zero samples")
    return {"domain_source_prob": counts.source_prob_sum / counts.n,
            "domain_pct_target": 100.0 * counts.target_like / counts.n}


def _stack(batch: Sequence[Sequence[int]], what: str) -> np.ndarray:
    lengths = {len(s) for s in batch}
    if len(lengths) != 1:
        raise ValueError(f"{what}: sequences in a batch must have one length, got {sorted(lengths)}")
    return np.asarray(batch, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Generative perplexity under a reference (causal) language model
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NLLCounts:
    nll_sum: float = 0.0  # nats
    tokens: int = 0
    sequences: int = 0

    def __add__(self, other: "NLLCounts") -> "NLLCounts":
        return NLLCounts(self.nll_sum + other.nll_sum, self.tokens + other.tokens,
                         self.sequences + other.sequences)


def truncate_at_eos(tokens: Sequence[int], eos_id: Optional[int]) -> list[int]:
    """The sequence up to and including its first EOS (all of it without one)."""
    tokens = [int(t) for t in tokens]
    if eos_id is not None and eos_id in tokens:
        return tokens[:tokens.index(eos_id) + 1]
    return tokens


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=-1, keepdims=True)
    log_norm = top[..., 0] + np.log(np.exp(z - top).sum(axis=-1))
    return log_norm - np.take_along_axis(z, np.asarray(targets)[..., None], axis=-1)[..., 0]


def generative_nll(sequences: Sequence[Sequence[int]], next_token_logits: Model, *,
                   eos_id: Optional[int] = None, bos_id: Optional[int] = None,
                   pad_id: int = 0, batch_size: int = 8) -> NLLCounts:
    """Summed NLL of the samples under a causal reference model.

    ``next_token_logits`` maps (B, T) int64 tokens to (B, T, V) logits where position t predicts
    token t + 1. Each sample is cut after its first EOS (the EOS is scored). Without ``bos_id``
    the first token is context only; with it, a BOS is prepended and every token is scored.
    Shorter sequences are right-padded with ``pad_id``; a causal model never looks ahead, so the
    padding changes nothing.
    """
    total = NLLCounts()
    for batch in _batches(sequences, batch_size):
        cut = [([bos_id] if bos_id is not None else []) + truncate_at_eos(s, eos_id) for s in batch]
        cut = [s for s in cut if len(s) >= 2]
        if not cut:
            continue
        width = max(len(s) for s in cut) - 1
        inputs = np.full((len(cut), width), pad_id, dtype=np.int64)
        for i, s in enumerate(cut):
            inputs[i, :len(s) - 1] = s[:-1]
        logits = _numpy(next_token_logits(inputs))
        if logits.ndim != 3 or logits.shape[:2] != inputs.shape:
            raise ValueError(f"the reference model returned logits of shape {logits.shape} for "
                             f"tokens of shape {inputs.shape}; expected (B, T, vocab)")
        for i, s in enumerate(cut):
            # One sequence at a time keeps the float64 copy at T x V, not B x T x V.
            nll = token_nll(logits[i, :len(s) - 1], np.asarray(s[1:], dtype=np.int64))
            total = total + NLLCounts(float(nll.sum()), len(s) - 1, 1)
    return total


def perplexity(counts: NLLCounts) -> float:
    """Corpus-level exp(sum NLL / sum tokens)."""
    if counts.tokens == 0:
        raise ValueError("perplexity of zero scored tokens (were all samples a single token?)")
    return math.exp(counts.nll_sum / counts.tokens)


# ----------------------------------------------------------------------------------------------
# Diversity: distinct-n, unigram entropy, repetition
# ----------------------------------------------------------------------------------------------

@dataclass
class DiversityCounts:
    """n-gram counts over a sample set plus per-sequence repetition (mergeable with ``+``)."""
    max_n: int = 3
    repetition_n: int = 4
    ngrams: dict[int, Counter] = field(default_factory=dict)
    repetition_sum: float = 0.0
    repetition_sequences: int = 0  # sequences long enough to have a repetition_n-gram

    def __add__(self, other: "DiversityCounts") -> "DiversityCounts":
        if (self.max_n, self.repetition_n) != (other.max_n, other.repetition_n):
            raise ValueError("cannot merge diversity counts made with different n")
        merged = {n: self.ngrams.get(n, Counter()) + other.ngrams.get(n, Counter())
                  for n in range(1, self.max_n + 1)}
        return DiversityCounts(self.max_n, self.repetition_n, merged,
                               self.repetition_sum + other.repetition_sum,
                               self.repetition_sequences + other.repetition_sequences)


def _ngrams(seq: Sequence[Hashable], n: int) -> list[tuple]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def diversity_counts(sequences: Sequence[Sequence[Hashable]], max_n: int = 3,
                     repetition_n: int = 4) -> DiversityCounts:
    """Counts over the items of each sequence: token ids, or words of decoded text."""
    if max_n < 1 or repetition_n < 1:
        raise ValueError(f"n-gram orders must be at least 1, got max_n={max_n}, "
                         f"repetition_n={repetition_n}")
    grams = {n: Counter() for n in range(1, max_n + 1)}
    rep_sum, rep_seqs = 0.0, 0
    for seq in sequences:
        seq = list(seq)
        for n in grams:
            grams[n].update(_ngrams(seq, n))
        own = _ngrams(seq, repetition_n)
        if own:
            rep_sum += 1.0 - len(set(own)) / len(own)
            rep_seqs += 1
    return DiversityCounts(max_n, repetition_n, grams, rep_sum, rep_seqs)


def diversity(counts: DiversityCounts) -> dict[str, float]:
    """distinct_n = unique n-grams / all n-grams over the whole sample set; unigram entropy in
    bits; repetition_n = mean over sequences of the share of a sequence's n-grams that repeat
    an n-gram earlier in the same sequence (1 - unique / total, Welleck et al. 2019's seq-rep-n).
    """
    out = {}
    for n in range(1, counts.max_n + 1):
        c = counts.ngrams.get(n, Counter())
        total = sum(c.values())
        out[f"distinct_{n}"] = len(c) / total if total else float("nan")
    unigrams = np.array(list(counts.ngrams.get(1, Counter()).values()), dtype=np.float64)
    if unigrams.size:
        p = unigrams / unigrams.sum()
        out["unigram_entropy_bits"] = float(-(p * np.log2(p)).sum())
    else:
        out["unigram_entropy_bits"] = float("nan")
    out[f"repetition_{counts.repetition_n}"] = (counts.repetition_sum / counts.repetition_sequences
                                                if counts.repetition_sequences else float("nan"))
    return out
