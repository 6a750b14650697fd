"""What each group's SLURM job asks for, in submitit's ``SlurmExecutor`` parameters, and the
sbatch script that makes (``launchers/submit.py --dry-run``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from gtl_dist.cluster.dag import Group
from gtl_dist.cluster.options import LaunchOptions, job_nodes, ranks_per_node, time_limit_min
from gtl_dist.compat import sbatch_script
from gtl_dist.config import RunConfig
from gtl_dist.paths import RunPaths
from gtl_dist.stages import BIG, DATA


def slurm_parameters(group: Group, cfg: RunConfig, opts: LaunchOptions, run_name: str,
                     dependency: Optional[str] = None) -> dict[str, Any]:
    """sbatch parameters (submitit ``SlurmExecutor`` names) for one group's job or array."""
    c = cfg.cluster
    gpus, cpus = opts.gpus(cfg), opts.cpus(cfg)
    big = group.size == BIG
    params: dict[str, Any] = {
        "job_name": f"gtl-{run_name}-{group.name}",
        "nodes": job_nodes(group, opts),
        "ntasks_per_node": ranks_per_node(group, cfg, opts),
        "cpus_per_task": max(cpus, cfg.shards.build_workers) if group.size == DATA else cpus,
        "time": time_limit_min(group, cfg, opts),
        "signal_delay_s": c.signal_delay_s,
        "array_parallelism": c.array_parallelism,
        # --requeue lets submitit requeue after preemption; --kill-on-invalid-dep cancels the
        # dependants of a failed job rather than leaving them pending (DependencyNeverSatisfied).
        "additional_parameters": {"requeue": True, "kill-on-invalid-dep": "yes"},
        "setup": job_setup(cfg),
    }
    if gpus and group.size != DATA:
        params["gpus_per_node"] = gpus if big else 1
    partition = opts.partition or c.partition
    if partition:
        params["partition"] = partition
    if c.mem_gb:
        params["mem"] = f"{c.mem_gb}GB"
    if dependency:
        params["dependency"] = dependency
    return params


def job_setup(cfg: RunConfig) -> list[str]:
    """The shell lines every sbatch script runs before the task: the DeepSpeed op's folder, then
    ``cluster.setup`` (module loads, ...)."""
    from gtl_dist.train.dist import extensions_dir
    # Jobs must find the DeepSpeed op the launcher prebuilt (never build inside a preemptible job).
    lines = [f"export GTL_TORCH_EXTENSIONS_DIR={extensions_dir()}"]
    return lines + list(cfg.cluster.setup)


def render_sbatch(group: Group, cfg: RunConfig, opts: LaunchOptions, run_dir: str | Path,
                  dependency: Optional[str] = None) -> str:
    """The sbatch script submitit would submit for ``group``, without submitting it. Jobs run the
    launcher's own interpreter (``sys.executable``), which is why it must be on a path every node
    mounts."""
    params = slurm_parameters(group, cfg, opts, RunPaths(run_dir).root.name, dependency)
    if group.is_array:
        params["map_count"] = len(group.tasks)
    folder = RunPaths(run_dir).jobs / group.name / "%j"
    return sbatch_script(f"{sys.executable} -u -m submitit.core._submit {folder}", folder, **params)
