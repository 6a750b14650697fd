"""The training loop every stage shares.

A stage's :class:`~gtl_dist.train.recipe.Recipe` builds its network, its training loaders and its
loss, and runs its validation. Everything else happens here, once, in this order:

    signals -> process group -> resume point -> model (same init on every rank) -> DeepSpeed
    -> checkpoint load -> loaders (+ cursors) -> RNG states -> loop -> export

:func:`execute` sets up the signals and the process group; :func:`~gtl_dist.train.state.setup`
builds the rest up to the RNG states into one :class:`~gtl_dist.train.state.TrainState`;
:func:`train` runs the loop (:func:`train_from`: :func:`train_step`, :func:`log_train`,
:func:`maybe_validate`, ``checkpointer.save``), which ends in :func:`export`, or in
:func:`stop_for_requeue` when preempted, and then releases the engine; :func:`execute` tears the
process group down and, after a preemption, hands the signal over.

Per optimiser step: ``grad_accum`` micro-batches (forward through the engine, backward, step),
the EMA update, then one all-reduce on the host of the preemption flags (and the data
fingerprint). The loss and the recipe's statistics stay on the device, summed over the
micro-batches, and are read and all-reduced only on the steps that are logged (every
``log_every`` steps, the last, a preempted one), as nanoGPT and torchtitan do: no other step waits
for the device. Validation every ``val_every`` steps and at the last step, on EMA weights when
``ema > 0``; a checkpoint every ``save_every`` steps, at the last step and on preemption. Why a
resumed run repeats an uninterrupted one bit for bit: gtl_dist/train/recipe.py.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import nn

from gtl_dist.batch_stats import BatchStats
from gtl_dist.config import RunConfig
from gtl_dist.exports import read_export_meta, write_export
from gtl_dist.log import Progress, get_logger
from gtl_dist.paths import RunPaths
from gtl_dist.stages import STAGES
from gtl_dist.train import dist
from gtl_dist.train.engine import detect_hardware, full_fp32_state
from gtl_dist.train.metrics import StageMetrics, memory_stats
from gtl_dist.train.preempt import PreemptionGuard
from gtl_dist.train.recipe import Recipe, StageContext, StageResult, StepRandom, forked_rng
from gtl_dist.train.state import TrainState, fingerprint, setup

log = get_logger("train.loop")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def engine_grad_norm(engine: Any) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def plain_grad_norm(module: nn.Module) -> torch.Tensor:
    """Gradient 2-norm where DeepSpeed keeps none: without ZeRO and without a bf16 optimiser it
    clips through torch's clip_grad_norm_ and drops the norm. The gradients are already
    all-reduced at the accumulation boundary, so every rank gets the same value. A device
    scalar: read only when the step is logged."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


@dataclass
class StepSums:
    """One step's loss and statistics summed over its micro-batches where they were computed:
    a loss's :class:`BatchStats` on the device, in float64 (one tensor, never read per
    micro-batch), a recipe's plain floats on the host. Float64 sums in micro-batch order, as the
    host's Python floats made them."""
    device: Optional[torch.Tensor] = None   # the loss, then the BatchStats' values
    names: tuple[str, ...] = ()
    host: dict[str, float] = field(default_factory=dict)

    def add(self, loss: torch.Tensor, stats: Mapping[str, float]) -> None:
        values = loss.detach().double().reshape(1)
        if isinstance(stats, BatchStats):
            values, self.names = torch.cat([values, stats.tensor]), stats.names
        else:
            for k, v in stats.items():
                self.host[k] = self.host.get(k, 0.0) + float(v)
        if self.device is None:
            self.device = torch.zeros_like(values)
        self.device += values

    def read(self) -> tuple[float, dict[str, float]]:
        """(summed loss, summed statistics): the step's one read of the device."""
        loss, *values = self.device.tolist()
        return loss, {**dict(zip(self.names, values)), **self.host}


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic phase runs after ``step``: every ``every`` steps and after the last."""
    return step % every == 0 or step == last


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

@dataclass
class StepOutcome:
    """What one optimiser step reports, summed over the ranks."""
    values: Optional[dict[str, float]]  # loss and statistics averaged over the batch; logged steps only
    data_crc: float             # fingerprint of every batch the step read
    signals: list[int]          # the preemption signals any rank received
    grad_norm: Optional[float]  # logged steps where DeepSpeed keeps none; else the engine has it
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
    state = setup(recipe, ctx)
    try:
        return train_from(recipe, ctx, state)
    finally:
        state.release()


def train_from(recipe: Recipe, ctx: StageContext, state: TrainState) -> StageResult:
    """The loop from ``state``'s step to the export, or to the preemption's checkpoint."""
    tc = recipe.train_config
    metrics = open_metrics(ctx, state.step)
    last = ctx.last_step
    progress = Progress(last, ctx.label, unit="step", enabled=ctx.dist_env.is_main,
                        initial=state.step)
    window, signals = Throughput(), []
    # A stage that starts from a model worth keeping scores it first, so selection can keep it.
    if state.step == 0 and STAGES[ctx.stage].init_is_candidate:
        validate_and_select(recipe, ctx, state, metrics)
    while state.step < last:
        # One optimiser step: the micro-batches, the EMA update, then one host all-reduce of the
        # preemption flags, so that every rank stops after the same step. Its loss and
        # statistics are read from the device only when they are logged.
        out = train_step(recipe, ctx, state)
        signals = out.signals
        window.add(out.seconds)

        # Log every log_every steps, after the last step and on preemption.
        if out.values is not None:
            progress.update(1, postfix=f"loss {out.values['loss']:.4f}")
            log_train(ctx, state, metrics, out, window)
            window = Throughput()
        else:
            progress.update(1)

        # Validate every val_every steps and after the last step; keep the best weights.
        maybe_validate(recipe, ctx, state, metrics)
        if out_of_patience(tc, state):
            log.info("%s: stopping at step %d: no better held-out loss in %d validations since step %d",
                     ctx.label, state.step, tc.patience, state.best_step)
            metrics.flush()
            break

        # Checkpoint every save_every steps, after the last step and on preemption.
        if due(state.step, tc.save_every, last) or signals:
            metrics.flush()
            state.checkpointer.save(state.step)
        if signals:
            break
    progress.close()

    if signals and state.step < last:  # a signal during the last step: just finish
        return stop_for_requeue(ctx, state, metrics, signals)
    return export(recipe, ctx, state, metrics)


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
    """One optimiser step, gradient accumulation included, then the EMA update and one host
    all-reduce of the preemption flags and the data fingerprint. The loss and the recipe's
    statistics stay on the device, summed over the micro-batches; on a step that is logged
    (every ``log_every`` steps, the last, a preempted one) they are read once and all-reduced."""
    t0 = time.perf_counter()
    sums, crc, grad_norm = accumulate_gradients(recipe, ctx, state)
    state.step += 1
    if state.engine.global_steps != state.step:
        raise RuntimeError(f"DeepSpeed counts {state.engine.global_steps} optimiser steps, the "
                           f"loop {state.step}: the micro-batch geometry and the engine disagree")
    if state.ema is not None:
        state.ema.update(state.model)
    flags = ctx.guard.flags()
    agreed = dist.all_reduce([*flags, float(crc)], "sum")
    signals = ctx.guard.agreed(agreed[:len(flags)])
    state.tokens_seen += state.tokens_per_step
    tc = recipe.train_config
    if not (due(state.step, tc.log_every, ctx.last_step) or signals):
        return StepOutcome(None, agreed[-1], signals, None, time.perf_counter() - t0)
    loss_sum, stats_sum = sums.read()
    keys = sorted(stats_sum)
    reduced = dist.all_reduce([loss_sum, *(stats_sum[k] for k in keys)], "sum")
    n = state.geometry.grad_accum * ctx.dist_env.world_size
    values = {"loss": reduced[0] / n, **{k: v / n for k, v in zip(keys, reduced[1:])}}
    return StepOutcome(values, agreed[-1], signals, None if grad_norm is None else float(grad_norm),
                       time.perf_counter() - t0)


def accumulate_gradients(recipe: Recipe, ctx: StageContext,
                         state: TrainState) -> tuple[StepSums, int, Optional[torch.Tensor]]:
    """The step's ``grad_accum`` micro-batches through the engine, each with the random streams
    of its (step, micro-step, rank); DeepSpeed steps the optimiser after the last. Returns this
    rank's summed loss and statistics (unread), the data fingerprint and, where DeepSpeed keeps
    none, the gradient norm (a device scalar)."""
    d, device, accum = ctx.dist_env, ctx.hardware.device, state.geometry.grad_accum
    untracked_norm = recipe.train_config.zero_stage == 0 and state.precision == "fp32"
    sums, crc, grad_norm = StepSums(), 0, None
    for micro in range(accum):
        batches = next_batches(state.iterators)
        crc += fingerprint(batches)
        rng = StepRandom.for_step(ctx.run_seed, state.step, micro, accum, d, device)
        loss, stats = state.engine(to_device(batches, device), rng)
        state.engine.backward(loss)
        if state.engine.is_gradient_accumulation_boundary() and untracked_norm:
            grad_norm = plain_grad_norm(state.model)
        state.engine.step()
        sums.add(loss, stats)
    return sums, crc, grad_norm


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
    grad_norm = out.grad_norm if out.grad_norm is not None else engine_grad_norm(state.engine)
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
    if due(state.step, tc.val_every, ctx.last_step):
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
    """After the preemption's checkpoint: the result that makes :func:`execute` hand the agreed
    signals over to the handler installed before ours (submitit's requeues the job)."""
    log.warning("%s: preempted; saved step %d, exiting so the job can be requeued",
                ctx.label, state.step)
    metrics.close()
    return StageResult("preempted", ctx.stage, ctx.target, ctx.fraction, state.step,
                       ctx.input_hash, val_loss=state.last_val, best_step=state.best_step,
                       signals=tuple(signals))


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
            variant: Optional[str] = None, fold: Optional[int] = None,
            stop_at: Optional[int] = None) -> StageResult:
    """Run one stage end to end in this process (one rank of the job); ``variant`` names one run
    of its learning-rate grid (its own folder; the caller publishes the best), ``fold`` the fold
    a kfold run holds out and ``stop_at`` a kfold refit's last step (gtl_dist/train/grid.py)."""
    from gtl_dist.train.dist import init_distributed

    guard = PreemptionGuard().install()  # first: a USR2 during set-up must not kill the rank
    finished = False
    try:
        d = init_distributed()
        ctx = StageContext(cfg, RunPaths(run_dir), stage, target, fraction, input_hash, d,
                           detect_hardware(), guard, seed, variant, fold, stop_at)
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
    finally:
        # Also on failure (then without the final barrier, which the other ranks may never reach):
        # a group left up is handed to the next task of this process (--cluster debug), and torn
        # down at interpreter exit instead it can abort the process with SIGABRT.
        dist.shutdown(barrier=finished)
        if not finished:
            guard.uninstall()
    if result.status == "preempted":
        # Every rank has left the process group: submitit's handler requeues and exits, and a
        # rank still waiting in a collective for this one would hang.
        guard.hand_over(d.is_main, list(result.signals))
    guard.uninstall()
    return result
