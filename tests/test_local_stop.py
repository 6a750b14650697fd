"""A --cluster local launcher that stops takes its jobs with it, and one that is killed leaves them
to the next launcher, which adopts them: never two trainers on one task directory."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from gtl_dist.cluster.dag import build_pipeline
from gtl_dist.cluster.status import main as status_main
from gtl_dist.config import load_config
from gtl_dist.paths import RunPaths

REPO = Path(__file__).resolve().parents[1]


class Launcher:
    """launchers/submit.py on tiny.yaml's data and denoiser, in a session of its own (a signal to it
    reaches it alone, as `kill <pid>` would), its output read line by line as it comes."""

    def __init__(self, run_dir: Path, *extra: str):
        self.command = [sys.executable, str(REPO / "launchers" / "submit.py"), "--config", "configs/tiny.yaml",
                        "--cluster", "local", "--run-dir", str(run_dir), "--stages", "data", "denoiser", "--update-config",
                        *extra]
        # stderr to a file: a job the launcher leaves behind holds its pipes open (no end of file).
        self.stderr = run_dir.parent / f"{run_dir.name}-launcher-{time.monotonic_ns()}.err"
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(self.command, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                                         start_new_session=True, env={**os.environ, "GTL_NO_PROGRESS_BAR": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout_s: float = 600) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, f"the launcher ended ({self.proc.returncode}): {self.output()}"
                continue
            self.out.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} within {timeout_s:.0f} s: {self.output()}")

    def finish(self, timeout_s: float = 900) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=timeout_s)
        time.sleep(0.2)  # the reader thread drains the pipe
        while not self.lines.empty():
            self.out.append(self.lines.get())
        return rc, "".join(self.out), self.stderr.read_text()

    def output(self) -> str:
        return "".join(self.out)[-3000:]


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.5)


def training(run_dir: Path) -> bool:
    log = run_dir / "denoiser" / "train_log.jsonl"
    return log.is_file() and '"kind": "train"' in log.read_text()


def job_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@pytest.fixture
def built(tmp_path_factory):
    """A run directory of tiny.yaml whose data is built (copied afresh for each test)."""
    base = tmp_path_factory.getbasetemp() / "stop-base"
    if not (base / "data" / "DONE.json").is_file():
        proc = subprocess.run([sys.executable, str(REPO / "launchers" / "submit.py"), "--config",
                               "configs/tiny.yaml", "--cluster", "local", "--run-dir", str(base), "--stages", "data"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def copy(name: str) -> Path:
        shutil.copytree(base, tmp_path_factory.getbasetemp() / name)
        return tmp_path_factory.getbasetemp() / name
    return copy


def test_sigterm_stops_the_launcher_with_its_jobs_and_says_how_to_resume(built):
    run_dir = built("sigterm")
    launcher = Launcher(run_dir, "--set", "train.denoiser.steps=100000")
    controller = int(launcher.wait_for(r"started denoiser \(local job (\d+), log ")[1])
    wait_until(lambda: training(run_dir), 600, "the denoiser's first train record")
    tree = job_tree(controller)
    assert len(tree) >= 2  # submitit's controller and the rank it started
    launcher.proc.send_signal(signal.SIGTERM)
    rc, out, err = launcher.finish(timeout_s=120)
    assert rc == 130, out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM: its 1 running job(s) (denoiser) stopped with it; finished "
                           "tasks are kept and training resumes from its last checkpoint. Resume with: python "
                           "launchers/submit.py --config configs/tiny.yaml --cluster local"), err
    assert "Traceback" not in err
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert alive == []  # no orphan: the controller, its rank and everything they started are gone
    # status.py shows the stopped task as cancelled, with its log, and exits 1 as its help says.
    assert status_main(["--run-dir", str(run_dir), "--only", "cancelled"]) == 1


def test_sigterm_stops_a_debug_launcher_and_names_the_task_it_was_running(built):
    """--cluster debug runs the task in the launcher's own process: the stop line names it (it
    used to say that no job was running) and status.py shows it cancelled."""
    run_dir = built("sigterm-debug")
    launcher = Launcher(run_dir, "--cluster", "debug", "--set", "train.denoiser.steps=100000")
    wait_until(lambda: training(run_dir), 600, "the denoiser's first train record")
    launcher.proc.send_signal(signal.SIGTERM)
    rc, out, err = launcher.finish(timeout_s=120)
    assert rc == 130, out + err
    assert err.strip().splitlines()[-1].startswith(
        "stopped by SIGTERM: its 1 running job(s) (denoiser) stopped with it; finished tasks are kept"), err
    assert "Traceback" not in err
    assert status_main(["--run-dir", str(run_dir), "--only", "cancelled"]) == 1


def test_a_killed_launchers_job_is_adopted_by_the_next_launcher_never_run_twice(built):
    run_dir = built("killed")
    first = Launcher(run_dir, "--set", "train.denoiser.steps=100000")
    controller = int(first.wait_for(r"started denoiser \(local job (\d+), log ")[1])
    wait_until(lambda: training(run_dir), 600, "the denoiser's first train record")
    os.kill(first.proc.pid, signal.SIGKILL)  # no handler runs: its job is left behind, still training
    first.finish(timeout_s=60)
    tree = job_tree(controller)
    second = Launcher(run_dir, "--set", "train.denoiser.steps=100000")
    second.wait_for(rf"waiting for denoiser \(local job {controller} of an earlier launch\)")
    time.sleep(3)
    assert all(p.is_running() for p in tree)  # adopted as it is, not restarted
    # The job is the second launcher's now: stopping the launcher stops it.
    second.proc.send_signal(signal.SIGTERM)
    rc, out, err = second.finish(timeout_s=120)
    assert rc == 130 and "its 1 running job(s) (denoiser) stopped with it" in err, out + err
    assert "started denoiser" not in out  # never a second trainer on the denoiser's directory
    assert [p.name for p in (run_dir / "jobs" / "denoiser").iterdir() if p.name.isdigit()] == [str(controller)]
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert alive == []


def test_a_task_runs_in_one_job_at_a_time(tmp_path):
    """Whatever started them, a second job of a task that runs refuses at once (its flock)."""
    from gtl_dist.cluster.tasks import TaskFailed, run_task, task_lock
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    data = build_pipeline(cfg).group("data").tasks[0]
    paths = RunPaths(tmp_path)
    with task_lock(paths, data, rank=0):
        with pytest.raises(TaskFailed, match=r"^data: another job runs this task right now \(it holds \S+"
                                             r"jobs/running/data\.rank0\.lock\), and two jobs must never write "
                                             r"one task's directory"):
            run_task(cfg, tmp_path, data)
    assert not (tmp_path / "data" / "DONE.json").exists()
