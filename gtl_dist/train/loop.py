"""The training loop every job kind shares.

A job kind is a :class:`Task`: it builds its network, its training loaders and its loss, and
runs its validation pass. Everything else happens here, once, in this order:

    signals -> process group -> resume point -> model (same init on every rank) -> DeepSpeed
    -> checkpoint load -> loaders (+ cursors) -> RNG states -> loop -> export

Per optimiser step: ``grad_accum`` micro-batches (forward through the engine, backward, step),
the EMA update, then ONE all-reduce that carries the preemption flag, the loss and the task's
statistics. Validation every ``val_every`` steps and at the last step, on EMA weights when
``ema > 0``; a checkpoint every ``save_every`` steps, at the last step and on preemption.

Randomness, and why a resumed run repeats an uninterrupted one bit for bit:
- the initial weights come from the stage's seed (``StageContext.run_seed``: ``cfg.seed``, or a
  seed derived from it for replicate s > 0 of pipeline.seeds) on every rank (ZeRO-3 partitions each rank's own
  copy, so they must agree);
- the noise of each micro-step comes from two generators re-seeded from (seed, step, micro-step):
  ``shared`` is identical on all ranks (the diffusion time t is stratified over the global
  batch), ``local`` adds the rank (masks, label smoothing). Their state is a function of the step,
  so a checkpoint needs nothing for them;
- everything else that draws from the global RNGs (dropout) continues from the per-rank
  python/numpy/torch RNG states saved in every checkpoint, restored after all set-up work
  (which may draw from them) is done; fetching batches runs outside that stream;
- the data position is the loaders' cursors, saved per rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from gtl_dist.config import RunConfig, TrainConfig
from gtl_dist.log import Progress, get_logger
from gtl_dist.paths import RunPaths, task_name
from gtl_dist.train import dist
from gtl_dist.train.checkpoint import Checkpointer
from gtl_dist.train.dist import DistEnv
from gtl_dist.train.ema import WeightEMA
from gtl_dist.train.engine import (Hardware, batch_geometry, build_engine, detect_hardware,
                                   full_fp32_state, resolve_precision)
from gtl_dist.train.export import read_export_meta, write_export
from gtl_dist.train.metrics import StageMetrics, memory_stats
from gtl_dist.train.preempt import PreemptionGuard

log = get_logger("train.loop")


@dataclass
class StageResult:
    status: str  # "finished" | "preempted"
    stage: str
    target: Optional[str]
    fraction: Optional[float]
    step: int
    input_hash: str
    export: Optional[Path] = None
    val_loss: Optional[float] = None
    best_step: Optional[int] = None
    val_metrics: dict[str, float] = field(default_factory=dict)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of values, stable across processes and Python versions."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class StepRandom:
    """The random streams of one micro-step (see the module docstring).

    ``shared`` is seeded by the step alone, so it is identical on every rank and micro-step: one
    stratified draw of t covers the whole global batch, and this micro-batch keeps share
    ``slot`` of ``slots`` (rank-major over ranks x accumulation steps, as ``sample_t`` expects).
    ``local`` is this rank's and micro-step's own.
    """

    def __init__(self, device: torch.device, shared_seed: int, local_seed: int, slot: int,
                 slots: int):
        self.shared = torch.Generator(device=device).manual_seed(shared_seed)
        self.local = torch.Generator(device=device).manual_seed(local_seed)
        self.slot, self.slots = slot, slots

    @classmethod
    def for_step(cls, seed: int, step: int, micro: int, grad_accum: int, dist_env: DistEnv,
                 device: torch.device) -> "StepRandom":
        return cls(device, derive_seed(seed, "shared", step),
                   derive_seed(seed, "local", step, micro, dist_env.rank),
                   dist_env.rank * grad_accum + micro, dist_env.world_size * grad_accum)

    @classmethod
    def for_validation(cls, seed: int, dist_env: DistEnv, device: torch.device) -> "StepRandom":
        """Fixed streams: every validation pass masks the same way, so losses are comparable."""
        return cls(device, derive_seed(seed, "val-shared"), derive_seed(seed, "val-local", dist_env.rank),
                   dist_env.rank, dist_env.world_size)


class Task(ABC):
    """What one job kind contributes to the loop."""

    stage: str
    role: str                 # the model role recorded in the export (build_model's role)
    train_config: TrainConfig
    seq_len: int
    tokenizer_hash: str

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised network (called for the trained copy and the evaluation copy)."""

    def initial_weights(self) -> Optional[dict[str, torch.Tensor]]:
        """Weights to start from instead of the random initialisation (fine-tuning, AR2Diff)."""
        return None

    def prepare(self, device: torch.device) -> None:
        """Move frozen helper networks to ``device``."""

    @abstractmethod
    def train_loaders(self, micro_batch: int, dist_env: DistEnv, seed: int) -> dict[str, Any]:
        """Infinite loaders with ``state_dict``/``load_state_dict``, one batch per micro-step."""

    @abstractmethod
    def training_loss(self, model: nn.Module, batches: dict[str, Any],
                      rng: StepRandom) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch (and float statistics, the same keys on every rank)."""

    @abstractmethod
    def validation_loaders(self, micro_batch: int, dist_env: DistEnv) -> Optional[dict[str, Any]]:
        """Single-pass, unshuffled loaders; built before training so that a validation set
        that cannot be read (too few shards for the ranks, ...) fails at once, not at the
        first validation hours later. None: the stage has no validation data (a per-target
        stage under protocol.selection=budget) and trains for its fixed budget."""

    @abstractmethod
    def validate(self, model: nn.Module, rng: StepRandom, loaders: dict[str, Any],
                 dist_env: DistEnv) -> dict[str, float]:
        """One deterministic pass on this rank's share; returns metrics averaged over ALL ranks
        (collective), including ``"loss"``."""

    @abstractmethod
    def export_info(self) -> dict[str, Any]:
        """Metadata an export needs to rebuild the model: role, config, vocab, seq_len."""

    def validation_report(self) -> Optional[str]:
        """Optional text written to TensorBoard after each validation (e.g. an overlap report)."""
        return None


class LossModule(nn.Module):
    """What DeepSpeed wraps: the trained network plus the task's loss. Frozen helper networks
    stay outside (the task holds them), so they are neither partitioned nor optimised."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model = model
        self._task = task

    def forward(self, batches: dict[str, Any], rng: StepRandom) -> tuple[torch.Tensor, dict]:
        return self._task.training_loss(self.model, batches, rng)


@dataclass
class StageContext:
    cfg: RunConfig
    paths: RunPaths
    stage: str
    target: Optional[str]
    fraction: Optional[float]
    input_hash: str
    dist_env: DistEnv
    hardware: Hardware
    guard: PreemptionGuard
    seed: int = 0  # replicate (pipeline.seeds) of a per-target stage

    @property
    def label(self) -> str:
        return task_name(self.stage, target=self.target, fraction=self.fraction, seed=self.seed)

    @property
    def run_seed(self) -> int:
        """The seed of this stage's randomness (weights, data order, masks): cfg.seed for
        replicate 0, an independent seed derived from it for every other replicate."""
        return self.cfg.seed if not self.seed else derive_seed(self.cfg.seed, "replicate", self.seed) % 2**31

    def export_path(self) -> Path:
        return self.paths.export(self.stage, self.target, self.fraction, self.seed)


# ----------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def fingerprint(batch: Any) -> int:
    """CRC32 of every tensor in a batch: logged per step (summed over ranks) so that a resumed
    run can be seen to read exactly the data an uninterrupted one did."""
    if isinstance(batch, torch.Tensor):
        return zlib.crc32(batch.detach().cpu().contiguous().numpy().tobytes())
    if isinstance(batch, dict):
        return sum(fingerprint(batch[k]) for k in sorted(batch)) % 2**32
    return 0


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _grad_norm(engine: Any) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def plain_grad_norm(module: nn.Module) -> float:
    """Gradient 2-norm where DeepSpeed keeps none: without ZeRO and without a bf16 optimiser it
    clips through torch's clip_grad_norm_ and drops the norm. The gradients are already
    all-reduced at the accumulation boundary, so every rank gets the same value."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def finished_export(ctx: StageContext) -> Optional[dict[str, Any]]:
    """The export's metadata if this stage already finished with the current inputs."""
    meta = read_export_meta(ctx.export_path())
    if meta and meta.get("input_hash") == ctx.input_hash and meta.get("finished"):
        return meta
    return None


def train(task: Task, ctx: StageContext) -> StageResult:
    cfg, d, tc = ctx.cfg, ctx.dist_env, task.train_config
    device = ctx.hardware.device
    geometry = batch_geometry(tc, d.world_size, ctx.stage)
    precision = resolve_precision(tc, ctx.hardware, ctx.stage)
    seed = ctx.run_seed
    ckpt = Checkpointer(ctx.paths.checkpoints(ctx.stage, ctx.target, ctx.fraction, ctx.seed), d,
                        zero_stage=tc.zero_stage, config_hash=ctx.input_hash,
                        tokenizer_hash=task.tokenizer_hash, keep_last=tc.keep_last,
                        label=ctx.label)
    point = ckpt.find_resume_point()
    step = point.step if point is not None else 0

    # Loaders first: an unreadable data set fails before the engine is built. Cursors and RNG
    # states are per rank, so they carry over only at the same world size.
    same_world = point is not None and point.commit.world_size == d.world_size
    if point is not None and not same_world:
        data_seed = derive_seed(seed, "reshuffle", step, d.world_size) % 2**31
        if d.is_main:
            log.warning("%s: the checkpoint was written by %d ranks and this run has %d, so the "
                        "per-rank data cursors and RNG states do not apply: the data restarts on "
                        "a fresh shuffle (seed %d) and the RNGs are re-seeded", ctx.label,
                        point.commit.world_size, d.world_size, data_seed)
    else:
        data_seed = seed
    loaders = task.train_loaders(geometry.micro_batch, d, data_seed)
    val_loaders = task.validation_loaders(geometry.micro_batch, d)
    validates = val_loaders is not None

    seed_rngs(seed)  # identical initial weights on every rank
    model = task.build_model()
    if point is None:
        init = task.initial_weights()
        if init is not None:
            model.load_state_dict(init)
    task.prepare(device)
    engine = build_engine(LossModule(model, task).to(device), tc, geometry, precision,
                          load_universal=point is not None and point.universal)
    trained = engine.module.model
    ema = WeightEMA(tc.ema, trained, tc.zero_stage) if tc.ema > 0 else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        eval_model = task.build_model().to(device).eval()

    state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "best_val": None, "best_step": None,
                             "last_val": None}
    rank_state = None
    if point is not None:
        rank_state, shared = ckpt.load(engine, point)
        state.update(shared["train"])
        if ema is not None:
            ema.load_state_dict(shared["ema"])
        # Logged so that a resume can be checked against the checkpoint it came from. Keep the
        # format: tests/test_resume.py and tests/test_pipeline_slurm.py (the requeued SLURM job)
        # parse "resumed from <step dir> (step N of M, weights fingerprint XXXXXXXX)".
        params = {n for n, _ in trained.named_parameters()}
        weights_crc = fingerprint({n: v for n, v in full_fp32_state(trained).items() if n in params})
        if d.is_main:
            ckpt.drop_best_after(point.step)
            log.info("%s: resumed from %s (step %d of %d, weights fingerprint %08x)", ctx.label,
                     point.step_dir, point.step, tc.steps, weights_crc)
    if state["step"] != step:
        raise RuntimeError(f"{point.step_dir}: its shared state is at step {state['step']}, its "
                           f"commit marker at {step}")
    if rank_state is not None:
        for name, loader in loaders.items():
            loader.load_state_dict(rank_state["loaders"][name])
    iterators: dict[str, Iterator] = {name: iter(loader) for name, loader in loaders.items()}
    # Only now: set-up above (model builds, DataLoader iterators) draws from the global RNGs.
    if rank_state is not None:
        set_rng_state(rank_state["rng"], device)
    else:
        seed_rngs(derive_seed(seed, "rank", d.rank, step))

    metrics = StageMetrics(ctx.paths.tb(ctx.stage, ctx.target, ctx.fraction, ctx.seed),
                           ctx.paths.stage(ctx.stage, ctx.target, ctx.fraction, ctx.seed) / "train_log.jsonl",
                           enabled=d.is_main, start_step=step)
    if step == 0:
        metrics.text("config", "```\n" + cfg.to_yaml() + "\n```", 0)
    samples_per_step = geometry.global_batch
    tokens_per_step = samples_per_step * task.seq_len

    def evaluate() -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        weights = ema.weights(trained) if ema is not None else full_fp32_state(trained)
        eval_model.load_state_dict(weights)
        # Outside the training RNG stream: a resumed run validates at other points in it.
        with torch.no_grad(), autocast(device, precision), \
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            values = task.validate(eval_model, StepRandom.for_validation(seed, d, device),
                                   val_loaders, d)
        return values, weights

    def save(at: int) -> None:
        metrics.flush()
        shared = {"train": dict(state), "ema": ema.state_dict() if ema is not None else None}
        rank_blob = {"step": at, "rank": d.rank, "world_size": d.world_size,
                     "loaders": {n: l.state_dict() for n, l in loaders.items()},
                     "rng": rng_state(device)}
        ckpt.save(engine, at, rank_state=rank_blob, shared_state=shared,
                  summary={k: state[k] for k in ("tokens_seen", "best_step", "best_val", "last_val")})

    progress = Progress(tc.steps, ctx.label, unit="step", enabled=d.is_main, initial=step)
    window_time, window_steps = 0.0, 0
    last_weights: Optional[dict[str, torch.Tensor]] = None
    last_val: dict[str, float] = {}
    preempted, signals = False, []
    untracked_norm = tc.zero_stage == 0 and precision == "fp32"
    grad_norm: Optional[float] = None
    while step < tc.steps:
        t0 = time.perf_counter()
        loss_sum, stats_sum, crc = 0.0, {}, 0
        for micro in range(geometry.grad_accum):
            # Data loading must not draw from the training RNG: a DataLoader takes its base seed
            # from it whenever it (re)starts, which a resumed run does at another step.
            with torch.random.fork_rng(devices=[]):
                batches = {name: next(it) for name, it in iterators.items()}
            crc += fingerprint(batches)
            rng = StepRandom.for_step(seed, step, micro, geometry.grad_accum, d, device)
            loss, stats = engine(to_device(batches, device), rng)
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary() and untracked_norm:
                grad_norm = plain_grad_norm(trained)
            engine.step()
            loss_sum += float(loss.item())
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
        step += 1
        if engine.global_steps != step:
            raise RuntimeError(f"DeepSpeed counts {engine.global_steps} optimiser steps, the loop "
                               f"{step}: the micro-batch geometry and the engine disagree")
        if ema is not None:
            ema.update(trained)
        keys = sorted(stats_sum)
        flags = ctx.guard.flags()
        reduced = dist.all_reduce([*flags, loss_sum, *(stats_sum[k] for k in keys), float(crc)],
                                  "sum")
        signals = ctx.guard.agreed(reduced[:len(flags)])
        preempted = bool(signals)
        reduced = reduced[len(flags):]
        n = geometry.grad_accum * d.world_size
        train_values = {"loss": reduced[0] / n, **{k: v / n for k, v in zip(keys, reduced[1:-1])}}
        state["step"] = step
        state["tokens_seen"] += tokens_per_step
        window_time += time.perf_counter() - t0
        window_steps += 1
        progress.update(1, postfix=f"loss {train_values['loss']:.4f}")

        if step % tc.log_every == 0 or step == tc.steps or preempted:
            lr = engine.get_lr()[0]
            if not untracked_norm:
                grad_norm = _grad_norm(engine)
            record = {**train_values, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_step * window_steps / window_time,
                      "samples_per_s": samples_per_step * window_steps / window_time,
                      "tokens_seen": float(state["tokens_seen"]), "data_crc": reduced[-1]}
            record.update({f"sys/{k}": v for k, v in memory_stats(device).items()})
            metrics.scalars(step, record, "train")
            window_time, window_steps = 0.0, 0

        if validates and (step % tc.val_every == 0 or step == tc.steps):
            last_val, last_weights = evaluate()
            state["last_val"] = last_val["loss"]
            metrics.scalars(step, last_val, "val")
            report = task.validation_report()
            if report:
                metrics.text("val/report", report, step)
            if tc.select_best and (state["best_val"] is None or last_val["loss"] < state["best_val"]):
                state["best_val"], state["best_step"] = last_val["loss"], step
                if d.is_main:
                    ckpt.save_best(step, {"step": step, "val": last_val, "state_dict": last_weights})

        if step % tc.save_every == 0 or step == tc.steps or preempted:
            save(step)
        if preempted:
            break
    progress.close()

    if preempted and step < tc.steps:  # a signal during the last step: just finish
        log.warning("%s: preempted; saved step %d, exiting so the job can be requeued",
                    ctx.label, step)
        metrics.close()
        # Every rank leaves the process group before rank 0 hands over: submitit's handler
        # requeues and exits, and a rank still waiting in a collective for it would hang.
        dist.shutdown()
        ctx.guard.hand_over(d.is_main, signals)
        return StageResult("preempted", ctx.stage, ctx.target, ctx.fraction, step, ctx.input_hash,
                           val_loss=state["last_val"], best_step=state["best_step"])

    # Export: the best-validation weights, else the EMA, else the final weights.
    if tc.select_best and state["best_step"] is not None:
        weights = ckpt.load_best(state["best_step"])["state_dict"] if d.is_main else {}
        which, exp_step, exp_val = "best", state["best_step"], state["best_val"]
    else:
        if last_weights is None:  # resumed at the very end: nothing computed in this process
            last_weights = ema.weights(trained) if ema is not None else full_fp32_state(trained)
        weights, which = last_weights, ("ema" if ema is not None else "final")
        exp_step, exp_val = step, state["last_val"]
    export_path = ctx.export_path()
    if d.is_main:
        meta = {**task.export_info(), "stage": ctx.stage, "target": ctx.target,
                "fraction": ctx.fraction, "seed": ctx.seed, "input_hash": ctx.input_hash,
                "tokenizer_hash": task.tokenizer_hash, "step": exp_step, "val_loss": exp_val,
                "weights": which, "trained_steps": step, "world_size": d.world_size,
                "zero_stage": tc.zero_stage, "precision": precision, "finished": True}
        write_export(export_path, weights, meta)
        metrics.hparams({"stage": ctx.label, "zero_stage": tc.zero_stage,
                         "world_size": d.world_size, "global_batch": tc.global_batch,
                         "lr": tc.lr, "steps": tc.steps, "ema": tc.ema},
                        {"val_loss": exp_val if exp_val is not None else float("nan")})
        log.info("%s: finished at step %d; exported %s weights (step %s, val loss %s) to %s",
                 ctx.label, step, which, exp_step, exp_val, export_path)
    metrics.close()
    return StageResult("finished", ctx.stage, ctx.target, ctx.fraction, step, ctx.input_hash,
                       export=export_path, val_loss=exp_val, best_step=state["best_step"],
                       val_metrics=last_val)


def stage_input_hash(cfg: RunConfig, stage: str, target: Optional[str],
                     fraction: Optional[float], seed: int = 0) -> str:
    """The hash a stage's checkpoints and export carry: the config sections it reads plus,
    recursively, those of its upstream stages (the pipeline DAG's definition, so the launcher's
    completion markers and the checkpoints agree)."""
    from gtl_dist.cluster.dag import Pipeline
    from gtl_dist.cluster.dag import Task as DagTask
    return Pipeline(cfg).input_hash(DagTask(stage, target, fraction, seed=seed))


def execute(cfg: RunConfig, run_dir: str | Path, stage: str, target: Optional[str],
            fraction: Optional[float], input_hash: str,
            make_task: Callable[[StageContext], Task], seed: int = 0) -> StageResult:
    """Run one stage end to end in this process (one rank of the job)."""
    from gtl_dist.train.dist import init_distributed

    guard = PreemptionGuard().install()  # first: a USR2 during set-up must not kill the rank
    finished = False
    try:
        d = init_distributed()
        ctx = StageContext(cfg, RunPaths(run_dir), stage, target, fraction, input_hash, d,
                           detect_hardware(), guard, seed)
        done = finished_export(ctx)
        if done is not None:
            if d.is_main:
                log.info("%s: already finished (export %s, same inputs); nothing to do",
                         ctx.label, ctx.export_path())
            result = StageResult("finished", stage, target, fraction, done["trained_steps"],
                                 input_hash, export=ctx.export_path(),
                                 val_loss=done.get("val_loss"),
                                 best_step=done["step"] if done.get("weights") == "best" else None)
        else:
            result = train(make_task(ctx), ctx)
        finished = True
        return result
    finally:
        # Also on failure (then without the final barrier, which the other ranks may never reach):
        # a group left up is handed to the next task of this process (--cluster debug), and torn
        # down at interpreter exit instead it can abort the process with SIGABRT.
        dist.shutdown(barrier=finished)
        guard.uninstall()
