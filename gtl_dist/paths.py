"""The run-directory layout. Every stage, the launcher and the report find things through here.

    runs/<run>/
      config.yaml, config.json        the resolved configuration and its hash
      launcher.flock, launcher.lock   the live launcher's lock and its record (cluster/run_lock.py)
      data/                           tokenizer, shards + manifest.json (shards.dir may move them:
                                      find them with gtl_dist.data.build.data_dir)
      <stage>/                        shared stages (denoiser, planner, ar_pretrain, ar2diff)
      <stage>/<target>/<fraction>/    per-(target, fraction) stages (seed s > 0 of pipeline.seeds:
                                      <stage>/<target>/<fraction>/seed-s/)
          ckpt/step-00000100/         DeepSpeed shards + COMMIT.json
          export/model.pt             consolidated fp32 weights, loadable without DeepSpeed
          DONE.json                   completion marker with the hashes of the stage's inputs
          lr-<value>[-wd-<value>][-m-<i>]/  one run of train.<stage>.lr_grid (x weight_decay_grid
                                      x model_grid), its own ckpt/, export/; export/ above is the
                                      run with the best held-out loss
      samples/<method>/<target>/<fraction>[/seed-s]/shard-0000.jsonl
      tb/<stage>[/<target>/<fraction>]  TensorBoard event files, one directory per job
      eval/                           report.md, results.csv, plots
      jobs/                           submitit folders and logs
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


def fraction_name(fraction: float) -> str:
    """1.0 -> "1", 0.3 -> "0.3", 0.05 -> "0.05": stable directory names for fractions."""
    return f"{fraction:g}"


def task_name(kind: str, method: Optional[str] = None, target: Optional[str] = None,
              fraction: Optional[float] = None, seed: int = 0, shard: Optional[int] = None) -> str:
    """A pipeline task's one name, in logs, the launcher and status: e.g. ``ratio/physics/0.05``,
    ``sample/gtl/physics/1/seed2/shard0``."""
    parts = [kind, method, target, None if fraction is None else fraction_name(fraction),
             f"seed{seed}" if seed else None, None if shard is None else f"shard{shard}"]
    return "/".join(p for p in parts if p is not None)


def seed_folder(path: Path, seed: Optional[int]) -> Path:
    """Replicate ``seed`` of a per-target stage or sample set: seed 0 (and None) keep the plain
    path, so a run that adds seeds to pipeline.seeds keeps everything it already has."""
    return path if not seed else path / f"seed-{seed}"


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    @property
    def config_json(self) -> Path:
        return self.root / "config.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def train_logs(self, stage: str, target: Optional[str] = None, fraction: Optional[float] = None,
                   seed: Optional[int] = None, variants: Sequence[str] = ()) -> list[Path]:
        """Every train_log.jsonl a task wrote: its own, or one per run (stages.run_variants)."""
        return [self.stage(stage, target, fraction, seed, v) / "train_log.jsonl" for v in variants or [None]]

    def stage(self, stage: str, target: Optional[str] = None, fraction: Optional[float] = None,
              seed: Optional[int] = None, variant: Optional[str] = None) -> Path:
        """A stage task's folder; ``variant`` is one run of its grid (grid_variant)."""
        folder = seed_folder(_cell(self.root / stage, target, fraction), seed)
        return folder / variant if variant else folder

    def checkpoints(self, stage: str, target: Optional[str] = None, fraction: Optional[float] = None,
                    seed: Optional[int] = None, variant: Optional[str] = None) -> Path:
        return self.stage(stage, target, fraction, seed, variant) / "ckpt"

    def export(self, stage: str, target: Optional[str] = None, fraction: Optional[float] = None,
               seed: Optional[int] = None, variant: Optional[str] = None) -> Path:
        return self.stage(stage, target, fraction, seed, variant) / "export" / "model.pt"

    def marker(self, stage: str, target: Optional[str] = None, fraction: Optional[float] = None,
               seed: Optional[int] = None) -> Path:
        return self.stage(stage, target, fraction, seed) / "DONE.json"

    def tb(self, stage: str, target: Optional[str] = None, fraction: Optional[float] = None,
           seed: Optional[int] = None, variant: Optional[str] = None) -> Path:
        folder = seed_folder(_cell(self.root / "tb" / stage, target, fraction), seed)
        return folder / variant if variant else folder

    def samples(self, method: str, target: Optional[str], fraction: Optional[float],
                seed: Optional[int] = None) -> Path:
        """Sample shards of one method; the source model's samples are shared by all targets."""
        return seed_folder(_cell(self.root / "samples" / method, target, fraction), seed)

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"


def _cell(path: Path, target: Optional[str], fraction: Optional[float]) -> Path:
    if target is not None:
        path = path / target
    return path / fraction_name(fraction) if fraction is not None else path


def grid_variant(lr: float, weight_decay: Optional[float] = None, model: Optional[int] = None) -> str:
    """The folder of one run of a stage's grid (TrainConfig.grid), under the task's folder: lr-<value>,
    with -wd-<value> where the grid also searches the weight decay and -m-<index> where it searches
    model settings."""
    return (f"lr-{lr:g}" + ("" if weight_decay is None else f"-wd-{weight_decay:g}")
            + ("" if model is None else f"-m-{model}"))
