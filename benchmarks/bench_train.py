"""Throughput of the DeepSpeed training loop against a plain PyTorch loop, measured in one run.

    python benchmarks/bench_train.py [--steps 40] [--seq-len 256] [--hidden 128] [--batch 32]
                                     [--threads 2] [--worlds 1 2] [--zero 0 2 3]

What it measures, on one small denoiser config (the Markov task at a longer sequence length):

- plain:    a hand-written PyTorch loop in this process — the same network (build_model), the same
            shard reader, MDLM loss, torch AdamW, the same clipping and LR schedule; no DeepSpeed,
            no checkpoints, no EMA;
- ZeRO s:   ``python -m gtl_dist.train`` (the real loop) with 1 and 2 processes; tokens/s from its
            own log (time spent in training steps only, the first log window dropped as warm-up),
            summed over ranks; peak RSS per rank;
- reader:   the shard reader alone at the training micro-batch.

Targets (issue #4): DeepSpeed at 1 process >= 0.9 x plain; reader >= 20 x what training consumes.
Timings on a shared machine are noisy: compare the ratios from one run, not numbers across runs.
Every loop runs in its own fresh process with the same number of CPU threads per rank; the plain
loop runs before and after the DeepSpeed runs and the faster of the two is the reference.
EMA is off in every variant (it is the same extra work with or without DeepSpeed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def overrides(args: argparse.Namespace, data_dir: Path) -> list[str]:
    heads = max(1, args.hidden // 32)
    tc = {"steps": args.steps, "global_batch": args.batch, "log_every": args.log_every,
          "val_every": args.steps, "save_every": args.steps, "val_batches": 1, "ema": 0.0,
          "num_workers": args.workers, "lr": 1e-3}
    return ([f"data.markov.length={args.seq_len}", "data.markov.num_source=4000",
             "data.markov.num_test=400",
             "data.markov.source_diagonal=0.6", "shards.samples_per_shard=200",
             f"shards.dir={data_dir}",
             f"models.denoiser.hidden={args.hidden}", f"models.denoiser.heads={heads}",
             "models.denoiser.blocks=2", f"models.denoiser.cond_dim={args.hidden // 2}"]
            + [f"train.denoiser.{k}={v}" for k, v in tc.items()])


def reader_tokens_per_s(manifest, micro: int, workers: int, batches: int) -> float:
    from gtl_dist.data import make_loader
    loader = make_loader(manifest, "source/train", micro, num_workers=workers, seed=0)
    it = iter(loader)
    next(it)  # start-up (worker processes) is not throughput
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["tokens"].numel()
    return n / (time.perf_counter() - t0)


def plain_tokens_per_s(cfg, manifest, args: argparse.Namespace) -> float:
    """The reference: what a minimal PyTorch loop does with the same pieces."""
    from gtl_dist.data import make_loader
    from gtl_dist.diffusion import NoiseSchedule, mdlm_loss, sample_t
    from gtl_dist.models import VocabSpec, build_model
    from gtl_dist.train.engine import CosineWithWarmup
    tc = cfg.train.denoiser
    torch.manual_seed(0)
    model = build_model("denoiser", cfg, VocabSpec.from_manifest(manifest))
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                            weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, CosineWithWarmup(tc.steps, tc.warmup_frac,
                                                                    tc.lr, tc.min_lr))
    schedule = NoiseSchedule.from_config(cfg.noise)
    it = iter(make_loader(manifest, "source/train", args.batch, num_workers=args.workers, seed=0))
    gen = torch.Generator().manual_seed(0)
    elapsed, tokens = 0.0, 0
    for step in range(args.steps):
        t0 = time.perf_counter()
        x0 = next(it)["tokens"]
        t = sample_t(x0.shape[0], gen, t_min=cfg.noise.t_min)
        loss, _ = mdlm_loss(model, x0, schedule, t, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        loss.item()
        if step >= args.log_every:  # the same warm-up window the DeepSpeed runs drop
            elapsed += time.perf_counter() - t0
            tokens += x0.numel()
    return tokens / elapsed


def plain_in_subprocess(args: argparse.Namespace, root: Path) -> float:
    """Run the plain loop in a fresh process with the same thread setting as a DeepSpeed rank."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--plain-in", str(root)],
                         env=env, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"plain loop failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_run(sets: list[str], run_dir: Path, world: int, zero: int,
                  threads: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "gtl_dist.train", "--config", str(REPO / "configs" / "tiny.yaml"),
           "--run-dir", str(run_dir), "--stage", "denoiser"]
    for s in sets + [f"train.denoiser.zero_stage={zero}"]:
        cmd += ["--set", s]
    port = free_port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": str(threads), "GTL_NO_PROGRESS_BAR": "1"})
        log = open(run_dir.parent / f"{run_dir.name}-rank{rank}.log", "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=1200) for p in procs]
    if any(codes):
        tail = (run_dir.parent / f"{run_dir.name}-rank0.log").read_text().splitlines()[-20:]
        raise RuntimeError(f"ZeRO-{zero} x {world}: exit codes {codes}\n" + "\n".join(tail))
    records = [json.loads(line) for line in (run_dir / "denoiser" / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"][1:]  # drop the warm-up window
    seconds = sum(1.0 / r["tokens_per_s"] for r in train)  # equal windows: harmonic mean
    return {"tokens_per_s": len(train) / seconds,
            "peak_rss_gb": max(r["sys/peak_rss_gb"] for r in train)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="global batch (sequences per step)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in total (split over ranks)")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--zero", type=int, nargs="+", default=[0, 2, 3])
    p.add_argument("--keep", help="keep the run directories here instead of a temporary folder")
    p.add_argument("--plain-in", help=argparse.SUPPRESS)  # internal: measure the plain loop only
    args = p.parse_args()

    from gtl_dist.config import load_config
    from gtl_dist.data import prepare_data
    from gtl_dist.train.dist import prebuild_ops

    if args.plain_in:
        root = Path(args.plain_in)
        cfg = load_config(REPO / "configs" / "tiny.yaml", overrides(args, root / "data"))
        torch.set_num_threads(args.threads)
        print(plain_tokens_per_s(cfg, prepare_data(cfg, root / "base"), args))
        return 0

    prebuild_ops()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_train_"))
    root.mkdir(parents=True, exist_ok=True)
    sets = overrides(args, root / "data")
    cfg = load_config(REPO / "configs" / "tiny.yaml", sets)
    manifest = prepare_data(cfg, root / "base")
    torch.set_num_threads(args.threads)

    rows = []
    # Measured before and after the DeepSpeed runs; the faster of the two is the reference (load
    # from other processes only ever slows a measurement down).
    plain_before = plain_in_subprocess(args, root)
    rows.append(("plain PyTorch", 1, plain_before, None))
    for world in args.worlds:
        for zero in args.zero:
            run_dir = root / f"zero{zero}-world{world}"
            shutil.rmtree(run_dir, ignore_errors=True)
            out = deepspeed_run(sets, run_dir, world, zero, max(1, args.threads // world))
            rows.append((f"DeepSpeed ZeRO-{zero}", world, out["tokens_per_s"], out["peak_rss_gb"]))
    reader = reader_tokens_per_s(manifest, args.batch, args.workers, batches=200)
    plain = max(plain_before, plain_in_subprocess(args, root))
    rows[0] = ("plain PyTorch", 1, plain, None)

    print(f"\nconfig: denoiser hidden {args.hidden}, 2 blocks, seq_len {args.seq_len}, global batch "
          f"{args.batch}, {args.steps} steps, {args.threads} CPU threads, {args.workers} workers/rank")
    print(f"{'loop':<18} {'procs':>5} {'tokens/s':>10} {'vs plain':>9} {'peak RSS/rank':>14}")
    for name, world, tps, rss in rows:
        rss_s = f"{rss:.2f} GiB" if rss is not None else "-"
        print(f"{name:<18} {world:>5} {tps:>10.0f} {tps / plain:>9.2f} {rss_s:>14}")
    one = [tps for name, world, tps, _ in rows if world == 1 and name.startswith("DeepSpeed")]
    print(f"\nDeepSpeed at 1 process / plain: {min(one) / plain:.2f} (worst stage) .. "
          f"{max(one) / plain:.2f} (best); target >= 0.90")
    fastest = max(tps for _, _, tps, _ in rows)
    print(f"shard reader: {reader:.0f} tokens/s = {reader / fastest:.1f} x the fastest training "
          f"loop; target >= 20")
    print(f"command: python benchmarks/bench_train.py {' '.join(sys.argv[1:])}".rstrip())
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
