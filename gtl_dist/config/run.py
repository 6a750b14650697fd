"""The schema of how a run samples, evaluates and is submitted, and :class:`RunConfig`, which holds
every section and the rules across them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from gtl_dist.config.choices import (POOR_OVERLAP_ACCURACY, SELECTIONS, MauveFeaturizer, PlannerMode,
                                     PlannerScope, Replicates, Sampler, Schedule)
from gtl_dist.config.hashing import sections_hash
from gtl_dist.config.protocol import check_split, replicates_disjoint
from gtl_dist.config.rules import ConfigError, require, require_at_least, require_in
from gtl_dist.config.sections import DataConfig, ModelsConfig, ShardConfig, StagesConfig, TokenizerConfig
from gtl_dist.io import dict_hash
from gtl_dist.methods import METHODS


@dataclass
class NoiseConfig:
    schedule: Schedule = "loglinear"
    eps: float = 1e-3
    """loglinear: 1 - alpha_t = (1 - eps) t."""
    sigma_min: float = 1e-4
    """geometric."""
    sigma_max: float = 20.0
    """geometric."""
    t_min: float = 1e-3
    """t ~ U[t_min, 1]."""
    antithetic: bool = True

    def check(self) -> None:
        require_in(self.t_min, 0.0, 1.0, "t_min")
        require_in(self.eps, 0.0, 1.0, "eps")
        require(0 < self.sigma_min < self.sigma_max, "sigma_min",
                f"{self.sigma_min}: the geometric schedule needs 0 < sigma_min < sigma_max={self.sigma_max}")


@dataclass
class SampleConfig:
    methods: list[str] = field(default_factory=lambda: ["gtl", "source", "vanilla", "finetune"])
    """Which rows of the methods table (gtl_dist/methods.py) the run samples and compares."""
    sampler: Sampler = "planner"
    """The GTL sampler (planner, ancestral, exact; the baselines draw with the unguided ancestral
    sampler), or first_hitting: every method's sampler, one uniformly chosen masked position per
    step (exact for an exact model; docs/method.md §7)."""
    num_samples: int = 1024
    batch_size: int = 32
    shards: int = 4
    """Sample shards per (method, target, fraction): array tasks."""
    gamma: float = 1.0
    """Guidance strength of gtl: its edit-ratio network is fitted to the target's own likelihood,
    so 1 is the exact guided kernel (docs/method.md §3, §5)."""
    paper_gamma: float = 5.0
    """Guidance strength of gtl_paper: its regressed ratio is shrunk, so the paper uses 2
    (synthetic) to 5 (text)."""
    n_ratio: int = 512
    top_k: int = 8
    steps: int = 128
    """Steps of the ancestral samplers (unguided too)."""
    t_end: float = 1e-5
    planner_temperature: float = 0.5
    planner_mode: PlannerMode = "sample"
    seed: int = 1234
    ratio_batch_size: int = 4096
    """Edited sequences scored per ratio-net pass (n_ratio candidates × positions, chunked)."""
    stabilise: bool = True
    """Ancestral samplers: reset P(stay masked) to the unguided value after guidance
    (docs/method.md §7). Off only to show the all-mask collapse it prevents."""

    def check(self) -> None:
        for m in self.methods:
            require(m in METHODS, "methods", f"'{m}' is not a method; choose from {', '.join(METHODS)}")
        require(len(set(self.methods)) == len(self.methods), "methods", f"{self.methods} has duplicates")
        for key in ("gamma", "paper_gamma"):
            require(getattr(self, key) >= 0, key, f"{getattr(self, key)}: a guidance strength must be 0 "
                                                  f"(unguided) or more")
        require_at_least(self, 1, "n_ratio", "top_k", "ratio_batch_size", "num_samples", "batch_size",
                         "shards", "steps")
        require(self.planner_temperature > 0, "planner_temperature", "must be > 0")
        require_in(self.t_end, 0.0, 1.0, "t_end")


@dataclass
class EvalConfig:
    mauve_seeds: int = 5
    mauve_featurizer: MauveFeaturizer = "auto"
    """auto: the mauve-text package's quantiser if installed, else ours."""
    mauve_scaling: float = 5.0
    """The constant c of MAUVE's divergence frontier."""
    mauve_length_bins: int = 8
    """Quantile bins of generated lengths for length-matched references."""
    mauve_num_buckets: int = 0
    """k-means clusters; 0 = one per ten samples (the reference's rule)."""
    mauve_max_features: int = 8192
    """TF-IDF vocabulary cap (word uni/bi-grams by document frequency)."""
    mauve_explained_variance: float = 0.9
    """PCA components kept before k-means."""
    diversity_max_n: int = 3
    """distinct-1..n."""
    repetition_n: int = 4
    """n-gram order of the within-sample repetition rate."""
    batch_size: int = 16
    """Sequences per classifier / reference-LM call, and per call of a method's conditional in the
    masked cross-entropy of text runs."""
    gen_ppl_max_vocab_share: float = 0.25
    """Text runs: generative perplexity is reported only when the reference LM's own perplexity on
    held-out target text is below this share of the vocabulary size |V| (uniform guessing scores
    |V|); otherwise the report drops it and says why in its Checks."""
    mauve_min_samples: int = 512
    """Text runs: the report's Checks flag MAUVE computed on fewer samples per set (sample.num_samples)."""
    overlap_warn_accuracy: float = POOR_OVERLAP_ACCURACY
    """Text runs: the report flags a target whose held-out text the evaluator's domain classifier
    tells from held-out source text with at least this balanced accuracy (poor overlap)."""
    ladder: bool = True
    """Markov runs with a GTL method: add the oracle ladder and the calibration diagnostics
    (docs/method.md §12) to the report; they sample with exact networks (minutes on a CPU)."""
    ce_sequences: int = 2000
    """Held-out target sequences (the first of the test set) on which every method's masked-token
    cross-entropy is scored, on identical masks (docs/method.md §10)."""
    ce_mask_rates: list[float] = field(default_factory=lambda: [0.15, 0.3, 0.45, 0.6, 0.75, 0.9])
    """Each scored sequence is masked once at each of these rates; the score is the mean over rates
    of the mean cross-entropy per masked token."""
    paper_sampler_steps: int = 0
    """Markov runs: also score samples of every method drawn in the evaluation with the paper's
    sampler, the exact ancestral sampler with this many steps on the run's noise schedule (a
    secondary row beside the run's own sampler; 0: off)."""

    def check(self) -> None:
        require_at_least(self, 1, "ce_sequences")
        require_at_least(self, 0, "paper_sampler_steps")
        require(bool(self.ce_mask_rates) and all(0 < r < 1 for r in self.ce_mask_rates), "ce_mask_rates",
                f"{self.ce_mask_rates}: need one or more mask rates in (0, 1)")
        require_at_least(self, 1, "mauve_seeds", "mauve_length_bins", "mauve_max_features",
                         "diversity_max_n", "repetition_n", "batch_size", "mauve_min_samples")
        require(self.gen_ppl_max_vocab_share > 0, "gen_ppl_max_vocab_share",
                f"{self.gen_ppl_max_vocab_share} must be > 0 (e.g. 0.25: report gen_ppl only when the "
                f"reference LM's own perplexity is below a quarter of the vocabulary size)")
        require(self.mauve_scaling > 0, "mauve_scaling", f"{self.mauve_scaling} must be > 0 "
                                                         f"(the paper uses 5)")
        require(self.mauve_num_buckets == 0 or self.mauve_num_buckets >= 2, "mauve_num_buckets",
                f"{self.mauve_num_buckets}: use 0 (automatic) or at least 2")
        require_in(self.mauve_explained_variance, 0.0, 1.0, "mauve_explained_variance", "(]")


@dataclass
class ProtocolConfig:
    """Where the per-target stages' validation data come from (docs/method.md §12).

    A method given n_T target sequences uses no other target data: with ``holdout`` its early
    stopping and checkpoint selection see only a held-out part of those n_T (the last
    max(holdout_min, round(holdout_fraction * n_T)) of them; it trains on the rest); with
    ``kfold`` every point of its grid trains once per fold of ``folds`` contiguous blocks of the
    n_T, validated on the block left out, the point and step whose held-out loss averaged over the
    folds is lowest win, and a refit on all n_T for that many steps is the export; with
    ``budget`` it trains on all n_T for a fixed number of steps and keeps the final (or EMA)
    weights, as the paper's baselines do. The targets' test sets serve the final evaluation only.
    """
    selection: str = "holdout"
    """holdout | kfold | budget: a plain string, so that its check can say why "test" is refused."""
    holdout_fraction: float = 0.2
    holdout_min: int = 2
    folds: int = 5
    """kfold: the number of folds (at most n_T: every fold holds out at least one sequence)."""
    holdout_views: int = 16
    """Each validation pass scores every held-out sequence this many times, masked afresh each
    time: a few sequences give a usable signal only over many masked views."""
    replicates: Replicates = "redraw"
    """redraw: replicate s of pipeline.seeds draws its own n_T target sequences, block s of the
    target's training set (samples s·n_T .. (s+1)·n_T − 1, wrapping at its end), so replicates see
    disjoint data while the set holds them (every method of one replicate sees the same draw);
    shared: every replicate reads the same first n_T sequences and differs only in its seed."""

    def check(self) -> None:
        require(self.selection not in ("test", "eval", "evaluation"), "selection",
                f"'{self.selection}' would select checkpoints on the targets' test sets, which serve "
                f"the final evaluation only (a method given n_T sequences may use no other target "
                f"data); use holdout or budget")
        require(self.selection in SELECTIONS, "selection",
                f"'{self.selection}' is not one of {', '.join(SELECTIONS)}")
        require_in(self.holdout_fraction, 0.0, 1.0, "holdout_fraction")
        require(self.holdout_min >= 1, "holdout_min",
                f"{self.holdout_min}: holdout selection needs at least one held-out sequence")
        require_at_least(self, 1, "holdout_views")
        require(self.folds >= 2, "folds", f"{self.folds}: k-fold selection needs at least 2 folds")


@dataclass
class PipelineConfig:
    planner_scope: PlannerScope = "shared"
    """shared: one source-only planner (docs/method.md §6); per_target: one per target fraction."""
    ar2diff: bool = False
    """Build the source denoiser through AR pretraining + AR2Diff instead of training it directly."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Replicates of every per-target stage and every sample set (mean ± std in the report). The
    data and the source stages are shared; seed 0 keeps the plain paths, seed s > 0 adds seed-s/."""
    replicates_at: dict[float, int] = field(default_factory=dict)
    """Fraction -> how many replicates run there: the first that many of ``seeds`` (a fraction not
    listed runs them all). Where the data draw matters less (large fractions), fewer suffice."""

    def check(self) -> None:
        seeds = self.seeds
        require(bool(seeds) and len(set(seeds)) == len(seeds) and min(seeds) >= 0, "seeds",
                f"{seeds}: need distinct non-negative integers, e.g. [0] or [0, 1, 2]")
        for fraction, count in self.replicates_at.items():
            require(1 <= count <= len(seeds), f"replicates_at.{fraction:g}",
                    f"{count}: between 1 and the {len(seeds)} seeds of pipeline.seeds")

    def seeds_at(self, fraction: Optional[float]) -> list[int]:
        """The replicates at ``fraction`` (every seed where the fraction is None or not listed)."""
        return self.seeds[:self.replicates_at.get(fraction, len(self.seeds))] if fraction is not None else self.seeds


@dataclass
class ClusterConfig:
    """How jobs are submitted (launchers/submit.py flags override these)."""
    partition: Optional[str] = None
    timeout_min: int = 240
    small_timeout_min: int = 60
    cpus_per_task: int = 2
    gpus_per_node: int = 0
    mem_gb: Optional[int] = None
    array_parallelism: int = 16
    signal_delay_s: int = 120
    max_requeue: int = 5
    setup: list[str] = field(default_factory=list)
    """Extra shell lines in every sbatch script."""

    def check(self) -> None:
        require_at_least(self, 1, "timeout_min", "small_timeout_min", "cpus_per_task", "array_parallelism")
        require_at_least(self, 0, "gpus_per_node", "signal_delay_s", "max_requeue")
        require(self.mem_gb is None or self.mem_gb >= 1, "mem_gb",
                f"{self.mem_gb}: memory per node in GB, at least 1 (or null: the partition's default)")
        shortest = 60 * min(self.timeout_min, self.small_timeout_min)
        require(self.signal_delay_s < shortest, "signal_delay_s",
                f"{self.signal_delay_s} s: the warning before a time limit must come after the job "
                f"starts, so below the shortest limit ({shortest} s)")


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: StagesConfig = field(default_factory=StagesConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    # -- derived views ------------------------------------------------------------------------
    @property
    def uses_tokenizer(self) -> bool:
        return self.data.corpus != "markov"

    @property
    def seq_len(self) -> int:
        return self.data.markov.length if self.data.corpus == "markov" else self.shards.seq_len

    @property
    def targets(self) -> list[str]:
        return self.data.targets

    def check(self) -> None:
        """The rules across sections: methods that need a known chain, and a Markov config's
        protocol against its target counts (a text corpus's n_T is known once the data stage has
        run, and is checked there and at submit time)."""
        if self.data.corpus != "markov":
            chain_only = [m for m in self.sample.methods if METHODS[m].markov_only]
            require(not chain_only, "sample.methods", f"{chain_only} estimate a Markov chain and need "
                                                      f"data.corpus=markov; drop them for a text corpus")
            return
        n_train = self.data.markov.num_target - round(self.data.overlap * self.data.markov.num_target)
        for f in self.data.target_fractions:
            n = round(f * n_train)
            if n >= 1:  # a fraction with no target data at all: refused at submit time, with its fix
                try:
                    check_split(n, self.protocol, f"fraction {f} (n_T = {n})")
                except ConfigError as exc:
                    raise ConfigError(f"protocol: {exc}") from None
                seeds = self.pipeline.seeds_at(f)
                if (f < 1.0 and self.protocol.replicates == "redraw"
                        and not replicates_disjoint(n_train, n, seeds, self.protocol)):
                    raise ConfigError(
                        f"pipeline.seeds: replicates {seeds} each draw their own n_T = {n} "
                        f"target sequences (protocol.replicates=redraw), which needs "
                        f"{(max(seeds) + 1) * n} of them at fraction {f}, but "
                        f"data.markov.num_target gives {n_train}; raise data.markov.num_target, use "
                        f"fewer or smaller seeds, or set protocol.replicates=shared")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        return dict_hash(self.to_dict())

    def section_hash(self, *paths: str) -> str:
        """Hash of the named sections only (e.g. ``"data", "models.denoiser"``).

        Checkpoints and stage markers record the hash of what the stage depends on, so that
        changing, say, the sampler's γ does not invalidate a trained denoiser. Keys that only
        say how the data is built, not what it holds (BUILD_ONLY_KEYS), or how a stage runs,
        not what it computes (EXECUTION_ONLY_KEYS), never count.
        """
        return sections_hash(self.to_dict(), paths)

    def data_hash(self) -> str:
        """What the shards hold: the hash every manifest, loader cursor and checkpoint checks."""
        return self.section_hash("data", "tokenizer", "shards")
