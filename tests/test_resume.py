"""Resumption with 2 ranks on CPU/gloo: bit-exact after a hard kill (ZeRO 0-3), crash
consistency, world size 2 -> 1 through universal checkpoints, TensorBoard without duplicates,
preemption by a signal to one rank (with and without a previously installed handler).

Each ZeRO stage runs the toy stage (tests/train_helpers.py) three times on 2 ranks:
  straight  K steps uninterrupted;
  killed    the same, with GTL_FAULT_KILL_BEFORE_COMMIT=K: every rank SIGKILLs itself after
            writing the step-K shards and before the commit marker, so the last committed step
            is K/2 and step K's folder is left half-done;
  resumed   the killed run directory started again: it must resume from K/2 and end exactly
            where the straight run ended.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from train_helpers import (Ranks, committed, consolidated_params, deepspeed_ops,  # noqa: F401
                           params_fingerprint, rank_state, shared_state, threads_after_stage,
                           toy_cmd, train_records, wait_for)

pytestmark = [pytest.mark.resume, pytest.mark.distributed]

K = 6
HALF = K // 2
FAULT = "GTL_FAULT_KILL_BEFORE_COMMIT"


def settings(zero: int, **extra) -> list[str]:
    base = {"steps": K, "save_every": HALF, "val_every": HALF, "log_every": 1, "ema": 0.9,
            "global_batch": 16, "keep_last": 3, "lr": 0.01, "zero_stage": zero, **extra}
    return [f"train.denoiser.{k}={v}" for k, v in base.items()]


def step_dir(run: Path, step: int) -> Path:
    return run / "denoiser" / "ckpt" / f"step-{step:08d}"


def resumed_fingerprint(log_text: str) -> str:
    found = re.findall(r"weights fingerprint ([0-9a-f]{8})", log_text)
    assert found, "no resume line in the log"
    return found[-1]


@dataclass
class ResumeCase:
    zero: int
    straight: Path
    resumed: Path
    for_world_1: Path     # a copy of the killed run directory, before it was resumed
    killed_commits: list
    killed_left_step_dir: bool
    resume_log: str


@pytest.fixture(scope="module", params=[0, 1, 2, 3], ids=lambda z: f"zero{z}")
def case(request, tmp_path_factory, deepspeed_ops) -> ResumeCase:  # noqa: F811
    zero = request.param
    base = tmp_path_factory.mktemp(f"zero{zero}")
    logs = base / "logs"
    straight, resumed = base / "straight", base / "resumed"
    # The straight and the killed run are independent: run them side by side.
    a = Ranks(toy_cmd(straight, *settings(zero)), 2, logs, tag="straight")
    b = Ranks(toy_cmd(resumed, *settings(zero)), 2, logs, {FAULT: str(K)}, tag="killed")
    a.expect(0)
    b.expect(-signal.SIGKILL)
    killed_commits = committed(resumed / "denoiser" / "ckpt")
    left = step_dir(resumed, K).is_dir() and not (step_dir(resumed, K) / "COMMIT.json").exists()
    copy = base / "for_world_1"
    shutil.copytree(resumed, copy)
    c = Ranks(toy_cmd(resumed, *settings(zero)), 2, logs, tag="resume")
    c.expect(0)
    return ResumeCase(zero, straight, resumed, copy, killed_commits, left, c.log_text(0))


def test_kill_before_commit_resumes_from_previous_commit(case):
    assert case.killed_commits == [HALF]
    assert case.killed_left_step_dir, "the fault should strike after step K's shards were written"
    assert f"step-{HALF:08d} (step {HALF} of {K}" in case.resume_log
    # The pattern tests/test_pipeline_slurm.py reads from a requeued job's log.
    resumed = re.findall(r"resumed from \S+ \(step (\d+) of", case.resume_log)
    assert [int(s) for s in resumed] == [HALF]
    assert f"step-{K:08d}: no COMMIT.json" in case.resume_log  # the half-done save is discarded
    assert committed(case.resumed / "denoiser" / "ckpt") == [HALF, K]


def test_resume_is_bit_exact(case):
    straight = train_records(case.straight / "denoiser")
    resumed = train_records(case.resumed / "denoiser")
    assert sorted(straight) == sorted(resumed) == list(range(1, K + 1))
    for step in range(1, K + 1):
        for key in ("loss", "lr", "grad_norm", "data_crc"):
            assert resumed[step][key] == straight[step][key], (step, key)
    assert train_records(case.straight / "denoiser", "val") == \
        train_records(case.resumed / "denoiser", "val")

    # The resumed engine started from exactly the weights of the step-K/2 checkpoint.
    assert resumed_fingerprint(case.resume_log) == \
        params_fingerprint(consolidated_params(step_dir(case.straight, HALF)))

    a, b = step_dir(case.straight, K), step_dir(case.resumed, K)
    pa, pb = consolidated_params(a), consolidated_params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    ea, eb = shared_state(a)["ema"], shared_state(b)["ema"]
    assert ea["updates"] == eb["updates"] == K
    for name in ea["shadow"]:
        assert torch.equal(ea["shadow"][name], eb["shadow"][name]), name
    for rank in (0, 1):  # the data cursors: the next batches would be the same
        assert rank_state(a, rank)["loaders"] == rank_state(b, rank)["loaders"]
        assert rank_state(a, rank)["loaders"]["train"]["batch"] > 0
    ex_a = torch.load(case.straight / "denoiser/export/model.pt", weights_only=True)
    ex_b = torch.load(case.resumed / "denoiser/export/model.pt", weights_only=True)
    assert ex_a["meta"]["weights"] == "ema"
    for name, value in ex_a["state_dict"].items():
        assert torch.equal(value, ex_b["state_dict"][name]), name


def test_tensorboard_has_no_duplicate_steps_after_resume(case):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(case.resumed / "tb" / "denoiser"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, K + 1))
    records = train_records(case.resumed / "denoiser")
    for e in loss:  # the surviving points are the resumed run's (float32 in the event file)
        assert e.value == pytest.approx(records[e.step]["loss"], rel=1e-6)
    assert [e.step for e in events.Scalars("val/loss")] == [HALF, K]
    # The killed run had flushed steps up to K before it died: they were purged, not doubled.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    first = sorted((case.resumed / "tb" / "denoiser").glob("events.out.tfevents.*"))[0]
    killed_steps = {e.step for e in EventFileLoader(str(first)).Load()
                    if any(v.tag == "train/loss" for v in e.summary.value)}
    assert killed_steps == set(range(1, K + 1))


def test_world_size_2_to_1_continues_training(case, tmp_path):
    """ZeRO 1-3 go through DeepSpeed's universal conversion; ZeRO-0 checkpoints hold the whole
    optimiser state and load directly at any world size."""
    run = case.for_world_1
    one = Ranks(toy_cmd(run, *settings(case.zero)), 1, tmp_path, tag="world1")
    one.expect(0)
    text = one.log_text(0)
    assert ("converting it to a universal checkpoint" in text) == (case.zero > 0)
    assert "fresh shuffle" in text
    # DeepSpeed loaded exactly the weights the 2 ranks saved.
    assert resumed_fingerprint(text) == params_fingerprint(consolidated_params(step_dir(run, HALF)))
    # Converted once, and pruned once a newer checkpoint was committed.
    assert not (run / "denoiser" / "ckpt" / "universal" / f"step-{HALF:08d}").exists()
    final = json.loads((step_dir(run, K) / "COMMIT.json").read_text())
    assert final["world_size"] == 1 and final["step"] == K
    one_rec = train_records(run / "denoiser")
    straight = train_records(case.straight / "denoiser")
    for step in range(HALF + 1, K + 1):  # the LR schedule continued from the restored state
        assert one_rec[step]["lr"] == straight[step]["lr"]
        assert torch.isfinite(torch.tensor(one_rec[step]["loss"]))


PREEMPT_STEPS = 30


def _start_and_signal(run: Path, logs: Path, tag: str, extra: list[str] = ()) -> tuple[Ranks, int]:
    sets = settings(2, steps=PREEMPT_STEPS, save_every=1000, val_every=1000)
    # Slowed down (test-only knob of the toy task) so the signal surely lands mid-run.
    ranks = Ranks(toy_cmd(run, *sets) + list(extra), 2, logs, {"TOY_STEP_SLEEP": "0.05"}, tag=tag)
    log = run / "denoiser" / "train_log.jsonl"
    wait_for(lambda: log.exists() and log.stat().st_size > 0 and
             len(log.read_text().splitlines()) >= 3, 120, "three logged steps", ranks)
    ranks.signal(1, signal.SIGUSR2)  # one rank only, as when SLURM's signals arrive unevenly
    return ranks, PREEMPT_STEPS


def test_preemption_signal_to_one_rank_saves_everywhere_and_resumes(tmp_path, deepspeed_ops):  # noqa: F811
    run = tmp_path / "run"
    ranks, steps = _start_and_signal(run, tmp_path / "logs", "preempt")
    ranks.expect(75, timeout=180)  # EXIT_PREEMPTED on every rank
    ckpt = run / "denoiser" / "ckpt"
    (saved,) = committed(ckpt)
    assert 3 <= saved < steps
    assert [rank_state(step_dir(run, saved), r)["step"] for r in (0, 1)] == [saved, saved]
    assert "received SIGUSR2" in ranks.log_text(1) and "received SIGUSR2" not in ranks.log_text(0)
    assert max(train_records(run / "denoiser")) == saved  # logs flushed up to the save

    again = Ranks(toy_cmd(run, *settings(2, steps=steps, save_every=1000, val_every=1000)), 2,
                  tmp_path / "logs", tag="after")
    again.expect(0, timeout=240)
    assert f"(step {saved} of {steps}" in again.log_text(0)
    assert committed(ckpt)[-1] == steps
    assert sorted(train_records(run / "denoiser")) == list(range(1, steps + 1))
    # Both ways out of a stage let go of the process group: no gloo worker is left to run into
    # the interpreter's exit (where one can abort the process: "terminate called without an
    # active exception"). The ZeRO-2 engine's hooks and torch.distributed.nn used to pin it.
    for group in (ranks, again):
        for rank in (0, 1):
            assert threads_after_stage(group.log_text(rank)) == [], group.log_text(rank)


def test_preemption_hands_over_to_previous_handler_after_saving(tmp_path, deepspeed_ops):  # noqa: F811
    run = tmp_path / "run"
    marker = tmp_path / "requeued.json"
    ranks, steps = _start_and_signal(run, tmp_path / "logs", "chain", ["--chain-marker", str(marker)])
    # Rank 0 was not signalled itself but, as submitit expects, calls the earlier USR2 handler
    # (here: exit 42) once the collective save is committed; rank 1 has no earlier handler.
    ranks.expect([42, 75], timeout=180)
    assert threads_after_stage(ranks.log_text(1)) == []
    seen_by_handler = json.loads(marker.read_text())
    assert seen_by_handler == committed(run / "denoiser" / "ckpt") and len(seen_by_handler) == 1


def test_denoiser_job_resumes_bit_exactly_with_workers_and_accumulation(tmp_path, deepspeed_ops):  # noqa: F811
    """The real job kind end to end: shard reader cursors (1 DataLoader worker per rank), MDLM
    noise stratified over ranks x 2 accumulation steps, dropout, EMA, ZeRO-2 on 2 ranks."""
    from gtl_dist.config import load_config
    from gtl_dist.data import prepare_data
    from train_helpers import PYTHON, REPO
    data = ["data.markov.source_diagonal=0.6"]
    tc = {"steps": K, "save_every": HALF, "val_every": HALF, "log_every": 1, "global_batch": 16,
          "micro_batch": 4, "num_workers": 1, "zero_stage": 2, "ema": 0.99, "lr": 0.01}
    sets = data + ["models.denoiser.dropout=0.1"] + [f"train.denoiser.{k}={v}" for k, v in tc.items()]
    prepare_data(load_config(REPO / "configs" / "tiny.yaml", sets), tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")

    def cli(run: Path) -> list[str]:
        cmd = [PYTHON, "-m", "gtl_dist.train", "--config", str(REPO / "configs" / "tiny.yaml"),
               "--run-dir", str(run), "--stage", "denoiser"]
        return cmd + [a for s in sets for a in ("--set", s)]

    logs = tmp_path / "logs"
    a = Ranks(cli(tmp_path / "straight"), 2, logs, tag="straight")
    b = Ranks(cli(tmp_path / "resumed"), 2, logs, {FAULT: str(K)}, tag="killed")
    a.expect(0, timeout=300)
    b.expect(-signal.SIGKILL, timeout=300)
    c = Ranks(cli(tmp_path / "resumed"), 2, logs, tag="resume")
    c.expect(0, timeout=300)
    assert f"(step {HALF} of {K}" in c.log_text(0)

    straight = train_records(tmp_path / "straight" / "denoiser")
    resumed = train_records(tmp_path / "resumed" / "denoiser")
    for step in range(1, K + 1):
        for key in ("loss", "nll", "grad_norm", "lr", "data_crc"):
            assert resumed[step][key] == straight[step][key], (step, key)
    sa, sb = step_dir(tmp_path / "straight", K), step_dir(tmp_path / "resumed", K)
    pa, pb = consolidated_params(sa), consolidated_params(sb)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    ea, eb = shared_state(sa)["ema"]["shadow"], shared_state(sb)["ema"]["shadow"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    for rank in (0, 1):
        cursor = rank_state(sa, rank)["loaders"]["train"]
        assert cursor == rank_state(sb, rank)["loaders"]["train"]
        assert cursor["batches_consumed"] == K * 2 and cursor["num_workers"] == 1
