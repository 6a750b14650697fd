"""What gtl's adapter lacks, measured on a finished run (text or Markov) before a study adopts anything.

Each variant of gtl's adapter (rank, the per-token offset, the attention head, weight decay, the
learning-rate grid) is trained like the run's adapter stage, on the replicate's own n_T sequences
less its held-out part, and scored by what held-out selection scores: the lowest masked
cross-entropy on that held-out part (the method's own selection data; no test text is read).
Beside it, the run's full fine-tune on the same held-out part, the same number.

    python results/diagnostics/adapter_levers.py --run-dir runs/demo_study \\
        --scratch runs/text_levers --cell python:0.05:0 --cell numpy:0.05:0 \\
        --out results/diagnostics/text_adapter_levers.md

The run directory is read, never written; every variant trains into ``--scratch/<variant>``,
which shares the run's data and source (and is resumable: a finished variant is read back).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from gtl_dist.config import RunConfig, load_config
from gtl_dist.exports import read_export_meta
from gtl_dist.io import atomic_write_text
from gtl_dist.paths import RunPaths
from gtl_dist.train.jobs import run_stage

# name -> (models.adapter settings, train.adapter settings); every field spelled out, so that a
# variant means the same whatever the run's own adapter is. A variant named `finetune*` trains the
# run's full fine-tune instead, with its train.finetune settings replaced (its grid's other edge).
GRID = [3e-4, 1e-3, 3e-3, 1e-2]
VARIANTS = {
    "r8": ({"rank": 8, "offset": False}, {"weight_decay": 1.0}),
    "wd0": ({"rank": 8, "offset": False}, {"weight_decay": 0.0}),
    "lrhi": ({"rank": 8, "offset": False}, {"weight_decay": 1.0, "lr_grid": [3e-3, 1e-2, 3e-2, 1e-1]}),
    "r32": ({"rank": 32, "offset": False}, {"weight_decay": 1.0}),
    "attn": ({"rank": 8, "offset": False, "attention": True}, {"weight_decay": 1.0}),
    "attn2": ({"rank": 8, "offset": False, "attention": True, "heads": 2}, {"weight_decay": 1.0}),
    "attn4": ({"rank": 8, "offset": False, "attention": True, "heads": 4}, {"weight_decay": 1.0}),
    "attn4_lrhi": ({"rank": 8, "offset": False, "attention": True, "heads": 4},
                   {"weight_decay": 1.0, "lr_grid": [3e-3, 1e-2, 3e-2, 1e-1]}),
    "attn8": ({"rank": 8, "offset": False, "attention": True, "heads": 8}, {"weight_decay": 1.0}),
    "attn4_r16": ({"rank": 16, "offset": False, "attention": True, "heads": 4}, {"weight_decay": 1.0}),
    "off": ({"rank": 8, "offset": True}, {"weight_decay": 1.0}),
    "off_lrhi": ({"rank": 8, "offset": True}, {"weight_decay": 1.0, "lr_grid": [3e-3, 1e-2, 3e-2]}),
    "r32off": ({"rank": 32, "offset": True}, {"weight_decay": 1.0}),
    "offattn": ({"rank": 8, "offset": True, "attention": True}, {"weight_decay": 1.0}),
    "off_wd0": ({"rank": 8, "offset": True}, {"weight_decay": 0.0}),
    "r1off_wd0": ({"rank": 1, "offset": True}, {"weight_decay": 0.0}),
    "r1off_lrhi": ({"rank": 1, "offset": True}, {"weight_decay": 0.0, "lr_grid": [3e-3, 1e-2, 3e-2, 1e-1]}),
    "r1off_400": ({"rank": 1, "offset": True}, {"weight_decay": 0.0, "steps": 400, "lr_grid": [1e-3, 3e-3, 1e-2, 3e-2]}),
    "r8off_lrhi": ({"rank": 8, "offset": True}, {"weight_decay": 0.0, "lr_grid": [3e-3, 1e-2, 3e-2, 1e-1]}),
    "r8off_wd0": ({"rank": 8, "offset": True}, {"weight_decay": 0.0, "lr_grid": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]}),
    "r8off_wd1": ({"rank": 8, "offset": True}, {"weight_decay": 1.0, "lr_grid": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]}),
    "r8off_wd10": ({"rank": 8, "offset": True}, {"weight_decay": 10.0, "lr_grid": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]}),
    "finetune_lrlo": ({}, {"lr_grid": [3e-5, 1e-4, 3e-4]}),
}


def stage_of(name: str) -> str:
    return "finetune" if name.startswith("finetune") else "adapter"


def describe(name: str) -> str:
    models, train = VARIANTS[name]
    parts = ["full fine-tune"] if stage_of(name) == "finetune" else [
        f"rank {models['rank']}", "offset" if models["offset"] else "no offset"]
    if models.get("attention"):
        heads = models.get("heads", 1)
        parts.append("attention head" if heads == 1 else f"{heads} attention heads")
    if "weight_decay" in train:
        parts.append(f"weight decay {train['weight_decay']:g}")
    parts.append("learning rates " + " / ".join(f"{lr:g}" for lr in train.get("lr_grid", GRID)))
    if "steps" in train:
        parts.append(f"at most {train['steps']} steps")
    return f"`{name}`: " + ", ".join(parts)


def variant_cfg(cfg: RunConfig, name: str) -> RunConfig:
    models, train = VARIANTS[name]
    stage = stage_of(name)
    adapter = dataclasses.replace(cfg.models.adapter, **{"through": "output", "attention": False, "heads": 1, **models})
    trained = dataclasses.replace(getattr(cfg.train, stage), **{"lr_grid": GRID, **train})
    return dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, adapter=adapter),
                               train=dataclasses.replace(cfg.train, **{stage: trained}))


def scratch_dir(run_dir: Path, root: Path) -> Path:
    """A run directory that shares the run's data and source and trains an adapter of its own."""
    root.mkdir(parents=True, exist_ok=True)
    for shared in ("data", "denoiser"):
        if not (root / shared).exists():
            os.symlink(run_dir.resolve() / shared, root / shared)
    return root


def heldout(root: Path, stage: str, target: str, fraction: float, seed: int) -> tuple[float, int, float, int]:
    """(held-out loss, kept step, kept learning rate, trainable parameters) of a stage's export."""
    meta = read_export_meta(RunPaths(root).export(stage, target, fraction, seed))
    best = min(meta["lr_grid"], key=lambda r: r["val_loss"])
    return float(meta["val_loss"]), int(meta["step"]), float(best["lr"]), int(meta["trainable_parameters"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--cell", action="append", required=True, help="target:fraction:seed")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = load_config([args.run_dir / "config.yaml"])
    cells = [(t, float(f), int(s)) for t, f, s in (c.split(":") for c in args.cell)]
    # A cell may name a fraction the run did not train (its data holds every fraction's prefix).
    fractions = sorted({*cfg.data.target_fractions, *(f for _, f, _ in cells)}, reverse=True)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, target_fractions=fractions))
    names = args.variants.split(",")
    lines = ["# Adapter levers: held-out masked cross-entropy (selection data, not test data)", "",
             f"Written by `python results/diagnostics/adapter_levers.py --run-dir {args.run_dir} "
             f"--scratch {args.scratch} " + " ".join(f"--cell {c}" for c in args.cell)
             + f" --variants {args.variants} --out {args.out}`. Cells are the lowest held-out loss over the learning-rate grid "
             f"and steps (nats per masked token), with the kept step, learning rate and trainable "
             f"parameters; `finetune` is the run's full fine-tune on the same held-out sequences.", "",
             *(f"- {describe(name)}" for name in names), "",
             "| variant | " + " | ".join(args.cell) + " |", "|---" * (len(args.cell) + 1) + "|"]
    rows = {"finetune": [heldout(args.run_dir, "finetune", *c)
                         if RunPaths(args.run_dir).export("finetune", *c).exists() else None for c in cells]}
    for name in names:
        root, vcfg = scratch_dir(args.run_dir, args.scratch / name), variant_cfg(cfg, name)
        for cell in cells:
            if run_stage(vcfg, root, stage_of(name), *cell).status == "preempted":
                raise SystemExit(f"stopped during {name} {cell}; the same command resumes it")
        rows[name] = [heldout(root, stage_of(name), *c) for c in cells]
        print(name, rows[name], flush=True)
    for name, found in rows.items():
        lines.append(f"| {name} | " + " | ".join("— (not in the run)" if cell is None else
                                                "{:.4f} (step {}, lr {:g}, {:,} p.)".format(*cell)
                                                for cell in found) + " |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
