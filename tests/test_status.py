"""launchers/status.py on a fake run directory: its exit status and the --only filter."""

import importlib.util
import pickle
from pathlib import Path

import pytest

from gtl_dist.cluster.dag import build_pipeline
from gtl_dist.cluster.launch import TASK_STATES, Submission, SubmissionLog
from gtl_dist.cluster.run_dir import prepare_run_dir
from gtl_dist.cluster.tasks import write_marker
from gtl_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("status_cli", REPO / "launchers" / "status.py")
status_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(status_cli)
main = status_cli.main


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
