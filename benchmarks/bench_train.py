"""Throughput and MFU of the DeepSpeed training loop against a plain PyTorch loop, eager and
compiled, measured in one run.

    python benchmarks/bench_train.py [--steps 40] [--seq-len 256] [--hidden 128] [--batch 32]
                                     [--threads 2] [--worlds 1 2] [--zero 0 2 3] [--rounds 2]
                                     [--device cpu|cuda] [--compile] [--peak-tflops T]
                                     [--paper-size] [--profile]

What it measures, on one small denoiser config (the Markov task at a longer sequence length; 2
blocks of --hidden), or with --paper-size on the arXiv preset's 59.8M denoiser (configs/arxiv.yaml's
models.denoiser, 30522-token vocabulary and L = 512; micro-batch 64 unless --batch says otherwise)
over a synthetic text corpus (random words of a lexicon twice the vocabulary's size, so that its
tokenizer fills it):

- plain:    a hand-written PyTorch loop — the same network (build_model), the same shard reader,
            MDLM loss, torch AdamW, the same clipping and LR schedule; no DeepSpeed, no
            checkpoints, no EMA;
- ZeRO s:   ``python -m gtl_dist.train`` (the real loop) with 1 and 2 processes; tokens/s from its
            own log (time spent in training steps only, the first log window dropped as warm-up),
            summed over ranks; peak RSS per rank (peak GPU memory on cuda);
- compiled: with --compile, each of the above again with the
            network's forward and the MDLM loss compiled into one graph
            (``train.denoiser.compile``; the plain loop calls the same ``engine.compile_step``).
            The compile happens in the first log window, which is dropped. ZeRO-3 has none (the
            config refuses it);
- reader:   the shard reader alone at the training micro-batch;
- profile:  with --profile, torch.profiler's table of three steps of the plain loop (eager and,
            with --compile, compiled), operators by self device time: where a step's time goes,
            to explain an MFU below target.

--device cpu (the default) hides any GPU from the runs. --device cuda runs every variant on GPUs,
one rank per GPU (so --worlds at most the GPU count), as a training job does there: bf16
(DeepSpeed's bf16 weights; the plain loop's fp32 weights under the network's bf16 autocast), TF32
for fp32 matrix products and torch's fused AdamW in both loops.

MFU = tokens/s x (6N + 12·B·H·L) / peak (``gtl_dist.train.metrics.flops_per_token``: N parameters,
B blocks, H hidden, L sequence length), summed over ranks against one GPU's peak times the ranks;
peak = --peak-tflops, by default 989 TFLOP/s on cuda (H100 SXM, bf16 dense); on cpu the column is
printed only when --peak-tflops is given.

Targets: issue #4, DeepSpeed at 1 process >= 0.9 x plain and the reader >= 20 x what training
consumes; issue #13, >= 35 % MFU on one H100 for the 59.8M denoiser at L = 512 (micro-batch 64;
benchmarks/gpu_suite.sh runs this at ZeRO-2 with --profile):

    python benchmarks/bench_train.py --device cuda --compile --paper-size --worlds 1 --zero 2 \
        --steps 40 --rounds 1

Timings on a shared machine are noisy, and load only ever slows a run down: every variant runs
``--rounds`` times, interleaved (plain, then each DeepSpeed variant, then again), each in its own
fresh process with the same CPU threads per rank, and the best round counts. The table shows the
spread over rounds; compare ratios from one run, not numbers across runs. Where other jobs hold
cores, use ``--threads 1``: with two OpenMP threads every small operation waits until both are
scheduled, and runs slowed down erratically by up to 10x. EMA is off everywhere (it is the same
extra work with or without DeepSpeed).

Where the time goes (py-spy on the 1-process runs at the default size, 200 Hz):
- ZeRO-0 and ZeRO-2 spend ~98% of a step in the network's forward and backward and the
  optimiser, like the plain loop. What our loop adds per step — fetching the batch in the main
  process, its CRC for the resume check, re-seeding the step's generators, forking the RNG around
  data loading, one all-reduce of (preemption flags, loss, statistics) — is 1-2% of a step.
  These two meet the 0.9 target at 1 process (within the noise of a shared machine).
- ZeRO-3 additionally runs DeepSpeed's per-submodule parameter hooks: before and after the
  forward and the backward of every submodule that owns parameters, its coordinator fetches the
  submodule's partitioned parameters (an all-gather, a copy at world size 1) and releases them,
  and each gradient is reduced into its partition as it is produced. On this model (36
  submodules with parameters) that is ~145 hook calls and ~73 fetches per step: host-side
  Python and many small tensor operations, a fixed cost per submodule per step, independent of
  the batch. The line "ZeRO-3 overhead" below gives it in ms per step. Seen on a shared 2-core
  machine: with 1 thread per process ZeRO-3 ran at 0.91 of plain (+18 ms on a 500 ms step;
  ZeRO-0 0.95, ZeRO-2 0.96); with 2 threads at about 0.8 (+55 ms on a 290 ms step), because the
  network's matrix products get faster with a second thread while the hooks' small operations
  do not (py-spy put the hooks alone at ~10% of a 2-thread step). So whether ZeRO-3 meets 0.9
  at 1 process depends on how much compute each step has: a larger network or micro-batch
  dilutes the fixed cost. ZeRO-3 buys memory (parameters, gradients and optimiser state
  partitioned over ranks) that a single process does not need: single-process runs should use
  ZeRO 0-2. DeepSpeed's knobs for the hooks did not help here: stage3_prefetch_bucket_size=0,
  overlap_comm=false and contiguous_gradients=false stayed within the noise, and
  stage3_module_granularity_threshold (which fuses small submodules into one fetch) makes
  DeepSpeed's backward fail on this model (a fused submodule's parameters are released before
  their gradients are computed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
ARXIV = REPO / "configs" / "arxiv.yaml"
H100_BF16_TFLOPS = 989.0  # dense bf16, SXM
PAPER_BATCH = 64  # the micro-batch of the H100 measurement in benchmarks/arxiv_gpu_hours.py


@dataclass(frozen=True)
class Variant:
    zero: Optional[int]  # None: the plain PyTorch loop
    world: int
    compiled: bool

    @property
    def name(self) -> str:
        loop = "plain PyTorch" if self.zero is None else f"DeepSpeed ZeRO-{self.zero}"
        return loop + (" compiled" if self.compiled else "")


def variants(args: argparse.Namespace) -> list[Variant]:
    """Plain, then every (world, ZeRO stage); each eager and, with --compile, compiled."""
    modes = [False, True] if args.compile else [False]
    out = [Variant(None, 1, c) for c in modes]
    for world in args.worlds:
        out += [Variant(zero, world, c) for zero in args.zero for c in modes if not (c and zero == 3)]
    return out


def arxiv_config():
    """The arXiv preset's config (its data path is never read here)."""
    from gtl_dist.config import load_config
    return load_config(ARXIV, ["data.path=unused"])


def overrides(args: argparse.Namespace, root: Path) -> list[str]:
    tc = {"steps": args.steps, "global_batch": args.batch, "log_every": args.log_every,
          "val_every": args.steps, "save_every": args.steps, "val_batches": 1, "ema": 0.0,
          "num_workers": args.workers, "lr": 1e-3}
    data = paper_task(args, root) if args.paper_size else markov_task(args)
    return ([f"shards.dir={root / 'data'}", "shards.samples_per_shard=200"] + data
            + [f"train.denoiser.{k}={v}" for k, v in tc.items()])


def markov_task(args: argparse.Namespace) -> list[str]:
    """The Markov task at --seq-len, and a small denoiser of --hidden."""
    heads = max(1, args.hidden // 32)
    return [f"data.markov.length={args.seq_len}", "data.markov.num_source=4000",
            "data.markov.num_test=400", "data.markov.source_diagonal=0.6",
            f"models.denoiser.hidden={args.hidden}", f"models.denoiser.heads={heads}",
            "models.denoiser.blocks=2", f"models.denoiser.cond_dim={args.hidden // 2}"]


def paper_task(args: argparse.Namespace, root: Path) -> list[str]:
    """The synthetic corpus (written by write_corpus) at --seq-len, and the arXiv preset's denoiser."""
    arxiv = arxiv_config()
    denoiser = yaml.safe_dump(dataclasses.asdict(arxiv.models.denoiser), default_flow_style=True)
    return ["data.corpus=jsonl", f"data.path={root / 'corpus.jsonl'}",
            "data.source_domains=[source]", "data.target_domains=[target]",
            "data.target_fractions=[1.0]", f"shards.seq_len={args.seq_len}",
            f"tokenizer.vocab_size={arxiv.tokenizer.vocab_size}",
            f"models.denoiser={denoiser.strip()}"]


def write_corpus(path: Path, vocab_size: int, docs: int = 1000, words: int = 1000) -> None:
    """Random words of a lexicon of 2 x ``vocab_size`` letter strings, one document a line (every
    tenth of domain "target"): text whose tokenizer fills ``vocab_size`` ids."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lexicon = sorted({"".join(rng.choice(letters, rng.integers(4, 9))) for _ in range(2 * vocab_size)})
    with path.open("w") as fh:
        for doc in range(docs):
            text = " ".join(lexicon[i] for i in rng.integers(0, len(lexicon), words))
            fh.write(json.dumps({"text": text, "domain": "target" if doc % 10 == 0 else "source"}) + "\n")


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
    """The reference: what a minimal PyTorch loop does with the same pieces (and, on a GPU, the
    same TF32 and fused AdamW as the package's engine)."""
    from gtl_dist.data import make_loader
    from gtl_dist.diffusion import NoiseSchedule, mdlm_loss, mdlm_terms, sample_t
    from gtl_dist.models import VocabSpec, build_model
    from gtl_dist.train.engine import (CosineWithWarmup, compile_step, detect_hardware, fused_adamw,
                                       use_tensor_cores)
    tc, hw = cfg.train.denoiser, detect_hardware()
    use_tensor_cores(hw)
    torch.manual_seed(0)
    model = build_model("denoiser", cfg, VocabSpec.from_manifest(manifest)).to(hw.device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                            weight_decay=tc.weight_decay, fused=fused_adamw(tc, hw))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, CosineWithWarmup(tc.steps, tc.warmup_frac,
                                                                    tc.lr, tc.min_lr))
    schedule = NoiseSchedule.from_config(cfg.noise)
    terms = compile_step(mdlm_terms) if args.plain_compiled else None
    it = iter(make_loader(manifest, "source/train", args.batch, num_workers=args.workers, seed=0))
    gen = torch.Generator(hw.device).manual_seed(0)

    def train_step() -> int:
        x0 = next(it)["tokens"].to(hw.device)
        t = sample_t(x0.shape[0], gen, t_min=cfg.noise.t_min)
        loss, _ = mdlm_loss(model, x0, schedule, t, gen, terms=terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        loss.item()  # waits for the step's kernels
        return x0.numel()

    elapsed, tokens = 0.0, 0
    for step in range(args.steps):
        t0 = time.perf_counter()
        n = train_step()
        if step >= args.log_every:  # the same warm-up window the DeepSpeed runs drop
            elapsed += time.perf_counter() - t0
            tokens += n
    if args.profile:
        print(profile_steps(train_step, hw.device))
    return tokens / elapsed


def profile_steps(train_step, device: torch.device, steps: int = 3) -> str:
    """torch.profiler's table of ``steps`` training steps, operators by self device time: where a
    step's time goes (matrix products, attention, the loss head, the optimiser)."""
    from gtl_dist.train.metrics import profile_operators

    def run() -> None:
        for _ in range(steps):
            train_step()
    return f"profile of {steps} steps:\n" + profile_operators(run, device, rows=25)[0]


def run_env(args: argparse.Namespace, threads: int) -> dict[str, str]:
    """A run's environment: its CPU threads, and no GPU unless --device cuda."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"OMP_NUM_THREADS": str(threads), "GTL_NO_PROGRESS_BAR": "1"})
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def plain_in_subprocess(args: argparse.Namespace, root: Path, compiled: bool, profile: bool
                        ) -> tuple[float, str]:
    """Run the plain loop in a fresh process with the same thread setting as a DeepSpeed rank:
    its tokens/s and, with ``profile``, its profile table."""
    cmd = [sys.executable, __file__, *[a for a in sys.argv[1:] if a != "--profile"], "--plain-in", str(root)]
    out = subprocess.run(cmd + ["--plain-compiled"] * compiled + ["--profile"] * profile,
                         env=run_env(args, args.threads), capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"plain loop failed:\n{out.stderr[-3000:]}")
    *table, tokens_per_s = out.stdout.strip().splitlines()
    return float(tokens_per_s), "\n".join(table)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_run(args: argparse.Namespace, sets: list[str], run_dir: Path, v: Variant) -> dict[str, float]:
    cmd = [sys.executable, "-m", "gtl_dist.train", "--config", str(REPO / "configs" / "tiny.yaml"),
           "--run-dir", str(run_dir), "--stage", "denoiser"]
    for s in sets + [f"train.denoiser.zero_stage={v.zero}", f"train.denoiser.compile={v.compiled}"]:
        cmd += ["--set", s]
    port = free_port()
    procs = []
    for rank in range(v.world):
        env = run_env(args, max(1, args.threads // v.world))
        env.update({"RANK": str(rank), "WORLD_SIZE": str(v.world), "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        log = open(run_dir.parent / f"{run_dir.name}-rank{rank}.log", "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=1200) for p in procs]
    if any(codes):
        tail = (run_dir.parent / f"{run_dir.name}-rank0.log").read_text().splitlines()[-20:]
        raise RuntimeError(f"{v.name} x {v.world}: exit codes {codes}\n" + "\n".join(tail))
    records = [json.loads(line) for line in (run_dir / "denoiser" / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"][1:]  # drop the warm-up window
    seconds = sum(1.0 / r["tokens_per_s"] for r in train)  # equal windows: harmonic mean
    memory = "sys/cuda_max_allocated_gb" if args.device == "cuda" else "sys/peak_rss_gb"
    return {"tokens_per_s": len(train) / seconds, "peak_gb": max(r[memory] for r in train)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seq-len", type=int, help="default 256; 512 with --paper-size")
    p.add_argument("--hidden", type=int, default=128, help="the small denoiser's width")
    p.add_argument("--batch", type=int, help=f"global batch (sequences per step); default 32, "
                                             f"{PAPER_BATCH} with --paper-size")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in total (split over ranks)")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--zero", type=int, nargs="+", default=[0, 2, 3])
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best counts")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--compile", action="store_true",
                   help="also run every loop compiled")
    p.add_argument("--peak-tflops", type=float,
                   help=f"one device's peak for MFU (default on cuda: {H100_BF16_TFLOPS:g}, H100 bf16)")
    p.add_argument("--paper-size", action="store_true",
                   help="the arXiv preset's 59.8M denoiser at its L = 512, on a synthetic text corpus")
    p.add_argument("--profile", action="store_true",
                   help="also print where the plain loop's step time goes (torch.profiler, first round)")
    p.add_argument("--keep", help="keep the run directories here instead of a temporary folder")
    p.add_argument("--plain-in", help=argparse.SUPPRESS)  # internal: measure the plain loop only
    p.add_argument("--plain-compiled", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    paper = arxiv_config() if args.paper_size else None
    args.seq_len = args.seq_len or (paper.shards.seq_len if paper else 256)
    args.batch = args.batch or (PAPER_BATCH if paper else 32)
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if not gpus or max(args.worlds) > gpus:
            p.error(f"--device cuda runs one rank per GPU: {gpus} GPU(s) here, --worlds {args.worlds}")
        args.peak_tflops = args.peak_tflops or H100_BF16_TFLOPS
    return args


def main() -> int:
    args = parse_args()
    from gtl_dist.config import load_config
    from gtl_dist.data import prepare_data
    from gtl_dist.models import VocabSpec, build_model
    from gtl_dist.train.dist import prebuild_ops
    from gtl_dist.train.metrics import flops_per_token

    if args.plain_in:
        root = Path(args.plain_in)
        cfg = load_config(REPO / "configs" / "tiny.yaml", overrides(args, root))
        torch.set_num_threads(args.threads)
        print(plain_tokens_per_s(cfg, prepare_data(cfg, root / "base"), args))
        return 0

    prebuild_ops()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_train_"))
    root.mkdir(parents=True, exist_ok=True)
    if args.paper_size:
        write_corpus(root / "corpus.jsonl", arxiv_config().tokenizer.vocab_size)
    sets = overrides(args, root)
    cfg = load_config(REPO / "configs" / "tiny.yaml", sets)
    manifest = prepare_data(cfg, root / "base")
    torch.set_num_threads(args.threads)
    model = build_model("denoiser", cfg, VocabSpec.from_manifest(manifest))
    flops = flops_per_token(model, cfg.seq_len)

    tps: dict[Variant, list[float]] = {v: [] for v in variants(args)}
    peak_gb: dict[Variant, float] = {}
    profiles: dict[Variant, str] = {}
    for r in range(args.rounds):
        for v in tps:
            if v.zero is None:
                rate, profiles[v] = plain_in_subprocess(args, root, v.compiled, args.profile and r == 0)
                tps[v].append(rate)
            else:
                run_dir = root / f"zero{v.zero}-world{v.world}{'-compiled' * v.compiled}"
                shutil.rmtree(run_dir, ignore_errors=True)
                out = deepspeed_run(args, sets, run_dir, v)
                tps[v].append(out["tokens_per_s"])
                peak_gb[v] = max(peak_gb.get(v, 0.0), out["peak_gb"])
            print(f"round {r + 1}/{args.rounds}: {v.name} x {v.world}: {tps[v][-1]:.0f} tokens/s",
                  flush=True)
    best = {v: max(values) for v, values in tps.items()}
    report(args, cfg, model, flops, tps, best, peak_gb)
    for v, table in profiles.items():
        if table:
            print(f"\n{v.name}, {table}")
    reader = reader_tokens_per_s(manifest, args.batch, args.workers, batches=200)
    print(f"shard reader: {reader:.0f} tokens/s = {reader / max(best.values()):.1f} x the fastest "
          f"training loop; target >= 20")
    print(f"command: python benchmarks/bench_train.py {' '.join(sys.argv[1:])}".rstrip())
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def report(args, cfg, model, flops: float, tps, best, peak_gb) -> None:
    """The table: one row a variant, against the plain loop of the same mode (eager, compiled)."""
    m = cfg.models.denoiser
    plain = {v.compiled: best[v] for v in best if v.zero is None}
    print(f"\nconfig: denoiser {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
          f"(hidden {m.hidden}, {m.blocks} blocks, vocab {model.vocab.size}), seq_len {cfg.seq_len}, "
          f"global batch {args.batch}, {args.steps} steps, {args.device}, {args.threads} CPU threads, "
          f"{args.workers} workers/rank, best of {args.rounds} interleaved rounds; "
          f"{flops / 1e6:.3g} MFLOP a token (6N + 12·B·H·L)")
    mfu_head = f" {'MFU':>6}" if args.peak_tflops else ""
    memory = "peak GPU mem" if args.device == "cuda" else "peak RSS/rank"
    print(f"{'loop':<27} {'procs':>5} {'tokens/s':>10} {'rounds min..max':>17} {'vs plain':>9}"
          f"{mfu_head} {memory:>14}")
    for v, values in tps.items():
        mfu = (f" {100 * mfu_of(best[v], flops, v.world, args.peak_tflops):>5.1f}%"
               if args.peak_tflops else "")
        gb = f"{peak_gb[v]:.2f} GiB" if v in peak_gb else "-"
        print(f"{v.name:<27} {v.world:>5} {best[v]:>10.0f} {f'{min(values):.0f}..{max(values):.0f}':>17} "
              f"{best[v] / plain[v.compiled]:>9.2f}{mfu} {gb:>14}")
    print_targets(args, cfg, best, plain)


def print_targets(args, cfg, best, plain) -> None:
    print("\nDeepSpeed at 1 process vs the plain loop of the same mode (target >= 0.90):")
    for v in best:
        if v.zero is not None and v.world == 1:
            ratio = best[v] / plain[v.compiled]
            print(f"  {v.name}: {ratio:.2f} {'meets' if ratio >= 0.9 else 'misses'} the target")
    tokens_per_step = args.batch * cfg.seq_len
    z0, z3 = Variant(0, 1, False), Variant(3, 1, False)
    if z0 in best and z3 in best:
        print(f"  ZeRO-3 overhead: {1000 * tokens_per_step * (1 / best[z3] - 1 / best[z0]):.0f} ms per "
              f"step over ZeRO-0's {1000 * tokens_per_step / best[z0]:.0f} ms (DeepSpeed's per-submodule "
              f"parameter fetch/release and gradient partitioning hooks; see the docstring)")
    compiled = [v for v in best if v.compiled]
    if compiled:
        print("Compiled vs eager, the same loop:")
    for v in compiled:
        print(f"  {v.name} x {v.world}: {best[v] / best[dataclasses.replace(v, compiled=False)]:.2f} x")


def mfu_of(tokens_per_s: float, flops_per_token: float, ranks: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation of ``ranks`` devices of ``peak_tflops`` each."""
    return tokens_per_s * flops_per_token / (ranks * peak_tflops * 1e12)


if __name__ == "__main__":
    from gtl_dist.log import setup_logging
    setup_logging()
    sys.exit(main())
