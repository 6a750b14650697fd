"""The local runner's scheduling (gtl_dist/cluster/local.py): a task starts once its inputs are done,
and takes its share of the cores, or all of them when nothing can run beside it."""

from __future__ import annotations

from gtl_dist.cluster.dag import build_pipeline
from gtl_dist.cluster.local import LocalRunner
from gtl_dist.cluster.options import LaunchOptions
from gtl_dist.cluster.run_dir import prepare_run_dir
from gtl_dist.cluster.submissions import Plan, SubmissionLog
from gtl_dist.config import load_config


def test_a_task_that_everything_left_waits_on_takes_all_the_cores(tmp_path, configs_dir, monkeypatch):
    cfg = load_config(configs_dir / "tiny.yaml")
    paths = prepare_run_dir(cfg, tmp_path / "run")
    pipeline = build_pipeline(cfg)
    local = LocalRunner(cfg, LaunchOptions(cluster="local", local_parallelism=2), pipeline, paths,
                        SubmissionLog(paths), runner=None)
    started: list[tuple[str, int, int]] = []  # (task, tasks sharing the cores, tasks running beside it)
    running_now: list[str] = []

    def start(self, task, slots, on_event):
        started.append((task.key, slots, len(running_now)))
        running_now.append(task.key)
        return False  # a job that runs until the loop next looks at it

    def outcome(job):
        running_now.clear()  # every job started so far ends at the next look
        return None

    monkeypatch.setattr(LocalRunner, "_start", start)
    monkeypatch.setattr(LocalRunner, "_outcome", staticmethod(outcome))
    failed = local.run(Plan(to_run=list(pipeline.tasks)), on_event=lambda line: None)
    assert failed == [] and len(started) == len(pipeline.tasks)
    shares = dict((key, slots) for key, slots, _ in started)
    # Every other task reads the data build, and the evaluation reads every sample set.
    assert shares["data"] == 1 and shares["eval"] == 1
    # A task that started first of two that ran side by side had half the cores, though it
    # started alone: the other did not wait on it.
    firsts = [key for (key, _, beside), (_, _, after) in zip(started, started[1:]) if beside == 0 and after == 1]
    assert firsts and all(shares[key] == 2 for key in firsts)
    assert all(slots == 2 for _, slots, beside in started if beside)
