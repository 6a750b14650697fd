"""The schema of what a run builds and trains: data, tokenizer, shards, models and training stages.

Each section's fields carry the rules on them in its ``check`` (run on the merged config, so
layered files may be incomplete on their own)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from gtl_dist.config.choices import (DEFAULT_LABEL_SMOOTHING, AdapterThrough, Attention, Corpus, Precision,
                                     TokenizerModel, ZeroStage)
from gtl_dist.config.rules import require, require_at_least, require_in

_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


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
    last hidden state (per position and, with ``attention``, through attention heads across
    positions), turned into token scores by the source's own output projection (``output``) or
    by a map to |V| of its own (``direct``)."""
    rank: int = 8
    through: AdapterThrough = "output"
    attention: bool = False
    """Add ``heads`` rank-``rank`` attention heads with rotary positions over the source's features, so
    that a position's edit can read the other positions: better where the source's features miss
    what the target needs (the paper's sticky pair), worse at a few dozen sequences where they
    carry it (the perturbed pairs; docs/method.md §5a)."""
    heads: int = 1
    """How many rank-``rank`` attention heads (with ``attention``): each adds 4·H·rank parameters
    and can read other positions than the rest (a neighbour on each side, say)."""
    offset: bool = False
    """Add a per-token edit c_v shared by every position (|V| parameters, zero at the start): the
    shift of token frequencies between the domains. Through the output layer the edit W·δ lies in
    W's H-dimensional column space, which a frequency shift over |V| > H tokens need not."""

    def check(self) -> None:
        require_at_least(self, 1, "rank")
        require_at_least(self, 1, "heads")
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
    weight_decay_grid: Optional[list[float]] = None
    """Per-target stages: also train once per weight decay of this list, crossed with ``lr_grid``
    (each pair its own folder, lr-<value>-wd-<value>/), and keep the pair whose best held-out
    validation loss is lowest. Decay pulls the trained weights toward zero: for an adapter, whose
    zero output is the source itself, that is shrinkage toward the source, chosen per replicate on
    its own held-out data. None: every run at ``weight_decay``."""
    model_grid: Optional[list[dict[str, Any]]] = None
    """Per-target stages: also train once per entry, each a set of overrides of the stage's own
    model section (``models.adapter`` for the adapter stage, say ``{attention: true, heads: 4}``),
    crossed with ``lr_grid`` and ``weight_decay_grid`` (each its own folder, ...-m-<index>/), and
    keep the run whose best held-out validation loss is lowest: a capacity chosen per replicate on
    its own held-out data (docs/method.md §12). Each export carries its own model settings. None:
    the model section as it is."""
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

    def grid(self) -> list[tuple[float, Optional[float], Optional[int]]]:
        """The runs of this stage's search, one (learning rate, weight decay, model) per point of
        ``lr_grid`` x ``weight_decay_grid`` x ``model_grid`` (the decay None where it is not
        searched, the model an index of ``model_grid`` or None); [] when no grid is set: the
        stage trains once."""
        if not (self.lr_grid or self.weight_decay_grid or self.model_grid):
            return []
        return [(lr, wd, m) for lr in self.lr_grid or [self.lr] for wd in self.weight_decay_grid or [None]
                for m in (range(len(self.model_grid)) if self.model_grid else [None])]

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
                "protocol.selection=holdout or kfold) or lr_grid=null")
        decays = self.weight_decay_grid
        require(decays is None or (bool(decays) and min(decays) >= 0 and len(set(decays)) == len(decays)),
                "weight_decay_grid", f"{decays}: a weight-decay grid needs distinct values of 0 or more, "
                                     f"e.g. [1, 3, 10] (or null: train at weight_decay)")
        require(decays is None or self.select_best, "weight_decay_grid",
                "picking a weight decay needs held-out validation: set select_best=true (with "
                "protocol.selection=holdout or kfold) or weight_decay_grid=null")
        models = self.model_grid
        require(models is None or (bool(models) and all(isinstance(m, dict) for m in models)), "model_grid",
                f"{models}: a model grid is a list of mappings of model settings, e.g. "
                f"[{{attention: false}}, {{attention: true, heads: 4}}] (or null)")
        require(models is None or self.select_best, "model_grid",
                "picking a model needs held-out validation: set select_best=true (with "
                "protocol.selection=holdout or kfold) or model_grid=null")
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
