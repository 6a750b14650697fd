"""Read job and node facts from a SLURM controller without accounting.

Clusters without slurmdbd (our one-machine test cluster, many small sites) make ``sacct`` fail,
so submitit's ``job.state`` stays ``UNKNOWN`` (docs/operations.md). These helpers ask the
controller directly: ``squeue --states=all`` sees pending, running and recently finished jobs
(finished ones stay in memory for ``MinJobAge`` seconds), ``scontrol show node`` gives the
address a node is reached at. Every call has its own timeout, so a dead controller is an
error, never a hang.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Iterable, Mapping, Optional

# A job id SLURM no longer (or never) knew: purged after MinJobAge, or a typo.
UNKNOWN = "UNKNOWN"
# States after which a job never runs again (requeue aside).
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
    "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED",
})

# Keys in ``scontrol -o`` records look like ``NodeAddr``, ``AllocNode:Sid`` or ``CPUs/Task``;
# values may contain spaces (``OS=Linux 6.1.0 #1 SMP ...``), so a value runs up to the next key.
_RECORD_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w:/.]*)=")


class SlurmCommandError(RuntimeError):
    """A SLURM client command failed or timed out; the message has the command and its stderr."""


def slurm_program(name: str) -> Optional[str]:
    """Absolute path of a SLURM/munge program, also looking in the sbin dirs a user's PATH lacks."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        candidate = os.path.join(folder, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def run_slurm(args: list[str], env: Optional[Mapping[str, str]] = None,
              timeout_s: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run a SLURM client command (``env`` replaces os.environ when given, e.g. with SLURM_CONF)."""
    program = slurm_program(args[0])
    if program is None:
        raise SlurmCommandError(
            f"{args[0]}: not found on PATH; install the Debian package slurm-client "
            f"(apt-get install slurm-client) or load your site's SLURM module")
    try:
        proc = subprocess.run([program, *args[1:]], env=None if env is None else dict(env),
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SlurmCommandError(f"{' '.join(args)}: no answer within {timeout_s:.0f} s "
                                f"(is slurmctld running? SLURM_CONF="
                                f"{(env or os.environ).get('SLURM_CONF', '<unset>')})") from None
    if check and proc.returncode != 0:
        raise SlurmCommandError(f"{' '.join(args)} exited with {proc.returncode}: "
                                f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def parse_record(line: str) -> dict[str, str]:
    """One ``scontrol show ... -o`` line -> {key: value}."""
    matches = list(_RECORD_KEY.finditer(line))
    record = {}
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        record[match.group(1)] = line[match.end():end].strip()
    return record


def parse_squeue_states(text: str) -> dict[str, str]:
    """Lines ``<jobid>|<state>`` from ``squeue -r -o %i|%T`` -> {jobid: state}."""
    states = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        job_id, _, state = line.partition("|")
        if not state:
            raise SlurmCommandError(f"squeue: unexpected output line {line!r} (expected 'jobid|state')")
        states[job_id.strip()] = state.strip()
    return states


def job_states(job_ids: Iterable[str | int], env: Optional[Mapping[str, str]] = None,
               timeout_s: float = 30.0) -> dict[str, str]:
    """Current SLURM state of each job id (``"123"`` or array element ``"123_4"``), as a string.

    Works without accounting: pending, running and finished jobs come from
    ``squeue --states=all`` (finished ones while they are younger than ``MinJobAge``); ids the
    controller does not know map to ``UNKNOWN``. A whole array id (``"123"``) of an array job
    is reported element-wise by squeue and so maps to ``UNKNOWN``: ask for its elements.
    """
    wanted = [str(j) for j in job_ids]
    if not wanted:
        return {}
    fmt = ["-h", "-r", "--states=all", "-o", "%i|%T"]
    proc = run_slurm(["squeue", *fmt, "-j", ",".join(wanted)], env=env, timeout_s=timeout_s,
                     check=False)
    if proc.returncode == 0:
        found = parse_squeue_states(proc.stdout)
    elif "Invalid job id" in proc.stderr:
        # squeue rejects the whole list when one id is unknown; ask one by one.
        found = {}
        for job_id in wanted:
            one = run_slurm(["squeue", *fmt, "-j", job_id], env=env, timeout_s=timeout_s,
                            check=False)
            if one.returncode == 0:
                found.update(parse_squeue_states(one.stdout))
            elif "Invalid job id" not in one.stderr:
                raise SlurmCommandError(f"squeue -j {job_id} exited with {one.returncode}: "
                                        f"{one.stderr.strip()}")
    else:
        raise SlurmCommandError(f"squeue -j {','.join(wanted)} exited with {proc.returncode}: "
                                f"{proc.stderr.strip()}")
    return {job_id: found.get(job_id, UNKNOWN) for job_id in wanted}


def node_addr(node_name: str, env: Optional[Mapping[str, str]] = None,
              timeout_s: float = 30.0) -> str:
    """The address SLURM reaches ``node_name`` at (``NodeAddr``): what MASTER_ADDR should be.

    Node names need not resolve in DNS (a one-machine cluster names its nodes n1, n2 on
    127.0.0.1), so torch.distributed must be given this address, not the name.
    """
    proc = run_slurm(["scontrol", "show", "node", "-o", node_name], env=env, timeout_s=timeout_s,
                     check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SlurmCommandError(f"scontrol show node {node_name}: no such node "
                                f"({proc.stderr.strip() or 'empty answer'})")
    record = parse_record(proc.stdout.strip().splitlines()[0])
    addr = record.get("NodeAddr", "")
    if not addr:
        raise SlurmCommandError(f"scontrol show node {node_name}: record has no NodeAddr: "
                                f"{proc.stdout.strip()[:200]}")
    return addr
