"""Typed run configuration: YAML files -> dataclasses, ``--set key=value`` overrides, hashing.

A run is described by one :class:`RunConfig`. It is built from one or more YAML files (later
files override earlier ones) and ``key.path=value`` overrides, and validated as it is built:
unknown keys are rejected naming the key and the file, values are type-checked, and cross-field
rules (fractions in (0, 1], ZeRO stage in 0..3, ...) are checked in one place.

Defaults are the paper's text settings (docs/method.md); the presets in ``configs/`` shrink them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from gtl_dist.io import dict_hash
from gtl_dist.log import get_logger
from gtl_dist.stages import STAGES

log = get_logger(__name__)

CORPORA = ("markov", "demo", "arxiv", "jsonl", "txt")
SAMPLERS = ("planner", "ancestral", "exact")
# gtl: the default recipe (edit-ratio network, docs/method.md §5); gtl_paper: the paper's
# (domain classifiers -> sequence-level ratio network); then the unguided models.
METHODS = ("gtl", "gtl_paper", "source", "vanilla", "finetune")
# Model selection of per-target stages (docs/method.md §12): on a held-out part of the method's own
# n_T target sequences, or a fixed budget with no selection.
SELECTIONS = ("holdout", "budget")


_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


# Settings that change how shards are built or where they go, but not a byte of what they hold
# (the build is independent of its worker count): excluded from every hash.
BUILD_ONLY_KEYS = ("shards.build_workers", "shards.dir")


class ConfigError(ValueError):
    """A configuration problem, with the file and key it comes from."""


# ----------------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------------

@dataclass
class MarkovConfig:
    """Synthetic Markov chains (docs/method.md §10): token ids are the chain states, [MASK] = num_states."""
    num_states: int = 5
    length: int = 20
    source_diagonal: float = 0.10
    # One entry per target domain: name -> diagonal (off-diagonal mass is spread uniformly).
    target_diagonals: dict[str, float] = field(default_factory=lambda: {"sticky": 0.80})
    # Full matrices override the diagonals when given (rows must sum to 1).
    source_matrix: Optional[list[list[float]]] = None
    target_matrices: Optional[dict[str, list[list[float]]]] = None
    # Random chains: every row drawn from a symmetric Dirichlet with this concentration (small:
    # peaked rows, large: near-uniform rows), from dirichlet_seed and the chain's name. A full
    # matrix wins over Dirichlet rows, which win over a diagonal.
    source_dirichlet: Optional[float] = None
    target_dirichlet: Optional[dict[str, float]] = None
    dirichlet_seed: int = 0
    num_source: int = 10_000
    num_target: int = 1_000
    num_test: int = 5_000  # held-out sequences per domain


@dataclass
class DataConfig:
    corpus: str = "markov"
    # File or folder for arxiv / jsonl / txt corpora; unused for markov and demo.
    path: Optional[str] = None
    source_domains: list[str] = field(default_factory=lambda: ["cs", "math"])
    target_domains: list[str] = field(default_factory=lambda: ["physics"])
    test_fraction: float = 0.1
    split_seed: int = 42
    # Fractions of each target's training set; nested subsets (1% ⊂ 5% ⊂ 30% ⊂ 100%).
    target_fractions: list[float] = field(default_factory=lambda: [1.0, 0.3, 0.05, 0.01])
    # Overlap knob r (docs/method.md §8): this fraction of each target's training data moves to the source.
    overlap: float = 0.0
    # Cap on documents read per domain (None: all). Useful for quick looks at big corpora.
    max_docs_per_domain: Optional[int] = None
    markov: MarkovConfig = field(default_factory=MarkovConfig)


@dataclass
class TokenizerConfig:
    vocab_size: int = 8000
    model_type: str = "unigram"  # unigram | bpe
    character_coverage: float = 0.9995
    # SentencePiece samples at most this many sentences from the source training text.
    max_sentences: int = 1_000_000
    num_threads: int = 2


@dataclass
class ShardConfig:
    seq_len: int = 512
    samples_per_shard: int = 1000
    # Parallel build processes (one input slice each).
    build_workers: int = 2
    # Where shards go; default <run_dir>/data. Relative paths are taken from the run directory.
    dir: Optional[str] = None
    # Text sets are cut into build units of whole documents holding about this many characters;
    # each unit is packed and written on its own (its last partial chunk is dropped, its last shard
    # may be short), which makes the shards independent of how many build workers ran.
    unit_chars: int = 8_000_000


@dataclass
class ModelConfig:
    """A DiT backbone (docs/method.md §2): adaLN-zero blocks, rotary positions, SDPA attention."""
    hidden: int = 512
    blocks: int = 8
    heads: int = 8
    cond_dim: int = 128
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    attention: str = "bidirectional"  # bidirectional | causal
    time_conditioning: bool = False


def _ratio_sized() -> ModelConfig:
    return ModelConfig(hidden=96, blocks=8, heads=8, cond_dim=48)


@dataclass
class ModelsConfig:
    denoiser: ModelConfig = field(default_factory=ModelConfig)
    classifier: ModelConfig = field(default_factory=_ratio_sized)
    ratio: ModelConfig = field(default_factory=_ratio_sized)
    edit_ratio: ModelConfig = field(default_factory=_ratio_sized)
    planner: ModelConfig = field(default_factory=_ratio_sized)
    # Causal LM the evaluation trains on held-out target text to score generative perplexity.
    reference_lm: ModelConfig = field(default_factory=lambda: ModelConfig(
        hidden=256, blocks=4, heads=4, cond_dim=64, attention="causal"))


@dataclass
class TrainConfig:
    """One stage's optimisation and bookkeeping (AdamW, cosine with warm-up, docs/method.md)."""
    steps: int = 1000
    global_batch: int = 128
    # Per-rank micro-batch; None = global_batch / world_size (no accumulation).
    micro_batch: Optional[int] = None
    lr: float = 3e-4
    min_lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    ema: float = 0.0  # EMA decay of the weights (0 = off)
    zero_stage: int = 0
    offload_optimizer: bool = False
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    val_every: int = 500
    val_batches: int = 8
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    select_best: bool = False  # keep the checkpoint with the best validation loss for export
    num_workers: int = 1  # DataLoader workers per rank
    # Stage-specific knobs.
    eta_cycle: float = 0.1  # ratio: weight of the cycle loss (η₁)
    balanced: bool = True  # classifiers: half source, half target per batch
    label_smoothing: list[float] = field(default_factory=lambda: [1.7, 15.3])  # Beta(a, b); [] = off


def _stage(**kw: Any) -> Any:
    return field(default_factory=lambda: TrainConfig(**kw))


# One train.<stage> section per row of the stage table (gtl_dist/stages.py), with that stage's
# defaults (its row's ``train``).
StagesConfig = dataclasses.make_dataclass(
    "StagesConfig", [(name, TrainConfig, _stage(**spec.train)) for name, spec in STAGES.items()])
StagesConfig.__module__ = __name__


@dataclass
class NoiseConfig:
    schedule: str = "loglinear"  # loglinear | geometric
    eps: float = 1e-3  # loglinear: 1 - alpha_t = (1 - eps) t
    sigma_min: float = 1e-4  # geometric
    sigma_max: float = 20.0  # geometric
    t_min: float = 1e-3  # t ~ U[t_min, 1]
    antithetic: bool = True


@dataclass
class SampleConfig:
    methods: list[str] = field(default_factory=lambda: ["gtl", "source", "vanilla", "finetune"])
    sampler: str = "planner"  # GTL sampler: planner | ancestral | exact
    num_samples: int = 1024
    batch_size: int = 32
    shards: int = 4  # sample shards per (method, target, fraction): array tasks
    # Guidance strength of gtl: its edit-ratio network is fitted to the target's own likelihood,
    # so 1 is the exact guided kernel (docs/method.md §3, §5).
    gamma: float = 1.0
    # Guidance strength of gtl_paper: its regressed ratio is shrunk, so the paper uses 2
    # (synthetic) to 5 (text).
    paper_gamma: float = 5.0
    n_ratio: int = 512
    top_k: int = 8
    steps: int = 128  # ancestral samplers (unguided too)
    t_end: float = 1e-5
    planner_temperature: float = 0.5
    planner_mode: str = "sample"  # sample | argmax | uniform
    seed: int = 1234
    # Edited sequences scored per ratio-net pass (n_ratio candidates × positions, chunked).
    ratio_batch_size: int = 4096
    # Ancestral samplers: reset P(stay masked) to the unguided value after guidance (docs/method.md §7).
    # Off only to show the all-mask collapse it prevents.
    stabilise: bool = True


@dataclass
class EvalConfig:
    mauve_seeds: int = 5
    # auto: the mauve-text package's quantiser if installed, else ours | tfidf | mauve-text
    mauve_featurizer: str = "auto"
    mauve_scaling: float = 5.0  # the constant c of MAUVE's divergence frontier
    mauve_length_bins: int = 8  # quantile bins of generated lengths for length-matched references
    mauve_num_buckets: int = 0  # k-means clusters; 0 = one per ten samples (the reference's rule)
    mauve_max_features: int = 8192  # TF-IDF vocabulary cap (word uni/bi-grams by document frequency)
    mauve_explained_variance: float = 0.9  # PCA components kept before k-means
    diversity_max_n: int = 3  # distinct-1..n
    repetition_n: int = 4  # n-gram order of the within-sample repetition rate
    batch_size: int = 16  # sequences per classifier / reference-LM call
    overlap_warn_accuracy: float = 0.99
    # Markov runs with a GTL method: add the oracle ladder and the calibration diagnostics
    # (docs/method.md §12) to the report; they sample with exact networks (minutes on a CPU).
    ladder: bool = True


@dataclass
class ProtocolConfig:
    """Where the per-target stages' validation data come from (docs/method.md §12).

    A method given n_T target sequences uses no other target data: with ``holdout`` its early
    stopping and checkpoint selection see only a held-out part of those n_T (the last
    max(holdout_min, round(holdout_fraction * n_T)) of them; it trains on the rest); with
    ``budget`` it trains on all n_T for a fixed number of steps and keeps the final (or EMA)
    weights, as the paper's baselines do. The targets' test sets serve the final evaluation only.
    """
    selection: str = "holdout"  # holdout | budget
    holdout_fraction: float = 0.2
    holdout_min: int = 2
    # Each validation pass scores every held-out sequence this many times, masked afresh each
    # time: a few sequences give a usable signal only over many masked views.
    holdout_views: int = 16


@dataclass
class PipelineConfig:
    planner_scope: str = "shared"  # shared (source-only, docs/method.md §6) | per_target
    # Build the source denoiser through AR pretraining + AR2Diff instead of training it directly.
    ar2diff: bool = False
    # Replicates of every per-target stage and every sample set (mean ± std in the report). The
    # data and the source stages are shared; seed 0 keeps the plain paths, seed s > 0 adds seed-s/.
    seeds: list[int] = field(default_factory=lambda: [0])


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
    setup: list[str] = field(default_factory=list)  # extra shell lines in every sbatch script


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
        if self.data.corpus == "markov":
            m = self.data.markov
            return list(m.target_matrices or m.target_dirichlet or m.target_diagonals)
        return list(self.data.target_domains)

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
        say how the data is built, not what it holds (BUILD_ONLY_KEYS), never count.
        """
        d = self.to_dict()
        for key in BUILD_ONLY_KEYS:
            section, name = key.split(".")
            d[section].pop(name)
        return dict_hash({p: _get_path(d, p.split(".")) for p in paths})

    def data_hash(self) -> str:
        """What the shards hold: the hash every manifest, loader cursor and checkpoint checks."""
        return self.section_hash("data", "tokenizer", "shards")


def _get_path(d: Any, keys: list[str]) -> Any:
    for k in keys:
        d = d[k]
    return d


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
        if f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        # YAML 1.1 reads "3e-4" (no dot) as a string: accept numeric strings for float fields.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
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
    """Cross-field checks. Messages name the key and the fix."""
    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: {key}: {msg}")

    d = cfg.data
    if d.corpus not in CORPORA:
        bad("data.corpus", f"'{d.corpus}' is not one of {', '.join(CORPORA)}")
    if d.corpus in ("arxiv", "jsonl", "txt") and not d.path:
        bad("data.path", f"corpus '{d.corpus}' reads a file or folder; set data.path "
                         f"(e.g. --set data.path=/data/arxiv-metadata-oai-snapshot.json)")
    if not d.target_fractions:
        bad("data.target_fractions", "needs at least one fraction, e.g. [1.0]")
    for f in d.target_fractions:
        if not 0.0 < f <= 1.0:
            bad("data.target_fractions", f"{f} is outside (0, 1]")
    if len(set(d.target_fractions)) != len(d.target_fractions):
        bad("data.target_fractions", f"{d.target_fractions} has duplicates")
    if not 0.0 <= d.overlap < 1.0:
        bad("data.overlap", f"{d.overlap} is outside [0, 1)")
    if not 0.0 < d.test_fraction < 1.0:
        bad("data.test_fraction", f"{d.test_fraction} is outside (0, 1)")
    if d.corpus != "markov":
        if not d.source_domains:
            bad("data.source_domains", "needs at least one source domain")
        if not d.target_domains:
            bad("data.target_domains", "needs at least one target domain")
        both = set(d.source_domains) & set(d.target_domains)
        if both:
            bad("data.target_domains", f"{sorted(both)} are also source domains; use data.overlap "
                                       f"to mix target data into the source")
    m = d.markov
    if m.num_states < 2:
        bad("data.markov.num_states", "needs at least 2 states")
    if m.length < 2:
        bad("data.markov.length", "needs at least 2 tokens")
    if d.corpus == "markov" and not (m.target_matrices or m.target_dirichlet or m.target_diagonals):
        bad("data.markov.target_diagonals", "needs at least one target chain")
    if m.target_matrices and m.target_dirichlet:
        bad("data.markov.target_dirichlet", "the targets are given twice (also by "
                                            "data.markov.target_matrices); keep one of the two")
    for name, conc in [("source_dirichlet", m.source_dirichlet)] + [
            (f"target_dirichlet.{k}", v) for k, v in (m.target_dirichlet or {}).items()]:
        if conc is not None and not conc > 0:
            bad(f"data.markov.{name}", f"{conc}: a Dirichlet concentration must be > 0 (e.g. 1.0 "
                                       f"for rows drawn uniformly from the simplex)")
    for key in ("num_source", "num_target", "num_test"):
        if getattr(m, key) < 1:
            bad(f"data.markov.{key}", "must be at least 1")
    for name, diag in [("source_diagonal", m.source_diagonal)] + [
            (f"target_diagonals.{k}", v) for k, v in m.target_diagonals.items()]:
        if not 0.0 <= diag <= 1.0:
            bad(f"data.markov.{name}", f"{diag} is outside [0, 1]")
    matrices = [("source_matrix", m.source_matrix)] + [
        (f"target_matrices.{k}", v) for k, v in (m.target_matrices or {}).items()]
    for name, mat in matrices:
        if mat is None:
            continue
        if len(mat) != m.num_states or any(len(row) != m.num_states for row in mat):
            bad(f"data.markov.{name}", f"expected a {m.num_states}x{m.num_states} matrix "
                                      f"(data.markov.num_states={m.num_states})")
        for i, row in enumerate(mat):
            if min(row) < 0 or abs(sum(row) - 1.0) > 1e-6:
                bad(f"data.markov.{name}", f"row {i} = {row} must be non-negative and sum to 1")
    # Set and domain names become file names and WebDataset keys (where a '.' would split the key).
    if d.corpus == "markov":
        target_key = ("data.markov.target_matrices" if m.target_matrices else
                      "data.markov.target_dirichlet" if m.target_dirichlet else "data.markov.target_diagonals")
        named = {target_key: cfg.targets}
    else:
        named = {"data.source_domains": d.source_domains, "data.target_domains": d.target_domains}
    for key, names in named.items():
        for name in names:
            if not _DOMAIN_NAME.fullmatch(name):
                bad(key, f"'{name}' is not a valid domain name (letters, digits, '_' and '-', no dots)")
    target_key = list(named)[-1]
    if "source" in cfg.targets:
        bad(target_key, "'source' is reserved for the source set; rename that target")

    t = cfg.tokenizer
    if t.model_type not in ("unigram", "bpe"):
        bad("tokenizer.model_type", f"'{t.model_type}' is not unigram or bpe")
    if t.vocab_size < 16:
        bad("tokenizer.vocab_size", f"{t.vocab_size} is too small (at least 16)")
    if cfg.shards.seq_len < 2:
        bad("shards.seq_len", "must be at least 2")
    if cfg.shards.samples_per_shard < 1:
        bad("shards.samples_per_shard", "must be at least 1")
    if cfg.shards.build_workers < 1:
        bad("shards.build_workers", "must be at least 1")
    if cfg.shards.unit_chars < 1:
        bad("shards.unit_chars", "must be at least 1")

    for role in ("denoiser", "classifier", "ratio", "edit_ratio", "planner", "reference_lm"):
        mc: ModelConfig = getattr(cfg.models, role)
        key = f"models.{role}"
        if mc.hidden % mc.heads:
            bad(f"{key}.hidden", f"{mc.hidden} is not divisible by heads={mc.heads}")
        if (mc.hidden // mc.heads) % 2:
            bad(f"{key}.hidden", f"head size {mc.hidden // mc.heads} must be even for rotary positions")
        if mc.attention not in ("bidirectional", "causal"):
            bad(f"{key}.attention", f"'{mc.attention}' is not bidirectional or causal")
        if not 0.0 <= mc.dropout < 1.0:
            bad(f"{key}.dropout", f"{mc.dropout} is outside [0, 1)")

    n = cfg.noise
    if n.schedule not in ("loglinear", "geometric"):
        bad("noise.schedule", f"'{n.schedule}' is not loglinear or geometric")
    if not 0.0 < n.t_min < 1.0:
        bad("noise.t_min", f"{n.t_min} is outside (0, 1)")

    for stage in STAGES:
        tc: TrainConfig = getattr(cfg.train, stage)
        key = f"train.{stage}"
        if tc.steps < 1:
            bad(f"{key}.steps", "must be at least 1")
        if tc.global_batch < 1:
            bad(f"{key}.global_batch", "must be at least 1")
        if tc.micro_batch is not None and (tc.micro_batch < 1 or tc.global_batch % tc.micro_batch):
            bad(f"{key}.micro_batch", f"{tc.micro_batch} must divide global_batch={tc.global_batch}")
        if tc.zero_stage not in (0, 1, 2, 3):
            bad(f"{key}.zero_stage", f"{tc.zero_stage} is not 0, 1, 2 or 3")
        if tc.offload_optimizer and tc.zero_stage == 0:
            bad(f"{key}.offload_optimizer", "optimizer offload needs zero_stage 1, 2 or 3")
        if tc.precision not in ("auto", "fp32", "bf16"):
            bad(f"{key}.precision", f"'{tc.precision}' is not auto, fp32 or bf16")
        if not 0.0 <= tc.ema < 1.0:
            bad(f"{key}.ema", f"{tc.ema} is outside [0, 1)")
        if not 0.0 <= tc.warmup_frac < 1.0:
            bad(f"{key}.warmup_frac", f"{tc.warmup_frac} is outside [0, 1)")
        if len(tc.betas) != 2:
            bad(f"{key}.betas", f"expected two numbers, got {tc.betas}")
        if tc.label_smoothing and (len(tc.label_smoothing) != 2 or min(tc.label_smoothing) <= 0):
            bad(f"{key}.label_smoothing", "expected [] (off) or two positive Beta parameters [a, b]")
        for k in ("val_every", "save_every", "log_every", "keep_last"):
            if getattr(tc, k) < 1:
                bad(f"{key}.{k}", "must be at least 1")
        if tc.num_workers < 0:
            bad(f"{key}.num_workers", "must be >= 0")

    s = cfg.sample
    for mth in s.methods:
        if mth not in METHODS:
            bad("sample.methods", f"'{mth}' is not one of {', '.join(METHODS)}")
    if s.sampler not in SAMPLERS:
        bad("sample.sampler", f"'{s.sampler}' is not one of {', '.join(SAMPLERS)}")
    for key in ("gamma", "paper_gamma"):
        if getattr(s, key) < 0:
            bad(f"sample.{key}", f"{getattr(s, key)} < 0; guidance strength must be >= 0 (0 = unguided)")
    if s.n_ratio < 1:
        bad("sample.n_ratio", "must be at least 1")
    if s.top_k < 1:
        bad("sample.top_k", "must be at least 1")
    if s.planner_mode not in ("sample", "argmax", "uniform"):
        bad("sample.planner_mode", f"'{s.planner_mode}' is not sample, argmax or uniform")
    if s.planner_temperature <= 0:
        bad("sample.planner_temperature", "must be > 0")
    if s.ratio_batch_size < 1:
        bad("sample.ratio_batch_size", "must be at least 1")
    if not 0.0 < s.t_end < 1.0:
        bad("sample.t_end", f"{s.t_end} is outside (0, 1)")
    if s.num_samples < 1 or s.batch_size < 1 or s.shards < 1 or s.steps < 1:
        bad("sample", "num_samples, batch_size, shards and steps must all be at least 1")
    validate_protocol(cfg, bad)
    seeds = cfg.pipeline.seeds
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        bad("pipeline.seeds", f"{seeds}: need distinct non-negative integers, e.g. [0] or [0, 1, 2]")
    if cfg.pipeline.planner_scope not in ("shared", "per_target"):
        bad("pipeline.planner_scope", f"'{cfg.pipeline.planner_scope}' is not shared or per_target")
    ev = cfg.eval
    if ev.mauve_featurizer not in ("auto", "tfidf", "mauve-text"):
        bad("eval.mauve_featurizer", f"'{ev.mauve_featurizer}' is not auto, tfidf or mauve-text")
    if ev.mauve_seeds < 1:
        bad("eval.mauve_seeds", "must be at least 1")
    if ev.mauve_scaling <= 0:
        bad("eval.mauve_scaling", f"{ev.mauve_scaling} must be > 0 (the paper uses 5)")
    if ev.mauve_num_buckets < 0 or ev.mauve_num_buckets == 1:
        bad("eval.mauve_num_buckets", f"{ev.mauve_num_buckets}: use 0 (automatic) or at least 2")
    if not 0.0 < ev.mauve_explained_variance <= 1.0:
        bad("eval.mauve_explained_variance", f"{ev.mauve_explained_variance} is outside (0, 1]")
    for key in ("mauve_length_bins", "mauve_max_features", "diversity_max_n", "repetition_n",
                "batch_size"):
        if getattr(ev, key) < 1:
            bad(f"eval.{key}", "must be at least 1")


def holdout_count(n_target: int, protocol: ProtocolConfig) -> int:
    """How many of a method's n_T target sequences it holds out for selection (0 under budget)."""
    if protocol.selection != "holdout":
        return 0
    return max(protocol.holdout_min, round(protocol.holdout_fraction * n_target))


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


def validate_protocol(cfg: RunConfig, bad: Any) -> None:
    p = cfg.protocol
    if p.selection in ("test", "eval", "evaluation"):
        bad("protocol.selection", f"'{p.selection}' would select checkpoints on the targets' test "
                                  f"sets, which serve the final evaluation only (a method given n_T "
                                  f"sequences may use no other target data); use holdout or budget")
    if p.selection not in SELECTIONS:
        bad("protocol.selection", f"'{p.selection}' is not one of {', '.join(SELECTIONS)}")
    if not 0.0 < p.holdout_fraction < 1.0:
        bad("protocol.holdout_fraction", f"{p.holdout_fraction} is outside (0, 1)")
    if p.holdout_min < 1:
        bad("protocol.holdout_min", f"{p.holdout_min}: holdout selection needs at least one "
                                    f"held-out sequence")
    if p.holdout_views < 1:
        bad("protocol.holdout_views", "must be at least 1")
    if cfg.data.corpus != "markov":
        return  # text: n_T is known once the data stage has run (checked there and at submit time)
    n_train = cfg.data.markov.num_target - round(cfg.data.overlap * cfg.data.markov.num_target)
    for f in cfg.data.target_fractions:
        n = round(f * n_train)
        if n < 1:
            continue  # a fraction with no target data at all: refused at submit time, with its fix
        try:
            check_holdout(n, p, f"fraction {f} (n_T = {n})")
        except ConfigError as exc:
            bad("protocol", str(exc))
