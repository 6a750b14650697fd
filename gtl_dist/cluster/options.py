"""What a submission was asked for: the launcher's flags, and the ranks each group's job runs.

Every layer that sizes a job reads it from here: the sbatch parameters (gtl_dist/cluster/sbatch.py),
the local runner (gtl_dist/cluster/local.py) and the preflight (gtl_dist/cluster/preflight.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gtl_dist.cluster.dag import Group
from gtl_dist.config import RunConfig
from gtl_dist.stages import BIG, EVAL

CLUSTERS = ("slurm", "local", "debug")


class LaunchError(RuntimeError):
    """Something about the submission is wrong; the message says what and how to fix it."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a launcher that ran jobs on this machine; ``stopped`` lists the
    tasks whose jobs it stopped with it."""

    def __init__(self, signal_name: str, stopped: list):
        super().__init__(signal_name)
        self.signal_name, self.stopped = signal_name, stopped


@dataclass
class LaunchOptions:
    cluster: str = "slurm"  # slurm | local | debug
    nodes: int = 1
    gpus_per_node: Optional[int] = None  # None: cfg.cluster.gpus_per_node
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    time_min: Optional[int] = None
    local_parallelism: int = 1
    command: str = ""
    """The launcher's own command line: the report cites it."""
    cluster_chosen: bool = True
    """--cluster was given (else it is the default: slurm where sbatch is on PATH)."""

    def gpus(self, cfg: RunConfig) -> int:
        return cfg.cluster.gpus_per_node if self.gpus_per_node is None else self.gpus_per_node

    def cpus(self, cfg: RunConfig) -> int:
        return cfg.cluster.cpus_per_task if self.cpus_per_task is None else self.cpus_per_task


def time_limit_key(group: Group, opts: LaunchOptions) -> str:
    """The setting that sets a job's time limit: --time (or cluster.timeout_min) for the source
    stage; cluster.timeout_min for the evaluation, one job that scores every cell, so that a
    study's evaluation is not timed out and requeued without end under the small jobs' limit;
    cluster.small_timeout_min for every other task."""
    if group.size == BIG and opts.time_min:
        return "--time"
    return "cluster.timeout_min" if group.size in (BIG, EVAL) else "cluster.small_timeout_min"


def time_limit_min(group: Group, cfg: RunConfig, opts: LaunchOptions) -> int:
    """A job's time limit in minutes, from the setting time_limit_key names."""
    key = time_limit_key(group, opts)
    return opts.time_min if key == "--time" else getattr(cfg.cluster, key.removeprefix("cluster."))


def job_nodes(group: Group, opts: LaunchOptions) -> int:
    """Nodes of one job of ``group``: --nodes for the source stage, one for every other task."""
    return opts.nodes if group.size == BIG else 1


def ranks_per_node(group: Group, cfg: RunConfig, opts: LaunchOptions) -> int:
    """One rank per GPU on GPU nodes, one per node on CPU nodes; other tasks run one rank."""
    return max(1, opts.gpus(cfg)) if group.size == BIG else 1


def world_size(group: Group, cfg: RunConfig, opts: LaunchOptions) -> int:
    """Ranks of one task of ``group``: its SLURM job's nodes × ranks per node; with the local
    executor --nodes ranks for the big group and one otherwise; one in the launcher's process
    (debug)."""
    if opts.cluster == "slurm":
        return job_nodes(group, opts) * ranks_per_node(group, cfg, opts)
    return opts.nodes if group.size == BIG and opts.cluster == "local" else 1
