"""Typed run configuration: YAML files -> dataclasses, ``--set key=value`` overrides, hashing.

A run is described by one :class:`RunConfig`. It is built from one or more YAML files (later
files override earlier ones) and ``key.path=value`` overrides, and validated as it is built:
unknown keys are rejected naming the key and the file, values are type-checked, and cross-field
rules (fractions in (0, 1], micro-batch dividing the batch, ...) sit in each section's ``check``.

Defaults are the paper's text settings (docs/method.md); the presets in ``configs/`` shrink them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from gtl_dist.io import dict_hash
from gtl_dist.log import get_logger
from gtl_dist.methods import METHODS

log = get_logger(__name__)

# Settings that change how shards are built or where they go, but not a byte of what they hold
# (the build is independent of its worker count): excluded from every hash.
BUILD_ONLY_KEYS = ("shards.build_workers", "shards.dir")
# Settings that say how a training stage runs, not what it computes (torch.compile runs the same
# network and loss): excluded from every hash too, and free to change between submissions of a
# run (gtl_dist/cluster/run_dir.py), so switching one neither retrains a stage nor orphans its
# checkpoints. A "*" part stands for any one name: every stage.
EXECUTION_ONLY_KEYS = ("train.*.compile",)


class ConfigError(ValueError):
    """A configuration problem, with the file and key it comes from."""


# ----------------------------------------------------------------------------------------------
# The schema: each section's fields, with the rules on them in its ``check`` (run on the merged
# config, so layered files may be incomplete on their own), and the choices as Literal types
# (checked as the YAML is read, naming the file and the key).
# ----------------------------------------------------------------------------------------------

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
# n_T target sequences, or a fixed budget with no selection.
SELECTIONS = ("holdout", "budget")
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

_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def require(ok: bool, key: str, msg: str) -> None:
    """A rule of a section: ``key`` (relative to the section) and what is wrong, with the fix."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def require_at_least(section: Any, minimum: int, *keys: str) -> None:
    for key in keys:
        require(getattr(section, key) >= minimum, key, f"must be at least {minimum}")


def require_in(value: float, lo: float, hi: float, key: str, closed: str = "()") -> None:
    """``value`` in the interval from ``lo`` to ``hi``, ``closed`` saying which ends belong."""
    above = value >= lo if closed[0] == "[" else value > lo
    below = value <= hi if closed[1] == "]" else value < hi
    require(above and below, key, f"{value} is outside {closed[0]}{lo:g}, {hi:g}{closed[1]}")


@dataclass
class MarkovConfig:
    """Synthetic Markov chains (docs/method.md §10): token ids are the chain states, [MASK] = num_states."""
    num_states: int = 5
    length: int = 20
    source_diagonal: float = 0.10
    target_diagonals: dict[str, float] = field(default_factory=lambda: {"sticky": 0.80})
    """One entry per target domain: name -> diagonal (off-diagonal mass is spread uniformly)."""
    source_matrix: Optional[list[list[float]]] = None
    """A full matrix overrides the diagonal when given (rows must sum to 1)."""
    target_matrices: Optional[dict[str, list[list[float]]]] = None
    source_dirichlet: Optional[float] = None
    """Random chains: every row drawn from a symmetric Dirichlet with this concentration (small:
    peaked rows, large: near-uniform rows), from dirichlet_seed and the chain's name. A full
    matrix wins over Dirichlet rows, which win over a diagonal."""
    target_dirichlet: Optional[dict[str, float]] = None
    target_perturbations: Optional[dict[str, float]] = None
    """Targets that perturb the source (name -> λ in (0, 1]): each row is (1 − λ)·the source's row +
    λ·a fresh row drawn from a symmetric Dirichlet of concentration ``perturbation_dirichlet``, so
    the source carries information about the target; λ is their distance."""
    perturbation_dirichlet: float = 1.0
    dirichlet_seed: int = 0
    num_source: int = 10_000
    num_target: int = 1_000
    num_test: int = 5_000
    """Held-out sequences per domain."""

    @property
    def targets_key(self) -> str:
        """The key that names the target chains."""
        return ("target_matrices" if self.target_matrices else
                "target_dirichlet" if self.target_dirichlet else
                "target_perturbations" if self.target_perturbations else "target_diagonals")

    def check(self) -> None:
        require_at_least(self, 2, "num_states", "length")
        require_at_least(self, 1, "num_source", "num_target", "num_test")
        given = [k for k in ("target_matrices", "target_dirichlet", "target_perturbations") if getattr(self, k)]
        require(len(given) <= 1, given[-1] if given else "", f"the targets are given {len(given)} times "
                f"({', '.join('data.markov.' + k for k in given)}); keep one")
        for name, lam in (self.target_perturbations or {}).items():
            require_in(lam, 0.0, 1.0, f"target_perturbations.{name}", "(]")
        require(self.perturbation_dirichlet > 0, "perturbation_dirichlet",
                f"{self.perturbation_dirichlet}: a Dirichlet concentration must be > 0")
        for name, conc in [("source_dirichlet", self.source_dirichlet)] + [
                (f"target_dirichlet.{k}", v) for k, v in (self.target_dirichlet or {}).items()]:
            require(conc is None or conc > 0, name, f"{conc}: a Dirichlet concentration must be > 0 "
                                                    f"(e.g. 1.0 for rows drawn uniformly from the simplex)")
        for name, diag in [("source_diagonal", self.source_diagonal)] + [
                (f"target_diagonals.{k}", v) for k, v in self.target_diagonals.items()]:
            require_in(diag, 0.0, 1.0, name, "[]")
        for name, mat in [("source_matrix", self.source_matrix)] + [
                (f"target_matrices.{k}", v) for k, v in (self.target_matrices or {}).items()]:
            if mat is not None:
                self.check_matrix(name, mat)

    def check_matrix(self, name: str, mat: list[list[float]]) -> None:
        n = self.num_states
        require(len(mat) == n and all(len(row) == n for row in mat), name,
                f"expected a {n}x{n} matrix (data.markov.num_states={n})")
        for i, row in enumerate(mat):
            require(min(row) >= 0 and abs(sum(row) - 1.0) <= 1e-6, name,
                    f"row {i} = {row} must be non-negative and sum to 1")


@dataclass
class DataConfig:
    corpus: Corpus = "markov"
    path: Optional[str] = None
    """File or folder for arxiv / jsonl / txt corpora; unused for markov and demo."""
    source_domains: list[str] = field(default_factory=lambda: ["cs", "math"])
    target_domains: list[str] = field(default_factory=lambda: ["physics"])
    test_fraction: float = 0.1
    evaluator_fraction: float = 0.1
    """Text corpora: this share of each domain's documents is held out like the test split, for
    the evaluator's own models only (the reference LM and the scoring domain classifier,
    docs/method.md §10), so that no instrument is trained on text a method trains on. Sets
    <domain>/evaluator and source/evaluator; Markov data draws data.markov.num_test fresh
    sequences per chain instead."""
    split_seed: int = 42
    target_fractions: list[float] = field(default_factory=lambda: [1.0, 0.3, 0.05, 0.01])
    """Fractions of each target's training set; nested subsets (1% ⊂ 5% ⊂ 30% ⊂ 100%)."""
    overlap: float = 0.0
    """Overlap knob r (docs/method.md §8): this fraction of each target's training data moves to
    the source."""
    max_docs_per_domain: Optional[int] = None
    """Cap on documents read per domain (None: all). Useful for quick looks at big corpora."""
    markov: MarkovConfig = field(default_factory=MarkovConfig)

    @property
    def targets(self) -> list[str]:
        """The target domains (for markov, the target chains' names)."""
        if self.corpus == "markov":
            return list(getattr(self.markov, self.markov.targets_key) or {})
        return list(self.target_domains)

    def check(self) -> None:
        require(self.corpus not in ("arxiv", "jsonl", "txt") or bool(self.path), "path",
                f"corpus '{self.corpus}' reads a file or folder; set data.path "
                f"(e.g. --set data.path=/data/arxiv-metadata-oai-snapshot.json)")
        fractions = self.target_fractions
        require(bool(fractions), "target_fractions", "needs at least one fraction, e.g. [1.0]")
        for f in fractions:
            require_in(f, 0.0, 1.0, "target_fractions", "(]")
        require(len(set(fractions)) == len(fractions), "target_fractions", f"{fractions} has duplicates")
        require_in(self.overlap, 0.0, 1.0, "overlap", "[)")
        require_in(self.test_fraction, 0.0, 1.0, "test_fraction")
        require_in(self.evaluator_fraction, 0.0, 1.0, "evaluator_fraction")
        require(self.test_fraction + self.evaluator_fraction < 1.0, "evaluator_fraction",
                f"data.test_fraction={self.test_fraction} and data.evaluator_fraction={self.evaluator_fraction} "
                f"hold out everything and leave no training documents; lower one of them")
        if self.corpus == "markov":
            require(bool(self.targets), f"markov.{self.markov.targets_key}", "needs at least one target chain")
            named = {f"markov.{self.markov.targets_key}": self.targets}
        else:
            require(bool(self.source_domains), "source_domains", "needs at least one source domain")
            require(bool(self.target_domains), "target_domains", "needs at least one target domain")
            both = set(self.source_domains) & set(self.target_domains)
            require(not both, "target_domains", f"{sorted(both)} are also source domains; use "
                                                f"data.overlap to mix target data into the source")
            named = {"source_domains": self.source_domains, "target_domains": self.target_domains}
        # Set and domain names become file names and WebDataset keys (where a '.' would split the key).
        for key, names in named.items():
            for name in names:
                require(bool(_DOMAIN_NAME.fullmatch(name)), key, f"'{name}' is not a valid domain name "
                                                                f"(letters, digits, '_' and '-', no dots)")
        require("source" not in self.targets, list(named)[-1],
                "'source' is reserved for the source set; rename that target")


@dataclass
class TokenizerConfig:
    vocab_size: int = 8000
    model_type: TokenizerModel = "unigram"
    character_coverage: float = 0.9995
    max_sentences: int = 1_000_000
    """SentencePiece samples at most this many sentences from the source training text."""
    num_threads: int = 2

    def check(self) -> None:
        require(self.vocab_size >= 16, "vocab_size", f"{self.vocab_size} is too small (at least 16)")


@dataclass
class ShardConfig:
    seq_len: int = 512
    samples_per_shard: int = 1000
    build_workers: int = 2
    """Parallel build processes (one input slice each)."""
    dir: Optional[str] = None
    """Where shards go; default <run_dir>/data. Relative paths are taken from the run directory."""
    unit_chars: int = 8_000_000
    """Text sets are cut into build units of whole documents holding about this many characters;
    each unit is packed and written on its own (its last partial chunk is dropped, its last shard
    may be short), which makes the shards independent of how many build workers ran."""

    def check(self) -> None:
        require_at_least(self, 2, "seq_len")
        require_at_least(self, 1, "samples_per_shard", "build_workers", "unit_chars")


@dataclass
class ModelConfig:
    """A DiT backbone (docs/method.md §2): adaLN-zero blocks, rotary positions, SDPA attention."""
    hidden: int = 512
    blocks: int = 8
    heads: int = 8
    cond_dim: int = 128
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    attention: Attention = "bidirectional"
    time_conditioning: bool = False

    def check(self) -> None:
        require(self.hidden % self.heads == 0, "hidden", f"{self.hidden} is not divisible by "
                                                         f"heads={self.heads}")
        require((self.hidden // self.heads) % 2 == 0, "hidden",
                f"head size {self.hidden // self.heads} must be even for rotary positions")
        require_in(self.dropout, 0.0, 1.0, "dropout", "[)")


@dataclass
class AdapterConfig:
    """The guide adapter of gtl (docs/method.md §5a): a rank-``rank`` edit of the frozen source's
    last hidden state (per position and, with ``attention``, through one attention head across
    positions), turned into token scores by the source's own output projection (``output``) or
    by a map to |V| of its own (``direct``)."""
    rank: int = 8
    through: AdapterThrough = "output"
    attention: bool = False
    """Add one rank-``rank`` attention head with rotary positions over the source's features, so
    that a position's edit can read the other positions: better where the source's features miss
    what the target needs (the paper's sticky pair), worse at a few dozen sequences where they
    carry it (the perturbed pairs; docs/method.md §5a)."""

    def check(self) -> None:
        require_at_least(self, 1, "rank")
        require(not self.attention or self.rank % 2 == 0, "rank",
                f"{self.rank}: the attention head's rotary positions need an even rank")


@dataclass
class LoraConfig:
    """The finetune_small control (docs/method.md §9): a rank-``rank`` update of the named linear
    layers of every DiT block of the source (attn_qkv, attn_out, mlp.0, mlp.2, adaLN_modulation),
    everything else frozen. Pick rank and layers so that it trains about as many parameters as
    the GTL guide (the report's Cost section counts both)."""
    rank: int = 1
    layers: list[str] = field(default_factory=lambda: ["attn_qkv", "attn_out"])

    def check(self) -> None:
        require_at_least(self, 1, "rank")
        known = ("attn_qkv", "attn_out", "mlp.0", "mlp.2", "adaLN_modulation")
        require(bool(self.layers) and set(self.layers) <= set(known), "layers",
                f"{self.layers}: choose one or more of {', '.join(known)}")


@dataclass
class CountsConfig:
    """The counts references of the Markov task (docs/method.md §9): the target chain from the
    transition counts of its training sequences with a Dirichlet prior (uniform for ``counts``,
    the source chain's rows for ``counts_source``) whose strength, in pseudo-transitions per row,
    is picked from ``strengths`` on the held-out part (the first one under selection: budget)."""
    strengths: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0])

    def check(self) -> None:
        require(bool(self.strengths) and min(self.strengths) > 0, "strengths",
                f"{self.strengths}: need one or more positive prior strengths")


def _ratio_sized() -> ModelConfig:
    return ModelConfig(hidden=96, blocks=8, heads=8, cond_dim=48)


@dataclass
class ModelsConfig:
    denoiser: ModelConfig = field(default_factory=ModelConfig)
    classifier: ModelConfig = field(default_factory=_ratio_sized)
    """gtl_paper's domain classifiers, and the evaluation's (stage domain_classifier)."""
    ratio: ModelConfig = field(default_factory=_ratio_sized)
    edit_ratio: ModelConfig = field(default_factory=_ratio_sized)
    """The edit-ratio network of gtl_edit; also the architecture of the scratch_head control."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    finetune_small: LoraConfig = field(default_factory=LoraConfig)
    counts: CountsConfig = field(default_factory=CountsConfig)
    planner: ModelConfig = field(default_factory=_ratio_sized)
    reference_lm: ModelConfig = field(default_factory=lambda: ModelConfig(
        hidden=256, blocks=4, heads=4, cond_dim=64, attention="causal"))
    """Causal LM the evaluation trains on the target's evaluator split to score generative
    perplexity (stage reference_lm)."""


@dataclass
class TrainConfig:
    """One stage's optimisation and bookkeeping (AdamW, cosine with warm-up, docs/method.md)."""
    steps: int = 1000
    global_batch: int = 128
    micro_batch: Optional[int] = None
    """Per-rank micro-batch; None = global_batch / world_size (no accumulation)."""
    lr: float = 3e-4
    lr_grid: Optional[list[float]] = None
    """Per-target stages: train once per learning rate of this list (each run its own folder,
    lr-<value>/) and export the run whose best held-out validation loss is lowest, so that every
    method picks its learning rate by the same rule on its own held-out data (docs/method.md §12).
    None: train once at ``lr``."""
    min_lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    ema: float = 0.0
    """EMA decay of the weights (0 = off)."""
    zero_stage: ZeroStage = 0
    offload_optimizer: bool = False
    precision: Precision = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    compile: bool = False
    """Compile the network's forward and the loss into one graph with torch.compile (inductor;
    the masked-diffusion stages, zero_stage 0-2): faster steps on GPUs, after a compile of a
    minute or so at the first step. Execution-only (EXECUTION_ONLY_KEYS): no hash covers it."""
    val_every: int = 500
    val_batches: int = 8
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    select_best: bool = False
    """Keep the checkpoint with the best validation loss for export."""
    patience: Optional[int] = None
    """With select_best: stop once this many validations in a row brought no better validation
    loss, and export the best (None: train every step)."""
    num_workers: int = 1
    """DataLoader workers per rank."""
    eta_cycle: float = 0.1
    """ratio: weight of the cycle loss (η₁)."""
    balanced: bool = True
    """classifiers: half source, half target per batch."""
    label_smoothing: list[float] = field(default_factory=lambda: list(DEFAULT_LABEL_SMOOTHING))
    """classifiers: Beta(a, b) label smoothing; [] = off."""

    def check(self) -> None:
        require_at_least(self, 1, "steps", "global_batch", "val_every", "save_every", "log_every",
                         "keep_last")
        require_at_least(self, 0, "num_workers")
        require_at_least(self, 1, "val_batches")
        require(self.lr > 0, "lr", f"{self.lr}: the learning rate must be above 0 (e.g. 3e-4)")
        require(0 <= self.min_lr <= self.lr, "min_lr", f"{self.min_lr}: the cosine schedule's floor must lie "
                                                       f"between 0 and lr={self.lr}")
        require(self.weight_decay >= 0, "weight_decay", f"{self.weight_decay}: must be 0 (off) or more")
        require(self.grad_clip >= 0, "grad_clip", f"{self.grad_clip}: must be 0 (no clipping) or more")
        mb = self.micro_batch
        require(mb is None or (mb >= 1 and self.global_batch % mb == 0), "micro_batch",
                f"{mb} must divide global_batch={self.global_batch}")
        require(not (self.offload_optimizer and self.zero_stage == 0), "offload_optimizer",
                "optimizer offload needs zero_stage 1, 2 or 3")
        require(not (self.compile and self.zero_stage == 3), "compile",
                "torch.compile needs zero_stage 0, 1 or 2 (ZeRO-3 gathers each submodule's "
                "parameters in hooks that break the compiled graph); lower zero_stage or set "
                "compile=false")
        require_in(self.ema, 0.0, 1.0, "ema", "[)")
        require_in(self.warmup_frac, 0.0, 1.0, "warmup_frac", "[)")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                f"expected two numbers in [0, 1) (AdamW's moment decays, e.g. [0.9, 0.999]), got {self.betas}")
        require(self.patience is None or (self.patience >= 1 and self.select_best), "patience",
                f"{self.patience}: early stopping needs select_best=true and patience >= 1 validations "
                f"(or null: train every step)")
        grid = self.lr_grid
        require(grid is None or (bool(grid) and min(grid) > 0 and len(set(grid)) == len(grid)), "lr_grid",
                f"{grid}: a learning-rate grid needs distinct positive values, e.g. [3e-4, 1e-3, 3e-3] "
                f"(or null: train once at lr)")
        require(grid is None or self.select_best, "lr_grid",
                "picking a learning rate needs held-out validation: set select_best=true (with "
                "protocol.selection=holdout) or lr_grid=null")
        ls = self.label_smoothing
        require(not ls or (len(ls) == 2 and min(ls) > 0), "label_smoothing",
                "expected [] (off) or two positive Beta parameters [a, b]")


def _stage(**kw: Any) -> Any:
    return field(default_factory=lambda: TrainConfig(**kw))


# The stages whose recipe has a compiled training step (Recipe.compile): the masked-diffusion ones.
COMPILED_STAGES = ("denoiser", "ar2diff", "vanilla", "finetune", "finetune_small", "scratch_head")


@dataclass
class StagesConfig:
    """One ``train.<stage>`` section per row of the stage table (gtl_dist/stages.py), with that
    stage's defaults where they differ from TrainConfig's."""
    denoiser: TrainConfig = _stage(steps=50_000, ema=0.9999)
    ar_pretrain: TrainConfig = _stage(steps=50_000)
    ar2diff: TrainConfig = _stage(steps=10_000, ema=0.9999)
    planner: TrainConfig = _stage(steps=10_000, val_every=500, select_best=True)
    edit_ratio: TrainConfig = _stage(steps=10_000, val_every=500, select_best=True)
    # Weight decay pulls the adapter toward zero, i.e. toward the source (docs/method.md §5a).
    adapter: TrainConfig = _stage(steps=10_000, val_every=500, select_best=True, weight_decay=1.0)
    classifier_ti: TrainConfig = _stage(steps=5_000, val_every=1000, select_best=True)
    classifier_td: TrainConfig = _stage(steps=5_000, val_every=1000, select_best=True)
    ratio: TrainConfig = _stage(steps=30_000, val_every=1000, select_best=True)
    vanilla: TrainConfig = _stage(steps=50_000, ema=0.9999, select_best=True)
    finetune: TrainConfig = _stage(steps=10_000, ema=0.9999, select_best=True)
    finetune_small: TrainConfig = _stage(steps=10_000, ema=0.9999, select_best=True)
    scratch_head: TrainConfig = _stage(steps=50_000, ema=0.9999, select_best=True)
    counts: TrainConfig = _stage(steps=1, select_best=True)
    counts_source: TrainConfig = _stage(steps=1, select_best=True)
    reference_lm: TrainConfig = _stage(steps=5_000, val_every=500, select_best=True, num_workers=0)
    domain_classifier: TrainConfig = _stage(steps=5_000, val_every=1000, select_best=True, num_workers=0)

    def check(self) -> None:
        """Only the stages of COMPILED_STAGES have a compiled training step."""
        for f in dataclasses.fields(self):
            require(f.name in COMPILED_STAGES or not getattr(self, f.name).compile, f"{f.name}.compile",
                    f"stage {f.name} has no compiled training step (only {', '.join(COMPILED_STAGES)} "
                    f"have); set train.{f.name}.compile=false")


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
    ``budget`` it trains on all n_T for a fixed number of steps and keeps the final (or EMA)
    weights, as the paper's baselines do. The targets' test sets serve the final evaluation only.
    """
    selection: str = "holdout"
    """holdout | budget: a plain string, so that its check can say why "test" is refused."""
    holdout_fraction: float = 0.2
    holdout_min: int = 2
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
                    check_holdout(n, self.protocol, f"fraction {f} (n_T = {n})")
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
        d = self.to_dict()
        for key in BUILD_ONLY_KEYS + EXECUTION_ONLY_KEYS:
            _drop_path(d, key.split("."))
        return dict_hash({p: _get_path(d, p.split(".")) for p in paths})

    def data_hash(self) -> str:
        """What the shards hold: the hash every manifest, loader cursor and checkpoint checks."""
        return self.section_hash("data", "tokenizer", "shards")


def _get_path(d: Any, keys: list[str]) -> Any:
    for k in keys:
        d = d[k]
    return d


def _drop_path(d: dict[str, Any], keys: list[str]) -> None:
    """Remove the dotted path ``keys`` from ``d``; a "*" part stands for every entry there."""
    head, *rest = keys
    if not rest:
        d.pop(head)
        return
    for sub in (d.values() if head == "*" else [d[head]]):
        _drop_path(sub, rest)


def execution_only(key: str) -> bool:
    """Whether the dotted ``key`` is one of EXECUTION_ONLY_KEYS."""
    parts = key.split(".")
    return any(len(parts) == len(pattern) and all(p in ("*", k) for k, p in zip(parts, pattern))
               for pattern in (k.split(".") for k in EXECUTION_ONLY_KEYS))


# ----------------------------------------------------------------------------------------------
# Building a dataclass from plain data, with errors that name the file and the key
# ----------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it; raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of "
                          f"{', '.join(_type_name(a) for a in inner)}")
    if origin is Literal:  # a choice: the value must be one of the options, of the same type
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = args
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = args
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        # YAML 1.1 reads "3e-4" (no dot) as a string: accept numeric strings for float fields.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # nan, inf: no setting means either
            raise ConfigError(f"{where}: {value!r} is not a finite number; give a plain number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            prefix = f"{where}." if where else ""
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}; valid keys here: {', '.join(names)}")
        factory = fields[key].default_factory
        if isinstance(value, dict) and factory is not dataclasses.MISSING:
            default = factory()
            # A section overlays its own defaults: `train.vanilla: {steps: 20}` keeps vanilla's
            # EMA and best-checkpoint selection, `models.ratio: {blocks: 2}` keeps hidden 96.
            if dataclasses.is_dataclass(default):
                value = _merge(dataclasses.asdict(default), value)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def example_override() -> str:
    """A ``--set`` for error hints, read off the default config so it always names a real key: the
    first setting of the models section with its default (``models.denoiser.hidden=512``)."""
    keys, node = ["models"], RunConfig().models
    while dataclasses.is_dataclass(node):
        keys.append(dataclasses.fields(node)[0].name)
        node = getattr(node, keys[-1])
    return f"{'.'.join(keys)}={node}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.denoiser.steps=10"`` -> (["train", "denoiser", "steps"], 10). Values are YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set {example_override()}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must be a dotted path of config sections and a "
                          f"setting, e.g. --set {example_override()}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for k in reversed(keys):
        out = {k: out}
    return out


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _known_only(cls: type, data: dict[str, Any], where: str, dropped: list[str]) -> dict[str, Any]:
    """``data`` without the keys ``cls`` does not have (recursively); their paths go to ``dropped``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            dropped.append(path)
            continue
        kind = hints[key]
        if isinstance(value, dict) and dataclasses.is_dataclass(kind):
            value = _known_only(kind, value, path, dropped)
        out[key] = value
    return out


def config_from_dict(data: dict[str, Any], source: str = "<dict>", strict: bool = True) -> RunConfig:
    """Build and validate a config from a mapping. ``strict=False`` is for configs this package
    wrote earlier (export metadata, a run directory's config.yaml): keys a later version removed
    are dropped with a warning instead of refused, so old models and runs stay readable."""
    if not strict:
        dropped: list[str] = []
        data = _known_only(RunConfig, data, "", dropped)
        if dropped:
            log.warning("%s: ignoring key(s) this version of gtl_dist no longer has: %s",
                        source, ", ".join(dropped))
    try:
        cfg = _build(RunConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    validate(cfg, source)
    return cfg


def load_config(paths: list[str | Path] | str | Path = (), overrides: list[str] = ()) -> RunConfig:
    """Load YAML files in order (later wins), apply ``key=value`` overrides, validate.

    Each file is checked on its own first, so an unknown key is reported against the file
    that contains it; overrides are reported as ``--set``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    merged: dict[str, Any] = {}
    sources = []
    for p in paths:
        p = Path(p)
        data = _load_yaml(p)
        try:
            _build(RunConfig, data, "")  # validates keys and types against this file alone
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        merged = _merge(merged, data)
        sources.append(str(p))
    for text in overrides:
        keys, value = parse_override(text)
        over = _nest(keys, value)
        try:
            _build(RunConfig, _merge(merged, over), "")
        except ConfigError as exc:
            raise ConfigError(f"--set {text}: {exc}") from None
        merged = _merge(merged, over)
    return config_from_dict(merged, " + ".join(sources + ["--set"] * bool(overrides)) or "<defaults>")


def validate(cfg: RunConfig, source: str = "<config>") -> None:
    """Every section's ``check``, innermost first, then the config's own; a broken rule is
    reported as ``<source>: <section.key>: <what is wrong and the fix>``."""
    try:
        check_section(cfg, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def check_section(section: Any, where: str) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            check_section(value, f"{where}{f.name}.")
    if hasattr(section, "check"):
        try:
            section.check()
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None


def holdout_count(n_target: int, protocol: ProtocolConfig) -> int:
    """How many of a method's n_T target sequences it holds out for selection (0 under budget)."""
    if protocol.selection != "holdout":
        return 0
    return max(protocol.holdout_min, round(protocol.holdout_fraction * n_target))


def replicate_start(n_total: int, n_target: int, replicate: int, protocol: ProtocolConfig) -> int:
    """The first of replicate ``replicate``'s n_T samples in a target training set of ``n_total``
    (the rest follow it, wrapping at the end): block ``replicate`` under ``redraw``, the shared
    prefix under ``shared`` (protocol.replicates)."""
    return (replicate * n_target) % n_total if protocol.replicates == "redraw" else 0


def replicates_disjoint(n_total: int, n_target: int, replicates: list[int], protocol: ProtocolConfig) -> bool:
    """Whether the replicates' draws of n_T samples share no sample (always true of one replicate)."""
    if len(replicates) < 2:
        return True
    return protocol.replicates == "redraw" and (max(replicates) + 1) * n_target <= n_total


def check_holdout(n_target: int, protocol: ProtocolConfig, where: str) -> tuple[int, int]:
    """(training, held-out) sequence counts of one target fraction, or a ConfigError that says
    why the protocol cannot work there and what to change."""
    held = holdout_count(n_target, protocol)
    if protocol.selection == "holdout" and n_target - held < 1:
        raise ConfigError(
            f"protocol.holdout_fraction={protocol.holdout_fraction} with protocol.holdout_min="
            f"{protocol.holdout_min} holds out {held} of the {n_target} target sequences of {where} "
            f"and leaves none to train on; lower protocol.holdout_min, use a larger fraction, or "
            f"set protocol.selection=budget (fixed training budget, no selection)")
    return n_target - held, held
