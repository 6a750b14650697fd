"""One launcher per run directory (gtl_dist/cluster/run_lock.py) and a submissions.json that
concurrent writers never lose entries of (SubmissionLog)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from gtl_dist.cluster.submissions import Submission, SubmissionLog
from gtl_dist.cluster.run_lock import RECORD_NAME, RunDirBusy, hold_run_dir
from gtl_dist.data import Manifest
from gtl_dist.processes import pid_alive
from gtl_dist.paths import RunPaths

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _write_record(run_dir: Path, pid: int, host: str) -> Path:
    record = run_dir / RECORD_NAME
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"pid": pid, "host": host, "started": time.time() - 3600,
                                  "command": "python launchers/submit.py --config old.yaml"}))
    return record


def test_two_launchers_on_one_run_dir_one_runs_and_the_other_refuses(tmp_path):
    """Started together: one builds the data (once, in one job), the other submits nothing and
    exits 3 naming the first's PID and host and what to do."""
    run_dir = tmp_path / "tiny"
    # 20000 source sequences: the data job takes several seconds, so the launchers overlap.
    cmd = [sys.executable, str(REPO / "launchers" / "submit.py"), "--config", "configs/tiny.yaml",
           "--cluster", "local", "--run-dir", str(run_dir), "--stages", "data", "--wait",
           "--set", "data.markov.num_source=20000"]
    env = {**os.environ, "GTL_NO_PROGRESS_BAR": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], outs
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    out, err = outs[loser]
    assert f"is held by launcher PID {procs[winner].pid} on host {socket.gethostname()}" in err
    assert f"python launchers/status.py --run-dir {run_dir}" in err and "kill " in err
    assert "started data" not in out
    assert outs[winner][0].count("started data") == 1 and "finished data" in outs[winner][0]
    jobs = [p for p in (run_dir / "jobs" / "data").iterdir() if p.name.isdigit()]
    assert len(jobs) == 1  # the data were built once
    Manifest.load(run_dir / "data").verify()
    assert not (run_dir / RECORD_NAME).exists()  # the winner released the run directory


def test_a_held_run_dir_refuses_naming_the_holder(tmp_path):
    with hold_run_dir(tmp_path, "python launchers/submit.py --config c.yaml") as me:
        assert json.loads((tmp_path / RECORD_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirBusy, match=rf"{tmp_path / RECORD_NAME}: .* is held by launcher PID "
                                             rf"{me.pid} on host {socket.gethostname()} .*c\.yaml"):
            with hold_run_dir(tmp_path):
                pass
    with hold_run_dir(tmp_path):  # released at the end of the block
        pass


def test_a_stale_lock_of_a_dead_launcher_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = _dead_pid()
    record = _write_record(tmp_path, dead, socket.gethostname())
    with caplog.at_level("WARNING", logger="gtl_dist.cluster.run_lock"):
        with hold_run_dir(tmp_path) as me:
            assert json.loads(record.read_text())["pid"] == me.pid == os.getpid()
    assert f"{record}: taking over from launcher PID {dead} on host {socket.gethostname()}" in caplog.text
    assert "ended without releasing the run directory" in caplog.text
    assert not record.exists()


def test_a_record_of_another_host_with_a_free_lock_is_refused_naming_the_fix(tmp_path):
    """Its PID cannot be checked, and its host may not see our flock: refuse, saying how to go on."""
    record = _write_record(tmp_path, 4242, "login-elsewhere")
    with pytest.raises(RunDirBusy, match=rf"If no launcher of {tmp_path} runs on login-elsewhere any "
                                         rf"more, delete {record} and launch again"):
        with hold_run_dir(tmp_path):
            pass
    assert json.loads(record.read_text())["pid"] == 4242  # left alone


def test_concurrent_submission_log_writers_lose_no_entry(tmp_path):
    """Each writer read the file before the others wrote (a stale view); every save still keeps
    the others' entries."""
    paths = RunPaths(tmp_path)
    logs = [SubmissionLog(paths) for _ in range(4)]
    start = threading.Barrier(len(logs))

    def write(w: int, log: SubmissionLog) -> None:
        start.wait()
        for i in range(25):
            log.record(SimpleNamespace(key=f"w{w}/t{i}"), Submission(f"{w}{i}", "g", "h", "local", "f"))
            log.save()

    threads = [threading.Thread(target=write, args=(w, log)) for w, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    saved = json.loads((paths.jobs / "submissions.json").read_text())
    assert sorted(saved) == sorted(f"w{w}/t{i}" for w in range(4) for i in range(25))
    assert saved["w3/t7"]["job_id"] == "37"


# -- jobs of an earlier launch ----------------------------------------------------------------------

@pytest.fixture
def tiny_launcher(tmp_path, configs_dir):
    from gtl_dist.cluster.dag import build_pipeline
    from gtl_dist.cluster.launch import Launcher
    from gtl_dist.cluster.options import LaunchOptions
    from gtl_dist.config import load_config

    def make(*overrides: str, cluster: str = "local") -> Launcher:
        cfg = load_config(configs_dir / "tiny.yaml", list(overrides))
        return Launcher(cfg, tmp_path / "run", LaunchOptions(cluster=cluster), build_pipeline(cfg))
    return make


def _record_job(launcher, task, job_id: str, cluster: str = "local") -> None:
    folder = str(launcher.paths.jobs / task.kind / "%j")
    launcher.subs.record(task, Submission(job_id, task.kind, launcher.pipeline.input_hash(task), cluster, folder))
    launcher.subs.save()


def test_changed_inputs_are_refused_while_a_job_made_with_the_old_ones_runs(tiny_launcher, monkeypatch):
    """--update-config must not start a second job on the directory of one that still runs."""
    from gtl_dist.cluster.options import LaunchError
    old = tiny_launcher()
    denoiser, sampled = (next(t for t in old.pipeline.tasks if t.kind == kind) for kind in ("denoiser", "sample"))
    job = subprocess.Popen(["sleep", "60"])
    try:
        _record_job(old, denoiser, str(job.pid))
        _record_job(old, sampled, "4242", cluster="slurm")
        monkeypatch.setattr("gtl_dist.cluster.launch.slurm_job_states", lambda subs: {"4242": "RUNNING"})
        changed = tiny_launcher("seed=7", cluster="slurm")  # every task's inputs change
        plan = changed.plan()
        assert denoiser in plan.to_run and set(plan.superseded) == {denoiser, sampled}
        with pytest.raises(LaunchError) as err:
            changed.check_prerequisites(plan)
        message = str(err.value)
        assert f"denoiser (local job, PID {job.pid})" in message and "(SLURM job 4242)" in message
        assert "kill <PID> / scancel <job>" in message and "nothing was submitted" in message
        same = tiny_launcher(cluster="slurm").plan()  # same inputs: the jobs are simply in flight
        assert same.superseded == {} and {denoiser, sampled} <= set(same.in_flight)
    finally:
        job.kill()
        job.wait()
    monkeypatch.setattr("gtl_dist.cluster.launch.slurm_job_states", lambda subs: {"4242": "COMPLETED"})
    plan = tiny_launcher("seed=7", cluster="slurm").plan()
    assert plan.superseded == {} and denoiser in plan.to_run
    tiny_launcher("seed=7", cluster="slurm").check_prerequisites(plan)


def test_a_local_launcher_waits_for_an_earlier_launchs_job_that_nothing_here_reads(tiny_launcher):
    """A launcher that died leaves its local jobs running; the next one holds the run directory
    until they end, even when no task it runs reads theirs (here the last one, the report)."""
    launcher = tiny_launcher()
    report = next(t for t in launcher.pipeline.tasks if t.kind == "eval")
    job = subprocess.Popen(["sleep", "1.5"])
    threading.Thread(target=job.wait).start()  # reap it, as init reaps a dead launcher's jobs
    _record_job(launcher, report, str(job.pid))
    plan = launcher.plan()
    assert report in plan.in_flight
    plan.to_run.clear()  # nothing else to run: only the wait is tested
    events: list[str] = []
    start = time.monotonic()
    failed = launcher.run_here(plan, on_event=events.append)
    assert time.monotonic() - start >= 1.0
    assert failed == [report]  # it ended without its completion marker
    assert any(f"waiting for {report.key} (local job {job.pid} of an earlier launch)" in e for e in events)
    assert any(f"FAILED {report.key}: its earlier job ended without finishing" in e for e in events)


def test_a_pid_the_kernel_gave_to_a_later_process_is_not_the_recorded_job(tiny_launcher):
    """Local job ids are PIDs, which the kernel reuses: a process that started after the job was
    recorded is another one, and a launcher must neither wait on it nor count its task as running."""
    launcher = tiny_launcher()
    report = next(t for t in launcher.pipeline.tasks if t.kind == "eval")
    job = subprocess.Popen(["sleep", "60"])
    try:
        assert pid_alive(job.pid) and pid_alive(job.pid, started=time.time())
        assert not pid_alive(job.pid, started=time.time() - 3600)
        folder = str(launcher.paths.jobs / "eval" / "%j")
        for submitted, in_flight in ((time.time() - 3600, False), (time.time(), True)):
            launcher.subs.record(report, Submission(str(job.pid), "eval", launcher.pipeline.input_hash(report),
                                                    "local", folder, submitted=submitted))
            assert (report in launcher.plan().in_flight) is in_flight
    finally:
        job.kill()
        job.wait()
    assert not pid_alive(job.pid) and not pid_alive("not a pid")
