"""The private parts of other libraries that gtl_dist relies on, in one place.

Each function below reaches into a library where it offers no public way to do the job. They
were written against the versions in :data:`TESTED_VERSIONS`; tests/test_compat.py pins those
versions and exercises each function, so that a new version of either library fails one test that
names this file, instead of failing a run on a cluster. pyproject.toml pins submitit exactly for
the same reason.

- submitit's ``_make_sbatch_string``: the sbatch script that ``SlurmExecutor`` would submit,
  rendered without submitting (``launchers/submit.py --dry-run``).
- submitit's ``_parse_node_list``: the hosts of a SLURM hostlist, as its ``SlurmJobEnvironment``
  reads ``SLURM_JOB_NODELIST`` (that class reads ``os.environ`` only; gtl_dist/train/dist.py
  resolves ranks from any mapping, so that it can be tested and explained by hand).
- torch's DataLoader iterator: its worker processes (``_workers``) and its orderly shutdown
  (``_shutdown_workers``), which gtl_dist/data/loader.py needs because its workers ignore SIGTERM
  (a preemption signal is the training loop's to handle) and would otherwise outlive their loader.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

# Library -> the version (or version prefix) the private calls below were checked against.
TESTED_VERSIONS = {"submitit": "1.5.4", "torch": "2.13."}


def version_mismatches() -> list[str]:
    """``"<library> <installed> (checked against <tested>)"`` for each library whose installed
    version is not the one this module was checked against."""
    out = []
    for library, tested in TESTED_VERSIONS.items():
        installed = version(library)
        if not (installed == tested or (tested.endswith(".") and installed.startswith(tested))):
            out.append(f"{library} {installed} (checked against {tested}{'*' if tested.endswith('.') else ''})")
    return out


def sbatch_script(command: str, folder: Any, **parameters: Any) -> str:
    """The sbatch script submitit's SlurmExecutor submits for ``command``, with ``parameters`` in
    its own names (nodes, ntasks_per_node, time, additional_parameters, ...)."""
    from submitit.slurm.slurm import _make_sbatch_string
    return _make_sbatch_string(command=command, folder=folder, **parameters)


def slurm_hostnames(nodelist: str) -> list[str]:
    """The hosts of a SLURM hostlist: ``"gpu[07-08],cpu1"`` -> gpu07, gpu08, cpu1. Raises
    ValueError (submitit's SlurmParseException) for a malformed one."""
    from submitit.slurm.slurm import _parse_node_list
    return _parse_node_list(nodelist)


def dataloader_workers(iterator: Any) -> list[Any]:
    """The worker processes (multiprocessing.Process) of a DataLoader's multi-process iterator."""
    return list(iterator._workers)


def shut_down_dataloader_workers(iterator: Any) -> None:
    """Ask a DataLoader iterator's workers to stop the orderly way (done event, then a sentinel on
    each index queue, then join); a no-op once the interpreter is exiting."""
    iterator._shutdown_workers()
