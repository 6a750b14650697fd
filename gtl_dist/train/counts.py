"""The counts stages (Markov task): the target chain estimated from transition counts, the
statistical reference for what n_T sequences allow (docs/method.md §9).

Closed form, no optimiser: on the same training sequences as every other per-target stage (the
replicate's n_T less its held-out part), each row of the transition matrix is the posterior mean
under a Dirichlet prior of ``s`` pseudo-transitions spread like the prior's centre,

    P[i, j] = (C[i, j] + s·m[i, j]) / (Σ_j C[i, j] + s)

with m uniform (``counts``) or the source chain's row (``counts_source``, m from the transition
counts of the source's training set: the stage row reads that set). ``s`` is picked from
``models.counts.strengths`` by the same held-out rule as every other stage (masked-token
cross-entropy of the held-out views, gtl_dist/objectives.py; under ``selection: kfold`` averaged
over the folds, each fitted on the rest, and the chain then refitted on all n_T), and the export
is the exact denoiser of the chain (gtl_dist/models/chain.py), sampled and scored like a trained
network.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from gtl_dist.config import ConfigError, RunConfig, Split, check_split, replicate_start
from gtl_dist.data import load_run_manifest, read_samples
from gtl_dist.diffusion import sample_t
from gtl_dist.log import get_logger
from gtl_dist.models import VocabSpec
from gtl_dist.models.chain import ChainDenoiser, MarkovChain
from gtl_dist.objectives import masked_token_ce
from gtl_dist.paths import RunPaths, task_name
from gtl_dist.stages import STAGES
from gtl_dist.exports import write_export
from gtl_dist.train.recipe import StageResult, derive_seed

log = get_logger("train.counts")


def transition_counts(states: torch.Tensor, num_states: int) -> np.ndarray:
    """C[i, j]: how often state j follows state i in the sequences [n, L]."""
    x = states.numpy()
    pairs = x[:, :-1] * num_states + x[:, 1:]
    return np.bincount(pairs.ravel(), minlength=num_states * num_states).reshape(num_states, num_states).astype(float)


def posterior_mean(counts: np.ndarray, centre: np.ndarray, strength: float) -> np.ndarray:
    return (counts + strength * centre) / (counts.sum(axis=1, keepdims=True) + strength)


def fit_counts(cfg: RunConfig, run_dir: str | Path, stage: str, target: Optional[str],
               fraction: Optional[float], seed: int, input_hash: str) -> StageResult:
    """Fit and export the chain of one (target, fraction, replicate); see the module."""
    if cfg.data.corpus != "markov":
        raise ConfigError(f"stage {stage} estimates a Markov chain from transition counts and needs "
                          f"data.corpus=markov (this run reads '{cfg.data.corpus}'); drop the counts "
                          f"methods from sample.methods")
    paths, manifest = RunPaths(run_dir), load_run_manifest(cfg, run_dir)
    vocab, states = VocabSpec.from_manifest(manifest), cfg.data.markov.num_states
    name = f"{target}/train"
    n, total = manifest.num_samples(name, fraction), manifest.num_samples(name)
    where = f"target '{target}' at fraction {fraction} (n_T = {n})"
    split = check_split(n, cfg.protocol, where)
    start = replicate_start(total, n, seed, cfg.protocol)

    def rows(offset: int, count: int) -> torch.Tensor:
        first = (start + offset) % total
        return read_samples(manifest, name, first, first + count)

    def training_counts(part: Split) -> np.ndarray:
        """Transition counts of a split's training part (the window but its held-out block)."""
        spans = [(0, part.held_at), (part.held_at + part.held, part.n_train - part.held_at)]
        return transition_counts(torch.cat([rows(offset, count) for offset, count in spans if count > 0]), states)

    def chain(counts: np.ndarray, strength: float) -> ChainDenoiser:
        return ChainDenoiser(MarkovChain(posterior_mean(counts, centre, strength)), cfg.seq_len)

    centre = np.full((states, states), 1.0 / states)
    if "source" in STAGES[stage].train_sets:
        source = transition_counts(read_samples(manifest, "source/train", 0, manifest.num_samples("source/train")),
                                   states)
        centre = source / source.sum(axis=1, keepdims=True)
    strengths = cfg.models.counts.strengths
    # Scored on the held-out part, or under kfold on every fold (each fitted on the rest).
    scored = ([check_split(n, cfg.protocol, where, f) for f in range(cfg.protocol.folds)]
              if cfg.protocol.selection == "kfold" else [split] if split.held else [])
    # Each part's training counts and held-out views, read once for every strength.
    parts = [(training_counts(part), rows(part.held_at, part.held).repeat(cfg.protocol.holdout_views, 1))
             for part in scored]
    run_seed = cfg.seed if not seed else derive_seed(cfg.seed, "replicate", seed) % 2**31
    grid = []
    for strength in strengths if parts else []:
        losses = []
        for counts, views in parts:
            g = torch.Generator().manual_seed(derive_seed(run_seed, "val-shared"))
            rates = sample_t(len(views), g, t_min=cfg.noise.t_min, antithetic=cfg.noise.antithetic)
            losses.append(masked_token_ce(chain(counts, strength), views, rates, g, vocab=vocab)[1]["loss"])
        grid.append({"strength": strength, "val_loss": float(np.mean(losses))})
    best = (min((g for g in grid if math.isfinite(g["val_loss"])), key=lambda g: g["val_loss"]) if grid
            else {"strength": strengths[0], "val_loss": None})
    fit = chain(training_counts(split), best["strength"])
    export = paths.export(stage, target, fraction, seed)
    meta = {"role": STAGES[stage].role, "config": cfg.to_dict(), "vocab": asdict(vocab), "seq_len": cfg.seq_len,
            "trainable_parameters": states * (states - 1), "stage": stage, "target": target,
            "fraction": fraction, "seed": seed, "input_hash": input_hash,
            "tokenizer_hash": manifest.tokenizer_hash, "step": 0, "val_loss": best["val_loss"],
            "weights": "best" if grid else "final", "trained_steps": 0, "finished": True,
            "prior_strength": best["strength"], "strength_grid": grid, "sequences": split.n_train}
    write_export(export, fit.state_dict(), meta)
    log.info("%s: %d training sequences, prior strength %g (held-out loss %s)",
             task_name(stage, target=target, fraction=fraction, seed=seed), split.n_train, best["strength"],
             best["val_loss"])
    return StageResult("finished", stage, target, fraction, 0, input_hash, export=export,
                       val_loss=best["val_loss"], best_step=0 if grid else None)

