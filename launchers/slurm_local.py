"""A real SLURM cluster on one machine: one slurmctld, N slurmd "nodes" and a private munged.

It lets tests and a person on a workstation run the cluster path for real (sbatch, srun,
job arrays, two-node jobs) with Debian's packages and no systemd, cgroups or accounting
(docs/operations.md). Everything lives in one state directory:

    <dir>/cluster.json   what was started: per daemon its pid and kernel start time, the spec
    <dir>/slurm.conf     export SLURM_CONF=<dir>/slurm.conf for sbatch/srun/squeue/scontrol
    <dir>/munge/         private munge key, seed and log (0700)
    <dir>/run/           munge socket (0755: munged insists job users can reach it)
    <dir>/ctld/          slurmctld state;  <dir>/spool/slurmd-<node>/  slurmd spools
    <dir>/log/           daemon logs

Only processes recorded in cluster.json (matched by pid *and* start time, so a recycled pid
is never signalled) and slurmstepd processes spawned by this cluster's slurmd (found by a
marker variable in their environment) are ever stopped. The machine's own munged, its
/etc/munge/munge.key, /etc/slurm and /etc/hosts are left alone.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import psutil

from gtl_dist.io import atomic_write_json, atomic_write_text, read_json
from gtl_dist.processes import is_running, start_time
from gtl_dist.slurm_query import SlurmCommandError, run_slurm, slurm_program

DAEMON_PROGRAMS = ("munged", "slurmctld", "slurmd")
CLIENT_PROGRAMS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
INSTALL_HINT = ("install the Debian packages: sudo apt-get install slurmctld slurmd slurm-client "
                "munge")
DEFAULT_CONTROLLER_PORT = 17817
STATE_FILE = "cluster.json"
# Set in the daemons' environment; slurmstepd inherits it, which is how `stop` recognises
# job steps of this cluster (and only this cluster) that outlived their slurmd.
MARKER_VAR = "GTL_SLURM_CLUSTER_DIR"
# munged's socket path must fit in sockaddr_un.sun_path (108 bytes on Linux).
_MAX_SOCKET_PATH = 107


class ClusterError(RuntimeError):
    """The local cluster could not be started, queried or stopped; the message says why."""


def missing_programs() -> list[str]:
    """Names of the SLURM/munge programs this machine lacks (empty: everything is installed)."""
    return [p for p in (*DAEMON_PROGRAMS, *CLIENT_PROGRAMS) if slurm_program(p) is None]


def default_state_dir() -> Path:
    # /tmp rather than $HOME: munged refuses a socket whose parent dirs are not world-searchable.
    return Path(f"/tmp/gtl-slurm-{getpass.getuser()}")


@dataclass(frozen=True)
class ClusterSpec:
    """Shape of the cluster. Node i (n1, n2, ...) listens on controller_port + i."""

    nodes: int = 2
    cpus_per_node: int = os.cpu_count() or 1
    # Memory is not a consumable here (CR_CPU), so each node may claim the whole machine;
    # it only has to be large enough for jobs' --mem requests.
    memory_mb: int = 0  # 0: the machine's total memory
    controller_port: int = DEFAULT_CONTROLLER_PORT
    partition: str = "debug"
    cluster_name: str = "gtl"
    # Finished jobs stay visible to squeue/scontrol this long: the only job record there is
    # without accounting.
    min_job_age_s: int = 3600

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 64:
            raise ClusterError(f"nodes={self.nodes}: expected 1..64 simulated nodes")
        if self.cpus_per_node < 1:
            raise ClusterError(f"cpus_per_node={self.cpus_per_node}: expected >= 1")
        if self.memory_mb < 0:
            raise ClusterError(f"memory_mb={self.memory_mb}: expected >= 0 (0: machine total)")
        if not 1024 <= self.controller_port <= 65535 - self.nodes:
            raise ClusterError(f"controller_port={self.controller_port}: expected 1024.."
                               f"{65535 - self.nodes} (node ports follow it)")
        if self.min_job_age_s < 2:
            raise ClusterError(f"min_job_age_s={self.min_job_age_s}: SLURM requires >= 2")
        for key in ("partition", "cluster_name"):
            value = getattr(self, key)
            if not value.replace("_", "").replace("-", "").isalnum():
                raise ClusterError(f"{key}={value!r}: use letters, digits, '-' and '_' only")

    @property
    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    @property
    def slurmd_ports(self) -> list[int]:
        return [self.controller_port + i for i in range(1, self.nodes + 1)]

    @property
    def ports(self) -> list[int]:
        return [self.controller_port, *self.slurmd_ports]


def render_slurm_conf(spec: ClusterSpec, state_dir: Path, hostname: str, user: str,
                      munge_socket: Path, memory_mb: int) -> str:
    """The cgroup-free, accounting-free slurm.conf for ``spec`` (docs/operations.md)."""
    d = Path(state_dir)
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={port} "
        f"CPUs={spec.cpus_per_node} RealMemory={memory_mb} State=UNKNOWN"
        for name, port in zip(spec.node_names, spec.slurmd_ports))
    return f"""\
# Written by launchers/slurm_local.py for a one-machine test cluster; regenerated on start.
ClusterName={spec.cluster_name}
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={spec.controller_port}
SlurmUser={user}
SlurmdUser={user}
# A private munged: its own key and socket, so the machine's munge is neither used nor disturbed.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={d / "ctld"}
SlurmdSpoolDir={d / "spool"}/slurmd-%n
SlurmctldPidFile={d / "ctld"}/slurmctld.pid
SlurmdPidFile={d / "spool"}/slurmd-%n.pid
SlurmctldLogFile={d / "log"}/slurmctld.log
SlurmdLogFile={d / "log"}/slurmd-%n.log
# No cgroups: works in containers and VMs without a delegated cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
# No accounting: sacct fails; use gtl_dist.slurm_query.job_states instead.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Trust the CPU counts written here, so nodes may claim more CPUs than the machine has.
SlurmdParameters=config_overrides
MinJobAge={spec.min_job_age_s}
# A cancelled job's processes get SIGKILL 5 s after SIGTERM (default 30): quick teardown.
KillWait=5
ReturnToService=2
MailProg=/bin/true
{nodes}
# FORCE:4 lets four small jobs share each CPU, so arrays and two-node jobs fit a 2-core machine.
PartitionName={spec.partition} Nodes={",".join(spec.node_names)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def find_free_controller_port(nodes: int, low: int = 20000, high: int = 40000,
                              attempts: int = 200) -> int:
    """A controller port such that it and the ``nodes`` ports after it are free right now.

    For test sessions that must not clash with a cluster someone else runs on the default
    ports. The scan starts at a pid-dependent offset so concurrent sessions spread out.
    """
    span = high - low - nodes
    start = (os.getpid() * 7919) % span
    for i in range(attempts):
        port = low + (start + i * (nodes + 1)) % span
        if all(_port_is_free(p) for p in range(port, port + nodes + 1)):
            return port
    raise ClusterError(f"no {nodes + 1} consecutive free TCP ports found in {low}..{high}")


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


# ----------------------------------------------------------------------------------------------
# The cluster
# ----------------------------------------------------------------------------------------------

class LocalSlurmCluster:
    """Start, inspect and stop the one-machine cluster whose state lives in ``state_dir``.

    ``spec`` is used by ``start``; ``status``/``stop`` read the spec recorded at start.
    """

    def __init__(self, state_dir: str | os.PathLike, spec: Optional[ClusterSpec] = None):
        self.state_dir = Path(state_dir).absolute()
        self.spec = spec or ClusterSpec()
        state = self._read_state()
        if state is not None and spec is None:
            self.spec = ClusterSpec(**state["spec"])

    # -- paths and environment ----------------------------------------------------------------

    @property
    def conf_path(self) -> Path:
        return self.state_dir / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.state_dir / "run" / "munge.socket"

    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF: the environment for this cluster's client commands."""
        return {**os.environ, "SLURM_CONF": str(self.conf_path)}

    def _state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _read_state(self) -> Optional[dict]:
        path = self._state_path()
        if not path.exists():
            return None
        state = read_json(path)
        if "daemons" not in state or "spec" not in state:
            raise ClusterError(f"{path}: not a cluster state file (keys 'daemons', 'spec' "
                               f"missing); remove {self.state_dir} by hand if it is stale")
        unmatched = [d["pid"] for d in state["daemons"] if "started" not in d]
        if unmatched:
            raise ClusterError(f"{path}: written by an older version of this tool, without the "
                               f"daemons' start times; stop pids {unmatched} by hand if they are its "
                               f"daemons, then remove {self.state_dir}")
        return state

    # -- inspection -----------------------------------------------------------------------------

    def daemons(self) -> list[dict]:
        """Recorded daemons, each with name, pid, started (its start time), argv, log and a live
        ``alive``."""
        state = self._read_state()
        if state is None:
            return []
        return [{**d, "alive": is_running(d["pid"], d["started"])} for d in state["daemons"]]

    def is_running(self) -> bool:
        """True when every daemon of a completed start is alive."""
        state = self._read_state()
        daemons = self.daemons()
        return bool(state and state.get("complete") and daemons
                    and all(d["alive"] for d in daemons))

    def status(self) -> dict:
        """State dir, conf, per-daemon liveness and (when the controller answers) node states."""
        daemons = self.daemons()
        nodes = {}
        if daemons and any(d["alive"] and d["name"] == "slurmctld" for d in daemons):
            try:
                nodes = self.node_states()
            except SlurmCommandError as exc:
                nodes = {"error": str(exc)}
        return {"state_dir": str(self.state_dir), "slurm_conf": str(self.conf_path),
                "running": self.is_running(), "daemons": daemons, "nodes": nodes}

    def node_states(self) -> dict[str, str]:
        """{node name: lower-case state} from sinfo, e.g. {"n1": "idle", "n2": "mixed"}."""
        proc = run_slurm(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env(), timeout_s=10)
        states = {}
        for line in proc.stdout.splitlines():
            if line.strip():
                name, state = line.split(None, 1)
                states[name] = state.strip()
        return states

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every daemon log, for error messages."""
        logs = sorted((self.state_dir / "log").glob("*")) if (self.state_dir / "log").exists() else []
        # A daemon's captured stderr repeats its log file once logging is up; it only adds
        # something (e.g. a config error) when there is no log file yet.
        logs = [p for p in logs if not (p.suffix == ".out" and p.with_suffix(".log").exists()
                                         and p.with_suffix(".log").stat().st_size > 0)]
        if not logs:
            return f"(no logs under {self.state_dir / 'log'})"
        return "\n".join(f"--- {p} ---\n{_tail(p, lines)}" for p in logs)

    # -- start ----------------------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> bool:
        """Start the cluster and wait until every node is idle; False if it was already running.

        On failure the daemons started so far are stopped, the state dir (with the logs) is
        kept, and ClusterError carries the log tails.
        """
        missing = missing_programs()
        if missing:
            raise ClusterError(f"missing programs: {', '.join(missing)}; {INSTALL_HINT}")
        state = self._read_state()
        if state is not None:
            daemons = self.daemons()
            alive = [d["name"] for d in daemons if d["alive"]]
            if alive and len(alive) == len(daemons) and state.get("complete"):
                recorded = ClusterSpec(**state["spec"])
                if recorded != self.spec:
                    raise ClusterError(
                        f"a cluster with another shape is already running in {self.state_dir} "
                        f"({recorded}); stop it first to start {self.spec}")
                return False
            if alive:
                raise ClusterError(
                    f"the cluster in {self.state_dir} is only partly running "
                    f"(alive: {', '.join(alive)}); stop it first "
                    f"(python launchers/slurm_cluster.py stop --dir {self.state_dir})")
            shutil.rmtree(self.state_dir)  # stale: a previous run died without `stop`
        elif self.state_dir.exists() and any(self.state_dir.iterdir()):
            raise ClusterError(f"{self.state_dir} exists, is not empty and has no {STATE_FILE}: "
                               f"not a cluster state dir; pick another directory")
        busy = [p for p in self.spec.ports if not _port_is_free(p)]
        if busy:
            raise ClusterError(
                f"TCP port(s) {', '.join(map(str, busy))} already in use (another cluster?); "
                f"choose a different controller port (--port), the nodes use the next "
                f"{self.spec.nodes}")
        if len(str(self.munge_socket)) > _MAX_SOCKET_PATH:
            raise ClusterError(f"{self.munge_socket}: path longer than {_MAX_SOCKET_PATH} bytes, "
                               f"too long for a unix socket; use a shorter state dir")
        self._prepare_dir()
        try:
            self._start_daemons(timeout_s)
        except BaseException as exc:
            tails = self.log_tails()
            self._terminate_daemons(timeout_s=10)
            if isinstance(exc, ClusterError):
                raise ClusterError(f"{exc}\nThe logs are kept in {self.state_dir / 'log'}:\n"
                                   f"{tails}") from None
            raise
        return True

    def _prepare_dir(self) -> None:
        d = self.state_dir
        for sub, mode in (("", 0o755), ("munge", 0o700), ("run", 0o755), ("ctld", 0o700),
                          ("spool", 0o755), ("log", 0o755)):
            path = d / sub
            path.mkdir(parents=True, exist_ok=True)
            if path.stat().st_uid != os.getuid():
                raise ClusterError(f"{path}: owned by uid {path.stat().st_uid}, not by you "
                                   f"(uid {os.getuid()}); pick another --dir")
            path.chmod(mode)
        for name in self.spec.node_names:  # slurmd logs an error if it must create its own
            (d / "spool" / f"slurmd-{name}").mkdir(exist_ok=True)
        key = d / "munge" / "munge.key"
        # Our own key rather than /etc/munge/munge.key: only our daemons and clients talk to
        # this munged, and the system key is readable by root/munge only.
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(128))
        memory = self.spec.memory_mb or psutil.virtual_memory().total // 2**20
        hostname = socket.gethostname().split(".")[0]
        atomic_write_text(self.conf_path, render_slurm_conf(
            self.spec, d, hostname, getpass.getuser(), self.munge_socket, memory))
        self.conf_path.chmod(0o644)
        self._write_state([], complete=False)

    def _write_state(self, daemons: list[dict], complete: bool) -> None:
        atomic_write_json(self._state_path(), {"spec": asdict(self.spec), "daemons": daemons,
                                               "complete": complete})

    def _spawn(self, name: str, argv: list[str], recorded: list[dict]) -> subprocess.Popen:
        log = self.state_dir / "log" / f"{name}.out"
        env = {**os.environ, "SLURM_CONF": str(self.conf_path), MARKER_VAR: str(self.state_dir)}
        with open(log, "ab") as out:
            # A new session: Ctrl-C in the starting terminal must not reach the daemons.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env=env, cwd=self.state_dir, start_new_session=True)
        started = start_time(proc.pid)
        if started is None:  # exited before we could look: record nothing, report the log
            proc.wait()
            raise ClusterError(f"{name} exited at once with code {proc.returncode}")
        recorded.append({"name": name, "pid": proc.pid, "started": started, "argv": argv,
                         "log": str(log)})
        # Record before waiting on anything, so `stop` can find it even if we die now.
        self._write_state(recorded, complete=False)
        return proc

    def _start_daemons(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        recorded: list[dict] = []
        procs: dict[str, subprocess.Popen] = {}
        d = self.state_dir
        procs["munged"] = self._spawn("munged", [
            slurm_program("munged"), "--foreground", f"--socket={self.munge_socket}",
            f"--key-file={d / 'munge' / 'munge.key'}", f"--pid-file={d / 'munge' / 'munged.pid'}",
            f"--log-file={d / 'log' / 'munged.log'}", f"--seed-file={d / 'munge' / 'munged.seed'}",
        ], recorded)
        self._wait(lambda: self.munge_socket.exists(), procs, deadline, "munged socket")
        conf = str(self.conf_path)
        procs["slurmctld"] = self._spawn("slurmctld", [slurm_program("slurmctld"), "-D", "-f", conf],
                                         recorded)
        self._wait(self._controller_answers, procs, deadline, "slurmctld to answer `scontrol ping`")
        for name in self.spec.node_names:
            procs[f"slurmd-{name}"] = self._spawn(
                f"slurmd-{name}", [slurm_program("slurmd"), "-D", "-f", conf, "-N", name], recorded)
        self._wait(self._nodes_idle, procs, deadline,
                   f"nodes {','.join(self.spec.node_names)} to be idle in sinfo")
        self._write_state(recorded, complete=True)

    def _controller_answers(self) -> bool:
        proc = run_slurm(["scontrol", "ping"], env=self.env(), timeout_s=10, check=False)
        return proc.returncode == 0 and "UP" in proc.stdout

    def _nodes_idle(self) -> bool:
        try:
            states = self.node_states()
        except SlurmCommandError:
            return False
        return all(states.get(n) == "idle" for n in self.spec.node_names)

    def _wait(self, ready, procs: dict[str, subprocess.Popen], deadline: float, what: str) -> None:
        while True:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with code {proc.returncode} while waiting "
                                       f"for {what}")
            if ready():
                return
            if time.monotonic() > deadline:
                detail = ""
                if what.startswith("nodes"):
                    try:
                        detail = f" (sinfo: {self.node_states()})"
                    except SlurmCommandError as exc:
                        detail = f" ({exc})"
                raise ClusterError(f"timed out waiting for {what}{detail}")
            time.sleep(0.25)

    # -- stop -----------------------------------------------------------------------------------

    def stop(self, timeout_s: float = 30.0) -> list[str]:
        """Cancel this cluster's jobs, stop its daemons, then delete the state dir.

        Returns what was done, one line per action. The state dir is removed only once
        every recorded process is gone; if one survives SIGKILL, ClusterError says which.
        """
        state = self._read_state()
        if state is None:
            return [f"no cluster recorded in {self.state_dir}; nothing to stop"]
        actions = []
        daemons = self.daemons()
        if any(d["alive"] and d["name"] == "slurmctld" for d in daemons):
            actions += self._cancel_jobs(timeout_s=min(timeout_s, 15.0))
        actions += self._terminate_daemons(timeout_s)
        survivors = [d for d in self.daemons() if d["alive"]] + self._stray_processes()
        if survivors:
            raise ClusterError(f"still alive after SIGKILL: {survivors}; {self.state_dir} kept")
        shutil.rmtree(self.state_dir)
        actions.append(f"removed {self.state_dir}")
        return actions

    def _cancel_jobs(self, timeout_s: float) -> list[str]:
        # Cancelling through SLURM lets slurmstepd kill the job processes it tracks; stopping
        # slurmd first would orphan them.
        env = self.env()
        try:
            ids = run_slurm(["squeue", "-h", "-o", "%A"], env=env, timeout_s=10).stdout.split()
            if not ids:
                return []
            run_slurm(["scancel", *sorted(set(ids))], env=env, timeout_s=10, check=False)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if not run_slurm(["squeue", "-h", "-o", "%A"], env=env, timeout_s=10).stdout.split():
                    break
                time.sleep(0.5)
        except SlurmCommandError as exc:
            return [f"could not cancel jobs ({exc}); their processes are killed below"]
        return [f"cancelled {len(set(ids))} job(s)"]

    def _terminate_daemons(self, timeout_s: float) -> list[str]:
        """SIGTERM slurm daemons, then munged (the others need it to shut down), SIGKILL stragglers."""
        actions = []
        daemons = self.daemons()
        slurm = [d for d in daemons if d["name"] != "munged"]
        munge = [d for d in daemons if d["name"] == "munged"]
        for group in (slurm, munge):
            actions += self._terminate(group, timeout_s)
        strays = self._stray_processes()
        for pid, started, what in strays:
            if is_running(pid, started):
                os.kill(pid, signal.SIGKILL)
                actions.append(f"killed leftover {what} (pid {pid})")
        self._wait_gone([(pid, started) for pid, started, _ in strays], 5.0)
        return actions

    def _terminate(self, daemons: list[dict], timeout_s: float) -> list[str]:
        actions = []
        live = [d for d in daemons if is_running(d["pid"], d["started"])]
        for d in live:
            os.kill(d["pid"], signal.SIGTERM)
        left = self._wait_gone([(d["pid"], d["started"]) for d in live], timeout_s)
        for d in live:
            if (d["pid"], d["started"]) in left:
                os.kill(d["pid"], signal.SIGKILL)
                actions.append(f"killed {d['name']} (pid {d['pid']}): no exit {timeout_s:.0f} s "
                               f"after SIGTERM")
            else:
                actions.append(f"stopped {d['name']} (pid {d['pid']})")
        self._wait_gone(list(left), 5.0)
        return actions

    @staticmethod
    def _wait_gone(procs: list[tuple[int, float]], timeout_s: float) -> set[tuple[int, float]]:
        deadline = time.monotonic() + timeout_s
        left = set(procs)
        while left:
            left = {p for p in left if is_running(*p)}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return left

    def _stray_processes(self) -> list[tuple[int, float, str]]:
        """(pid, start time, description) of live processes this cluster's slurmd spawned.

        slurmstepd carries MARKER_VAR from slurmd's environment; job processes are its
        descendants. Only root or the cluster's user can read those environments, which is
        also who runs the cluster.
        """
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter(["environ"]):
            environ = process.info["environ"] or {}
            if environ.get(MARKER_VAR) == str(self.state_dir) and process.pid != os.getpid():
                try:
                    for member in [process, *process.children(recursive=True)]:
                        found[member.pid] = member
                except psutil.NoSuchProcess:
                    continue
        strays = []
        for pid in sorted(found):
            try:
                with found[pid].oneshot():
                    if found[pid].status() == psutil.STATUS_ZOMBIE:
                        continue
                    what = " ".join(found[pid].cmdline()).strip() or "?"
                    strays.append((pid, found[pid].create_time(), what))
            except psutil.NoSuchProcess:
                continue
        return strays
