"""What a stage brings to the training loop, and the random streams of its steps.

A stage's :class:`Recipe` (``RECIPES`` in gtl_dist/train/jobs.py) builds its network, its
loaders and its loss, and runs its validation; :class:`StageContext` says which stage, cell and
rank this process trains; :class:`StageResult` is what the loop (gtl_dist/train/loop.py) returns.

Randomness, and why a resumed run repeats an uninterrupted one bit for bit:
- the initial weights come from the stage's seed (``StageContext.run_seed``: ``cfg.seed``, or a
  seed derived from it for replicate s > 0 of pipeline.seeds) on every rank (ZeRO-3 partitions
  each rank's own copy, so they must agree);
- the noise of each micro-step comes from two generators re-seeded from (seed, step, micro-step):
  ``shared`` is identical on all ranks (the diffusion time t is stratified over the global
  batch), ``local`` adds the rank (masks, label smoothing). Their state is a function of the step,
  so a checkpoint needs nothing for them (:class:`StepRandom`);
- everything else that draws from the global RNGs (dropout) continues from the per-rank
  python/numpy/torch RNG states saved in every checkpoint, restored after all set-up work
  (which may draw from them) is done; fetching batches runs outside that stream;
- the data position is the loaders' cursors, saved per rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from gtl_dist.config import RunConfig, TrainConfig
from gtl_dist.paths import RunPaths, task_name
from gtl_dist.train.dist import DistEnv
from gtl_dist.train.engine import Hardware
from gtl_dist.train.preempt import PreemptionGuard


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
    signals: tuple[int, ...] = ()  # status "preempted": the signals the ranks agreed on


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
    """What one stage contributes to the loop (``RECIPES`` in gtl_dist/train/jobs.py: one per stage)."""

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
    fold: Optional[int] = None  # protocol.selection=kfold: the fold this run holds out
    stop_at: Optional[int] = None  # a kfold refit: its last step (the schedule spans train.<stage>.steps)

    @property
    def last_step(self) -> int:
        """The step the run ends at: ``train.<stage>.steps``, or a refit's ``stop_at``."""
        steps = getattr(self.cfg.train, self.stage).steps
        return steps if self.stop_at is None else min(self.stop_at, steps)

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


def seed_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def forked_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """A block whose draws leave the global RNGs (the CPU's, and ``device``'s if it is a GPU) as
    they were."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

