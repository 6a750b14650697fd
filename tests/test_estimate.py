"""Wall-time estimates (gtl_dist/cluster/estimate.py): rates read from a run directory, the local
schedule, and launchers/submit.py --plan --estimate measuring a stage at full size."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from gtl_dist.cluster import estimate as est
from gtl_dist.cluster.dag import build_pipeline
from gtl_dist.cluster.options import LaunchOptions
from gtl_dist.cluster.submissions import Plan, Submission, SubmissionLog
from gtl_dist.config import load_config
from gtl_dist.paths import RunPaths

REPO = Path(__file__).resolve().parents[1]


def _tiny(*overrides):
    return build_pipeline(load_config(REPO / "configs" / "tiny.yaml", list(overrides)))


def _all_to_run(pipeline) -> Plan:
    return Plan(to_run=list(pipeline.tasks))


def test_the_local_schedule_is_the_sum_on_one_slot_and_the_longest_chain_on_many():
    pipeline = _tiny()
    seconds = {t: 100.0 if t.kind == "denoiser" else 10.0 + len(t.key) for t in pipeline.tasks}
    plan = _all_to_run(pipeline)
    serial = est.local_wall_seconds(pipeline, plan, seconds, LaunchOptions(cluster="local", local_parallelism=1))
    assert serial == sum(seconds.values())

    def chain(task):
        return seconds[task] + max((chain(d) for d in pipeline.task_deps(task)), default=0.0)
    wide = est.local_wall_seconds(pipeline, plan, seconds, LaunchOptions(cluster="local", local_parallelism=1000))
    assert wide == max(chain(t) for t in pipeline.tasks)
    two = est.local_wall_seconds(pipeline, plan, seconds, LaunchOptions(cluster="local", local_parallelism=2))
    assert wide < two < serial


def test_rates_come_from_the_run_directorys_train_logs_submissions_and_markers(tmp_path):
    pipeline = _tiny()
    paths = RunPaths(tmp_path)
    denoiser = pipeline.group("denoiser").tasks[0]
    log = paths.stage("denoiser") / "train_log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("".join(json.dumps({"step": s, "kind": "train", "samples_per_s": rate}) + "\n"
                           for s, rate in ((10, 64.0), (20, 32.0), (30, 128.0))))  # median 64 -> 1 s/step
    subs = SubmissionLog(paths)
    subs.record(denoiser, Submission("1", "denoiser", "h", "local", "f", submitted=time.time() - 100))
    sample = next(t for t in pipeline.group("sample").tasks if t.method == "source")
    subs.record(sample, Submission("2", "sample", "h", "local", "f", submitted=time.time() - 50))
    subs.save()
    for task, info in ((denoiser, {}), (sample, {"seconds": 8.0, "samples": 32})):
        task.marker(paths).parent.mkdir(parents=True, exist_ok=True)
        task.marker(paths).write_text(json.dumps(info))
    rates = est.read_rates(pipeline, paths)
    assert rates.step_s == {"denoiser": 1.0}
    work = est.work_steps(pipeline.cfg, "denoiser")  # 40 steps and 2 validations of 2 batches at a third
    assert abs(work - (40 + 2 * 2 / 3)) < 1e-9
    assert abs(rates.other_s["denoiser"] - (100 - work)) < 2  # the rest of its wall time
    assert rates.sample_s == {"source": 0.25} and abs(rates.other_s["sample/source"] - 42) < 2
    seconds = est.task_seconds(denoiser, pipeline.cfg, rates)
    assert abs(seconds - 100) < 2  # the measured task, predicted back
    lines = est.estimate_lines(pipeline, _all_to_run(pipeline), rates, LaunchOptions(cluster="local"), "logs")
    assert lines[1] == "  denoiser          1 task(s), 40 steps x 1 s: 2 min per task, 2 min in all"
    assert any(line.startswith("  not estimated (no rate measured): ") and "edit_ratio" in line for line in lines)


def test_plan_estimate_measures_a_stage_at_full_size_over_the_runs_shards(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "GTL_NO_PROGRESS_BAR": "1"}
    built = subprocess.run([sys.executable, "shards/build.py", "--config", "configs/tiny.yaml", "--run-dir", str(run)],
                           cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert built.returncode == 0, built.stderr
    res = subprocess.run([sys.executable, "launchers/submit.py", "--config", "configs/tiny.yaml", "--cluster", "local",
                          "--local-parallelism", "2", "--run-dir", str(run), "--stages", "denoiser", "--estimate"],
                         cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    scratch = re.search(r"estimate: measuring 1 task\(s\) at full size, 3 steps each, \d+ threads? per task, in (\S+)",
                        res.stdout)
    assert scratch and not Path(scratch[1]).exists()  # measured in a scratch run directory, then removed
    assert re.search(r"^  denoiser +1 task\(s\), 40 steps x [\d.e-]+ s: .* per task", res.stdout, re.M), res.stdout
    assert re.search(r"^  wall time with --cluster local --local-parallelism 2: about \d", res.stdout, re.M)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "config.yaml", "data"]  # nothing else written
