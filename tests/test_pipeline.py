"""launchers/submit.py on one machine: the whole tiny pipeline with submitit's local executor,
idempotent re-submission, the rendered sbatch scripts, and bad input."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gtl_dist.cluster.dag import build_pipeline
from gtl_dist.cluster.options import LaunchOptions
from gtl_dist.cluster.sbatch import render_sbatch
from gtl_dist.cluster.tasks import marker_valid
from gtl_dist.config import load_config
from gtl_dist.methods import METHODS
from gtl_dist.io import read_json_lines
from gtl_dist.paths import RunPaths

REPO = Path(__file__).resolve().parents[1]


def submit(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launchers" / "submit.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "GTL_NO_PROGRESS_BAR": "1"})


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "tiny"
    proc = submit("--config", "configs/tiny.yaml", "--cluster", "local", "--run-dir", str(run_dir),
                  "--local-parallelism", "2", "--publish", str(run_dir.parent / "published"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc


def test_local_pipeline_runs_to_a_report(local_run):
    run_dir, proc = local_run
    report = run_dir / "eval" / "report.md"
    assert f"done. report: {report}" in proc.stdout
    text = report.read_text()
    assert "transition_mean_abs_err" in text
    # The report cites the launcher's command line, passed to the evaluation task by the launcher.
    assert "- command: `python launchers/submit.py --config configs/tiny.yaml --cluster local --run-dir " in text
    with open(run_dir / "eval" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    got = {(r["method"], r["fraction"]) for r in rows if r["metric"] == "transition_mean_abs_err"}
    for method in ("gtl", "vanilla", "finetune"):
        for f in cfg.data.target_fractions:
            assert any(m == method and float(fr) == f for m, fr in got if fr), (method, f, got)
    assert ("source", "") in got
    # Every task left a marker valid for the current inputs; exports and samples are complete.
    pipeline = build_pipeline(cfg)
    assert [t.key for t in pipeline.tasks if not marker_valid(pipeline, RunPaths(run_dir), t)] == []
    assert (run_dir / "denoiser" / "export" / "model.pt").is_file()
    assert (run_dir / "ratio" / "sticky" / "0.2" / "DONE.json").is_file()
    assert (run_dir / "edit_ratio" / "sticky" / "0.2" / "DONE.json").is_file()
    shards = sorted((run_dir / "samples" / "gtl" / "sticky" / "1").glob("shard-*.jsonl"))
    assert len(shards) == cfg.sample.shards
    assert sum(len(p.read_text().splitlines()) for p in shards) == cfg.sample.num_samples


def test_resubmitting_a_finished_run_submits_nothing(local_run):
    run_dir, _ = local_run
    proc = submit("--config", "configs/tiny.yaml", "--cluster", "local", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert "nothing to submit: every task is done" in proc.stdout
    assert "started" not in proc.stdout


def test_status_table_shows_every_task_done(local_run):
    run_dir, _ = local_run
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "status.py"), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    n = len(build_pipeline(load_config(REPO / "configs" / "tiny.yaml")).tasks)
    assert f"{n} tasks: {n} done" in proc.stdout
    assert "denoiser" in proc.stdout and "40/40" in proc.stdout


def test_run_dir_of_another_config_is_refused_naming_the_keys(local_run):
    run_dir, _ = local_run
    proc = submit("--config", "configs/tiny.yaml", "--cluster", "local", "--run-dir", str(run_dir),
                  "--set", "models.denoiser.hidden=64", "--set", "sample.gamma=3")
    assert proc.returncode == 2
    assert "made by a different config" in proc.stderr
    assert "models.denoiser.hidden: 32 -> 64" in proc.stderr and "sample.gamma: 1.0 -> 3.0" in proc.stderr


def test_a_crashing_stage_is_reported_and_its_dependants_cancelled(tmp_path, local_run):
    """A corrupted source export makes fine-tuning crash: the failure names the log and quotes its
    end, and the fine-tuned samples that depend on it are cancelled, not left waiting."""
    src, _ = local_run
    run_dir = tmp_path / "run"
    # Reuse the finished run's data and denoiser; re-run fine-tuning and its samples only.
    subprocess.run(["cp", "-r", str(src), str(run_dir)], check=True)
    for stale in ("finetune", "samples/finetune", "eval"):
        subprocess.run(["rm", "-rf", str(run_dir / stale)], check=True)
    (run_dir / "jobs" / "submissions.json").unlink()
    (run_dir / "denoiser" / "export" / "model.pt").write_bytes(b"not a checkpoint")
    proc = submit("--config", "configs/tiny.yaml", "--cluster", "local", "--run-dir", str(run_dir),
                  "--stages", "finetune", "sample", "eval")
    assert proc.returncode == 1
    assert "FAILED finetune/sticky/1" in proc.stdout and "log: " in proc.stdout
    assert "cancelled sample/finetune/sticky/1/shard0" in proc.stdout
    assert "cancelled eval" in proc.stdout
    log_path = Path(proc.stdout.split("FAILED finetune/sticky/1")[1].split("log: ")[1].split(")")[0])
    assert log_path.is_file() and "Traceback" in log_path.read_text()
    # The launcher's closing lines quote the end of the failed task's log: the error itself.
    assert f"    | {log_path.read_text().splitlines()[-1]}" in proc.stderr


def test_the_report_has_the_protocol_the_oracle_ladder_and_the_calibration(local_run):
    run_dir, proc = local_run
    published = run_dir.parent / "published"
    assert f"published: {published}" in proc.stdout
    assert (published / "report.md").read_text() == (run_dir / "eval" / "report.md").read_text()
    assert (published / "results.csv").is_file() and (published / "plots").is_dir()
    text = (run_dir / "eval" / "report.md").read_text()
    assert "- protocol: every per-target network trains on its own n_T target sequences less a held-out" in text
    with open(run_dir / "eval" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    ladder = {(r["method"], r["fraction"]): float(r["value"]) for r in rows
              if r["metric"] == "ladder_mean_abs_err"}
    # The guidance identity, through the run's own sampler settings: exact h = exact target model.
    assert ladder[("exact source + exact h, γ = 1", "")] == ladder[("exact target denoiser (floor)", "")]
    # Only an edit-ratio net reads z alone and can guide the exact source; the adapter reads the
    # learned source's features, so its method row is the learned pair.
    assert {m for m, f in ladder if f} == {"exact source + learned gtl_edit guide, γ = 1"}
    calibrated = {r["method"] for r in rows if r["metric"] == "edit_slope[target]"}
    assert calibrated == {"gtl: adapter", "gtl_edit: edit-ratio net", "gtl_paper: clean classifier",
                          "gtl_paper: masked classifier", "gtl_paper: ratio net"}


def test_a_protocol_that_leaves_no_training_data_is_refused_before_submitting(tmp_path):
    proc = submit("--config", "configs/tiny.yaml", "--cluster", "local", "--run-dir", str(tmp_path / "r"),
                  "--set", "protocol.holdout_min=40")
    assert proc.returncode == 2 and "holds out 40 of the 40 target sequences" in proc.stderr
    assert "protocol.selection=budget" in proc.stderr and not (tmp_path / "r").exists()
    proc = submit("--config", "configs/tiny.yaml", "--run-dir", str(tmp_path / "r"),
                  "--set", "protocol.selection=test")
    assert proc.returncode == 2 and "which serve the final evaluation only" in proc.stderr


def test_stages_whose_inputs_are_missing_are_refused(tmp_path):
    proc = submit("--config", "configs/tiny.yaml", "--cluster", "local", "--run-dir", str(tmp_path / "r"),
                  "--stages", "finetune")
    assert proc.returncode == 2
    assert "finetune/sticky/1 needs denoiser" in proc.stderr and "add 'denoiser' to --stages" in proc.stderr


def test_fraction_without_target_data_is_refused(tmp_path):
    proc = submit("--config", "configs/tiny.yaml", "--cluster", "local", "--run-dir", str(tmp_path / "r"),
                  "--set", "data.target_fractions=[1.0, 0.001]")
    assert proc.returncode == 2
    assert "fraction 0.001 of target 'sticky' leaves no training sequences" in proc.stderr


def test_unknown_stage_and_config_key_are_clear_errors(tmp_path):
    proc = submit("--config", "configs/tiny.yaml", "--run-dir", str(tmp_path / "r"), "--stages", "denoisr")
    assert proc.returncode == 2 and "unknown stage(s) denoisr" in proc.stderr
    proc = submit("--config", "configs/tiny.yaml", "--run-dir", str(tmp_path / "r"), "--set", "sample.gama=1")
    assert proc.returncode == 2 and "did you mean 'gamma'" in proc.stderr


def test_help_explains_the_command():
    proc = submit("--help")
    assert proc.returncode == 0
    for flag in ("--nodes", "--gpus-per-node", "--cluster", "--run-dir", "--stages", "--set", "--wait"):
        assert flag in proc.stdout


def _flags(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value.strip("'")
    return out


def test_rendered_sbatch_for_8_nodes_of_8_gpus(tmp_path):
    cfg = load_config(REPO / "configs" / "arxiv.yaml", ["data.path=/data/arxiv.json"])
    pipeline = build_pipeline(cfg)
    opts = LaunchOptions(cluster="slurm", nodes=8, gpus_per_node=8, cpus_per_task=8, partition="gpu",
                         time_min=2880)
    run_dir = tmp_path / "arxiv"

    big = _flags(render_sbatch(pipeline.group("denoiser"), cfg, opts, run_dir, "afterok:100"))
    assert big["nodes"] == "8" and big["ntasks-per-node"] == "8" and big["gpus-per-node"] == "8"
    assert big["cpus-per-task"] == "8" and big["partition"] == "gpu" and big["time"] == "2880"
    assert big["dependency"] == "afterok:100" and big["kill-on-invalid-dep"] == "yes"
    assert big["signal"] == f"USR2@{cfg.cluster.signal_delay_s}" and "requeue" in big
    assert "array" not in big

    guide = _flags(render_sbatch(pipeline.group(METHODS["gtl"].guide), cfg, opts, run_dir))
    n = len(cfg.targets) * len(cfg.data.target_fractions) * len(cfg.pipeline.seeds)
    assert guide["array"] == f"0-{n - 1}%{min(n, cfg.cluster.array_parallelism)}"
    assert guide["nodes"] == "1" and guide["ntasks-per-node"] == "1" and guide["gpus-per-node"] == "1"
    assert guide["time"] == str(cfg.cluster.small_timeout_min)

    data = _flags(render_sbatch(pipeline.group("data"), cfg, opts, run_dir))
    assert "gpus-per-node" not in data and data["cpus-per-task"] == str(cfg.shards.build_workers)
    samples = _flags(render_sbatch(pipeline.group("sample"), cfg, opts, run_dir))
    assert samples["array"].startswith(f"0-{len(pipeline.group('sample').tasks) - 1}%")
    assert samples["time"] == str(cfg.cluster.small_timeout_min)
    # The evaluation keeps nothing when cut off: it gets the long limit, not the small jobs'.
    evaluation = _flags(render_sbatch(pipeline.group("eval"), cfg, opts, run_dir))
    assert evaluation["time"] == str(cfg.cluster.timeout_min) != str(cfg.cluster.small_timeout_min)
    assert "array" not in evaluation and evaluation["nodes"] == "1"


def test_update_config_reruns_only_what_the_change_affects(tmp_path, local_run):
    src, _ = local_run
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(src), str(run_dir)], check=True)
    before = (run_dir / "samples" / "source" / "shard-0000.jsonl").read_text()
    proc = submit("--config", "configs/tiny.yaml", "--cluster", "local", "--run-dir", str(run_dir),
                  "--set", "sample.gamma=4.0", "--update-config")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sample.gamma: 1.0 -> 4.0" in proc.stdout
    plan = {line.split()[0]: line for line in proc.stdout.splitlines() if "task(s):" in line}
    tiny = load_config(REPO / "configs" / "tiny.yaml")
    guided = [m for m in tiny.sample.methods if METHODS[m].gamma_key == "gamma"]  # gtl, gtl_edit
    n_guided = len(guided) * len(tiny.data.target_fractions) * tiny.sample.shards
    assert f"{n_guided} to run" in plan["sample"] and "1 to run" in plan["eval"]
    for stage in ("data", "denoiser", "classifier_ti", "ratio", "vanilla", "finetune"):
        assert " 0 to run" in plan[stage], plan[stage]
    assert "started sample/gtl" in proc.stdout and "started sample/source" not in proc.stdout
    assert (run_dir / "samples" / "source" / "shard-0000.jsonl").read_text() == before
    assert "gamma: 4.0" in (run_dir / "config.yaml").read_text()


def test_update_config_restarts_a_changed_training_stage_keeping_its_old_checkpoints(tmp_path, local_run):
    src, _ = local_run
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(src), str(run_dir)], check=True)
    proc = submit("--config", "configs/tiny.yaml", "--cluster", "local", "--run-dir", str(run_dir),
                  "--set", "train.ratio.lr=0.0005", "--update-config", "--stages", "ratio")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides=["train.ratio.lr=0.0005"])
    paths, pipeline = RunPaths(run_dir), build_pipeline(cfg)
    ratio_tasks = pipeline.group("ratio").tasks
    assert proc.stdout.count("the stage starts afresh") == len(ratio_tasks)
    for task in ratio_tasks:
        assert marker_valid(pipeline, paths, task), task.key
        ckpt = paths.checkpoints("ratio", task.target, task.fraction)
        stale = list(ckpt.parent.glob("ckpt.stale-*"))
        assert len(stale) == 1 and any(stale[0].glob("step-*/COMMIT.json")), stale
        assert any(ckpt.glob("step-*/COMMIT.json"))
        # The old run's log went with its checkpoints; the new log holds the new run only.
        old_log, new_log = (read_json_lines(d / "train_log.jsonl") for d in (stale[0], ckpt.parent))
        assert old_log and new_log and [r["step"] for r in new_log] == [r["step"] for r in old_log]
        assert [r["lr"] for r in new_log if "lr" in r] != [r["lr"] for r in old_log if "lr" in r]
