"""Unit tests of the training machinery that need no process group: the distributed-environment
resolver, batch geometry, precision and hardware checks, the LR schedule, the DeepSpeed config,
the EMA, the preemption guard, TensorBoard purging, and the job kinds' argument and upstream checks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from gtl_dist.config import ConfigError, TrainConfig, load_config
from gtl_dist.train.dist import DistError, first_host, job_port, resolve_dist_env
from gtl_dist.train.engine import (BatchGeometry, CosineWithWarmup, Hardware, batch_geometry,
                                   deepspeed_config, fused_adamw, resolve_precision)

REPO = Path(__file__).resolve().parents[1]


# -- the distributed environment ----------------------------------------------------------------

def fixed_port() -> int:
    return 12345


def no_slurm(node: str) -> str:
    raise AssertionError(f"SLURM was asked for {node}")


def test_explicit_env_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
           "MASTER_PORT": "29400", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    d = resolve_dist_env(env, node_addr=no_slurm)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port, d.source) == \
        (3, 4, 1, "10.0.0.2", 29400, "env")
    assert d.variables()["RANK"] == "3"


def test_slurm_env_uses_node_address_and_job_port():
    asked = []

    def node_addr(name):
        asked.append(name)
        return "192.168.7.1"

    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-08,12],cpu1", "SLURM_JOB_ID": "123456"}
    d = resolve_dist_env(env, node_addr=node_addr)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.source) == (5, 8, 1, "192.168.7.1", "slurm")
    assert asked == ["gpu07"]
    assert d.master_port == job_port("123456") == 20_000 + 123456 % 12_768
    # every rank derives the same port; consecutive jobs get different ones
    assert job_port("123457") == d.master_port + 1
    # below Linux's ephemeral range, where outgoing connections take their ports
    assert all(20_000 <= job_port(str(i)) < 32_768 for i in range(0, 100_000, 7))


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_local_jobs_rendezvous_port_is_free_or_derived_below_the_ephemeral_range(ranks):
    """submitit's local executor picked MASTER_PORT at random in 20000-60000, where another
    connection can hold it (a job failed with EADDRINUSE): one rank now takes a free port, several
    derive theirs from the job id below the ephemeral range."""
    import random
    import socket
    from unittest import mock
    from gtl_dist.cluster.tasks import _export_local_distributed_env
    local = {f"SUBMITIT_LOCAL_{key}": value for key, value in (
        ("JOB_ID", "15709"), ("NTASKS", str(ranks)), ("JOB_NUM_NODES", "1"), ("NODEID", "0"),
        ("GLOBALID", "0"), ("LOCALID", "0"))}
    submitits_pick = random.Random("15709").randint(20_000, 60_000)  # submitit's own, for this job
    held = socket.socket()
    held.bind(("127.0.0.1", submitits_pick))  # as another connection may hold it
    held.listen()
    with held, mock.patch.dict(os.environ, {"SUBMITIT_EXECUTOR": "local", **local}):  # restored after
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        _export_local_distributed_env()
        port = int(os.environ["MASTER_PORT"])
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", str(ranks))
        if ranks > 1:
            assert port == job_port("15709")
        else:
            with socket.socket() as s:  # free when picked
                s.bind(("127.0.0.1", port))


def test_slurm_node_address_falls_back_to_the_name(monkeypatch):
    from gtl_dist.train import dist
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol anywhere
    monkeypatch.setattr("gtl_dist.slurm_query.slurm_program", lambda name: None)
    assert dist.default_node_addr("n1") == "n1"


def test_single_process_without_variables():
    d = resolve_dist_env({"HOME": "/root"}, node_addr=no_slurm, free_port=fixed_port)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port, d.source) == \
        (0, 1, 0, "127.0.0.1", 12345, "single")


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0"}, "WORLD_SIZE is missing"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "not in [0, WORLD_SIZE=2)"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "LOCAL_RANK is missing"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "MASTER_ADDR and MASTER_PORT"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}, "SLURM_JOB_NODELIST"),
])
def test_inconsistent_environments_are_named(env, message):
    with pytest.raises(DistError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        resolve_dist_env(env, node_addr=no_slurm, free_port=fixed_port)


@pytest.mark.parametrize("nodelist, first", [
    ("n1", "n1"), ("n[1-2]", "n1"), ("gpu[007-009,012],cpu[1-3]", "gpu007"),
    ("a,b", "a"), ("rack[2-3]-node[05-06]", "rack2-node05"), ("x[4,1]", "x4")])
def test_first_host_of_a_slurm_nodelist(nodelist, first):
    assert first_host(nodelist) == first


def test_dist_env_command_prints_the_resolution():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                "MASTER_PORT": "999"})
    out = subprocess.run([sys.executable, "-m", "gtl_dist.train.dist", "env"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=h MASTER_PORT=999 (from env)" in out.stdout


# -- batch geometry, precision, schedule, DeepSpeed config ---------------------------------------

def test_batch_geometry():
    assert batch_geometry(TrainConfig(global_batch=64), 2, "denoiser") == BatchGeometry(64, 32, 1, 2)
    assert batch_geometry(TrainConfig(global_batch=64, micro_batch=8), 2, "denoiser") == \
        BatchGeometry(64, 8, 4, 2)
    assert batch_geometry(TrainConfig(global_batch=6), 1, "ratio") == BatchGeometry(6, 6, 1, 1)


def test_global_batch_not_divisible_names_the_keys():
    with pytest.raises(ConfigError, match=r"train\.denoiser\.global_batch: 10 is not divisible by "
                                          r"the world size 4"):
        batch_geometry(TrainConfig(global_batch=10), 4, "denoiser")
    with pytest.raises(ConfigError, match=r"train\.vanilla\.global_batch / train\.vanilla\.micro_batch"
                                          r".*12 is not divisible by micro_batch × world size = 4 × 2 = 8"):
        batch_geometry(TrainConfig(global_batch=12, micro_batch=4), 2, "vanilla")


CPU = Hardware("cpu", True, "cpu")
OLD_GPU = Hardware("cuda", False, "Tesla V100")
NEW_GPU = Hardware("cuda", True, "H100")


def test_precision_auto_and_explicit():
    assert resolve_precision(TrainConfig(precision="auto"), CPU, "denoiser") == "fp32"
    assert resolve_precision(TrainConfig(precision="auto"), NEW_GPU, "denoiser") == "bf16"
    assert resolve_precision(TrainConfig(precision="auto"), OLD_GPU, "denoiser") == "fp32"
    assert resolve_precision(TrainConfig(precision="bf16"), CPU, "denoiser") == "bf16"  # runs


def test_impossible_precision_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.finetune\.precision: bf16 was asked for but "
                                          r"Tesla V100 cannot compute in bf16"):
        resolve_precision(TrainConfig(precision="bf16"), OLD_GPU, "finetune")


@pytest.mark.parametrize("override, key", [
    ("train.denoiser.zero_stage=4", "train.denoiser.zero_stage"),
    ("train.ratio.offload_optimizer=true", "train.ratio.offload_optimizer"),
    ("train.planner.precision=fp16", "train.planner.precision"),
])
def test_impossible_zero_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(REPO / "configs" / "tiny.yaml", [override])


def test_cosine_schedule_with_warmup():
    s = CosineWithWarmup(steps=100, warmup_frac=0.1, lr=1e-3, min_lr=1e-5)
    assert s(0) == pytest.approx(0.1)           # first step at lr / warmup
    assert s(9) == pytest.approx(1.0)           # end of warm-up
    assert s(10) == pytest.approx(1.0)          # cosine starts at the peak
    assert s(55) == pytest.approx(0.01 + 0.99 * 0.5)  # half way down
    assert s(100) == pytest.approx(0.01)        # min_lr / lr
    values = [s(i) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert CosineWithWarmup(10, 0.0, 1e-3, 0.0)(0) == pytest.approx(1.0)  # no warm-up


def test_deepspeed_config_from_train_config():
    tc = TrainConfig(global_batch=64, micro_batch=8, zero_stage=3, offload_optimizer=True, lr=2e-4,
                     betas=[0.9, 0.95], weight_decay=0.1, grad_clip=0.5)
    cfg = deepspeed_config(tc, BatchGeometry(64, 8, 4, 2), "bf16", load_universal=True)
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 4
    assert "train_batch_size" not in cfg  # DeepSpeed derives it: micro x accumulation x world
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    opt = cfg["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["torch_adam"] is True
    assert opt["params"]["betas"] == [0.9, 0.95] and opt["params"]["weight_decay"] == 0.1
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["checkpoint"]["load_universal"] is True
    fp32 = deepspeed_config(TrainConfig(), BatchGeometry(128, 128, 1, 1), "fp32")
    assert "bf16" not in fp32 and fp32["checkpoint"]["load_universal"] is False
    assert "fused" not in fp32["optimizer"]["params"]  # CPU: torch's AdamW exactly as before
    fused = deepspeed_config(TrainConfig(), BatchGeometry(128, 128, 1, 1), "bf16", fused=True)
    assert fused["optimizer"]["params"]["fused"] is True


def test_fused_adamw_where_the_optimizer_state_lives_on_a_gpu():
    assert fused_adamw(TrainConfig(), NEW_GPU) and fused_adamw(TrainConfig(), OLD_GPU)
    assert not fused_adamw(TrainConfig(), CPU)
    assert not fused_adamw(TrainConfig(zero_stage=2, offload_optimizer=True), NEW_GPU)


# -- EMA ----------------------------------------------------------------------------------------

def test_ema_update_matches_the_formula_with_warmup():
    from gtl_dist.train.ema import WeightEMA
    net = nn.Linear(3, 2)
    net.register_buffer("count", torch.tensor(7))
    ema = WeightEMA(0.99, net, zero_stage=0)
    expected = {k: v.detach().clone() for k, v in net.named_parameters()}
    for n in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * (n + 1))
        d = min(0.99, (1 + n) / (10 + n))
        assert ema.current_decay() == d
        ema.update(net)
        for k, p in net.named_parameters():
            expected[k] = d * expected[k] + (1 - d) * p.detach()
    for k, v in ema.shadow.items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-5)
    weights = ema.weights(net)
    assert set(weights) == {"weight", "bias", "count"} and int(weights["count"]) == 7

    clone = WeightEMA(0.99, nn.Linear(3, 2), zero_stage=0)
    clone.load_state_dict(ema.state_dict())
    assert clone.updates == 30
    assert all(torch.equal(clone.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError, match="does not match the model"):
        WeightEMA(0.9, nn.Linear(4, 2, bias=False), 0).load_state_dict(ema.state_dict())


# -- preemption guard ---------------------------------------------------------------------------

def test_guard_records_signals_and_hands_over_to_the_previous_handler():
    from gtl_dist.train.preempt import PreemptionGuard
    calls = []
    before = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))
    term_before = signal.getsignal(signal.SIGTERM)
    try:
        guard = PreemptionGuard().install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert guard.received == [signal.SIGUSR2] and calls == []  # only a flag, no requeue yet
        assert guard.flags() == [1.0, 0.0]
        agreed = guard.agreed([0.0, 2.0])  # another rank got SIGTERM twice
        assert agreed == [signal.SIGTERM]
        assert guard.hand_over(is_main=False, signals=[signal.SIGUSR2]) is False
        assert guard.hand_over(is_main=True, signals=[signal.SIGTERM, signal.SIGUSR2]) is True
        assert calls == [signal.SIGUSR2]
        # handing over restored the handlers the guard had replaced
        assert signal.getsignal(signal.SIGTERM) == term_before
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_guard_without_a_previous_handler_does_not_hand_over():
    from gtl_dist.train.preempt import PreemptionGuard
    before = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        guard = PreemptionGuard().install()
        os.kill(os.getpid(), signal.SIGUSR2)  # would kill the process without our handler
        assert guard.received == [signal.SIGUSR2]
        assert guard.hand_over(is_main=True, signals=[signal.SIGUSR2]) is False
        guard.uninstall()
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, before)


# -- TensorBoard ------------------------------------------------------------------------------

def test_metrics_purge_what_a_killed_run_logged_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from gtl_dist.io import read_json_lines
    from gtl_dist.train.metrics import StageMetrics
    tb, log = tmp_path / "tb", tmp_path / "log.jsonl"
    first = StageMetrics(tb, log, enabled=True, start_step=0)
    for step in range(1, 9):
        first.scalars(step, {"loss": 10.0 + step})
    first.flush()  # then "killed": never closed; its checkpoint was step 5
    # TensorBoard reads event files in name order, and a name holds the second it was opened and
    # a per-process counter: a resumed run opens its file seconds later, so its purge is read
    # after what it purges. Two writers in one second of one process could sort either way
    # (counter 9 before 10 by name): wait as a real restart does.
    time.sleep(1.05)
    second = StageMetrics(tb, log, enabled=True, start_step=5)
    for step in range(6, 11):
        second.scalars(step, {"loss": 100.0 + step})
    second.close()
    events = EventAccumulator(str(tb))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert points == [(s, 10.0 + s) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 11)]
    assert [r["step"] for r in read_json_lines(log)] == list(range(1, 11))
    off = StageMetrics(tmp_path / "tb2", tmp_path / "log2.jsonl", enabled=False, start_step=0)
    off.scalars(1, {"loss": 1.0})
    off.close()
    assert not (tmp_path / "tb2").exists() and not (tmp_path / "log2.jsonl").exists()


def test_memory_stats_report_resident_memory():
    from gtl_dist.train.metrics import memory_stats
    stats = memory_stats(torch.device("cpu"))
    assert 0.01 < stats["rss_gb"] <= stats["peak_rss_gb"] < 100
    assert "cuda_max_allocated_gb" not in stats


# -- job kinds: arguments and upstream checks ----------------------------------------------------

@pytest.fixture
def tiny():
    return load_config(REPO / "configs" / "tiny.yaml")


@pytest.mark.parametrize("stage, target, fraction, message", [
    ("vanilla", None, None, "trained per target and fraction"),
    ("ratio", "nowhere", 1.0, "this config's targets are sticky"),
    ("classifier_ti", "sticky", 0.5, r"--fraction 0.5: not in data.target_fractions"),
    ("denoiser", "sticky", 1.0, "trained once per run"),
    ("sampler", None, None, "not a stage"),
    ("reference_lm", None, None, "trained once per target.*pass --target \\(one of sticky\\) and no --fraction"),
    ("reference_lm", "sticky", 1.0, "trained once per target, on its evaluator split and no fraction"),
    ("domain_classifier", "sticky", 0.5, "trained once per target, on its evaluator split and no fraction"),
    ("reference_lm", "nowhere", None, "this config's targets are sticky"),
])
def test_stage_arguments_are_checked(tiny, stage, target, fraction, message):
    from gtl_dist.train.jobs import check_stage_args
    with pytest.raises(ConfigError, match=message):
        check_stage_args(tiny, stage, target, fraction)


def test_missing_manifest_says_to_build_the_data(tiny, tmp_path):
    from gtl_dist.data import ManifestError, load_run_manifest
    with pytest.raises(ManifestError, match=r"manifest.json: no shard manifest; build the data "
                                            r"first: python shards/build.py"):
        load_run_manifest(tiny, tmp_path)


def test_manifest_of_other_data_settings_names_both_hashes(tiny, tmp_path):
    """A stage and the evaluation refuse shards built from other data/tokenizer/shards settings;
    build-only keys (where the shards live, how many workers built them) do not count."""
    from gtl_dist.data import ManifestError, load_run_manifest, prepare_data
    built = prepare_data(tiny, tmp_path)
    assert load_run_manifest(tiny, tmp_path).data_hash == built.data_hash == tiny.data_hash()
    workers = load_config(REPO / "configs" / "tiny.yaml", ["shards.build_workers=1"])
    assert load_run_manifest(workers, tmp_path).data_hash == built.data_hash
    other = load_config(REPO / "configs" / "tiny.yaml", ["data.markov.source_diagonal=0.5"])
    with pytest.raises(ManifestError) as err:
        load_run_manifest(other, tmp_path)
    text = str(err.value)
    assert str(tmp_path / "data" / "manifest.json") in text
    assert f"hash {built.data_hash}, the current config has {other.data_hash()}" in text
    assert "rebuild the data" in text


def fake_ctx(cfg, run_dir: Path, stage="finetune", target="sticky", fraction=1.0):
    from gtl_dist.paths import RunPaths
    return types.SimpleNamespace(cfg=cfg, paths=RunPaths(run_dir), stage=stage, target=target,
                                 fraction=fraction, label=f"{stage}/{target}/{fraction:g}")


def test_finetune_without_a_source_export_names_the_path_and_the_stage(tiny, tmp_path):
    from gtl_dist.exports import ExportError
    from gtl_dist.stages import StageGraph
    from gtl_dist.train.jobs import upstream_export
    ctx = fake_ctx(tiny, tmp_path)
    with pytest.raises(ExportError) as err:
        upstream_export(ctx, StageGraph(tiny).source_stage)
    text = str(err.value)
    assert str(tmp_path / "denoiser" / "export" / "model.pt") in text
    assert "run stage denoiser first" in text and "--stage denoiser" in text
    ar = load_config(REPO / "configs" / "tiny.yaml", ["pipeline.ar2diff=true"])
    assert StageGraph(ar).source_stage == "ar2diff"


def test_stale_upstream_export_asks_to_rerun_it(tiny, tmp_path):
    from gtl_dist.exports import ExportError, write_export
    from gtl_dist.train.jobs import upstream_export
    from gtl_dist.stages import stage_input_hash
    path = tmp_path / "denoiser" / "export" / "model.pt"
    write_export(path, {"w": torch.zeros(1)}, {"stage": "denoiser", "input_hash": "0123abcd"})
    with pytest.raises(ExportError, match=r"trained with inputs hash 0123abcd, the current "
                                          r"configuration gives [0-9a-f]{16}; re-run stage denoiser"):
        upstream_export(fake_ctx(tiny, tmp_path), "denoiser")
    write_export(path, {"w": torch.zeros(1)},
                 {"stage": "denoiser", "input_hash": stage_input_hash(tiny, "denoiser", None, None)})
    assert torch.equal(upstream_export(fake_ctx(tiny, tmp_path), "denoiser")["state_dict"]["w"],
                       torch.zeros(1))


def test_damaged_export_is_reported(tmp_path):
    from gtl_dist.exports import ExportError, load_exported
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ExportError, match="not a readable export"):
        load_exported(bad)
    with pytest.raises(ExportError, match="no exported model here"):
        load_exported(tmp_path / "missing.pt")


def test_stage_input_hash_covers_upstream_but_not_sampling(tiny):
    from gtl_dist.stages import stage_input_hash
    base = stage_input_hash(tiny, "finetune", "sticky", 1.0)
    changed_source = load_config(REPO / "configs" / "tiny.yaml", ["train.denoiser.lr=0.5"])
    changed_sampler = load_config(REPO / "configs" / "tiny.yaml", ["sample.gamma=9"])
    assert stage_input_hash(changed_source, "finetune", "sticky", 1.0) != base
    assert stage_input_hash(changed_sampler, "finetune", "sticky", 1.0) == base
    assert stage_input_hash(tiny, "finetune", "sticky", 0.2) != base


def test_cli_rejects_bad_arguments_with_exit_code_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gtl_dist.train", "--config",
                          str(REPO / "configs" / "tiny.yaml"), "--run-dir", str(tmp_path),
                          "--stage", "vanilla"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "stage vanilla is trained per target and fraction: pass --target" in out.stderr


# -- checkpoint bookkeeping (rank-0 logic, no process group) -------------------------------------

def fake_commit(root: Path, step: int, best_step=None, committed=True) -> None:
    import json
    from gtl_dist.train.checkpoint import COMMIT, step_dir_name
    folder = root / step_dir_name(step)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if committed:
        (folder / COMMIT).write_text(json.dumps({
            "step": step, "world_size": 1, "zero_stage": 0, "config_hash": "c",
            "tokenizer_hash": "t", "files": {}, "rank_files": [], "summary": {"best_step": best_step}}))


def test_pruning_keeps_the_last_checkpoints_and_the_best_weights_they_refer_to(tmp_path):
    from gtl_dist.train.checkpoint import Checkpointer
    from gtl_dist.train.dist import DistEnv
    ckpt = Checkpointer(tmp_path, DistEnv(0, 1, 0, "127.0.0.1", 1, "single"), zero_stage=0,
                        config_hash="c", tokenizer_hash="t", keep_last=2, label="vanilla")
    # best at step 20 (referenced by every later commit), an older best at 10, a newer
    # not-yet-committed best at 50, a half-written save at 45
    for step in (10, 20):
        ckpt.save_best(step, {"step": step})
    ckpt.save_best(50, {"step": 50})
    fake_commit(tmp_path, 10, best_step=10)
    fake_commit(tmp_path, 20, best_step=20)
    fake_commit(tmp_path, 30, best_step=20)
    fake_commit(tmp_path, 40, best_step=20)
    fake_commit(tmp_path, 45, committed=False)
    assert ckpt.committed_steps() == [40, 30, 20, 10]
    ckpt._prune()
    assert ckpt.committed_steps() == [40, 30]
    assert [p.name for p in ckpt._best_files()] == ["step-00000020.pt", "step-00000050.pt"]
    assert ckpt.load_best(20) == {"step": 20}
    ckpt._clean_uncommitted()
    assert not (tmp_path / "step-00000045").exists()
    ckpt.drop_best_after(40)  # resuming at 40: the best from step 50 belongs to a lost future
    assert [p.name for p in ckpt._best_files()] == ["step-00000020.pt"]


def test_missing_jit_op_inside_slurm_fails_fast_with_the_fix(tmp_path):
    """Inside a SLURM job the op is never built (a preemption signal would kill the compiler)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"SLURM_JOB_ID": "42", "GTL_TORCH_EXTENSIONS_DIR": str(tmp_path / "empty")})
    env.pop("TORCH_EXTENSIONS_DIR", None)
    code = "import os; from gtl_dist.train.dist import require_ops; require_ops(os.environ)"
    out = subprocess.run([sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "DeepSpeed's JIT op is not built in" in out.stderr
    assert "python -m gtl_dist.train.dist prebuild" in out.stderr
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())


def test_export_of_an_older_version_with_a_removed_config_key_still_loads(tmp_path, caplog):
    """Exports carry their config; a key a later version dropped must not make the model unloadable."""
    from dataclasses import asdict

    from gtl_dist.models import VocabSpec, build_model
    from gtl_dist.exports import load_exported, write_export
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    vocab = VocabSpec(size=6, mask_id=5)
    model = build_model("ratio", cfg, vocab)
    old_config = cfg.to_dict()
    old_config["eval"]["reference_steps"] = 2000          # a key this version no longer has
    old_config["models"]["ratio"]["old_knob"] = True
    path = tmp_path / "export" / "model.pt"
    write_export(path, model.state_dict(), {"role": "ratio", "config": old_config, "vocab": asdict(vocab)})
    with caplog.at_level("WARNING"):
        loaded = load_exported(path)
    assert "eval.reference_steps" in caplog.text and "models.ratio.old_knob" in caplog.text
    z = torch.randint(0, 6, (3, cfg.data.markov.length))
    torch.testing.assert_close(loaded(z), model.eval()(z))
    with pytest.raises(ConfigError, match="run/config.yaml: unknown key"):
        from gtl_dist.config import config_from_dict
        config_from_dict(old_config, "run/config.yaml")


def test_a_diverged_validation_never_becomes_the_kept_checkpoint():
    """Selection keeps the lowest finite validation loss. A NaN (a step that diverged) first
    must not pin the selection: every later finite loss would compare false against it."""
    from gtl_dist.train.loop import is_new_best
    best = None
    kept = []
    for step, loss in enumerate([float("nan"), 1.5, float("inf"), 1.2, float("nan"), 1.3]):
        if is_new_best(loss, best):
            best = loss
            kept.append(step)
    assert kept == [1, 3] and best == 1.2
