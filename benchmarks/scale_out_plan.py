"""A scale-out simulation of the arXiv preset, on one machine, without data or a cluster.

    python benchmarks/scale_out_plan.py [--docs cs=650000,math=500000,physics=170000]
        [--chars-per-doc 1000] [--chars-per-token 4.0] [--manifest RUN_DIR/data/manifest.json]

1. Plan: ``launchers/submit.py --plan --cluster slurm`` for configs/arxiv.yaml at --nodes 8 and
   --nodes 64 (--gpus-per-node 8), the latter also with train.denoiser.global_batch=512; the job
   groups, task counts and ranks per task the launcher prints, and the preflight's verdict lines.
2. Reader: the shards per set the config implies, and for each read (as gtl_dist/train/jobs.py
   makes it) whether the loader itself (``ShardLoader``, gtl_dist/data/loader.py) splits it by
   shard or strides it by sample, at 1 rank (the per-target array tasks), 64 ranks and 512 ranks.
   Training reads get train.denoiser.num_workers workers at 64 and 512 ranks (only source/train
   is read there; the target rows ask what a target set would do); validation and evaluation
   passes read in the main process (num_workers=0), as jobs.py has them.

Shard counts are ESTIMATES unless --manifest names a built one: documents per domain (--docs,
rough guesses for a ~2.7M-record metadata snapshot; "physics" is the physics.* archive only),
characters per abstract and per token are assumptions; the split, the build units
(shards.unit_chars) and the cut into shards.samples_per_shard come from the package's own build
code (data/sets.py, data/build.py). A unit's chunks are estimated as its tokens // seq_len.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

from gtl_dist.config import check_split, load_config
from gtl_dist.data import build, loader, sets
from gtl_dist.data.manifest import Manifest, ManifestError, ShardInfo, ShardSet
from gtl_dist.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID
from gtl_dist.log import setup_logging

REPO = Path(__file__).resolve().parents[1]
# The snapshot is not needed to plan, only a file of its name: the preflight checks that data.path
# is a file (plan() makes an empty stand-in).
SNAPSHOT = Path(tempfile.gettempdir()) / "arxiv-scale-plan" / "arxiv-metadata-oai-snapshot.json"
BASE = ["--config", "configs/arxiv.yaml", "--set", f"data.path={SNAPSHOT}", "--cluster", "slurm",
        "--run-dir", "runs/arxiv-scale-plan", "--gpus-per-node", "8", "--plan"]
PLANS = [("8×8", ["--nodes", "8"]), ("64×8", ["--nodes", "64"]),
         ("64×8, global_batch=512", ["--nodes", "64", "--set", "train.denoiser.global_batch=512"])]
GROUP = re.compile(r"^\s+(\S+)\s+(\d+) task\(s\):.*?(?:\((\d+) ranks each\))?$")


def plan(extra: list[str]) -> tuple[str, dict[str, tuple[int, int]], list[str], int]:
    """The launcher's own --plan: (command, {group: (tasks, ranks)}, verdict lines, exit code)."""
    args = ["launchers/submit.py", *BASE, *extra]
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.touch()
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    groups = {m[1]: (int(m[2]), int(m[3] or 1)) for line in out.stdout.splitlines() if (m := GROUP.match(line))}
    verdict = [line for line in (out.stdout + out.stderr).splitlines()
               if line.startswith(("note:", "error:", "preflight:"))]
    return "python " + " ".join(args), groups, verdict, out.returncode


def estimated_manifest(cfg, docs: dict[str, int], chars_per_doc: int, chars_per_token: float) -> Manifest:
    """A manifest with the shard counts the build would write for ``docs`` documents per domain."""
    text_sets = sets.build_text_sets(cfg, {d: [None] * n for d, n in docs.items()})  # split + overlap
    tokens_per_doc = chars_per_doc / chars_per_token + 2  # bos ... eos (shards.pack_documents)
    per, out = cfg.shards.samples_per_shard, {}
    for name, members in text_sets.items():
        shards = []
        units = build._text_units(np.full(len(members), chars_per_doc), cfg.shards.unit_chars)
        for k, (a, b) in enumerate(units):
            chunks = int((b - a) * tokens_per_doc) // cfg.shards.seq_len  # last partial chunk dropped
            shards += [ShardInfo(f"{sets.file_stem(name)}-{len(shards):06d}.tar", min(per, chunks - lo), 0, "",
                                 unit=f"u{k}") for lo in range(0, chunks, per)]
        out[name] = ShardSet(shards, {})
    return Manifest(cfg.shards.seq_len, cfg.tokenizer.vocab_size, MASK_ID, PAD_ID, BOS_ID, EOS_ID, "", "",
                    "uint16", out, "arxiv", cfg.targets, root=Path("(estimate)"))


def split(manifest: Manifest, set_name: str, ranks: int, workers: int, finite: bool, **cut) -> str:
    """How ShardLoader itself reads the set (rank 0 of ``ranks``); shards are not opened."""
    with mock.patch.object(loader, "verify_shard", lambda *a: None):
        try:
            read = loader.ShardLoader(manifest, set_name, 1, world_size=ranks, num_workers=workers,
                                      infinite=not finite, **cut)
        except ManifestError:
            return f"**refused** (< {ranks} samples)"
    total, readers = sum(n for _, n in read.shards), ranks * max(1, workers)
    if finite:
        return f"strided (finite pass: {total:,} samples ≥ {ranks} ranks, C={readers})"
    if not read.by_sample:
        return f"by shard (C={readers})"
    hint = f"samples_per_shard ≤ {total // readers}" if total >= readers else f"only {total} samples"
    return f"strided: needs ≥ {readers} shards ({hint})"


def reads(cfg, manifest: Manifest):
    """(label, set, finite, loader cut, workers at 1 rank) per read, as jobs.py's ShardRecipe.loader makes it."""
    yield "source/train", "source/train", False, {}, cfg.train.classifier_ti.num_workers
    yield "source/test (validation)", "source/test", True, {}, 0
    yield "source/evaluator (domain_classifier)", "source/evaluator", False, {}, cfg.train.domain_classifier.num_workers
    for t in cfg.targets:
        for f in cfg.data.target_fractions:
            n = manifest.num_samples(f"{t}/train", f)
            held = check_split(n, cfg.protocol, f"{t} at {f}").held
            cut = dict(fraction=f, drop_last=held)  # the stage's training part of its fraction
            yield f"{t}/train @ {f} (less {held} held out)", f"{t}/train", False, cut, 0
        yield f"{t}/evaluator (reference_lm, domain_classifier)", f"{t}/evaluator", False, {}, 0
        yield f"{t}/test (their validation, eval)", f"{t}/test", True, {}, 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", default="cs=650000,math=500000,physics=170000",
                   help="documents per domain (archive of the first category); assumed, see above")
    p.add_argument("--chars-per-doc", type=int, default=1000, help="mean abstract length (assumed)")
    p.add_argument("--chars-per-token", type=float, default=4.0, help="of the 30,522-piece tokenizer (assumed)")
    p.add_argument("--manifest", default=None, help="a built manifest.json: real shard counts, no estimate")
    args = p.parse_args()
    logging.getLogger("gtl_dist").setLevel(logging.WARNING)

    runs = [(label, *plan(extra)) for label, extra in PLANS]
    print("### Plan and preflight (`launchers/submit.py --plan`)\n")
    print("| job group | tasks | " + " | ".join(f"ranks per task, {label}" for label, *_ in runs) + " |")
    print("|---|---:|" + "---:|" * len(runs))
    for group, (tasks, _) in runs[0][2].items():
        print(f"| {group} | {tasks} | " + " | ".join(str(r[2].get(group, ("-", "-"))[1]) for r in runs) + " |")
    for label, command, _, verdict, rc in runs:
        print(f"\n{label}: `{command}` (exit {rc})\n\n```\n" + "\n".join(verdict) + "\n```")

    cfg = load_config([REPO / "configs/arxiv.yaml"], [f"data.path={SNAPSHOT}"])
    docs = {k: int(v) for k, v in (kv.split("=") for kv in args.docs.split(","))}
    manifest = (Manifest.load(args.manifest) if args.manifest else
                estimated_manifest(cfg, docs, args.chars_per_doc, args.chars_per_token))
    scale_workers = cfg.train.denoiser.num_workers
    print(f"\n### Reader splits ({'manifest ' + args.manifest if args.manifest else 'estimated shards'})\n")
    if not args.manifest:
        print(f"Assumed: documents {docs}, {args.chars_per_doc} characters per abstract, "
              f"{args.chars_per_token} characters per token; from configs/arxiv.yaml: test_fraction "
              f"{cfg.data.test_fraction}, overlap {cfg.data.overlap}, seq_len {cfg.shards.seq_len}, "
              f"samples_per_shard {cfg.shards.samples_per_shard}, unit_chars {cfg.shards.unit_chars}.\n")
    print(f"| read | samples | shards | 1 rank (array task) | 8×8: 64 ranks × {scale_workers} workers "
          f"| 64×8: 512 ranks × {scale_workers} workers |\n|---|---:|---:|---|---|---|")
    for label, set_name, finite, cut, workers in reads(cfg, manifest):
        files = manifest.shard_files(set_name, **cut)
        scale = 0 if finite else scale_workers  # finite passes read in the main process (jobs.py)
        cells = [split(manifest, set_name, ranks, w, finite, **cut)
                 for ranks, w in [(1, workers), (64, scale), (512, scale)]]
        print(f"| {label} | {sum(n for _, n in files):,} | {len(files)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    setup_logging()
    main()
