"""The one-machine SLURM cluster: its config, its start/stop discipline, and real jobs on it.

Unmarked tests need no SLURM (config rendering, parsing, and `stop` signalling only what it
recorded, checked on plain `sleep` processes). Tests marked `slurm` run on the session's real
three-node cluster (tests/slurm_fixtures.py): a submitit job array, a job spanning n1 and n2,
job states without accounting, and a second cluster driven through the CLI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import cloudpickle
import psutil
import pytest
import submitit

from gtl_dist.processes import start_time
from gtl_dist.slurm_query import UNKNOWN, SlurmCommandError, job_states, node_addr, parse_record
from slurm_fixtures import wait_for_results
from slurm_local import (MARKER_VAR, ClusterError, ClusterSpec, LocalSlurmCluster, find_free_controller_port,
                         render_slurm_conf)

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "launchers" / "slurm_cluster.py"

# Jobs unpickle these functions in a fresh interpreter that cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def conf_settings(text: str) -> dict[str, str]:
    """Top-level ``Key=value`` lines of a slurm.conf (node and partition lines excluded)."""
    settings = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and " " not in line:
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


# ----------------------------------------------------------------------------------------------
# No SLURM needed
# ----------------------------------------------------------------------------------------------

def test_rendered_conf_is_cgroup_free_accounting_free_and_two_nodes_on_localhost(tmp_path):
    spec = ClusterSpec(nodes=2, cpus_per_node=3, controller_port=23000)
    sock = tmp_path / "run" / "munge.socket"
    text = render_slurm_conf(spec, tmp_path, "box", "alice", sock, memory_mb=4000)
    settings = conf_settings(text)
    assert {k: settings[k] for k in (
        "SlurmctldHost", "SlurmctldPort", "SlurmUser", "SlurmdUser", "AuthInfo", "ProctrackType",
        "TaskPlugin", "AccountingStorageType", "JobAcctGatherType", "SelectType",
        "SelectTypeParameters", "ReturnToService", "MailProg", "MinJobAge",
        "SlurmdSpoolDir")} == {
        "SlurmctldHost": "box(127.0.0.1)", "SlurmctldPort": "23000", "SlurmUser": "alice",
        "SlurmdUser": "alice", "AuthInfo": f"socket={sock}",
        "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",
        "AccountingStorageType": "accounting_storage/none",
        "JobAcctGatherType": "jobacct_gather/none", "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_CPU", "ReturnToService": "2", "MailProg": "/bin/true",
        "MinJobAge": "3600", "SlurmdSpoolDir": f"{tmp_path}/spool/slurmd-%n"}
    nodes = [parse_record(line) for line in text.splitlines() if line.startswith("NodeName=")]
    assert nodes == [
        {"NodeName": f"n{i}", "NodeHostname": "box", "NodeAddr": "127.0.0.1",
         "Port": str(23000 + i), "CPUs": "3", "RealMemory": "4000", "State": "UNKNOWN"}
        for i in (1, 2)]
    partition = [parse_record(line) for line in text.splitlines() if line.startswith("PartitionName=")]
    assert partition == [{"PartitionName": "debug", "Nodes": "n1,n2", "Default": "YES",
                          "MaxTime": "INFINITE", "State": "UP", "OverSubscribe": "FORCE:4"}]


@pytest.mark.parametrize("kwargs, key", [
    ({"nodes": 0}, "nodes=0"), ({"cpus_per_node": 0}, "cpus_per_node=0"),
    ({"controller_port": 80}, "controller_port=80"), ({"partition": "a b"}, "partition='a b'"),
    ({"min_job_age_s": 1}, "min_job_age_s=1"),
])
def test_spec_rejects_bad_values_naming_them(kwargs, key):
    with pytest.raises(ClusterError, match="^" + key.replace("(", r"\(")):
        ClusterSpec(**kwargs)


def test_parse_record_keeps_values_with_spaces_and_odd_keys():
    line = ("NodeName=n1 Arch=x86_64 CoresPerSocket=1 CPUAlloc=0 NodeAddr=127.0.0.1 "
            "NodeHostName=vm Version=22.05.8 OS=Linux 6.1.0-18-amd64 #1 SMP PREEMPT_DYNAMIC "
            "RealMemory=24105 AllocNode:Sid=localhost:3311 CPUs/Task=1 Reason=Not responding [s@t]")
    record = parse_record(line)
    assert record["NodeAddr"] == "127.0.0.1"
    assert record["OS"] == "Linux 6.1.0-18-amd64 #1 SMP PREEMPT_DYNAMIC"
    assert record["AllocNode:Sid"] == "localhost:3311" and record["CPUs/Task"] == "1"
    assert record["Reason"] == "Not responding [s@t]"


def _fake_squeue(folder: Path, body: str, monkeypatch) -> None:
    folder.mkdir()
    script = folder / "squeue"
    script.write_text("#!/bin/sh\nfor a in \"$@\"; do ids=\"$a\"; done\n" + body)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_job_states_asks_one_by_one_when_squeue_rejects_an_unknown_id(tmp_path, monkeypatch):
    # Some SLURM versions reject the whole -j list when one id was purged.
    _fake_squeue(tmp_path / "bin", """\
case ",$ids," in *,99,*) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;; esac
for id in $(echo "$ids" | tr , ' '); do
  case $id in 7) echo "7|RUNNING";; 8_1) echo "8_1|COMPLETED";; esac
done
""", monkeypatch)
    assert job_states(["7", "8_1", 99]) == {"7": "RUNNING", "8_1": "COMPLETED", "99": UNKNOWN}


def test_job_states_raises_when_the_controller_is_down(tmp_path, monkeypatch):
    _fake_squeue(tmp_path / "bin", 'echo "slurm_load_jobs error: Unable to contact slurm '
                                   'controller (connect failure)" >&2; exit 1\n', monkeypatch)
    with pytest.raises(SlurmCommandError, match="Unable to contact slurm controller"):
        job_states(["7"])


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for init to reap it counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _live_processes(accept) -> list[int]:
    """Pids of live processes for which ``accept(pid, ppid, argv)`` holds."""
    return [p.pid for p in psutil.process_iter(["ppid", "cmdline", "status"])
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.info["cmdline"] is not None
            and accept(p.pid, p.info["ppid"], p.info["cmdline"])]


def _sleeper(env: dict | None = None, argv: tuple = ("sleep", "60")) -> subprocess.Popen:
    return subprocess.Popen(list(argv), env=env, start_new_session=True)


def test_stop_signals_only_recorded_processes_and_marked_job_steps(tmp_path):
    state_dir = tmp_path / "cluster"
    state_dir.mkdir()
    recorded = _sleeper()
    bystander = _sleeper()
    # A "slurmstepd" of this cluster with a job process that lacks the marker: both must go.
    step = _sleeper(env={**os.environ, MARKER_VAR: str(state_dir)},
                    argv=("sh", "-c", f"env -u {MARKER_VAR} sleep 60 & wait"))
    # A step of another cluster whose dir merely starts with ours: must stay.
    other_step = _sleeper(env={**os.environ, MARKER_VAR: f"{state_dir}x"})
    procs = [recorded, bystander, step, other_step]
    step_child = None
    try:
        deadline = time.monotonic() + 10
        while not _live_processes(lambda pid, ppid, argv: ppid == step.pid):
            assert time.monotonic() < deadline, "the fake job step never started its child"
            time.sleep(0.05)
        [step_child] = _live_processes(lambda pid, ppid, argv: ppid == step.pid)
        daemons = [
            {"name": "slurmd-n1", "pid": recorded.pid, "started": start_time(recorded.pid),
             "argv": ["sleep"], "log": ""},
            # The bystander's pid with another start time: a recycled pid, never to be signalled.
            {"name": "slurmctld", "pid": bystander.pid,
             "started": start_time(bystander.pid) - 1, "argv": ["sleep"], "log": ""},
        ]
        (state_dir / "cluster.json").write_text(json.dumps(
            {"spec": asdict(ClusterSpec()), "daemons": daemons, "complete": True}))

        actions = LocalSlurmCluster(state_dir).stop(timeout_s=5)

        # stop() reaps its own children, so Popen may only see "gone" (returncode 0).
        recorded.wait(timeout=5)
        step.wait(timeout=5)
        assert _gone(step_child)
        assert bystander.poll() is None and other_step.poll() is None
        assert not state_dir.exists()
        assert f"stopped slurmd-n1 (pid {recorded.pid})" in actions  # SIGTERM sufficed
        assert any(a.startswith("killed leftover sh -c") and f"(pid {step.pid})" in a
                   for a in actions), actions
        assert not any("slurmctld" in a for a in actions)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        # Only if stop() failed to: the orphaned child of the fake step, checked by its argv.
        if step_child is not None and not _gone(step_child) and \
                psutil.Process(step_child).cmdline() == ["sleep", "60"]:
            os.kill(step_child, 9)


def test_stop_without_a_recorded_cluster_does_nothing(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    assert "nothing to stop" in LocalSlurmCluster(tmp_path).stop()[0]
    assert (tmp_path / "keep.txt").exists()


NEEDS_SLURM = "import pytest\n\n\n@pytest.mark.slurm\ndef test_needs_slurm():\n    pass\n"


def _run_slurm_marked_suite(tmp_path: Path, path: str, require: bool,
                            test_source: str = NEEDS_SLURM) -> subprocess.CompletedProcess:
    """Run a one-test suite marked `slurm` through tests/slurm_fixtures.py in a fresh pytest."""
    suite = tmp_path / "suite"
    suite.mkdir(exist_ok=True)
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    slurm: needs SLURM\n")
    (suite / "conftest.py").write_text('pytest_plugins = ["slurm_fixtures"]\n')
    (suite / "test_needs_slurm.py").write_text(test_source)
    env = {k: v for k, v in os.environ.items() if k not in ("GTL_REQUIRE_SLURM", "SLURM_CONF")}
    env.update(PATH=path, PYTHONPATH=str(REPO / "tests"), **({"GTL_REQUIRE_SLURM": "1"} if require else {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           str(suite)], cwd=suite, env=env, capture_output=True, text=True,
                          timeout=120)


def test_marked_tests_skip_without_slurm_but_fail_when_ci_requires_it(tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    skipped = _run_slurm_marked_suite(tmp_path, str(empty), require=False)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
    assert "SLURM not installed (missing" in skipped.stdout and "apt-get install" in skipped.stdout
    failed = _run_slurm_marked_suite(tmp_path, str(empty), require=True)
    assert failed.returncode == 1 and "1 error" in failed.stdout, failed.stdout
    assert "SLURM not installed" in failed.stdout and "GTL_REQUIRE_SLURM=1" in failed.stdout


def test_ci_turns_any_skip_of_a_slurm_test_into_a_failure(tmp_path):
    source = ("import pytest\n\n\n@pytest.mark.slurm\n@pytest.mark.skip(reason='flaky, later')\n"
              "def test_needs_slurm():\n    pass\n\n\n@pytest.mark.skip(reason='unrelated')\n"
              "def test_plain():\n    pass\n")
    relaxed = _run_slurm_marked_suite(tmp_path, os.environ["PATH"], require=False, test_source=source)
    assert relaxed.returncode == 0 and "2 skipped" in relaxed.stdout, relaxed.stdout
    strict = _run_slurm_marked_suite(tmp_path, os.environ["PATH"], require=True, test_source=source)
    assert strict.returncode == 1 and "1 skipped, 1 error" in strict.stdout, strict.stdout
    assert "skipped although GTL_REQUIRE_SLURM=1" in strict.stdout and "flaky, later" in strict.stdout


def _marked_cluster_dirs() -> set[str]:
    """State dirs named by the marker variable of live processes (daemons and job steps)."""
    return {p.info["environ"][MARKER_VAR] for p in psutil.process_iter(["environ", "status"])
            if p.info["status"] != psutil.STATUS_ZOMBIE and MARKER_VAR in (p.info["environ"] or {})}


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_required_slurm_fails_with_daemon_logs_when_the_cluster_cannot_start(tmp_path):
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    (fake / "slurmd").write_text("#!/bin/sh\necho 'fake slurmd: refusing to start' >&2\nexit 1\n")
    (fake / "slurmd").chmod(0o755)
    result = _run_slurm_marked_suite(tmp_path, f"{fake}{os.pathsep}{os.environ['PATH']}",
                                     require=True)
    assert result.returncode == 1 and "1 error" in result.stdout, result.stdout
    assert "the test SLURM cluster did not start" in result.stdout
    # Which fake slurmd is seen failing first, and whether it is seen alive before it exits, are
    # races, and a child reaped before it is looked at leaves no exit status: the message names a
    # daemon, its log tail says why.
    assert re.search(r"slurmd-n\d exited (at once )?with code \d+", result.stdout), result.stdout
    assert "fake slurmd: refusing to start" in result.stdout  # the log tail is in the report
    kept = re.search(r"The logs are kept in (\S+)/log:", result.stdout)
    assert kept and (Path(kept.group(1)) / "log" / "slurmctld.log").exists(), result.stdout
    # The failed start stopped the munged and slurmctld it had started.
    assert kept.group(1) not in _marked_cluster_dirs()
    shutil.rmtree(kept.group(1))


# ----------------------------------------------------------------------------------------------
# On the real cluster
# ----------------------------------------------------------------------------------------------

def _wait_states(expected: dict[str, str], timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        states = job_states(expected)
        if states == expected or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def square_in_array(x: int) -> dict:
    start = time.time()
    time.sleep(1.0)
    return {"square": x * x, "array_task": int(os.environ["SLURM_ARRAY_TASK_ID"]),
            "node": os.environ["SLURMD_NODENAME"], "start": start, "end": time.time()}


def report_placement() -> dict:
    from gtl_dist.train.dist import default_node_addr, first_host

    nodelist = os.environ["SLURM_JOB_NODELIST"]
    return {"procid": int(os.environ["SLURM_PROCID"]), "nodeid": int(os.environ["SLURM_NODEID"]),
            "node": os.environ["SLURMD_NODENAME"], "hostname": socket.gethostname(),
            "nodelist": os.environ["SLURM_JOB_NODELIST"],
            "master_addr": default_node_addr(first_host(nodelist))}  # as the trainer finds it


def _executor(tmp_path: Path, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs" / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=3, slurm_signal_delay_s=30, cpus_per_task=1, **params)
    return executor


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_job_array_returns_every_result_and_respects_parallelism(tmp_path):
    inputs = [3, 5, 7, 11]
    executor = _executor(tmp_path, slurm_array_parallelism=2, name="gtl-array")
    jobs = executor.map_array(square_in_array, inputs)
    array_id = jobs[0].job_id.split("_")[0]
    assert [job.job_id for job in jobs] == [f"{array_id}_{i}" for i in range(4)]
    [script] = (tmp_path / "jobs").glob(".submission_file_*.sh")  # arrays keep it there
    assert "#SBATCH --array=0-3%2" in script.read_text()

    results = [r for [r] in wait_for_results(jobs, timeout_s=120)]

    assert [r["square"] for r in results] == [9, 25, 49, 121]
    assert [r["array_task"] for r in results] == [0, 1, 2, 3]
    assert {r["node"] for r in results} <= {"n1", "n2", "n3"}
    # At most two tasks ever overlapped in time (%2), checked on the tasks' own clocks.
    events = sorted([(r["start"], 1) for r in results] + [(r["end"], -1) for r in results])
    running = [sum(step for _, step in events[:i + 1]) for i in range(len(events))]
    assert max(running) <= 2
    # The pickles land before the tasks' processes exit: give SLURM a moment to agree.
    completed = {job.job_id: "COMPLETED" for job in jobs}
    assert _wait_states(completed, timeout_s=30) == completed


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_two_node_job_runs_one_task_on_n1_and_one_on_n2(tmp_path):
    executor = _executor(tmp_path, nodes=2, tasks_per_node=1, name="gtl-two-nodes")
    job = executor.submit(report_placement)

    [tasks] = wait_for_results([job], timeout_s=120)

    tasks = sorted(tasks, key=lambda t: t["procid"])
    assert [(t["procid"], t["nodeid"], t["node"]) for t in tasks] == [(0, 0, "n1"), (1, 1, "n2")]
    # Both "nodes" are this machine; the master address comes from n1's NodeAddr, not its name.
    assert {t["hostname"] for t in tasks} == {socket.gethostname()}
    assert {t["nodelist"] for t in tasks} == {"n[1-2]"}
    assert {t["master_addr"] for t in tasks} == {"127.0.0.1"}
    assert node_addr("n2") == "127.0.0.1"
    assert _wait_states({job.job_id: "COMPLETED"}, timeout_s=30) == {job.job_id: "COMPLETED"}


def _sbatch(*args: str, cwd: Path) -> str:
    out = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", *args], cwd=cwd,
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return out.strip().split(";")[0]


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_job_states_without_accounting(tmp_path, slurm_cluster):
    failing = _sbatch("--wrap", "exit 3", cwd=tmp_path)
    held = _sbatch("--hold", "--wrap", "true", cwd=tmp_path)
    running = _sbatch("--wrap", "sleep 120", cwd=tmp_path)
    try:
        states = _wait_states({failing: "FAILED", held: "PENDING", running: "RUNNING"}, 60)
        assert states == {failing: "FAILED", held: "PENDING", running: "RUNNING"}
        assert job_states(["999999"]) == {"999999": UNKNOWN}
        # sacct really is unavailable here: this is why job_states exists.
        assert subprocess.run(["sacct", "-j", failing], capture_output=True).returncode != 0
    finally:
        subprocess.run(["scancel", held, running], check=True, timeout=30)
    assert _wait_states({held: "CANCELLED", running: "CANCELLED"}, 30) == \
        {held: "CANCELLED", running: "CANCELLED"}


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_cli_second_cluster_is_idempotent_and_stop_leaves_the_first_alone(tmp_path, slurm_cluster):
    first = slurm_cluster
    state_dir = Path("/tmp") / f"gtl-slurm-cli-{os.getpid()}"
    port = find_free_controller_port(1)
    started = _cli("start", "--dir", str(state_dir), "--nodes", "1", "--port", str(port))
    try:
        assert started.returncode == 0, started.stderr
        assert "started 1 node(s) n1" in started.stdout
        again = _cli("start", "--dir", str(state_dir), "--nodes", "1", "--port", str(port))
        assert again.returncode == 0 and again.stdout.startswith("already running"), again
        reshaped = _cli("start", "--dir", str(state_dir), "--nodes", "2", "--port", str(port))
        assert reshaped.returncode == 1 and "another shape is already running" in reshaped.stderr
        status = _cli("status", "--dir", str(state_dir))
        assert status.returncode == 0 and "node n1: idle" in status.stdout, status
        env_line = _cli("env", "--dir", str(state_dir)).stdout.strip()
        assert env_line == f"export SLURM_CONF={state_dir}/slurm.conf"
        second = LocalSlurmCluster(state_dir)
        pids = [d["pid"] for d in second.daemons()]
        assert len(pids) == 4 - 1 and second.is_running()
        # A running job on the second cluster must not survive its stop.
        job = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 317"],
                             cwd=tmp_path, env=second.env(), capture_output=True, text=True,
                             check=True).stdout.strip()
        deadline = time.monotonic() + 60
        while not _live_processes(lambda pid, ppid, argv: argv[-2:] == ["sleep", "317"]):
            assert time.monotonic() < deadline, "job on the second cluster never started"
            time.sleep(0.5)
        assert job_states([job], env=second.env()) == {job: "RUNNING"}
        busy = LocalSlurmCluster(tmp_path / "clash", ClusterSpec(nodes=1, controller_port=port))
        with pytest.raises(ClusterError, match=f"port\\(s\\) {port}"):
            busy.start()
    finally:
        stopped = _cli("stop", "--dir", str(state_dir))
    assert stopped.returncode == 0, stopped.stderr
    assert "cancelled 1 job(s)" in stopped.stdout
    assert not state_dir.exists()
    assert all(_gone(pid) for pid in pids)
    leftovers = _live_processes(lambda pid, ppid, argv: argv[-2:] == ["sleep", "317"])
    assert leftovers == [], f"job processes of the stopped cluster survive: {leftovers}"
    assert _cli("status", "--dir", str(state_dir)).returncode == 3
    # The session's cluster is untouched.
    assert first.is_running()
    assert set(first.node_states()) == set(first.spec.node_names)
