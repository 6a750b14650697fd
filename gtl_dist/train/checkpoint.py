"""Checkpoints: DeepSpeed's sharded save, our per-rank state, and a commit marker. The one place.

Layout of one stage's ``ckpt/`` directory::

    step-00000100/                     one checkpoint (DeepSpeed tag = the folder name)
        mp_rank_00_model_states.pt     DeepSpeed: module, scheduler, client state (ZeRO 0-2)
        zero_pp_rank_R_mp_rank_00_*    DeepSpeed: optimiser (and ZeRO-3 parameter) shards
        rank00000_state.pt ...         ours, one per rank: data cursors, RNG states
        shared_state.pt                ours, rank 0: EMA, step counters, best-val bookkeeping
        COMMIT.json                    written LAST, by rank 0, after every rank finished
    best/step-00000080.pt              consolidated fp32 weights at the best validation loss
    universal/step-00000100/           DeepSpeed universal conversion (world-size change)

Rules:

- A checkpoint exists only once ``COMMIT.json`` does. It records the step, world size, ZeRO
  stage, the stage's config and tokenizer hashes, and size + sha256 of every file. DeepSpeed's
  own ``latest`` is never written nor read: DeepSpeed writes it before its final barrier, so it
  can name a half-written save (docs/operations.md).
- Resume takes the highest committed step whose files all match their recorded size and
  sha256 (each rank checks a slice of the files; all agree through an all-reduce); a damaged
  one is reported and the previous committed step is used instead. Uncommitted step folders
  (a save killed half-way) are deleted.
- Per-rank state lives in per-rank files because DeepSpeed's ``client_state`` is rank 0's only
  for ZeRO 0-2. The client state still carries ``universal_checkpoint_info`` and
  ``iteration`` so that any checkpoint can be converted to a universal one later.
- A different world size with ZeRO 1-3 goes through ``ds_to_universal``, run once by
  rank 0 before the engine loads. Data cursors and RNG states are per rank and do not carry
  over: the loop then starts the data on a fresh shuffle and says so.
- The loop hands the checkpointer its stateful parts once (:class:`StatefulParts`); then
  ``save(step)`` writes them all and ``load(point)`` restores them.
- ``keep_last`` newest committed checkpoints are kept. The best-validation weights are kept
  separately as ``best/step-N.pt`` (consolidated fp32: exactly what the export needs), so
  pruning DeepSpeed checkpoints never loses them; a best file is deleted only when no kept
  checkpoint refers to it.

Fault injection (tests): with ``GTL_FAULT_KILL_BEFORE_COMMIT=<step>`` in the environment every
rank SIGKILLs itself when saving that step, after all shard files are written and before
``COMMIT.json`` is — the window a preemption's grace period can cut.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gtl_dist.io import atomic_path, atomic_write_json, sha256_file
from gtl_dist.log import get_logger
from gtl_dist.train import dist
from gtl_dist.train.dist import DistEnv

log = get_logger("train.checkpoint")

COMMIT = "COMMIT.json"
SHARED_STATE = "shared_state.pt"
FAULT_ENV = "GTL_FAULT_KILL_BEFORE_COMMIT"
COMMIT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the folder, the cause and the fix."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_step(name: str) -> Optional[int]:
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def rank_state_name(rank: int) -> str:
    return f"rank{rank:05d}_state.pt"


@dataclass(frozen=True)
class Commit:
    step: int
    world_size: int
    zero_stage: int
    config_hash: str
    tokenizer_hash: str
    files: dict[str, dict[str, Any]]  # name -> {"bytes": n, "sha256": hex}
    rank_files: list[str]
    summary: dict[str, Any] = field(default_factory=dict)  # step counters, best_step, ...
    format: int = COMMIT_FORMAT

    @classmethod
    def read(cls, path: Path) -> "Commit":
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: unreadable commit marker ({exc})") from None


@dataclass(frozen=True)
class ResumePoint:
    commit: Commit
    step_dir: Path
    load_dir: Path   # what engine.load_checkpoint reads ``tag`` from
    tag: str
    universal: bool  # through a universal conversion (ZeRO 1-3, world size changed)

    @property
    def step(self) -> int:
        return self.commit.step


def committed_steps(root: Path) -> list[int]:
    """Steps under ``root`` with a commit marker, newest first."""
    if not root.is_dir():
        return []
    steps = [parse_step(p.name) for p in root.iterdir() if p.is_dir() and (p / COMMIT).is_file()]
    return sorted((s for s in steps if s is not None), reverse=True)


def retire_stale(root: Path, config_hash: str) -> Optional[Path]:
    """Move ``root`` aside when its newest committed checkpoint was written under another config
    hash (a run directory that adopted a changed config): the stage then starts afresh and the
    old checkpoints stay readable at the returned path. Launcher-side only, before the stage's
    job starts; a training process that meets such a checkpoint refuses it instead."""
    root = Path(root)
    steps = committed_steps(root)
    if not steps:
        return None
    old = Commit.read(root / step_dir_name(steps[0]) / COMMIT).config_hash
    if old == config_hash:
        return None
    dest = root.with_name(f"{root.name}.stale-{old}")
    n = 1
    while dest.exists():
        n += 1
        dest = root.with_name(f"{root.name}.stale-{old}.{n}")
    root.rename(dest)
    return dest


def _load(path: Path) -> Any:
    # Our own files: they hold numpy RNG states and tuples, which weights_only rejects.
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's global python, numpy, torch (and ``device``'s CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass(frozen=True)
class StatefulParts:
    """What a checkpoint holds besides its bookkeeping. ``train_state``, ``ema`` and every loader
    have ``state_dict``/``load_state_dict``."""
    engine: Any              # DeepSpeed's: weights, optimiser, scheduler (sharded by DeepSpeed)
    train_state: Any         # the loop's counters and best-validation bookkeeping (shared)
    ema: Optional[Any]       # the same on every rank (shared)
    loaders: dict[str, Any]  # the data cursors (per rank)
    device: torch.device     # whose RNG states are saved with the CPU's (per rank)


class Checkpointer:
    def __init__(self, root: Path, dist_env: DistEnv, *, zero_stage: int, config_hash: str,
                 tokenizer_hash: str, keep_last: int, label: str):
        self.root = Path(root)
        self.dist = dist_env
        self.zero_stage = zero_stage
        self.config_hash = config_hash
        self.tokenizer_hash = tokenizer_hash
        self.keep_last = keep_last
        self.label = label  # e.g. "finetune/physics/0.3", for messages
        self.parts: Optional[StatefulParts] = None

    def attach(self, parts: StatefulParts) -> None:
        """Hand over, once, what ``save`` writes and ``load`` restores."""
        self.parts = parts

    # -- finding what to resume from ---------------------------------------------------------
    def committed_steps(self) -> list[int]:
        """Steps with a commit marker, newest first."""
        return committed_steps(self.root)

    def _clean_uncommitted(self) -> None:
        """Rank 0: remove step folders a killed save left without a commit marker."""
        if not self.root.is_dir():
            return
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and parse_step(p.name) is not None and not (p / COMMIT).is_file():
                log.warning("%s: no %s (a save that did not finish); deleting it", p, COMMIT)
                shutil.rmtree(p, ignore_errors=True)

    def _check_hashes(self, commit: Commit, step_dir: Path) -> None:
        marker = step_dir / COMMIT
        if commit.config_hash != self.config_hash:
            raise CheckpointError(
                f"{marker}: this checkpoint of stage {self.label} was written with config hash "
                f"{commit.config_hash}, but the current configuration hashes to "
                f"{self.config_hash} (the hash covers the data, tokenizer, shards, noise, model and "
                f"train sections this stage depends on). Resume with the configuration the run "
                f"was started with, or start the stage afresh: delete {self.root.parent} (or use "
                f"a new --run-dir)")
        if commit.tokenizer_hash != self.tokenizer_hash:
            raise CheckpointError(
                f"{marker}: this checkpoint of stage {self.label} was trained on data with "
                f"tokenizer hash {commit.tokenizer_hash}, but the current manifest has "
                f"{self.tokenizer_hash}: the shards were rebuilt with another tokenizer. Restore "
                f"the original data, or delete {self.root.parent} to retrain the stage")

    def _verify_my_share(self, commit: Commit, step_dir: Path) -> list[str]:
        """Check size and sha256 of this rank's slice of the files; return the problems."""
        names = sorted(commit.files)
        problems = []
        for name in names[self.dist.rank::self.dist.world_size]:
            path = step_dir / name
            want = commit.files[name]
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif path.stat().st_size != want["bytes"]:
                problems.append(f"{name} has {path.stat().st_size} bytes, expected {want['bytes']}")
            elif sha256_file(path) != want["sha256"]:
                problems.append(f"{name} fails its sha256 check")
        return problems

    def find_resume_point(self) -> Optional[ResumePoint]:
        """The newest usable committed checkpoint, or None for a fresh start. Collective."""
        if self.dist.is_main:
            self._clean_uncommitted()
            steps = self.committed_steps()
        else:
            steps = None
        steps = dist.broadcast_object(steps)
        rejected = []
        for step in steps:
            step_dir = self.root / step_dir_name(step)
            commit = Commit.read(step_dir / COMMIT)
            self._check_hashes(commit, step_dir)
            problems = self._verify_my_share(commit, step_dir)
            all_problems = [p for rank_problems in dist.all_gather_object(problems)
                            for p in rank_problems]
            if all_problems:
                rejected.append(step)
                if self.dist.is_main:
                    log.warning("%s is damaged (%s); falling back to the previous committed "
                                "checkpoint", step_dir, "; ".join(all_problems))
                continue
            if rejected and self.dist.is_main:
                log.warning("resuming %s from %s instead of the damaged %s", self.label,
                            step_dir.name, ", ".join(step_dir_name(s) for s in rejected))
            return self._resume_point(commit, step_dir)
        if rejected:
            raise CheckpointError(
                f"{self.root}: every committed checkpoint ({', '.join(map(step_dir_name, rejected))}) "
                f"is damaged (see the warnings above). Delete {self.root} to retrain stage "
                f"{self.label} from scratch")
        return None

    def _resume_point(self, commit: Commit, step_dir: Path) -> ResumePoint:
        tag = step_dir.name
        if commit.world_size == self.dist.world_size or commit.zero_stage == 0:
            # ZeRO-0 checkpoints hold the full optimiser state and load at any world size.
            return ResumePoint(commit, step_dir, self.root, tag, universal=False)
        out = self.root / "universal" / tag
        error = None
        if self.dist.is_main and not (out / "DONE").is_file():
            log.warning("%s was saved by %d ranks with ZeRO-%d; this run has %d: converting it to "
                        "a universal checkpoint in %s", step_dir, commit.world_size,
                        commit.zero_stage, self.dist.world_size, out)
            try:
                convert_to_universal(step_dir, out)
            except CheckpointError as exc:
                error = str(exc)
        error = dist.broadcast_object(error)
        if error:
            raise CheckpointError(error)
        return ResumePoint(commit, step_dir, self.root / "universal", tag, universal=True)

    # -- saving --------------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        """Collective save of the attached parts at ``step``; returns once the commit marker
        exists."""
        parts = self.parts
        train = parts.train_state.state_dict()
        shared_state = {"train": train,
                        "ema": parts.ema.state_dict() if parts.ema is not None else None}
        rank_state = {"step": step, "rank": self.dist.rank, "world_size": self.dist.world_size,
                      "loaders": {n: l.state_dict() for n, l in parts.loaders.items()},
                      "rng": rng_state(parts.device)}
        summary = {k: train[k] for k in ("tokens_seen", "best_step", "best_val", "last_val")}
        return self._write(step, rank_state, shared_state, summary)

    def _write(self, step: int, rank_state: dict, shared_state: dict,
               summary: dict[str, Any]) -> Path:
        """DeepSpeed's files, this rank's state, the shared state (rank 0), then the commit
        marker once every rank's files are on disk."""
        tag = step_dir_name(step)
        step_dir = self.root / tag
        client_state = {"universal_checkpoint_info": {}, "iteration": step}
        self.parts.engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state,
                                          save_latest=False)
        with atomic_path(step_dir / rank_state_name(self.dist.rank)) as tmp:
            torch.save(rank_state, tmp)
        if self.dist.is_main:
            with atomic_path(step_dir / SHARED_STATE) as tmp:
                torch.save(shared_state, tmp)
        dist.barrier()
        names = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
                       if p.is_file() and p.name != COMMIT and not p.name.startswith("."))
        mine = {n: {"bytes": (step_dir / n).stat().st_size, "sha256": sha256_file(step_dir / n)}
                for n in names[self.dist.rank::self.dist.world_size]}
        files = {k: v for part in dist.all_gather_object(mine) for k, v in part.items()}
        if os.environ.get(FAULT_ENV) == str(step):
            log.warning("%s=%d: killing this rank before the commit marker is written", FAULT_ENV,
                        step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.dist.is_main:
            commit = Commit(step=step, world_size=self.dist.world_size, zero_stage=self.zero_stage,
                            config_hash=self.config_hash, tokenizer_hash=self.tokenizer_hash,
                            files=files,
                            rank_files=[rank_state_name(r) for r in range(self.dist.world_size)],
                            summary=summary)
            atomic_write_json(step_dir / COMMIT, asdict(commit))
            self._prune()
        dist.barrier()
        return step_dir

    def _prune(self) -> None:
        """Rank 0: keep the newest ``keep_last`` checkpoints and the best files they refer to."""
        steps = self.committed_steps()
        keep, drop = steps[:self.keep_last], steps[self.keep_last:]
        for step in drop:
            shutil.rmtree(self.root / step_dir_name(step), ignore_errors=True)
        newest = steps[0]
        wanted_best = set()
        for step in keep:
            best = Commit.read(self.root / step_dir_name(step) / COMMIT).summary.get("best_step")
            if best is not None:
                wanted_best.add(best)
        for path in self._best_files():
            step = parse_step(path.stem)
            if step is not None and step <= newest and step not in wanted_best:
                path.unlink(missing_ok=True)
        universal = self.root / "universal"
        if universal.is_dir():
            for p in universal.iterdir():
                s = parse_step(p.name)
                if s is not None and s < newest:
                    shutil.rmtree(p, ignore_errors=True)

    # -- loading -------------------------------------------------------------------------------
    def load(self, point: ResumePoint) -> Optional[dict[str, Any]]:
        """Restore ``point`` into the attached parts: the engine, the train state, the EMA and,
        at the same world size, the data cursors. Returns this rank's RNG states for the caller
        to set once the rest of its set-up (which may draw from the global RNGs) is done; None
        when the world size changed (the per-rank states describe other ranks)."""
        parts = self.parts
        self._load_engine(point)
        shared = _load(point.step_dir / SHARED_STATE)
        parts.train_state.load_state_dict(shared["train"])
        if parts.ema is not None:
            parts.ema.load_state_dict(shared["ema"])
        if self.dist.is_main:
            self.drop_best_after(point.step)
        if shared["train"]["step"] != point.step:
            raise RuntimeError(f"{point.step_dir}: its shared state is at step "
                               f"{shared['train']['step']}, its commit marker at {point.step}")
        if point.commit.world_size != self.dist.world_size:
            return None
        rank_state = _load(point.step_dir / rank_state_name(self.dist.rank))
        for name, loader in parts.loaders.items():
            loader.load_state_dict(rank_state["loaders"][name])
        return rank_state["rng"]

    def _load_engine(self, point: ResumePoint) -> None:
        """DeepSpeed's part of ``point``: weights, optimiser and scheduler states."""
        engine = self.parts.engine
        path, _ = engine.load_checkpoint(str(point.load_dir), tag=point.tag,
                                         load_module_strict=True, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"{point.load_dir / point.tag}: DeepSpeed found nothing to load "
                                  f"although {COMMIT} lists it; delete that folder to fall back")
        if engine.global_steps != point.step:
            raise CheckpointError(f"{point.step_dir}: DeepSpeed restored global step "
                                  f"{engine.global_steps}, the commit marker says {point.step}")

    # -- best-validation weights -----------------------------------------------------------------
    def _best_files(self) -> list[Path]:
        folder = self.root / "best"
        return sorted(folder.glob("step-*.pt")) if folder.is_dir() else []

    def best_path(self, step: int) -> Path:
        return self.root / "best" / f"{step_dir_name(step)}.pt"

    def save_best(self, step: int, payload: dict) -> None:
        """Rank 0: store the weights that reached a new best validation loss at ``step``."""
        with atomic_path(self.best_path(step)) as tmp:
            torch.save(payload, tmp)

    def load_best(self, step: int) -> dict:
        path = self.best_path(step)
        if not path.is_file():
            raise CheckpointError(f"{path}: the best-validation weights recorded at step {step} are "
                                  f"missing; delete {self.root} to retrain stage {self.label}")
        return _load(path)

    def drop_best_after(self, step: int) -> None:
        """Rank 0, on resume: best files newer than the resumed step belong to a run whose later
        checkpoints were lost; the resumed run will revisit those steps."""
        for path in self._best_files():
            s = parse_step(path.stem)
            if s is not None and s > step:
                path.unlink(missing_ok=True)


def convert_to_universal(step_dir: Path, out: Path) -> None:
    """Run DeepSpeed's ``ds_to_universal`` on one checkpoint (single process, CPU)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(step_dir), "--output_folder", str(tmp),
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise CheckpointError(f"{step_dir}: conversion to a universal checkpoint failed "
                              f"(exit {proc.returncode}):\n{tail}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    (out / "DONE").write_text("converted\n")
