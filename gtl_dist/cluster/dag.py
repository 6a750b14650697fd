"""The GTL pipeline as a DAG of task groups (docs/architecture.md, "The pipeline").

A *task* is one unit of work with one entry point (``gtl_dist.cluster.tasks.run_task``); a *group*
is the set of tasks of one kind that are submitted together: a single job (data, the source
denoiser, evaluation) or a job array (one task per target × fraction, or per sample shard).
Dependencies are between groups, which maps one-to-one onto SLURM ``afterok`` dependencies.

Completion is decided by markers, not by job state: a task is done when its ``DONE.json``
records the same *input hash* that the current configuration gives it. The input hash covers
the configuration sections the task reads and, recursively, the input hashes of the tasks it
depends on — so changing the denoiser's model size invalidates fine-tuning, the planner and
every sample drawn from them, while changing γ only invalidates GTL samples and the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Optional

from gtl_dist.config import RunConfig, dict_hash
from gtl_dist.paths import RunPaths, task_name

# The network that guides each GTL method (docs/method.md §5).
GUIDE_STAGE = {"gtl": "edit_ratio", "gtl_paper": "ratio"}

# How a group is sized on the cluster.
BIG = "big"        # spans --nodes nodes, one rank per GPU (or per node on CPU)
SMALL = "small"    # one task, at most one GPU: packed many to a node
DATA = "data"      # one task, CPU only, shards.build_workers processes
EVAL = "eval"      # one task, at most one GPU


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


@dataclass
class Group:
    name: str
    tasks: list[Task]
    deps: list[str]
    size: str

    @property
    def is_array(self) -> bool:
        return self.size != BIG and (len(self.tasks) > 1 or self.name in PER_TASK_ARRAYS)


# Groups that are arrays by nature, even when the config leaves them a single task.
PER_TASK_ARRAYS = {"classifier_ti", "classifier_td", "ratio", "edit_ratio", "vanilla", "finetune",
                   "reference_lm", "sample"}

# Configuration sections each task kind reads (besides its dependencies).
_SECTIONS = {
    "data": ("seed", "data", "tokenizer", "shards"),
    "denoiser": ("seed", "noise", "models.denoiser", "train.denoiser"),
    "ar_pretrain": ("seed", "models.denoiser", "train.ar_pretrain"),
    "ar2diff": ("seed", "noise", "models.denoiser", "train.ar2diff"),
    "planner": ("seed", "noise", "models.planner", "train.planner", "pipeline.planner_scope",
                "protocol"),
    "classifier_ti": ("seed", "noise", "models.classifier", "train.classifier_ti", "protocol"),
    "classifier_td": ("seed", "noise", "models.classifier", "train.classifier_td", "protocol"),
    "ratio": ("seed", "noise", "models.ratio", "train.ratio", "protocol"),
    "edit_ratio": ("seed", "noise", "models.edit_ratio", "train.edit_ratio", "protocol"),
    "vanilla": ("seed", "noise", "models.denoiser", "train.vanilla", "protocol"),
    "finetune": ("seed", "noise", "models.denoiser", "train.finetune", "protocol"),
    "reference_lm": ("seed", "models.reference_lm", "train.reference_lm"),
    # Baselines draw with the unguided sampler; only GTL reads the guidance settings. The list
    # of methods is never an input: adding a method must not redraw the others.
    "sample": ("noise", "sample.num_samples", "sample.batch_size", "sample.top_k", "sample.steps",
               "sample.t_end", "sample.seed"),
    "sample_gtl": ("noise", "sample.num_samples", "sample.batch_size", "sample.top_k", "sample.steps",
                   "sample.t_end", "sample.seed", "sample.sampler", "sample.gamma", "sample.n_ratio",
                   "sample.ratio_batch_size", "sample.planner_temperature", "sample.planner_mode",
                   "sample.stabilise"),
    "sample_gtl_paper": ("noise", "sample.num_samples", "sample.batch_size", "sample.top_k",
                         "sample.steps", "sample.t_end", "sample.seed", "sample.sampler",
                         "sample.paper_gamma", "sample.n_ratio", "sample.ratio_batch_size",
                         "sample.planner_temperature", "sample.planner_mode", "sample.stabilise"),
    "eval": ("eval", "sample.num_samples"),
}


@dataclass
class Pipeline:
    """The DAG for one configuration: groups in submission (topological) order.

    ``all_groups`` is always the whole DAG (input hashes and dependencies are defined on it);
    ``groups`` is the selection to run (``--stages``), by default all of them.
    """
    cfg: RunConfig
    only: Optional[list[str]] = None
    all_groups: list[Group] = field(init=False)
    groups: list[Group] = field(init=False)

    def __post_init__(self) -> None:
        self.all_groups = _all_groups(self.cfg, self.source_stage)
        names = [g.name for g in self.all_groups]
        if self.only is None:
            self.groups = list(self.all_groups)
            return
        unknown = [n for n in self.only if n not in names]
        if unknown:
            raise ValueError(f"--stages: unknown stage(s) {', '.join(unknown)}; this config's stages "
                             f"are: {', '.join(names)}")
        self.groups = [g for g in self.all_groups if g.name in self.only]

    @property
    def source_stage(self) -> str:
        """The stage whose export is the frozen source denoiser."""
        return "ar2diff" if self.cfg.pipeline.ar2diff else "denoiser"

    def group(self, name: str) -> Group:
        for g in self.all_groups:
            if g.name == name:
                return g
        raise KeyError(f"no group '{name}' in this pipeline; groups: "
                       f"{', '.join(g.name for g in self.all_groups)}")

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    @property
    def tasks(self) -> list[Task]:
        """The selected groups' tasks."""
        return [t for g in self.groups for t in g.tasks]

    def group_of(self, task: Task) -> Group:
        for g in self.all_groups:
            if task in g.tasks:
                return g
        raise KeyError(task.key)

    def task_deps(self, task: Task) -> list[Task]:
        """The tasks whose outputs ``task`` reads (finer than the group dependencies)."""
        cfg = self.cfg
        k, t, f, s = task.kind, task.target, task.fraction, task.seed
        source = Task(self.source_stage)
        if k == "data":
            return []
        if k in ("denoiser", "ar_pretrain"):
            return [Task("data")]
        if k == "ar2diff":
            return [Task("ar_pretrain")]
        if k == "planner":
            return [source]
        if k in ("classifier_ti", "classifier_td", "vanilla", "reference_lm"):
            return [Task("data")]
        if k == "ratio":
            return [Task("classifier_ti", t, f, seed=s), Task("classifier_td", t, f, seed=s)]
        if k in ("finetune", "edit_ratio"):
            return [source]
        if k == "sample":
            m = task.method
            if m == "source":
                deps = [source]
            elif m in ("vanilla", "finetune"):
                deps = [Task(m, t, f, seed=s)]
            else:  # gtl (edit-ratio network) or gtl_paper (sequence-level ratio network)
                deps = [source, Task(GUIDE_STAGE[m], t, f, seed=s)]
                if cfg.sample.sampler == "planner":
                    deps.append(self.planner_task(t, f, s))
            return deps
        if k == "eval":
            deps = list(self.group("sample").tasks)
            if cfg.uses_tokenizer:  # the text metrics score with these networks
                scorer = evaluator_classifier_fraction(cfg)
                deps += [Task("classifier_ti", t, scorer) for t in cfg.targets]
                deps += [Task("reference_lm", t) for t in cfg.targets]
            return deps
        raise ValueError(f"unknown task kind '{k}'")

    def planner_task(self, target: Optional[str], fraction: Optional[float], seed: int = 0) -> Task:
        if self.cfg.pipeline.planner_scope == "shared":
            return Task("planner")
        return Task("planner", target, fraction, seed=seed)

    @cached_property
    def _hash_cache(self) -> dict[Task, str]:
        return {}

    def input_hash(self, task: Task) -> str:
        """Hash of everything the task's output depends on (config sections + upstream hashes)."""
        cache = self._hash_cache
        if task not in cache:
            sections = _SECTIONS[f"sample_{task.method}" if task.method in GUIDE_STAGE else task.kind]
            own = self.cfg.section_hash(*sections)
            ups = sorted((d.key, self.input_hash(d)) for d in self.task_deps(task))
            ident = {"task": task.key, "own": own, "deps": ups}
            if task.kind == "sample":
                # Which samples a shard holds depends on the sharding, not just the sampler.
                ident["shards"] = self.cfg.sample.shards
            cache[task] = dict_hash(ident)
        return cache[task]


def build_pipeline(cfg: RunConfig, only: Optional[Iterable[str]] = None) -> Pipeline:
    """The DAG for ``cfg``; ``only`` selects groups to run (the others stay in the DAG as
    dependencies that must already be done or queued)."""
    return Pipeline(cfg, None if only is None else list(only))


def evaluator_classifier_fraction(cfg: RunConfig) -> float:
    """The fraction whose (seed-0) time-independent classifier scores every text sample set's
    domain: the largest, trained on the most target data. It is the evaluator's instrument, the
    same for every method and fraction, so no method's score depends on its own data budget."""
    return max(cfg.data.target_fractions)


def _all_groups(cfg: RunConfig, src: str) -> list[Group]:
    groups: list[Group] = []
    targets, fractions, seeds = cfg.targets, cfg.data.target_fractions, cfg.pipeline.seeds
    per_tf = [(t, f) for t in targets for f in fractions]
    replicas = [(t, f, s) for t, f in per_tf for s in seeds]
    methods = cfg.sample.methods
    names: list[str] = []

    def add(name: str, tasks: list[Task], deps: list[str], size: str) -> None:
        if tasks:
            groups.append(Group(name, tasks, [d for d in deps if d in names], size))
            names.append(name)

    add("data", [Task("data")], [], DATA)
    if cfg.pipeline.ar2diff:
        add("ar_pretrain", [Task("ar_pretrain")], ["data"], BIG)
        add("ar2diff", [Task("ar2diff")], ["ar_pretrain"], BIG)
    else:
        add("denoiser", [Task("denoiser")], ["data"], BIG)
    guided = [m for m in methods if m in GUIDE_STAGE]
    if guided and cfg.sample.sampler == "planner":
        if cfg.pipeline.planner_scope == "shared":
            add("planner", [Task("planner")], [src], SMALL)
        else:
            add("planner", [Task("planner", t, f, seed=s) for t, f, s in replicas], [src], SMALL)
    if "gtl" in methods:
        add("edit_ratio", [Task("edit_ratio", t, f, seed=s) for t, f, s in replicas], [src], SMALL)
    if "gtl_paper" in methods:
        add("classifier_ti", [Task("classifier_ti", t, f, seed=s) for t, f, s in replicas], ["data"], SMALL)
        add("classifier_td", [Task("classifier_td", t, f, seed=s) for t, f, s in replicas], ["data"], SMALL)
        add("ratio", [Task("ratio", t, f, seed=s) for t, f, s in replicas],
            ["classifier_ti", "classifier_td"], SMALL)
    elif cfg.uses_tokenizer:
        # The report's domain score needs the evaluator's classifier even without gtl_paper.
        scorer = evaluator_classifier_fraction(cfg)
        add("classifier_ti", [Task("classifier_ti", t, scorer) for t in targets], ["data"], SMALL)
    if "vanilla" in methods:
        add("vanilla", [Task("vanilla", t, f, seed=s) for t, f, s in replicas], ["data"], SMALL)
    if "finetune" in methods:
        add("finetune", [Task("finetune", t, f, seed=s) for t, f, s in replicas], [src], SMALL)
    if cfg.uses_tokenizer:
        add("reference_lm", [Task("reference_lm", t) for t in targets], ["data"], SMALL)

    sample_tasks = []
    shards = range(cfg.sample.shards)
    for m in methods:
        if m == "source":
            sample_tasks += [Task("sample", None, None, m, i, s) for s in seeds for i in shards]
        else:
            sample_tasks += [Task("sample", t, f, m, i, s) for t, f, s in replicas for i in shards]
    sample_deps = {"source": [src], "vanilla": ["vanilla"], "finetune": ["finetune"],
                   "gtl": [src, "edit_ratio", "planner"], "gtl_paper": [src, "ratio", "planner"]}
    add("sample", sample_tasks, sorted({d for m in methods for d in sample_deps[m]}), SMALL)
    add("eval", [Task("eval")], ["sample", "classifier_ti", "reference_lm"], EVAL)
    return groups
