"""Training: one DeepSpeed-ZeRO loop for every stage.

    run_stage(cfg, run_dir, stage, target=None, fraction=None) -> StageResult
    python -m gtl_dist.train --config X.yaml --run-dir D --stage S [--target T --fraction F]
    gtl_dist.exports.load_exported(path, device="cpu") -> nn.Module

Modules: dist (rank/world from env or SLURM, DeepSpeed's process group and JIT op), engine
(deepspeed.initialize from TrainConfig), ema, checkpoint (committed step folders), preempt
(signals -> collective save), metrics (TensorBoard), recipe (what a stage brings to the loop;
the random streams), state (the training state and its set-up), loop (the shared loop), jobs
(the stages' recipes), counts (the closed-form counts stages). Exports are gtl_dist/exports.py's.
"""

from typing import Any

from gtl_dist.train.recipe import StageResult

__all__ = ["StageResult", "run_stage"]


def __getattr__(name: str) -> Any:
    # jobs imports the models, the data layer and this package's modules: load it on first use
    # so that `import gtl_dist.train.dist` stays light and free of import cycles.
    if name == "run_stage":
        from gtl_dist.train.jobs import run_stage
        return run_stage
    raise AttributeError(f"module 'gtl_dist.train' has no attribute '{name}'")
