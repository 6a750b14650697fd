"""The whole pipeline on the real three-node SLURM cluster the test session starts on localhost,
at two topologies at once: ``submit.py --nodes 2`` and ``--nodes 3`` on tiny.yaml each run to a
report, the denoiser spans that many nodes with one rank each, per-(target, fraction) stages run
as job arrays, an explicit preemption of the multi-node denoiser is followed by requeue and
completion from its saved step at the same world size, and re-submitting submits nothing.

Every wait has its own deadline (subprocess timeouts, polling with a clock), so nothing can hang.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from gtl_dist.slurm_query import job_states, parse_record, run_slurm

REPO = Path(__file__).resolve().parents[1]
# Long enough for the preemption to land mid-run with a checkpoint to resume from: the tiny
# denoiser trains at up to ~30 steps/s on an idle 2-core machine, so 120 steps could finish
# between two 2-s polls and leave no job to signal; 600 leave the poll ~20 s.
DENOISER_STEPS = 600
DENOISER = ["--set", f"train.denoiser.steps={DENOISER_STEPS}", "--set", "train.denoiser.save_every=10"]
# What this file checks is the orchestration (multi-node ranks, arrays, preemption, requeue), not
# the methods: GTL, one baseline and the source keep every kind of job (a multi-node denoiser,
# per-target arrays, sample arrays, the evaluation) at half the jobs of tiny.yaml's method list.
METHODS = ["--set", "sample.methods=[gtl, vanilla, source]"]
# tiny.yaml's global batch (64) is refused at 3 ranks by the preflight: 48 divides by 1, 2 and 3.
TOPOLOGY = {2: [], 3: ["--set", "train.denoiser.global_batch=48"]}

pytestmark = pytest.mark.slurm


def submit_command(run_dir: Path, *extra: str, nodes: int) -> list[str]:
    return [sys.executable, str(REPO / "launchers" / "submit.py"), "--config", "configs/tiny.yaml",
            "--cluster", "slurm", "--nodes", str(nodes), "--cpus-per-task", "1",
            "--run-dir", str(run_dir), *DENOISER, *METHODS, *TOPOLOGY[nodes], *extra]


def submit_env() -> dict[str, str]:
    return {**os.environ, "GTL_NO_PROGRESS_BAR": "1"}  # SLURM_CONF is set by the cluster fixture


def submit(run_dir: Path, *extra: str, timeout: float, nodes: int = 2
           ) -> subprocess.CompletedProcess:
    return subprocess.run(submit_command(run_dir, *extra, nodes=nodes), check=False,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=submit_env())


def submit_side_by_side(commands: dict[int, list[str]], out_dir: Path, timeout: float
                        ) -> dict[int, subprocess.CompletedProcess]:
    """Run the commands at once (output to files, so that no pipe fills up), each with the same
    deadline; the finished processes by key."""
    procs, files = {}, {}
    for key, command in commands.items():
        files[key] = (out_dir / f"{key}.out", out_dir / f"{key}.err")
        with open(files[key][0], "w") as out, open(files[key][1], "w") as err:
            procs[key] = subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=REPO,
                                          env=submit_env())
    deadline = time.monotonic() + timeout
    try:
        for proc in procs.values():
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {key: subprocess.CompletedProcess(commands[key], proc.returncode,
                                             files[key][0].read_text(), files[key][1].read_text())
            for key, proc in procs.items()}


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def last_train_step(run_dir: Path) -> int:
    path = run_dir / "denoiser" / "train_log.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()
             if line.strip().startswith("{") and '"kind": "train"' in line]
    return max(steps, default=0)


def committed_steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "denoiser" / "ckpt"
    return sorted(int(p.parent.name.split("-")[1]) for p in ckpt.glob("step-*/COMMIT.json"))


@dataclass
class SlurmRun:
    nodes: int
    run_dir: Path
    first: subprocess.CompletedProcess    # the submission
    follow: subprocess.CompletedProcess   # the same command with --wait, after the preemption
    denoiser_job: str
    preempted_at: int                     # the last logged step when the signal was sent

    def submit(self, *extra: str, timeout: float) -> subprocess.CompletedProcess:
        return submit(self.run_dir, *extra, timeout=timeout, nodes=self.nodes)


@pytest.fixture(scope="module")
def slurm_runs(slurm_cluster, tmp_path_factory) -> dict[int, SlurmRun]:
    """Both topologies on the one cluster at once (the nodes are shared, as on a real cluster):
    each is submitted, its denoiser preempted once it has committed a checkpoint and trained past
    it, and the same command with --wait then follows both runs to the end side by side."""
    base = tmp_path_factory.mktemp("slurm-pipeline")
    run_dirs = {nodes: base / f"tiny-{nodes}-nodes" for nodes in TOPOLOGY}
    firsts = {nodes: submit(run_dir, timeout=300, nodes=nodes) for nodes, run_dir in run_dirs.items()}
    for proc in firsts.values():
        assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = {nodes: json.loads((run_dir / "jobs" / "submissions.json").read_text())["denoiser"]["job_id"]
            for nodes, run_dir in run_dirs.items()}

    preempted_at: dict[int, int] = {}

    def preempt_each_once_past_a_checkpoint() -> bool:
        for nodes, run_dir in run_dirs.items():
            if nodes not in preempted_at and committed_steps(run_dir) and last_train_step(run_dir) >= 25:
                preempted_at[nodes] = last_train_step(run_dir)
                run_slurm(["scancel", "--signal=USR2", jobs[nodes]])
        return len(preempted_at) == len(run_dirs)

    wait_until(preempt_each_once_past_a_checkpoint, 600,
               "each denoiser to commit a checkpoint and pass step 25")
    # The same command with --wait finds the jobs queued/running, submits nothing new, and
    # follows the run to the end.
    follows = submit_side_by_side(
        {nodes: submit_command(run_dir, "--wait", "--wait-timeout", "20", nodes=nodes)
         for nodes, run_dir in run_dirs.items()}, base, timeout=1500)
    return {nodes: SlurmRun(nodes, run_dirs[nodes], firsts[nodes], follows[nodes], jobs[nodes],
                            preempted_at[nodes]) for nodes in TOPOLOGY}


@pytest.fixture(params=sorted(TOPOLOGY), ids=lambda n: f"{n}-nodes")
def slurm_run(request, slurm_runs) -> SlurmRun:
    return slurm_runs[request.param]


def test_pipeline_completes_with_a_report(slurm_run):
    proc, follow = slurm_run.first, slurm_run.follow
    assert "submitted denoiser" in proc.stdout and "tensorboard --logdir" in proc.stdout
    assert follow.returncode == 0, follow.stdout[-3000:] + follow.stderr[-3000:]
    assert "nothing to submit (jobs still queued/running)" in follow.stdout
    assert (slurm_run.run_dir / "eval" / "report.md").is_file()
    assert "done. report:" in follow.stdout


def denoiser_starts(run_dir: Path, job: str) -> list[list[tuple[int, int, str]]]:
    """Every start of the denoiser, the requeued one included: per start, (rank, world size,
    node) of each of its tasks. A task's log holds its starts in order."""
    per_task = [[(int(m.group(1)), int(m.group(2)), m.group(3))
                 for m in re.finditer(r"rank (\d+)/(\d+) on node (\w+)", log.read_text())]
                for log in (run_dir / "jobs" / "denoiser" / job).glob(f"{job}_*_log.err")]
    return [sorted(start) for start in zip(*per_task, strict=True)]  # as many starts in every log


def test_denoiser_spans_every_node_with_one_rank_each_before_and_after_requeue(slurm_run):
    starts = denoiser_starts(slurm_run.run_dir, slurm_run.denoiser_job)
    nodes = slurm_run.nodes
    assert len(starts) == 2, starts  # first start and requeued start
    for start in starts:
        # Which nodes SLURM picks depends on what else runs (the other topology shares them).
        assert [(rank, world) for rank, world, _ in start] == [(i, nodes) for i in range(nodes)]
        assert len({node for *_, node in start}) == nodes, start
        assert {node for *_, node in start} <= {"n1", "n2", "n3"}, start


def test_per_target_stages_ran_as_arrays(slurm_run):
    run_dir = slurm_run.run_dir
    subs = json.loads((run_dir / "jobs" / "submissions.json").read_text())
    for group in ("adapter", "vanilla", "sample"):
        ids = [v["job_id"] for k, v in subs.items() if v["group"] == group]
        assert ids and all("_" in i for i in ids), (group, ids)
        assert len({i.split("_")[0] for i in ids}) == 1, f"{group} was not one array: {ids}"
        assert sorted(int(i.split("_")[1]) for i in ids) == list(range(len(ids)))


def test_preempted_denoiser_was_requeued_and_resumed(slurm_run):
    run_dir, job, preempted_at = slurm_run.run_dir, slurm_run.denoiser_job, slurm_run.preempted_at
    record = parse_record(run_slurm(["scontrol", "show", "job", "-o", job]).stdout)
    assert int(record.get("Restarts", "0")) >= 1, record
    log = (run_dir / "jobs" / "denoiser" / job / f"{job}_0_log.err").read_text()
    resumed = [int(m) for m in re.findall(r"resumed from \S+ \(step (\d+) of", log)]
    assert resumed, "no resume in the denoiser's log"
    # It resumed from the checkpoint the preemption saved, not from scratch or an older one.
    assert resumed[-1] >= preempted_at - 10 and resumed[-1] > 0
    assert committed_steps(run_dir)[-1] == DENOISER_STEPS
    assert job_states([job])[job] == "COMPLETED"


def test_resubmitting_the_finished_run_submits_nothing(slurm_run):
    run_dir = slurm_run.run_dir
    before = (run_dir / "jobs" / "submissions.json").read_text()
    proc = slurm_run.submit(timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to submit: every task is done" in proc.stdout
    assert (run_dir / "jobs" / "submissions.json").read_text() == before


def test_a_partition_that_does_not_exist_is_one_clear_line(slurm_cluster, tmp_path):
    proc = submit(tmp_path / "run", "--partition", "nosuch", timeout=120)
    assert proc.returncode == 2
    problem, summary = proc.stderr.strip().splitlines()  # one line per problem, then the verdict
    assert "--partition nosuch (or cluster.partition): SLURM has no such partition" in problem
    assert "partitions: debug" in problem and "nothing was submitted" in summary
    assert not (tmp_path / "run" / "jobs").exists()  # nothing was submitted
