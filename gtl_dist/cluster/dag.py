"""The GTL pipeline as a DAG of task groups (docs/architecture.md, "The pipeline").

A *task* is one unit of work with one entry point (``gtl_dist.cluster.tasks.run_task``); a *group*
is the set of tasks of one kind that are submitted together: a single job (data, the source
denoiser, evaluation) or a job array (one task per target × fraction, or per sample shard).
Dependencies are between groups, which maps one-to-one onto SLURM ``afterok`` dependencies.

Which tasks a configuration runs, what each reads and its input hash come from the stage table
and :class:`~gtl_dist.stages.StageGraph` (gtl_dist/stages.py); this module only groups them.
Completion is decided by markers, not by job state: a task is done when its ``DONE.json``
records the same input hash that the current configuration gives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from gtl_dist.config import RunConfig
from gtl_dist.stages import BIG, DATA, EVAL, SHARED, SMALL, STAGES, StageGraph, Task

# Groups that are arrays by nature, even when the config leaves them a single task.
PER_TASK_ARRAYS = {name for name, spec in STAGES.items() if spec.scope != SHARED} | {"sample"}


@dataclass
class Group:
    name: str
    tasks: list[Task]
    deps: list[str]
    size: str

    @property
    def is_array(self) -> bool:
        return self.size != BIG and (len(self.tasks) > 1 or self.name in PER_TASK_ARRAYS)


def _group_size(kind: str) -> str:
    if kind in STAGES:
        return STAGES[kind].size
    return {"data": DATA, "sample": SMALL, "eval": EVAL}[kind]


@dataclass
class Pipeline(StageGraph):
    """The DAG for one configuration: groups in submission (topological) order, one per task kind.

    ``all_groups`` is always the whole DAG (input hashes and dependencies are defined on it);
    ``groups`` is the selection to run (``--stages``), by default all of them.
    """
    only: Optional[list[str]] = None
    all_groups: list[Group] = field(init=False)
    groups: list[Group] = field(init=False)

    def __post_init__(self) -> None:
        self.all_groups = []
        for kind, tasks in self.plan.items():
            # A group waits for the groups of its tasks' dependencies (in the order first met).
            deps = dict.fromkeys(d.kind for t in tasks for d in self.task_deps(t))
            self.all_groups.append(Group(kind, tasks, list(deps), _group_size(kind)))
        names = [g.name for g in self.all_groups]
        if self.only is None:
            self.groups = list(self.all_groups)
            return
        unknown = [n for n in self.only if n not in names]
        if unknown:
            raise ValueError(f"--stages: unknown stage(s) {', '.join(unknown)}; this config's stages "
                             f"are: {', '.join(names)}")
        self.groups = [g for g in self.all_groups if g.name in self.only]

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


def build_pipeline(cfg: RunConfig, only: Optional[Iterable[str]] = None) -> Pipeline:
    """The DAG for ``cfg``; ``only`` selects groups to run (the others stay in the DAG as
    dependencies that must already be done or queued)."""
    return Pipeline(cfg, None if only is None else list(only))
