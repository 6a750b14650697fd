"""Data-layer throughput on the built-in demo corpus: shard writing and shard reading, in tokens/s.

    python benchmarks/bench_data.py [--run-dir DIR] [--batches 300] [--batch-size 64]

Steps timed in one run: the corpus (docstring extraction, split), the tokenizer training, the
shard build (tokenize + pack + write + sha256) with 1 and 2 build workers, and the reader over
source/train with num_workers 0, 1 and 2 ("per worker" divides by max(1, num_workers)). Numbers
depend on the machine and on what else runs on it; compare ratios taken in one run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from gtl_dist.config import load_config
from gtl_dist.data import make_loader
from gtl_dist.data.build import MANIFEST_NAME, PARTS_DIR, data_dir, finalize, prepare
from gtl_dist.data.manifest import Manifest
from gtl_dist.data.prepare import run_slices
from gtl_dist.log import setup_logging

REPO = Path(__file__).resolve().parents[1]


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def remove_shards(root: Path) -> None:
    """Undo the shard build only (corpus, tokenizer and plan stay)."""
    manifest = Manifest.load(root)
    for entry in manifest.sets.values():
        for shard in entry.shards:
            (root / shard.name).unlink()
    (root / MANIFEST_NAME).unlink()
    shutil.rmtree(root / PARTS_DIR, ignore_errors=True)


def read_rate(manifest: Manifest, workers: int, batches: int, batch_size: int) -> tuple[float, float]:
    """tokens/s over ``batches`` batches after the first (worker start-up is reported apart)."""
    loader = make_loader(manifest, "source/train", batch_size, num_workers=workers, seed=0)
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - t0
    return batches * batch_size * manifest.seq_len / elapsed, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="where to build (default: a temporary folder, removed after)")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="bench_data_"))
    cfg = load_config(REPO / "configs" / "demo.yaml")
    root = data_dir(cfg, run_dir)
    if root.exists():
        shutil.rmtree(root)
    rows = []
    try:
        plan, t_prepare = timed(prepare, cfg, root)
        docs = sum(s["documents"] for s in plan["sets"].values())
        rows.append(("corpus + split + tokenizer (prepare)", f"{docs} docs", f"{t_prepare:.1f} s", ""))
        for workers in (1, 2):
            if workers > 1:
                remove_shards(root)
            _, t_build = timed(run_slices, root, workers)
            manifest, t_final = timed(finalize, root)
            tokens = sum(e.num_samples for e in manifest.sets.values()) * manifest.seq_len
            rate = tokens / (t_build + t_final)
            rows.append((f"shard build, {workers} build worker(s)", f"{tokens} tokens",
                         f"{t_build + t_final:.2f} s", f"{rate:,.0f} tok/s"))
        for workers in (0, 1, 2):
            rate, startup = read_rate(manifest, workers, args.batches, args.batch_size)
            rows.append((f"reader, num_workers={workers}", f"{args.batches} x {args.batch_size} x {manifest.seq_len}",
                         f"start {startup:.2f} s", f"{rate:,.0f} tok/s ({rate / max(1, workers):,.0f} per worker)"))
    finally:
        if not args.run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
    print("command: " + " ".join([Path(sys.executable).name] + sys.argv))
    print(f"corpus: demo (configs/demo.yaml), seq_len {cfg.shards.seq_len}, vocab {cfg.tokenizer.vocab_size}")
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))


if __name__ == "__main__":
    setup_logging()
    main()
