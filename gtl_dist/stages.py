"""The stage table, and the pipeline's tasks, their dependencies and input hashes.

Every training stage is one row of :data:`STAGES` (a :class:`StageSpec`): the network it trains,
how many copies a run trains (its scope), the config sections that are its inputs, the stages
whose exports it reads, its size on the cluster and its ``train.<stage>`` defaults. The rest of
the package reads the table: ``config`` builds the ``train`` section from it, ``train.jobs`` looks
up each stage's network, ``cluster.dag`` groups the tasks into jobs and ``launchers/submit.py``
lists the stages ``--stages`` accepts. Adding a stage is one row here plus one recipe class in
``gtl_dist/train/``, listed in ``RECIPES`` of ``gtl_dist/train/jobs.py`` (docs/architecture.md,
"Adding a stage").

:class:`StageGraph` turns one configuration into tasks: the tasks it runs (:attr:`StageGraph.plan`),
the tasks each one reads (:meth:`StageGraph.task_deps`) and each task's *input hash*: the config
sections the task reads and, recursively, the input hashes of the tasks it reads. Completion
markers, checkpoints and exports record that hash, so changing the denoiser's model size
invalidates fine-tuning, the planner and every sample drawn from them, while changing γ only
invalidates GTL samples and the report.

This module sits below ``gtl_dist.train``, ``gtl_dist.eval`` and ``gtl_dist.cluster``, which all
use it, and above ``gtl_dist.config`` and ``gtl_dist.methods``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, reduce
from typing import Optional

from gtl_dist.config import RunConfig
from gtl_dist.io import dict_hash
from gtl_dist.methods import METHODS, SOURCE
from gtl_dist.paths import RunPaths, grid_variant, task_name

# How many copies of a stage a run trains.
SHARED = "shared"              # one per run, on source data
PER_FRACTION = "per_fraction"  # one per (target, fraction, seed of pipeline.seeds)
PER_TARGET = "per_target"      # one per target, on no fraction of its training data

# How a group of tasks is sized on the cluster.
BIG = "big"        # spans --nodes nodes, one rank per GPU (or per node on CPU)
SMALL = "small"    # one task, at most one GPU: packed many to a node
DATA = "data"      # one task, CPU only, shards.build_workers processes
EVAL = "eval"      # one task, at most one GPU

# In a row's sets (StageSpec.train_sets, val_sets), besides the shards' own set names
# ("source/train", "source/test"; "{target}/test" for the task's target): the target's training
# sequences at the task's fraction less the held-out part, and that held-out part (docs/method.md §12).
# "{target}/evaluator" and "source/evaluator" are the evaluator split, which only the evaluation's
# own models read (data.evaluator_fraction).
TARGET_TRAIN = "{target}/train"
HELD_OUT = "<held-out>"
# What a per-target run of a source-trained stage (scope_key) reads instead of each source set.
PER_TARGET_SETS = {"source/train": TARGET_TRAIN, "source/test": HELD_OUT}


@dataclass(frozen=True)
class StageSpec:
    """One training stage."""
    name: str
    # The network it trains: a role of gtl_dist.models.build_model.
    role: str
    # SHARED, PER_FRACTION or PER_TARGET.
    scope: str
    # The config sections (dotted paths) that are its inputs: changing one retrains it. What it
    # reads of its upstream stages' sections is covered by their input hashes.
    sections: tuple[str, ...]
    # What it reads: "data" (the shards), SOURCE, or stages of earlier rows. The task it reads of
    # a stage is the one for the same (target, fraction, seed), as far as that stage's scope has them.
    deps: tuple[str, ...]
    # BIG or SMALL.
    size: str
    # The sets it trains and validates on, loader name -> set (shard set names, TARGET_TRAIN,
    # HELD_OUT). Validation on HELD_OUT is skipped when the protocol holds nothing out.
    train_sets: dict[str, str] = field(default_factory=dict)
    val_sets: dict[str, str] = field(default_factory=dict)
    # The export it starts from (SOURCE or a stage of its deps), or None: fresh weights.
    init: Optional[str] = None
    # A config key that, set to "per_target", makes a SHARED stage PER_FRACTION; it then reads
    # the target's sets in place of the source's (PER_TARGET_SETS).
    scope_key: Optional[str] = None
    # Its initial weights are a model worth keeping (the source itself): checkpoint selection
    # validates them before the first step and exports them if no trained step beats them.
    init_is_candidate: bool = False

    def __post_init__(self) -> None:
        if self.init is not None and self.init not in self.deps:
            raise ValueError(f"stage {self.name}: starts from {self.init}, which is not among its "
                             f"deps {self.deps}")


SOURCE_SETS = dict(train_sets={"train": "source/train"}, val_sets={"val": "source/test"})
TARGET_SETS = dict(train_sets={"train": TARGET_TRAIN}, val_sets={"val": HELD_OUT})
BOTH_DOMAINS = dict(train_sets={"source": "source/train", "target": TARGET_TRAIN},
                    val_sets={"source": "source/test", "target": HELD_OUT})

# Rows in submission order: every stage comes after the stages it reads. Their train.<stage>
# defaults are config.StagesConfig's.
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("denoiser", role="denoiser", scope=SHARED, size=BIG, deps=("data",),
              sections=("seed", "noise", "models.denoiser", "train.denoiser"), **SOURCE_SETS),
    # AR2Diff (pipeline.ar2diff): the source denoiser as a causal LM first, then run bidirectionally.
    StageSpec("ar_pretrain", role="ar", scope=SHARED, size=BIG, deps=("data",),
              sections=("seed", "models.denoiser", "train.ar_pretrain"), **SOURCE_SETS),
    StageSpec("ar2diff", role="denoiser", scope=SHARED, size=BIG, deps=("ar_pretrain",),
              sections=("seed", "noise", "models.denoiser", "train.ar2diff"), init="ar_pretrain",
              **SOURCE_SETS),
    StageSpec("planner", role="planner", scope=SHARED, size=SMALL, deps=(SOURCE,),
              sections=("seed", "noise", "models.planner", "train.planner", "pipeline.planner_scope",
                        "protocol"),
              scope_key="pipeline.planner_scope", **SOURCE_SETS),
    # Its edit network starts at zero: at step 0 the guided model is the source exactly.
    StageSpec("edit_ratio", role="edit_ratio", scope=PER_FRACTION, size=SMALL, deps=(SOURCE,),
              sections=("seed", "noise", "models.edit_ratio", "train.edit_ratio", "protocol"),
              init_is_candidate=True, train_sets={"target": TARGET_TRAIN}, val_sets={"target": HELD_OUT}),
    # gtl's guide adapter on the frozen source's last hidden state; zero at the start, so step 0
    # is the source exactly.
    StageSpec("adapter", role="adapter", scope=PER_FRACTION, size=SMALL, deps=(SOURCE,),
              sections=("seed", "noise", "models.adapter", "train.adapter", "protocol"),
              init_is_candidate=True, **TARGET_SETS),
    StageSpec("classifier_ti", role="classifier_ti", scope=PER_FRACTION, size=SMALL, deps=("data",),
              sections=("seed", "noise", "models.classifier", "train.classifier_ti", "protocol"),
              **BOTH_DOMAINS),
    StageSpec("classifier_td", role="classifier_td", scope=PER_FRACTION, size=SMALL, deps=("data",),
              sections=("seed", "noise", "models.classifier", "train.classifier_td", "protocol"),
              **BOTH_DOMAINS),
    StageSpec("ratio", role="ratio", scope=PER_FRACTION, size=SMALL,
              deps=("classifier_ti", "classifier_td"),
              sections=("seed", "noise", "models.ratio", "train.ratio", "protocol"), **BOTH_DOMAINS),
    StageSpec("vanilla", role="denoiser", scope=PER_FRACTION, size=SMALL, deps=("data",),
              sections=("seed", "noise", "models.denoiser", "train.vanilla", "protocol"), **TARGET_SETS),
    StageSpec("finetune", role="denoiser", scope=PER_FRACTION, size=SMALL, deps=(SOURCE,),
              sections=("seed", "noise", "models.denoiser", "train.finetune", "protocol"), init=SOURCE,
              init_is_candidate=True, **TARGET_SETS),
    # Controls (docs/method.md §9): a low-rank fine-tune with about as many trained parameters as
    # gtl's guide; the edit-ratio network's architecture trained alone as a target denoiser; the
    # target chain from transition counts (Markov only), with a uniform or a source-centred prior.
    StageSpec("finetune_small", role="finetune_small", scope=PER_FRACTION, size=SMALL, deps=(SOURCE,),
              sections=("seed", "noise", "models.denoiser", "models.finetune_small", "train.finetune_small",
                        "protocol"),
              init=SOURCE, init_is_candidate=True, **TARGET_SETS),
    StageSpec("scratch_head", role="scratch_head", scope=PER_FRACTION, size=SMALL, deps=("data",),
              sections=("seed", "noise", "models.edit_ratio", "train.scratch_head", "protocol"), **TARGET_SETS),
    StageSpec("counts", role="chain", scope=PER_FRACTION, size=SMALL, deps=("data",),
              sections=("seed", "noise", "models.counts", "train.counts", "protocol"), **TARGET_SETS),
    StageSpec("counts_source", role="chain", scope=PER_FRACTION, size=SMALL, deps=("data",),
              sections=("seed", "noise", "models.counts", "train.counts_source", "protocol"),
              train_sets={"train": TARGET_TRAIN, "source": "source/train"}, val_sets={"val": HELD_OUT}),
    # The evaluation's own models (docs/method.md §10), trained on the evaluator split, which no
    # method trains on, and validated on the test text: the causal LM of generative perplexity,
    # and the domain classifier of the domain score.
    StageSpec("reference_lm", role="reference_lm", scope=PER_TARGET, size=SMALL, deps=("data",),
              sections=("seed", "models.reference_lm", "train.reference_lm"),
              train_sets={"train": "{target}/evaluator"}, val_sets={"val": "{target}/test"}),
    StageSpec("domain_classifier", role="classifier_ti", scope=PER_TARGET, size=SMALL, deps=("data",),
              sections=("seed", "models.classifier", "train.domain_classifier"),
              train_sets={"source": "source/evaluator", "target": "{target}/evaluator"},
              val_sets={"source": "source/test", "target": "{target}/test"}),
)}

# The stages whose exports the text evaluation scores with, one task per target.
EVALUATOR_STAGES = ("reference_lm", "domain_classifier")

# Every task kind, in submission order: the data, the stages, the sample shards, the evaluation.
TASK_KINDS = ("data", *STAGES, "sample", "eval")

# Config sections the other task kinds read (besides their dependencies); a sample task's are
# its method's (MethodSpec.sample_sections).
DATA_SECTIONS = ("seed", "data", "tokenizer", "shards")
EVAL_SECTIONS = ("eval", "sample.num_samples")


@dataclass(frozen=True)
class Task:
    kind: str
    target: Optional[str] = None
    fraction: Optional[float] = None
    method: Optional[str] = None
    shard: Optional[int] = None
    # Replicate of a per-target stage or sample set (pipeline.seeds); 0 for the shared stages.
    seed: int = 0

    @property
    def key(self) -> str:
        return task_name(self.kind, self.method, self.target, self.fraction, self.seed, self.shard)

    def marker(self, paths: RunPaths):
        """Where this task's completion marker lives."""
        if self.kind == "sample":
            folder = paths.samples(self.method, self.target, self.fraction, self.seed)
            return folder / f"DONE-{self.shard:04d}.json"
        if self.kind == "data":
            return paths.data / "DONE.json"
        if self.kind == "eval":
            return paths.eval / "DONE.json"
        return paths.marker(self.kind, self.target, self.fraction, self.seed)


def task_sections(task: Task) -> tuple[str, ...]:
    """The config sections ``task`` reads itself (its dependencies' are theirs)."""
    if task.kind in STAGES:
        return STAGES[task.kind].sections
    if task.kind == "sample":
        return METHODS[task.method].sample_sections
    return {"data": DATA_SECTIONS, "eval": EVAL_SECTIONS}[task.kind]


@dataclass
class StageGraph:
    """The tasks of one configuration and what each reads; pure (reads no files)."""
    cfg: RunConfig
    _hashes: dict[Task, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def source_stage(self) -> str:
        """The stage whose export is the frozen source denoiser."""
        return "ar2diff" if self.cfg.pipeline.ar2diff else "denoiser"

    def scope(self, stage: str) -> str:
        """The stage's scope under this configuration (its row's, or PER_FRACTION where its
        scope_key says per_target)."""
        spec = STAGES[stage]
        if spec.scope_key and reduce(getattr, spec.scope_key.split("."), self.cfg) == "per_target":
            return PER_FRACTION
        return spec.scope

    def stage_sets(self, stage: str) -> tuple[dict[str, str], dict[str, str]]:
        """The row's training and validation sets (loader name -> set) under this configuration:
        a shared stage run per target reads the target's sets in place of the source's."""
        spec = STAGES[stage]
        per_target_run = self.scope(stage) != spec.scope
        return tuple({k: PER_TARGET_SETS.get(v, v) if per_target_run else v for k, v in sets.items()}
                     for sets in (spec.train_sets, spec.val_sets))

    def stage_task(self, stage: str, target: Optional[str] = None, fraction: Optional[float] = None,
                   seed: int = 0) -> Task:
        """The task of ``stage`` that serves (target, fraction, seed)."""
        scope = self.scope(stage)
        if scope == SHARED:
            return Task(stage)
        if scope == PER_TARGET:
            return Task(stage, target)
        return Task(stage, target, fraction, seed=seed)

    @cached_property
    def sample_tasks(self) -> list[Task]:
        """One per (method, target, fraction, seed, shard); the source's have no target."""
        cfg = self.cfg
        shards, seeds = range(cfg.sample.shards), cfg.pipeline.seeds
        replicas = [(t, f, s) for t in cfg.targets for f in cfg.data.target_fractions
                    for s in cfg.pipeline.seeds_at(f)]
        tasks = []
        for m in cfg.sample.methods:
            if METHODS[m].per_target:
                tasks += [Task("sample", t, f, m, i, s) for t, f, s in replicas for i in shards]
            else:
                tasks += [Task("sample", None, None, m, i, s) for s in seeds for i in shards]
        return tasks

    def method_stage(self, stage: str) -> str:
        """A row's stage name with SOURCE resolved to this configuration's source stage."""
        return self.source_stage if stage == SOURCE else stage

    def method_tasks(self, method: str, target: Optional[str], fraction: Optional[float],
                     seed: int) -> list[Task]:
        """The stage tasks whose exports ``method`` samples with at (target, fraction, seed): its
        denoiser, its guide and, when its sampler reads one, the planner."""
        spec = METHODS[method]
        stages = [self.method_stage(s) for s in spec.stages()]
        if spec.needs_planner(self.cfg.sample):
            stages.append("planner")
        return [self.stage_task(stage, target, fraction, seed) for stage in stages]

    def task_deps(self, task: Task) -> list[Task]:
        """The tasks whose outputs ``task`` reads."""
        cfg = self.cfg
        k, t, f, s = task.kind, task.target, task.fraction, task.seed
        if k == "data":
            return []
        if k in STAGES:
            return [Task("data") if d == "data" else self.stage_task(self.method_stage(d), t, f, s)
                    for d in STAGES[k].deps]
        if k == "sample":
            return self.method_tasks(task.method, t, f, s)
        if k == "eval":
            # Every sample set, and the networks behind it (the masked cross-entropy and the
            # selection table read them, docs/method.md §10).
            deps = list(self.sample_tasks)
            for sample in self.sample_tasks:
                deps += [d for d in self.method_tasks(sample.method, sample.target, sample.fraction, sample.seed)
                         if d not in deps]
            if cfg.uses_tokenizer:  # the evaluator's own models; ce_gain is measured against the source
                deps += [Task(stage, t) for stage in EVALUATOR_STAGES for t in cfg.targets]
                deps += [d for d in [Task(self.source_stage)] if d not in deps]
            return deps
        raise ValueError(f"unknown task kind '{k}'")

    @cached_property
    def plan(self) -> dict[str, list[Task]]:
        """The tasks this configuration runs, by kind in submission order: the source stage, every
        sample shard and the evaluation, and every task they read (a stage runs only when a method
        or the evaluation needs it)."""
        needed: dict[Task, None] = {}  # in the order first met

        def visit(task: Task) -> None:
            if task not in needed:
                needed[task] = None
                for dep in self.task_deps(task):
                    visit(dep)

        for root in (Task(self.source_stage), *self.sample_tasks, Task("eval")):
            visit(root)
        by_kind: dict[str, list[Task]] = {kind: [] for kind in TASK_KINDS}
        for task in needed:
            by_kind[task.kind].append(task)
        return {kind: tasks for kind, tasks in by_kind.items() if tasks}

    def input_hash(self, task: Task) -> str:
        """Hash of everything the task's output depends on (config sections + upstream hashes)."""
        if task not in self._hashes:
            own = self.cfg.section_hash(*task_sections(task))
            ups = sorted((d.key, self.input_hash(d)) for d in self.task_deps(task))
            ident = {"task": task.key, "own": own, "deps": ups}
            if task.kind == "sample":
                # Which samples a shard holds depends on the sharding, not just the sampler.
                ident["shards"] = self.cfg.sample.shards
            if task.kind in STAGES and STAGES[task.kind].init_is_candidate:
                # Whether selection may keep the initial weights is part of what the export is.
                ident["init_is_candidate"] = True
            self._hashes[task] = dict_hash(ident)
        return self._hashes[task]


def stage_input_hash(cfg: RunConfig, stage: str, target: Optional[str], fraction: Optional[float],
                     seed: int = 0) -> str:
    """The hash a stage's checkpoints and export carry: the pipeline's input hash of its task, so
    the launcher's completion markers and the checkpoints agree."""
    return StageGraph(cfg).input_hash(Task(stage, target, fraction, seed=seed))


def kfold_selected(cfg: RunConfig, stage: str, fraction: Optional[float]) -> bool:
    """Whether a task of ``stage`` chooses its export by k-fold selection (gtl_dist/train/grid.py):
    under ``protocol.selection: kfold``, a per-fraction stage that keeps its best weights on its
    held-out part (the protocol's other stages, as under ``budget``, train once on all n_T)."""
    # A shared stage (no fraction) never reads the protocol: it is not among its inputs.
    return (fraction is not None and cfg.protocol.selection == "kfold" and STAGES[stage].role != "chain"
            and HELD_OUT in STAGES[stage].val_sets.values() and getattr(cfg.train, stage).select_best)


def run_variants(cfg: RunConfig, stage: str, fraction: Optional[float]) -> list[str]:
    """The folders of a task's runs, in the order it trains them (gtl_dist/train/grid.py): one per
    grid point, or under k-fold selection one per point and fold, then ``refit``; [] for a task
    that trains once, in its own folder."""
    if kfold_selected(cfg, stage, fraction):
        return [fold_variant(p, f) for p in grid_points(cfg, stage) for f in range(cfg.protocol.folds)] + [REFIT]
    return [grid_variant(*p) for p in getattr(cfg.train, stage).grid()]


REFIT = "refit"


def grid_points(cfg: RunConfig, stage: str) -> list[tuple[float, Optional[float], Optional[int]]]:
    """The (lr, weight decay, model index) points a task trains: its grid, or its own settings alone."""
    tc = getattr(cfg.train, stage)
    return tc.grid() or [(tc.lr, None, None)]


def fold_variant(point: tuple[float, Optional[float], Optional[int]], fold: int) -> str:
    """The folder of one fold's run of one grid point."""
    return f"{grid_variant(*point)}/fold-{fold}"
