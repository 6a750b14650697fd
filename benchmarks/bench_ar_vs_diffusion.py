"""AR2Diff's speed question on our models and hardware (docs/method.md §11): when does S-step diffusion
decoding beat autoregressive decoding with a KV cache?

The same DiT weights run both ways (AR2Diff switches only the attention mask): an ARLM decodes L
tokens with a KV cache (one new token per network call), and a Denoiser of the same size decodes
all L positions in S ancestral steps (one full-sequence call per step; fewer when a step unmasks
nothing, the "cached" sampler). For each length we time both, count network evaluations, and
report the cost of one diffusion step relative to one cached AR token step (the AR2Diff report
quotes about 12x at its scale), and the crossover length where diffusion becomes faster.

    python benchmarks/bench_ar_vs_diffusion.py [--hidden 256 --blocks 4 --steps 10 --batch 4]

Random weights: decoding cost does not depend on what the weights say. One thread by default,
so the ratio is not disturbed by other work on a small machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from gtl_dist.config import ModelConfig, NoiseConfig
from gtl_dist.diffusion import NoiseSchedule
from gtl_dist.log import setup_logging
from gtl_dist.models import ARLM, Denoiser, VocabSpec
from gtl_dist.sample import unguided_sampler
from gtl_dist.sample.ar import sample_ar


def time_ar(model: ARLM, length: int, batch: int, repeats: int) -> tuple[float, int]:
    prompt = torch.zeros(batch, 1, dtype=torch.long)
    best, evals = float("inf"), 0
    sample_ar(model, prompt, min(length - 1, 4), generator=torch.Generator().manual_seed(0))  # warm-up
    for r in range(repeats):
        g = torch.Generator().manual_seed(r)
        t0 = time.perf_counter()
        _, stats = sample_ar(model, prompt, length - 1, generator=g, temperature=1.0, top_k=8)
        best = min(best, time.perf_counter() - t0)
        evals = stats.network_evals
    return best, evals


def time_diffusion(model: Denoiser, schedule, steps: int, batch: int, repeats: int) -> tuple[float, float]:
    sampler = unguided_sampler(model, schedule, top_k=8, steps=steps)
    best, evals = float("inf"), 0.0
    sampler.sample(1, torch.Generator().manual_seed(0), batch_size=1)  # warm-up
    for r in range(repeats):
        g = torch.Generator().manual_seed(r)
        t0 = time.perf_counter()
        result = sampler.sample(batch, g, batch_size=batch)
        best = min(best, time.perf_counter() - t0)
        evals = result.stats.per_sequence()["denoiser"]
    return best, evals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--steps", type=int, default=10, help="diffusion steps (AR2Diff's default: 10)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = VocabSpec(size=args.vocab + 1, mask_id=args.vocab)
    schedule = NoiseSchedule.from_config(NoiseConfig())
    rows = []
    for length in args.lengths:
        cfg = ModelConfig(hidden=args.hidden, blocks=args.blocks, heads=args.heads, cond_dim=64, dropout=0.0)
        ar = ARLM(cfg, vocab, length).eval()
        den = Denoiser(cfg, vocab, length).eval()
        den.load_state_dict(ar.state_dict())  # AR2Diff: the same weights, another attention mask
        with torch.no_grad():
            t_ar, n_ar = time_ar(ar, length, args.batch, args.repeats)
            t_df, n_df = time_diffusion(den, schedule, args.steps, args.batch, args.repeats)
        per_token = t_ar / n_ar
        per_step = t_df / max(n_df, 1)
        rows.append((length, t_ar, n_ar, t_df, n_df, per_step / per_token, t_ar / t_df))
        print(f"L={length:5d}  AR {t_ar:8.3f}s ({n_ar} evals)  diffusion {t_df:8.3f}s ({n_df:.1f} evals)  "
              f"step/token cost {per_step / per_token:6.1f}x  speed-up {t_ar / t_df:6.2f}x", flush=True)
    # The shortest length from which diffusion stays faster at every longer measured length.
    crossover = next((r[0] for i, r in enumerate(rows) if all(x[6] >= 1.0 for x in rows[i:])), None)
    print()
    print(f"model: hidden {args.hidden}, {args.blocks} blocks, |V| {args.vocab}; batch {args.batch}; "
          f"{args.steps} diffusion steps; {args.threads} thread(s); best of {args.repeats}")
    print("| length | AR s | AR evals | diffusion s | diffusion evals | 1 step / 1 AR token | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for length, t_ar, n_ar, t_df, n_df, ratio, speed in rows:
        print(f"| {length} | {t_ar:.3f} | {n_ar} | {t_df:.3f} | {n_df:.1f} | {ratio:.1f}x | {speed:.2f}x |")
    print(f"crossover: diffusion ({args.steps} steps) is faster from L = {crossover} on" if crossover
          else f"crossover: not reached up to L = {args.lengths[-1]}")


if __name__ == "__main__":
    setup_logging()
    main()
