"""``python -m gtl_dist.train``: train one stage as one rank of a job (see --help)."""

from __future__ import annotations

import argparse
import sys
import textwrap

from gtl_dist.config import ConfigError, load_config
from gtl_dist.log import set_log_context, setup_logging
from gtl_dist.paths import task_name
from gtl_dist.stages import PER_FRACTION, PER_TARGET, STAGES
from gtl_dist.train.preempt import EXIT_PREEMPTED



def _scopes() -> str:
    """Which stages take --target, --fraction and --seed, from the stage table."""
    def named(scope: str) -> str:
        return ", ".join(name for name, spec in STAGES.items() if spec.scope == scope)
    switchable = "".join(f"; {name} too when {spec.scope_key}=per_target"
                         for name, spec in STAGES.items() if spec.scope_key)
    text = (f"stages: {', '.join(STAGES)}. Trained per target and fraction (--target/--fraction), "
            f"once per seed of pipeline.seeds (--seed; default 0): {named(PER_FRACTION)}{switchable}. "
            f"Trained once per target, on no fraction of its training data (--target, no "
            f"--fraction): {named(PER_TARGET)}. The others are trained once per run.")
    return textwrap.fill(text, 98, subsequent_indent="  ")


EPILOG = f"""\
{_scopes()}

ranks: one process per rank. The rank comes from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
  MASTER_PORT (torchrun, submitit) or from SLURM (srun: SLURM_PROCID, ...); without either it
  runs as a single process. Build DeepSpeed's JIT op once before the first job:
      python -m gtl_dist.train.dist prebuild

resuming: the stage continues from its newest committed checkpoint in
  <run-dir>/<stage>[/<target>/<fraction>]/ckpt; a stage that already finished with the same
  inputs returns at once. Its export lands in .../export/model.pt, TensorBoard logs in
  <run-dir>/tb/<stage>/...

exit codes: 0 finished; {EXIT_PREEMPTED} preempted (a checkpoint was saved: run again to resume);
  2 bad configuration or arguments; 1 any other error.

example (2 ranks on one machine):
  for r in 0 1; do RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \\
    python -m gtl_dist.train --config configs/tiny.yaml --run-dir runs/tiny --stage denoiser & done
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gtl_dist.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one stage of the GTL pipeline with DeepSpeed ZeRO (this process is one "
                    "rank), resuming from its last committed checkpoint, and export the model.",
        epilog=EPILOG)
    parser.add_argument("--config", action="append", required=True, metavar="YAML",
                        help="config file; repeat to overlay (later files win), e.g. "
                             "--config configs/arxiv.yaml --config configs/zero/stage3.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set train.denoiser.steps=100")
    parser.add_argument("--run-dir", required=True, help="the run directory (holds data/, the "
                        "stage folders and tb/)")
    parser.add_argument("--stage", required=True, choices=STAGES, metavar="STAGE",
                        help="the stage to train (see below)")
    parser.add_argument("--target", help="target domain, for per-target stages (also reference_lm, domain_classifier)")
    parser.add_argument("--fraction", type=float, help="target-data fraction, for per-target "
                        "stages (not reference_lm, domain_classifier)")
    parser.add_argument("--seed", type=int, default=0, help="replicate of a per-target stage, one of "
                        "pipeline.seeds (default 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    set_log_context(task=task_name(args.stage, target=args.target, fraction=args.fraction, seed=args.seed))
    from gtl_dist.data import ManifestError
    from gtl_dist.train.checkpoint import CheckpointError
    from gtl_dist.train.dist import DistError
    from gtl_dist.exports import ExportError
    from gtl_dist.train.jobs import run_stage
    KNOWN_ERRORS = (CheckpointError, DistError, ExportError, ManifestError, FileNotFoundError)
    try:
        cfg = load_config(args.config, args.set)
        result = run_stage(cfg, args.run_dir, args.stage, args.target, args.fraction, args.seed)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KNOWN_ERRORS as exc:  # their messages name the file and the fix; no traceback needed
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result.status == "preempted":
        return EXIT_PREEMPTED
    print(f"{result.stage}: finished at step {result.step}; export {result.export} "
          f"(val loss {result.val_loss})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
