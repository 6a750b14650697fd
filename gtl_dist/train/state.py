"""One stage's training state, and its set-up at the newest usable checkpoint or at step 0.

:func:`setup` builds, in this order (every draw from the global RNGs happens where a resumed run
repeats it, and the RNG states are set last; gtl_dist/train/recipe.py says why):

    resume point -> loaders (+ validation loaders) -> model (same init on every rank) -> DeepSpeed
    -> EMA -> checkpoint load -> loader iterators -> RNG states

into one :class:`TrainState`, whose stateful parts the checkpointer is given once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from gtl_dist.log import get_logger
from gtl_dist.train.checkpoint import Checkpointer, ResumePoint, StatefulParts, set_rng_state
from gtl_dist.train.ema import WeightEMA
from gtl_dist.train.engine import (BatchGeometry, batch_geometry, build_engine, full_fp32_state,
                                   resolve_precision)
from gtl_dist.train.recipe import LossModule, Recipe, StageContext, derive_seed, forked_rng, seed_rngs

log = get_logger("train.state")


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

    def release(self) -> None:
        """Let go of DeepSpeed's engine at the end of the stage. Its ZeRO optimiser's gradient
        hooks are held by C++, so without ``destroy`` the collector never frees the engine, nor
        the process groups it holds (dist.shutdown)."""
        self.engine.destroy()

    def state_dict(self) -> dict[str, Any]:
        """The counters every rank shares, as a checkpoint stores them."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                "best_step": self.best_step, "last_val": self.last_val}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val, self.best_step = state["best_val"], state["best_step"]
        self.last_val = state["last_val"]



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



def fingerprint(batch: Any) -> int:
    """CRC32 of every tensor in a batch: logged per step (summed over ranks) so that a resumed
    run can be seen to read exactly the data an uninterrupted one did."""
    if isinstance(batch, torch.Tensor):
        return zlib.crc32(batch.detach().cpu().contiguous().numpy().tobytes())
    if isinstance(batch, dict):
        return sum(fingerprint(batch[k]) for k in sorted(batch)) % 2**32
    return 0

