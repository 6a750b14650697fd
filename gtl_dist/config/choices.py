"""The config's choices (Literal types, checked as the YAML is read, naming the file and the key)
and the constants read off them."""

from __future__ import annotations

import typing
from typing import Literal

Corpus = Literal["markov", "demo", "arxiv", "jsonl", "txt"]
TokenizerModel = Literal["unigram", "bpe"]
Attention = Literal["bidirectional", "causal"]
Precision = Literal["auto", "fp32", "bf16"]
ZeroStage = Literal[0, 1, 2, 3]
Schedule = Literal["loglinear", "geometric"]
Sampler = Literal["planner", "ancestral", "exact", "first_hitting"]
PlannerMode = Literal["sample", "argmax", "uniform"]
MauveFeaturizer = Literal["auto", "tfidf", "mauve-text"]
PlannerScope = Literal["shared", "per_target"]
AdapterThrough = Literal["output", "direct"]
# Model selection of per-target stages (docs/method.md §12): on a held-out part of the method's own
# n_T target sequences, by k-fold cross-validation over all n_T then a refit on them, or a fixed
# budget with no selection.
SELECTIONS = ("holdout", "kfold", "budget")
# Whether replicates (pipeline.seeds) redraw the target data (docs/method.md §12).
Replicates = Literal["redraw", "shared"]

CORPORA: tuple[str, ...] = typing.get_args(Corpus)
PLANNER_MODES: tuple[str, ...] = typing.get_args(PlannerMode)
ATTENTION_MODES: tuple[str, ...] = typing.get_args(Attention)
FEATURIZER_CHOICES: tuple[str, ...] = typing.get_args(MauveFeaturizer)
# The domain classifiers' label smoothing: Beta(a, b) with mean 0.1 and variance 0.005
# (docs/method.md §4).
DEFAULT_LABEL_SMOOTHING = (1.7, 15.3)
# Balanced accuracy of a domain classifier at which source and target barely overlap (the ratio
# q/p is then nearly unbounded): the classifiers' training logs warn at it.
POOR_OVERLAP_ACCURACY = 0.99
