"""Sampling cost: network evaluations and wall time per generated sequence (docs/method.md §3, §7).

At |V| = 8,000 and L = 128, with small randomly initialised gtl_dist.models networks on the CPU,
in one run:
  (a) unguided ancestral sampler (S steps, top-K),
  (b) GTL planner sampler at n_ratio in {8, 64, 512},
  (c) GTL ancestral sampler (S steps, n_ratio candidates at every masked position),
  (d) naive guidance scoring every (position, token) edit at every step — too slow to run: one
      slice of its first step is timed and extrapolated (the output says so).
Targets: (b) needs >= 100x fewer ratio-net evaluations than (d), and (b)'s measured wall time is
within 1.5x of its cost model (the denoiser, planner and ratio-net passes of one step, each timed
alone at the same batch shapes, times L), i.e. the sampling loop itself wastes little.

Random weights do not change the cost of a forward pass, so no training is needed.

    python benchmarks/bench_sampling.py                 # a few minutes on 2 idle CPU cores
    python benchmarks/bench_sampling.py --threads 1 --sequences 1   # ~2 min; steadier on a busy machine

Two OpenMP threads on an oversubscribed machine make every network call several times slower
inside the sampling loop than when timed alone; the "sampler's own work outside the networks"
line (wall time minus time spent inside network calls) is the load-independent check that the
loop itself wastes little.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gtl_dist.config import ModelConfig  # noqa: E402
from gtl_dist.diffusion import LogLinearSchedule  # noqa: E402
from gtl_dist.log import setup_logging  # noqa: E402
from gtl_dist.models import Denoiser, Planner, RatioNet, VocabSpec, count_parameters  # noqa: E402
from gtl_dist.sample import AncestralSampler, PlannerSampler, SampleResult, unguided_sampler  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=8000, help="vocabulary size including [MASK]")
    ap.add_argument("--length", type=int, default=128, help="sequence length L")
    ap.add_argument("--sequences", type=int, default=2, help="sequences generated per sampler (one batch)")
    ap.add_argument("--steps", type=int, default=128, help="ancestral steps S")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--gamma", type=float, default=5.0)
    ap.add_argument("--n-ratio", type=int, nargs="+", default=[8, 64, 512],
                    help="planner sampler n_ratio values")
    ap.add_argument("--ancestral-n-ratio", type=int, default=8,
                    help="n_ratio of the GTL ancestral sampler (ratio rows: masked positions x n_ratio "
                         "per refreshed step)")
    ap.add_argument("--ratio-batch-size", type=int, default=256, help="edited sequences per ratio-net pass")
    ap.add_argument("--naive-rows", type=int, default=4096,
                    help="rows of the naive first step actually timed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (timings synchronise the device)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def build_networks(vocab: VocabSpec, length: int) -> tuple[Denoiser, RatioNet, Planner]:
    torch.manual_seed(0)
    small = ModelConfig(hidden=32, blocks=1, heads=2, cond_dim=16, dropout=0.0)
    denoiser = Denoiser(ModelConfig(hidden=64, blocks=2, heads=4, cond_dim=32, dropout=0.0), vocab, length)
    return denoiser.eval(), RatioNet(small, vocab, length).eval(), Planner(small, vocab, length).eval()


DEVICE = torch.device("cpu")  # set from --device in main()


def sync() -> None:
    """Wait for the device, so wall-clock timings cover the work (a no-op on the CPU)."""
    torch.get_device_module(DEVICE).synchronize(DEVICE)


class Timed:
    """A network wrapper that adds up the wall time spent inside its calls."""

    def __init__(self, network: torch.nn.Module):
        self.network, self.vocab, self.seq_len, self.seconds = network, network.vocab, network.seq_len, 0.0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        sync()
        t0 = time.perf_counter()
        out = self.network(z)
        sync()
        self.seconds += time.perf_counter() - t0
        return out


def median_time(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(sampler, num: int, seed: int) -> tuple[SampleResult, float]:
    sync()
    t0 = time.perf_counter()
    out = sampler.sample(num, torch.Generator().manual_seed(seed), batch_size=num)
    sync()
    return out, time.perf_counter() - t0


def ratio_chunks(rows: int, chunk: int) -> list[int]:
    return [chunk] * (rows // chunk) + ([rows % chunk] if rows % chunk else [])


def main() -> None:
    global DEVICE
    args = parse_args()
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    vocab = VocabSpec(size=args.vocab, mask_id=args.vocab - 1)
    L, B, V = args.length, args.sequences, args.vocab - 1  # V: ids a sequence may contain
    denoiser, ratio_net, planner = (net.to(DEVICE) for net in build_networks(vocab, L))
    schedule = LogLinearSchedule()
    command = "python benchmarks/bench_sampling.py " + " ".join(sys.argv[1:])
    print(f"command: {command}")
    print(f"device {DEVICE}, |V| = {args.vocab} (incl. [MASK]), L = {L}, "
          f"{B} sequences per sampler in one batch, "
          f"S = {args.steps}, top-K = {args.top_k}, gamma = {args.gamma}, "
          f"ratio batch = {args.ratio_batch_size}, {torch.get_num_threads()} threads")
    print(f"parameters: denoiser {count_parameters(denoiser):,}, ratio net {count_parameters(ratio_net):,}, "
          f"planner {count_parameters(planner):,}\n")

    rows = []  # (label, denoiser/seq, ratio/seq, planner/seq, wall s/seq, note)

    # (a) unguided
    sampler = unguided_sampler(denoiser, schedule, top_k=args.top_k, steps=args.steps)
    out, wall = run(sampler, B, args.seed)
    per = out.stats.per_sequence()
    rows.append(("(a) unguided ancestral", per["denoiser"], per["ratio"], per["planner"], wall / B,
                 f"{out.stats.cached_steps}/{args.steps} steps cached"))

    # (b) planner sampler, with its cost model: every network timed alone at the shapes of one step
    # (right before the run, so both see the same machine load), times L steps.
    model_vs_wall = {}
    planner_ratio_rows = {}
    for n in args.n_ratio:
        z = torch.randint(0, V, (B, L), device=DEVICE)
        with torch.inference_mode():
            step_model = median_time(lambda: denoiser(z)) + median_time(lambda: planner(z))
            for size in ratio_chunks(B * n, args.ratio_batch_size):
                zc = torch.randint(0, V, (size, L), device=DEVICE)
                step_model += median_time(lambda: ratio_net(zc), repeats=3)
        model = L * step_model
        nets = [Timed(m) for m in (denoiser, ratio_net, planner)]
        sampler = PlannerSampler(*nets, gamma=args.gamma, n_ratio=n, top_k=args.top_k,
                                 ratio_batch_size=args.ratio_batch_size)
        out, wall = run(sampler, B, args.seed)
        inside = sum(net.seconds for net in nets)
        per = out.stats.per_sequence()
        model_vs_wall[n] = (wall, model, inside)
        planner_ratio_rows[n] = per["ratio"]
        rows.append((f"(b) GTL planner n_ratio={n}", per["denoiser"], per["ratio"], per["planner"], wall / B,
                     f"cost model {model / B:.2f} s/seq; inside networks {inside / wall:.0%} of wall"))

    # (c) GTL ancestral
    sampler = AncestralSampler(denoiser, ratio_net, schedule, gamma=args.gamma,
                               n_ratio=args.ancestral_n_ratio, top_k=args.top_k, steps=args.steps,
                               ratio_batch_size=args.ratio_batch_size)
    out, wall = run(sampler, B, args.seed)
    per = out.stats.per_sequence()
    rows.append((f"(c) GTL ancestral n_ratio={args.ancestral_n_ratio}", per["denoiser"], per["ratio"],
                 per["planner"], wall / B, f"{out.stats.cached_steps}/{args.steps} steps cached"))

    # (d) naive: every masked position x every token, every step, no caching. Expected masked
    # positions at the start of step i: L·(1 − α_{t_i})/(1 − α_1) (the stay probabilities telescope).
    times = torch.linspace(1.0, 1e-5, args.steps + 1, dtype=torch.float64)[:-1]
    still_masked = (schedule.move_chance(times) / schedule.move_chance(torch.tensor(1.0))).sum().item() * L
    naive_ratio_rows = still_masked * V
    first_step_rows = L * V
    timed = min(args.naive_rows, first_step_rows)
    zc = torch.full((args.ratio_batch_size, L), vocab.mask_id, device=DEVICE)
    zc[:, 0] = torch.randint(0, V, (args.ratio_batch_size,), device=DEVICE)
    passes = math.ceil(timed / args.ratio_batch_size)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        for _ in range(passes):
            ratio_net(zc)
        sync()
        per_row = (time.perf_counter() - t0) / (passes * args.ratio_batch_size)
    with torch.inference_mode():
        t_denoiser = median_time(lambda: denoiser(torch.randint(0, V, (1, L), device=DEVICE)))
    naive_step = first_step_rows * per_row + t_denoiser
    naive_wall = naive_ratio_rows * per_row + args.steps * t_denoiser
    rows.append(("(d) naive guidance", float(args.steps), naive_ratio_rows, 0.0, naive_wall,
                 f"EXTRAPOLATED: timed {timed} of the first step's {first_step_rows:,} rows "
                 f"(step ~ {naive_step:.0f} s)"))

    header = (f"{'sampler':34s} {'denoiser/seq':>12s} {'ratio/seq':>14s} {'planner/seq':>11s} "
              f"{'wall s/seq':>11s}  note")
    print(header)
    print("-" * len(header))
    for label, d, r, p, w, note in rows:
        print(f"{label:34s} {d:12.1f} {r:14,.0f} {p:11.1f} {w:11.2f}  {note}")

    print("\nratios")
    ok = True
    for n in args.n_ratio:
        fewer = naive_ratio_rows / planner_ratio_rows[n]
        wall, model, inside = model_vs_wall[n]
        over = wall / model
        ok &= fewer >= 100 and over <= 1.5
        print(f"  n_ratio={n:4d}: naive / planner ratio-net evaluations = {fewer:10,.0f}x (target >= 100x); "
              f"measured wall / cost model = {over:.2f} (target <= 1.5; {wall:.2f} s vs {model:.2f} s; "
              f"sampler's own work outside the networks: {wall - inside:.2f} s)")
    print(f"\n{'all targets met' if ok else 'TARGET MISSED'} (timings on a shared machine are indicative; "
          f"counts are exact)")
    print(f"command: {command}")


if __name__ == "__main__":
    setup_logging()
    main()
