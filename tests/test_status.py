"""launchers/status.py: its exit status and the --only filter on a fake run directory; a failed debug
run, a closed pipe and a folder of shards/build.py; the progress lines of a followed run."""

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from gtl_dist.cluster import submit as submit_cli
from gtl_dist.cluster.dag import build_pipeline
from gtl_dist.cluster.submissions import TASK_STATES, Submission, SubmissionLog
from gtl_dist.cluster.run_dir import prepare_run_dir
from gtl_dist.cluster.status import main
from gtl_dist.cluster.progress import TrainProgress, format_progress, train_log_path
from gtl_dist.cluster.tasks import write_marker
from gtl_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]





@pytest.fixture
def finished_run(tmp_path, configs_dir):
    """A run directory whose every task left a valid completion marker."""
    cfg = load_config(configs_dir / "tiny.yaml")
    paths = prepare_run_dir(cfg, tmp_path / "run")
    pipeline = build_pipeline(cfg)
    for task in pipeline.tasks:
        write_marker(pipeline, paths, task)
    return pipeline, paths


def fail(pipeline, paths, task, job_id="999999999"):
    """``task``'s local job ended with an error (submitit's result pickle), leaving no marker."""
    task.marker(paths).unlink()
    sub = Submission(job_id, task.kind, pipeline.input_hash(task), "local", str(paths.jobs / task.kind / "%j"))
    result = Path(sub.folder.replace("%j", job_id)) / f"{job_id}_0_result.pkl"
    result.parent.mkdir(parents=True)
    result.write_bytes(pickle.dumps(("error", "Traceback ...\nValueError: boom")))
    log = SubmissionLog(paths)
    log.record(task, sub)
    log.save()


def test_a_finished_run_exits_0(finished_run, capsys):
    pipeline, paths = finished_run
    n = len(pipeline.tasks)
    assert main(["--run-dir", str(paths.root)]) == 0
    assert f"{n} tasks: {n} done" in capsys.readouterr().out


def test_a_failed_task_exits_1_whatever_is_shown(finished_run, capsys):
    pipeline, paths = finished_run
    denoiser = next(t for t in pipeline.tasks if t.kind == "denoiser")
    fail(pipeline, paths, denoiser)
    assert main(["--run-dir", str(paths.root), "--only", "failed"]) == 1
    out, err = capsys.readouterr()
    assert "1 tasks: 1 failed" in out and "denoiser" in out and "0_log.err" in out
    assert (f"1 task(s) failed or cancelled: read the logs listed above, then resubmit: python "
            f"launchers/submit.py --config {paths.config_yaml} --run-dir {paths.root}") in err
    assert main(["--run-dir", str(paths.root), "--only", "done"]) == 1
    assert "failed" not in capsys.readouterr().out


def test_an_unknown_only_filter_is_refused_listing_the_states(finished_run, capsys):
    _, paths = finished_run
    with pytest.raises(SystemExit) as exc:
        main(["--run-dir", str(paths.root), "--only", "faild"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --only: invalid choice: 'faild'" in err
    assert all(f"'{state}'" in err for state in TASK_STATES)


# -- progress lines of a followed run (cluster/status.TrainProgress) ------------------------------------

def test_progress_is_steps_percent_rate_and_eta():
    assert format_progress(1200, 2500, 2.1) == "step 1200/2500 (48%), 2.1 step/s, eta 10 min"
    assert format_progress(5, 40) == "step 5/40 (12%)"
    assert format_progress(40, 40, 25.0) == "step 40/40 (100%), 25 step/s"
    assert format_progress(0, 100_000, 0.5).endswith("0.5 step/s, eta 55.6 h")


@pytest.fixture
def training_run(tmp_path, configs_dir):
    """A run directory whose denoiser (40 steps of 64 samples in tiny.yaml) is training."""
    cfg = load_config(configs_dir / "tiny.yaml")
    paths = prepare_run_dir(cfg, tmp_path / "run")
    pipeline = build_pipeline(cfg)
    denoiser = next(t for t in pipeline.tasks if t.kind == "denoiser")
    return pipeline, paths, denoiser


def log_train(paths, task, step, mtime, samples_per_s=128.0, kind="train"):
    """Append one record to ``task``'s train_log.jsonl, as if written at ``mtime``."""
    path = train_log_path(paths, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": step, "kind": kind, "loss": 1.0, "samples_per_s": samples_per_s}) + "\n")
    os.utime(path, (mtime, mtime))


def test_running_training_tasks_report_their_step_at_most_every_30_s(training_run):
    pipeline, paths, denoiser = training_run
    now = [0.0]
    progress = TrainProgress(pipeline, paths, every_s=30, clock=lambda: now[0])
    assert progress.lines(pipeline.tasks) == []  # nothing logged yet
    log_train(paths, denoiser, 10, mtime=1000)
    # First sighting: the rate is the log's own, 128 samples/s over batches of 64.
    assert progress.lines(pipeline.tasks) == ["running denoiser: step 10/40 (25%), 2 step/s, eta 15 s"]
    now[0] = 10
    log_train(paths, denoiser, 20, mtime=1010)
    assert progress.lines(pipeline.tasks) == []  # 10 s after the last line
    now[0] = 31
    # Now the rate observed between the two records: 10 steps in 10 s.
    assert progress.lines([denoiser]) == ["running denoiser: step 20/40 (50%), 1 step/s, eta 20 s"]
    now[0] = 100
    log_train(paths, denoiser, 20, mtime=1015, kind="val")
    assert progress.lines([denoiser]) == []  # the step did not move
    log_train(paths, denoiser, 30, mtime=1030)
    lines = progress.lines([denoiser])
    assert lines == ["running denoiser: step 30/40 (75%), 0.67 step/s, eta 15 s"]
    assert "\r" not in lines[0] and "\n" not in lines[0]


def test_a_task_with_a_grid_shows_its_steps_over_all_its_runs(tmp_path, configs_dir):
    """A per-target stage with an lr_grid writes one train log per run (lr-<v>/): the progress line,
    launchers/status.py's step column and the measured step time all read them, the step counted
    over the whole grid so that the eta covers the runs still to come."""
    from gtl_dist.cluster.estimate import step_seconds
    from gtl_dist.cluster.status import status_rows
    from gtl_dist.paths import fraction_name, grid_variant
    cfg = load_config(configs_dir / "tiny.yaml", ["train.finetune.lr_grid=[0.001, 0.01]",
                                                   "train.finetune.select_best=true"])
    paths = prepare_run_dir(cfg, tmp_path / "run")
    pipeline = build_pipeline(cfg)
    task = next(t for t in pipeline.tasks if t.kind == "finetune")
    run_log = lambda lr: paths.stage(task.kind, task.target, task.fraction, task.seed,  # noqa: E731
                                     grid_variant(lr, None)) / "train_log.jsonl"
    assert train_log_path(paths, task) != run_log(0.001)
    for lr, step, mtime in ((0.001, 20, 1000), (0.01, 10, 1010)):  # the first run done, the second half-way
        run_log(lr).parent.mkdir(parents=True)
        run_log(lr).write_text(json.dumps({"step": step, "kind": "train", "loss": 0.5, "samples_per_s": 64.0}) + "\n")
        os.utime(run_log(lr), (mtime, mtime))
    progress = TrainProgress(pipeline, paths, clock=lambda: 0.0)
    # 2 runs of 20 steps; 64 samples/s over batches of 32.
    assert progress.lines([task]) == [f"running {task.key}: step 30/40 (75%), 2 step/s, eta 5 s"]
    row = next(r for r in status_rows(paths.root) if r.stage == "finetune" and r.target == task.target
               and r.fraction == fraction_name(task.fraction) and not r.detail)
    assert (row.step, row.total, row.loss) == (30, 40, 0.5)
    step_s, log = step_seconds(cfg, paths, [task])
    assert step_s == pytest.approx(0.5) and log == run_log(0.01)


def test_following_a_slurm_run_prints_progress_of_running_tasks(training_run, monkeypatch, capsys):
    pipeline, paths, denoiser = training_run
    states = {t.key: "running" if t is denoiser else "pending" for t in pipeline.tasks}
    monkeypatch.setattr(submit_cli, "task_state", lambda p, pa, task, sub, st: states[task.key])
    monkeypatch.setattr("gtl_dist.cluster.submissions.slurm_job_states", lambda subs: {})
    monkeypatch.setattr(submit_cli.time, "sleep", lambda s: states.update(dict.fromkeys(states, "done")))
    log_train(paths, denoiser, 10, mtime=1000)
    launcher = SimpleNamespace(pipeline=pipeline, paths=paths, subs=SubmissionLog(paths))
    assert submit_cli._follow(paths.root, launcher, None, None) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  \d\d:\d\d:\d\d running denoiser: step 10/40 \(25%\), 2 step/s, eta 15 s$", out, re.M)
    assert out.count("running denoiser: step") == 1


# -- what status.py sees ------------------------------------------------------------------------------------

def _cli(script: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "GTL_NO_PROGRESS_BAR": "1"}, **kw)


def test_a_failed_debug_run_is_shown_failed_with_its_log_and_exit_1(tmp_path):
    run = tmp_path / "run"
    submit = ["launchers/submit.py", "--config", "configs/tiny.yaml", "--cluster", "debug", "--run-dir", str(run)]
    assert _cli(*submit, "--stages", "data").returncode == 0
    shard = next((run / "data").glob("source-train-*.tar"))
    shard.write_bytes(shard.read_bytes()[:-100])  # the denoiser's reader refuses a damaged shard
    failed = _cli(*submit, "--stages", "denoiser")
    assert failed.returncode == 1 and "FAILED denoiser" in failed.stdout, failed.stdout + failed.stderr
    status = _cli("launchers/status.py", "--run-dir", str(run), "--only", "failed")
    assert status.returncode == 1, status.stdout + status.stderr
    [row] = [line for line in status.stdout.splitlines() if line.startswith("denoiser")]
    log = Path(row.split()[-1])
    assert " failed " in row and re.search(r" debug-\d+-1 ", row) and log.is_file()
    assert shard.name in log.read_text() and "Traceback" in log.read_text()  # the task's own log, kept
    assert "1 task(s) failed or cancelled" in status.stderr


def test_status_ends_quietly_when_its_reader_stops_reading(finished_run):
    _, paths = finished_run
    proc = subprocess.Popen([sys.executable, str(REPO / "launchers" / "status.py"), "--run-dir", str(paths.root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as `status.py | head -1` does
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""  # no BrokenPipeError traceback


def test_shards_built_by_build_py_are_a_run_directory_with_its_data_done(tmp_path):
    run = tmp_path / "run"
    assert _cli("shards/build.py", "--config", "configs/tiny.yaml", "--run-dir", str(run)).returncode == 0
    status = _cli("launchers/status.py", "--run-dir", str(run))
    n = len(build_pipeline(load_config(REPO / "configs" / "tiny.yaml")).tasks)
    assert status.returncode == 0 and f"{n} tasks: 1 done, {n - 1} not submitted" in status.stdout, status.stderr
    plan = _cli("launchers/submit.py", "--config", "configs/tiny.yaml", "--cluster", "local", "--run-dir", str(run),
                "--plan")
    assert plan.returncode == 0 and re.search(r"^  data +1 task\(s\): 1 done, 0 queued/running, 0 to run$",
                                              plan.stdout, re.M), plan.stdout + plan.stderr
    assert "the data stage has not run" not in plan.stdout
    other = _cli("shards/build.py", "--config", "configs/tiny.yaml", "--set", "seed=3", "--run-dir", str(run))
    assert other.returncode == 2 and "made by a different config" in other.stderr  # as submit.py refuses it
