"""Training: one DeepSpeed-ZeRO loop for every job kind.

    run_stage(cfg, run_dir, stage, target=None, fraction=None) -> StageResult
    python -m gtl_dist.train --config X.yaml --run-dir D --stage S [--target T --fraction F]
    load_exported(path, device="cpu") -> nn.Module

Modules: dist (rank/world from env or SLURM, DeepSpeed's process group and JIT op), engine
(deepspeed.initialize from TrainConfig), ema, checkpoint (committed step folders), preempt
(signals -> collective save), metrics (TensorBoard), export, loop (the shared loop), jobs (the
job kinds).
"""

from gtl_dist.train.export import load_exported
from gtl_dist.train.loop import StageResult


def run_stage(*args, **kwargs):  # noqa: D103 - documented in gtl_dist.train.jobs.run_stage
    from gtl_dist.train.jobs import run_stage as _run_stage
    return _run_stage(*args, **kwargs)


run_stage.__doc__ = "See gtl_dist.train.jobs.run_stage (imported lazily: it pulls in the models)."

__all__ = ["StageResult", "load_exported", "run_stage"]
