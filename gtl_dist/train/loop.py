"""The training loop every stage shares.

A stage's :class:`Recipe` builds its network, its training loaders and its loss, and runs its
validation pass. Everything else happens here, once, in this order:

    signals -> process group -> resume point -> model (same init on every rank) -> DeepSpeed
    -> checkpoint load -> loaders (+ cursors) -> RNG states -> loop -> export

:func:`execute` sets up the signals and the process group; :func:`setup` builds the rest up to the
RNG states into one :class:`TrainState`, whose stateful parts the checkpointer is given once;
:func:`train` runs the loop (:func:`train_step`, :func:`log_train`, :func:`maybe_validate`,
``checkpointer.save``) and ends in :func:`export`, or in :func:`stop_for_requeue` when preempted.

Per optimiser step: ``grad_accum`` micro-batches (forward through the engine, backward, step),
the EMA update, then ONE all-reduce that carries the preemption flag, the loss and the recipe's
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
import math
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
from gtl_dist.stages import STAGES
from gtl_dist.train import dist
from gtl_dist.train.checkpoint import Checkpointer, ResumePoint, StatefulParts, set_rng_state
from gtl_dist.train.dist import DistEnv
from gtl_dist.train.ema import WeightEMA
from gtl_dist.train.engine import (BatchGeometry, Hardware, batch_geometry, build_engine,
                                   detect_hardware, full_fp32_state, resolve_precision)
from gtl_dist.exports import read_export_meta, write_export
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


class Recipe(ABC):
    """What one stage contributes to the loop (gtl_dist/train/jobs.py holds one per stage)."""

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

    def compile(self) -> None:
        """From now on, run the training steps' network forward and loss as one compiled graph
        (``train.<stage>.compile``; only stages whose row in the stage table ``compiles``)."""
        raise NotImplementedError(f"stage {self.stage} has no compiled training step")

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
    """What DeepSpeed wraps: the trained network plus the recipe's loss. Frozen helper networks
    stay outside (the recipe holds them), so they are neither partitioned nor optimised."""

    def __init__(self, model: nn.Module, recipe: Recipe):
        super().__init__()
        self.model = model
        self._recipe = recipe

    def forward(self, batches: dict[str, Any], rng: StepRandom) -> tuple[torch.Tensor, dict]:
        return self._recipe.training_loss(self.model, batches, rng)


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
    variant: Optional[str] = None  # one run of the stage's learning-rate grid (lr-<value>)

    @property
    def label(self) -> str:
        name = task_name(self.stage, target=self.target, fraction=self.fraction, seed=self.seed)
        return f"{name}/{self.variant}" if self.variant else name

    @property
    def run_seed(self) -> int:
        """The seed of this stage's randomness (weights, data order, masks): cfg.seed for
        replicate 0, an independent seed derived from it for every other replicate."""
        return self.cfg.seed if not self.seed else derive_seed(self.cfg.seed, "replicate", self.seed) % 2**31

    def export_path(self) -> Path:
        return self.paths.export(self.stage, self.target, self.fraction, self.seed, self.variant)


# ----------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------

def seed_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def forked_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """A block whose draws leave the global RNGs (the CPU's, and ``device``'s if it is a GPU) as
    they were."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


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


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic phase runs after ``step``: every ``every`` steps and after the last."""
    return step % every == 0 or step == last


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """One stage's training, as :func:`setup` builds it and the loop advances it: the counters
    every rank shares (``state_dict``, saved with the EMA as a checkpoint's shared state), the
    stateful parts the checkpointer saves beside them, and what the phases use."""
    engine: Any                               # DeepSpeed's, around a LossModule
    ema: Optional[WeightEMA]
    loaders: dict[str, Any]                   # training loaders; their cursors are per rank
    val_loaders: Optional[dict[str, Any]]     # None: the stage has no validation data
    eval_model: nn.Module                     # the copy validation loads the weights into
    geometry: BatchGeometry
    precision: str
    tokens_per_step: int
    checkpointer: Checkpointer
    iterators: dict[str, Iterator] = field(default_factory=dict)  # started after the cursors
    step: int = 0
    tokens_seen: int = 0
    best_val: Optional[float] = None
    best_step: Optional[int] = None
    last_val: Optional[float] = None
    val_metrics: dict[str, float] = field(default_factory=dict)   # this process's last validation
    val_weights: Optional[dict[str, torch.Tensor]] = None         # and the weights it validated

    @property
    def model(self) -> nn.Module:
        """The trained network."""
        return self.engine.module.model

    def state_dict(self) -> dict[str, Any]:
        """The counters every rank shares, as a checkpoint stores them."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                "best_step": self.best_step, "last_val": self.last_val}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val, self.best_step = state["best_val"], state["best_step"]
        self.last_val = state["last_val"]


@dataclass
class StepOutcome:
    """What one optimiser step reports, summed over the ranks in its one all-reduce."""
    values: dict[str, float]    # the loss and the recipe's statistics, averaged over the batch
    data_crc: float             # fingerprint of every batch the step read
    signals: list[int]          # the preemption signals any rank received
    grad_norm: Optional[float]  # only where DeepSpeed keeps none; else the engine has it
    seconds: float


@dataclass
class Throughput:
    """Optimiser steps, and their seconds, since the last train record."""
    steps: int = 0
    seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds

    def rate(self, per_step: int) -> float:
        """Per second, of a quantity ``per_step`` every step."""
        return per_step * self.steps / self.seconds


def finished_export(ctx: StageContext) -> Optional[dict[str, Any]]:
    """The export's metadata if this stage already finished with the current inputs."""
    meta = read_export_meta(ctx.export_path())
    if meta and meta.get("input_hash") == ctx.input_hash and meta.get("finished"):
        return meta
    return None


def train(recipe: Recipe, ctx: StageContext) -> StageResult:
    """Train a stage from its newest checkpoint (or from scratch) to ``steps`` and export it; on
    preemption, save and hand the signal over instead."""
    tc = recipe.train_config
    state = setup(recipe, ctx)
    metrics = open_metrics(ctx, state.step)
    progress = Progress(tc.steps, ctx.label, unit="step", enabled=ctx.dist_env.is_main,
                        initial=state.step)
    window, signals = Throughput(), []
    # A stage that starts from a model worth keeping scores it first, so selection can keep it.
    if state.step == 0 and STAGES[ctx.stage].init_is_candidate:
        validate_and_select(recipe, ctx, state, metrics)
    while state.step < tc.steps:
        # One optimiser step: the micro-batches, the EMA update, then one all-reduce that also
        # carries the preemption flags, so that every rank stops after the same step.
        out = train_step(recipe, ctx, state)
        signals = out.signals
        window.add(out.seconds)
        progress.update(1, postfix=f"loss {out.values['loss']:.4f}")

        # Log every log_every steps, after the last step and on preemption.
        if due(state.step, tc.log_every, tc.steps) or signals:
            log_train(ctx, state, metrics, out, window)
            window = Throughput()

        # Validate every val_every steps and after the last step; keep the best weights.
        maybe_validate(recipe, ctx, state, metrics)
        if out_of_patience(tc, state):
            log.info("%s: stopping at step %d: no better held-out loss in %d validations since step %d",
                     ctx.label, state.step, tc.patience, state.best_step)
            metrics.flush()
            break

        # Checkpoint every save_every steps, after the last step and on preemption.
        if due(state.step, tc.save_every, tc.steps) or signals:
            metrics.flush()
            state.checkpointer.save(state.step)
        if signals:
            break
    progress.close()

    if signals and state.step < tc.steps:  # a signal during the last step: just finish
        return stop_for_requeue(ctx, state, metrics, signals)
    return export(recipe, ctx, state, metrics)


# -- set-up ----------------------------------------------------------------------------------

def setup(recipe: Recipe, ctx: StageContext) -> TrainState:
    """The training state at the newest usable checkpoint, or at step 0. Built in the order the
    module docstring gives: every draw from the global RNGs happens where a resumed run repeats
    it, and the RNG states are set last."""
    tc, device = recipe.train_config, ctx.hardware.device
    geometry = batch_geometry(tc, ctx.dist_env.world_size, ctx.stage)
    precision = resolve_precision(tc, ctx.hardware, ctx.stage)
    checkpointer = stage_checkpointer(recipe, ctx)
    point = checkpointer.find_resume_point()
    # Loaders first: an unreadable data set fails before the engine is built.
    loaders = recipe.train_loaders(geometry.micro_batch, ctx.dist_env, data_seed(ctx, point))
    val_loaders = recipe.validation_loaders(geometry.micro_batch, ctx.dist_env)
    engine = build_trained_engine(recipe, ctx, point, geometry, precision)
    if tc.compile:
        recipe.compile()
        if ctx.dist_env.is_main:
            log.info("%s: train.%s.compile: the first step compiles the network and the loss",
                     ctx.label, ctx.stage)
    ema = WeightEMA(tc.ema, engine.module.model, tc.zero_stage) if tc.ema > 0 else None
    with forked_rng(device):
        eval_model = recipe.build_model().to(device).eval()
    state = TrainState(engine, ema, loaders, val_loaders, eval_model, geometry, precision,
                       tokens_per_step=geometry.global_batch * recipe.seq_len,
                       checkpointer=checkpointer)
    checkpointer.attach(StatefulParts(engine, train_state=state, ema=ema, loaders=loaders,
                                      device=device))
    rng = resume(recipe, ctx, state, point) if point is not None else None
    state.iterators = {name: iter(loader) for name, loader in loaders.items()}
    # Only now: set-up above (model builds, DataLoader iterators) draws from the global RNGs.
    if rng is not None:
        set_rng_state(rng, device)
    else:
        seed_rngs(derive_seed(ctx.run_seed, "rank", ctx.dist_env.rank, state.step))
    return state


def stage_checkpointer(recipe: Recipe, ctx: StageContext) -> Checkpointer:
    """The checkpoints of this stage (and replicate), under its config and tokenizer hashes."""
    tc = recipe.train_config
    return Checkpointer(ctx.paths.checkpoints(ctx.stage, ctx.target, ctx.fraction, ctx.seed, ctx.variant),
                        ctx.dist_env, zero_stage=tc.zero_stage, config_hash=ctx.input_hash,
                        tokenizer_hash=recipe.tokenizer_hash, keep_last=tc.keep_last,
                        label=ctx.label)


def data_seed(ctx: StageContext, point: Optional[ResumePoint]) -> int:
    """The seed of the training data order. Cursors and RNG states are per rank, so they carry
    over only at the same world size; at another, the data restarts on a fresh shuffle."""
    d = ctx.dist_env
    if point is None or point.commit.world_size == d.world_size:
        return ctx.run_seed
    seed = derive_seed(ctx.run_seed, "reshuffle", point.step, d.world_size) % 2**31
    if d.is_main:
        log.warning("%s: the checkpoint was written by %d ranks and this run has %d, so the "
                    "per-rank data cursors and RNG states do not apply: the data restarts on "
                    "a fresh shuffle (seed %d) and the RNGs are re-seeded", ctx.label,
                    point.commit.world_size, d.world_size, seed)
    return seed


def build_trained_engine(recipe: Recipe, ctx: StageContext, point: Optional[ResumePoint],
                         geometry: BatchGeometry, precision: str) -> Any:
    """DeepSpeed's engine around the recipe's network, initialised alike on every rank: from the
    stage's seed, or on a fresh start from the recipe's initial weights if it has any."""
    device = ctx.hardware.device
    seed_rngs(ctx.run_seed)  # identical initial weights on every rank
    model = recipe.build_model()
    if point is None:
        init = recipe.initial_weights()
        if init is not None:
            model.load_state_dict(init)
    recipe.prepare(device)
    return build_engine(LossModule(model, recipe).to(device), recipe.train_config, geometry, precision,
                        ctx.hardware, load_universal=point is not None and point.universal)


def resume(recipe: Recipe, ctx: StageContext, state: TrainState,
           point: ResumePoint) -> Optional[dict[str, Any]]:
    """Restore ``point`` into the attached parts and say so; returns what
    :meth:`Checkpointer.load` does (this rank's RNG states, or None)."""
    rng = state.checkpointer.load(point)
    # Logged so that a resume can be checked against the checkpoint it came from. Keep the
    # format: tests/test_resume.py and tests/test_pipeline_slurm.py (the requeued SLURM job)
    # parse "resumed from <step dir> (step N of M, weights fingerprint XXXXXXXX)".
    params = {n for n, _ in state.model.named_parameters()}
    weights_crc = fingerprint({n: v for n, v in full_fp32_state(state.model).items() if n in params})
    if ctx.dist_env.is_main:
        log.info("%s: resumed from %s (step %d of %d, weights fingerprint %08x)", ctx.label,
                 point.step_dir, point.step, recipe.train_config.steps, weights_crc)
    return rng


def open_metrics(ctx: StageContext, step: int) -> StageMetrics:
    """The stage's TensorBoard and train_log.jsonl from ``step`` on (rank 0 writes them); a
    fresh start records the config first."""
    where = (ctx.stage, ctx.target, ctx.fraction, ctx.seed, ctx.variant)
    metrics = StageMetrics(ctx.paths.tb(*where), ctx.paths.stage(*where) / "train_log.jsonl",
                           enabled=ctx.dist_env.is_main, start_step=step)
    if step == 0:
        metrics.text("config", "```\n" + ctx.cfg.to_yaml() + "\n```", 0)
    return metrics


# -- one optimiser step ----------------------------------------------------------------------

def train_step(recipe: Recipe, ctx: StageContext, state: TrainState) -> StepOutcome:
    """One optimiser step, gradient accumulation included, then the EMA update and ONE
    all-reduce of the preemption flags, the loss, the recipe's statistics and the data
    fingerprint."""
    t0 = time.perf_counter()
    loss_sum, stats_sum, crc, grad_norm = accumulate_gradients(recipe, ctx, state)
    state.step += 1
    if state.engine.global_steps != state.step:
        raise RuntimeError(f"DeepSpeed counts {state.engine.global_steps} optimiser steps, the "
                           f"loop {state.step}: the micro-batch geometry and the engine disagree")
    if state.ema is not None:
        state.ema.update(state.model)
    keys = sorted(stats_sum)
    flags = ctx.guard.flags()
    reduced = dist.all_reduce([*flags, loss_sum, *(stats_sum[k] for k in keys), float(crc)],
                              "sum")
    signals = ctx.guard.agreed(reduced[:len(flags)])
    reduced = reduced[len(flags):]
    n = state.geometry.grad_accum * ctx.dist_env.world_size
    values = {"loss": reduced[0] / n, **{k: v / n for k, v in zip(keys, reduced[1:-1])}}
    state.tokens_seen += state.tokens_per_step
    return StepOutcome(values, reduced[-1], signals, grad_norm, time.perf_counter() - t0)


def accumulate_gradients(recipe: Recipe, ctx: StageContext,
                         state: TrainState) -> tuple[float, dict[str, float], int, Optional[float]]:
    """The step's ``grad_accum`` micro-batches through the engine, each with the random streams
    of its (step, micro-step, rank); DeepSpeed steps the optimiser after the last. Returns this
    rank's summed loss and statistics, the data fingerprint and, where DeepSpeed keeps none,
    the gradient norm."""
    d, device, accum = ctx.dist_env, ctx.hardware.device, state.geometry.grad_accum
    untracked_norm = recipe.train_config.zero_stage == 0 and state.precision == "fp32"
    loss_sum, stats_sum, crc, grad_norm = 0.0, {}, 0, None
    for micro in range(accum):
        batches = next_batches(state.iterators)
        crc += fingerprint(batches)
        rng = StepRandom.for_step(ctx.run_seed, state.step, micro, accum, d, device)
        loss, stats = state.engine(to_device(batches, device), rng)
        state.engine.backward(loss)
        if state.engine.is_gradient_accumulation_boundary() and untracked_norm:
            grad_norm = plain_grad_norm(state.model)
        state.engine.step()
        loss_sum += float(loss.item())
        for k, v in stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
    return loss_sum, stats_sum, crc, grad_norm


def next_batches(iterators: dict[str, Iterator]) -> dict[str, Any]:
    """One batch from every training loader. Fetched outside the training RNG stream: a
    DataLoader takes its base seed from it whenever it (re)starts, which a resumed run does at
    another step."""
    with torch.random.fork_rng(devices=[]):
        return {name: next(it) for name, it in iterators.items()}


def log_train(ctx: StageContext, state: TrainState, metrics: StageMetrics, out: StepOutcome,
              window: Throughput) -> None:
    """The step's train record: loss and statistics, learning rate, gradient norm, throughput
    since the last record, tokens seen, data fingerprint, memory."""
    grad_norm = out.grad_norm if out.grad_norm is not None else _grad_norm(state.engine)
    record = {**out.values, "lr": state.engine.get_lr()[0], "grad_norm": grad_norm,
              "tokens_per_s": window.rate(state.tokens_per_step),
              "samples_per_s": window.rate(state.geometry.global_batch),
              "tokens_seen": float(state.tokens_seen), "data_crc": out.data_crc}
    record.update({f"sys/{k}": v for k, v in memory_stats(ctx.hardware.device).items()})
    metrics.scalars(state.step, record, "train")


# -- validation ------------------------------------------------------------------------------

def maybe_validate(recipe: Recipe, ctx: StageContext, state: TrainState,
                   metrics: StageMetrics) -> None:
    """Validate every ``val_every`` steps and after the last step (if the stage has validation
    data)."""
    tc = recipe.train_config
    if due(state.step, tc.val_every, tc.steps):
        validate_and_select(recipe, ctx, state, metrics)


def out_of_patience(tc: Any, state: TrainState) -> bool:
    """Early stopping: ``train.<stage>.patience`` validations have passed since the best one. The
    stage then exports its best weights, as at the end of its steps."""
    return (tc.patience is not None and state.best_step is not None
            and state.step - state.best_step >= tc.patience * tc.val_every)


def is_new_best(loss: float, best: Optional[float]) -> bool:
    """Whether a validation loss beats the best so far. A non-finite loss (a diverged step) never
    does: kept as the first best, a NaN would pin the selection, since no loss compares below it."""
    return math.isfinite(loss) and (best is None or loss < best)


def validate_and_select(recipe: Recipe, ctx: StageContext, state: TrainState,
                        metrics: StageMetrics) -> None:
    """Validate the current weights (if the stage has validation data) and keep them as the
    best when ``select_best`` and their validation loss is a new best."""
    tc = recipe.train_config
    if state.val_loaders is None:
        return
    values, weights = validate(recipe, ctx, state)
    state.val_metrics, state.val_weights, state.last_val = values, weights, values["loss"]
    metrics.scalars(state.step, values, "val")
    report = recipe.validation_report()
    if report:
        metrics.text("val/report", report, state.step)
    if tc.select_best and is_new_best(values["loss"], state.best_val):
        state.best_val, state.best_step = values["loss"], state.step
        if ctx.dist_env.is_main:
            state.checkpointer.save_best(state.step, {"step": state.step, "val": values,
                                                      "state_dict": weights})


def validate(recipe: Recipe, ctx: StageContext,
             state: TrainState) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The recipe's validation metrics of the current weights, and those weights."""
    device = ctx.hardware.device
    weights = current_weights(state)
    state.eval_model.load_state_dict(weights)
    # Outside the training RNG stream: a resumed run validates at other points in it.
    with torch.no_grad(), autocast(device, state.precision), forked_rng(device):
        values = recipe.validate(state.eval_model,
                               StepRandom.for_validation(ctx.run_seed, ctx.dist_env, device),
                               state.val_loaders, ctx.dist_env)
    return values, weights


def current_weights(state: TrainState) -> dict[str, torch.Tensor]:
    """The EMA weights if any, else the trained ones (consolidated fp32); collective."""
    return state.ema.weights(state.model) if state.ema is not None else full_fp32_state(state.model)


# -- the end -----------------------------------------------------------------------------------

def stop_for_requeue(ctx: StageContext, state: TrainState, metrics: StageMetrics,
                     signals: list[int]) -> StageResult:
    """After the preemption's checkpoint: leave the process group and hand the signal over to
    the handler installed before ours (submitit's requeues the job)."""
    log.warning("%s: preempted; saved step %d, exiting so the job can be requeued",
                ctx.label, state.step)
    metrics.close()
    # Every rank leaves the process group before rank 0 hands over: submitit's handler
    # requeues and exits, and a rank still waiting in a collective for it would hang.
    dist.shutdown()
    ctx.guard.hand_over(ctx.dist_env.is_main, signals)
    return StageResult("preempted", ctx.stage, ctx.target, ctx.fraction, state.step,
                       ctx.input_hash, val_loss=state.last_val, best_step=state.best_step)


def export(recipe: Recipe, ctx: StageContext, state: TrainState,
           metrics: StageMetrics) -> StageResult:
    """Write the finished stage's export (rank 0) and its hparams record."""
    tc, d = recipe.train_config, ctx.dist_env
    weights, which, step, val = exported_weights(recipe, ctx, state)
    path = ctx.export_path()
    if d.is_main:
        meta = {**recipe.export_info(), "stage": ctx.stage, "target": ctx.target,
                "fraction": ctx.fraction, "seed": ctx.seed, "input_hash": ctx.input_hash,
                "tokenizer_hash": recipe.tokenizer_hash, "step": step, "val_loss": val,
                "weights": which, "trained_steps": state.step, "world_size": d.world_size,
                "zero_stage": tc.zero_stage, "precision": state.precision, "finished": True}
        write_export(path, weights, meta)
        metrics.hparams({"stage": ctx.label, "zero_stage": tc.zero_stage,
                         "world_size": d.world_size, "global_batch": tc.global_batch,
                         "lr": tc.lr, "steps": tc.steps, "ema": tc.ema},
                        {"val_loss": val if val is not None else float("nan")})
        log.info("%s: finished at step %d; exported %s weights (step %s, val loss %s) to %s",
                 ctx.label, state.step, which, step, val, path)
    metrics.close()
    return StageResult("finished", ctx.stage, ctx.target, ctx.fraction, state.step,
                       ctx.input_hash, export=path, val_loss=val, best_step=state.best_step,
                       val_metrics=state.val_metrics)


def exported_weights(recipe: Recipe, ctx: StageContext, state: TrainState
                     ) -> tuple[dict[str, torch.Tensor], str, Optional[int], Optional[float]]:
    """What the export holds: the best-validation weights (rank 0 reads them), else the EMA,
    else the final weights; with their kind, step and validation loss."""
    if recipe.train_config.select_best and state.best_step is not None:
        weights = (state.checkpointer.load_best(state.best_step)["state_dict"]
                   if ctx.dist_env.is_main else {})
        return weights, "best", state.best_step, state.best_val
    # The last validated weights; resumed at the very end, nothing was computed in this process.
    weights = state.val_weights if state.val_weights is not None else current_weights(state)
    return weights, "ema" if state.ema is not None else "final", state.step, state.last_val


def execute(cfg: RunConfig, run_dir: str | Path, stage: str, target: Optional[str],
            fraction: Optional[float], input_hash: str,
            make_recipe: Callable[[StageContext], Recipe], seed: int = 0,
            variant: Optional[str] = None) -> StageResult:
    """Run one stage end to end in this process (one rank of the job); ``variant`` names one run
    of its learning-rate grid (its own folder; the caller publishes the best)."""
    from gtl_dist.train.dist import init_distributed

    guard = PreemptionGuard().install()  # first: a USR2 during set-up must not kill the rank
    finished = False
    try:
        d = init_distributed()
        ctx = StageContext(cfg, RunPaths(run_dir), stage, target, fraction, input_hash, d,
                           detect_hardware(), guard, seed, variant)
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
            result = train(make_recipe(ctx), ctx)
        finished = True
        return result
    finally:
        # Also on failure (then without the final barrier, which the other ranks may never reach):
        # a group left up is handed to the next task of this process (--cluster debug), and torn
        # down at interpreter exit instead it can abort the process with SIGABRT.
        dist.shutdown(barrier=finished)
        guard.uninstall()
