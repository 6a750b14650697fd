"""How the Markov result of gtl depends on γ, and which γ the target data themselves would pick.

For each fraction and seed of a finished Markov run (the README's main command), with the run's
learned source denoiser and learned edit-ratio networks:

- mean |P̂ − Q| of 4,096 samples from the run's exact sampler at each γ of a grid (it scores against
  the true target chain, so it is a diagnostic, never a way to choose γ);
- the γ that minimises the guided cross-entropy of the masked held-out target sequences (the part
  of the n_T sequences the protocol holds out; 400 masked views each at n_T ≤ 250), which is what a
  method restricted to its n_T sequences could use to choose γ, and the γ that minimises it on
  2,000 test sequences (again a diagnostic).

    python results/diagnostics/markov_gamma.py --run-dir runs/markov > results/diagnostics/markov_gamma.md
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from gtl_dist.config import holdout_count, load_config
from gtl_dist.data import read_samples
from gtl_dist.data.manifest import Manifest
from gtl_dist.diffusion import mask_tokens
from gtl_dist.eval.ladder import MarkovRun
from gtl_dist.log import setup_logging
from gtl_dist.paths import RunPaths

GAMMAS = (0.6, 0.8, 1.0, 1.2, 1.4)  # held-out NLL picks among these; errors at each


def guided_nll(denoiser, net, x: torch.Tensor, views: int, seed: int, mask_id: int) -> np.ndarray:
    """Mean −log q_γ(x0^ℓ | z) over masked positions of ``views`` masked copies of x, per γ."""
    gen = torch.Generator().manual_seed(seed)
    xs = x.repeat(views, 1)
    z = mask_tokens(xs, torch.rand(len(xs), generator=gen), mask_id, gen)
    with torch.inference_mode():
        source_logp, edits = denoiser(z).float(), net(z).float()
    scored = z == mask_id
    return np.array([float(-torch.log_softmax(source_logp + g * edits, -1)
                           .gather(-1, xs[..., None]).squeeze(-1)[scored].mean()) for g in GAMMAS])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a finished run of configs/markov.yaml")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(f"{args.run_dir}/config.yaml")
    paths = RunPaths(args.run_dir)
    run = MarkovRun.load(cfg, paths)
    manifest = Manifest.load(paths.data / "manifest.json")
    denoiser, mask_id = run.export("denoiser"), cfg.data.markov.num_states
    about = __doc__.rsplit("\n\n", 1)[0]  # all but the command
    print(f"# γ sensitivity of gtl on the Markov run `{args.run_dir}`\n\n{about}\n")
    print("| target | n_T | seed | " + " | ".join(f"err γ={g:g}" for g in GAMMAS)
          + " | γ by held-out NLL | γ by test NLL |")
    print("|---" * (len(GAMMAS) + 5) + "|")
    for target in run.targets:
        test = read_samples(manifest, f"{target}/test", 0, 2000)
        for fraction in cfg.data.target_fractions:
            n = round(fraction * cfg.data.markov.num_target)
            held = read_samples(manifest, f"{target}/train", n - holdout_count(n, cfg.protocol), n)
            for seed in cfg.pipeline.seeds:
                net = run.export("edit_ratio", target, fraction, seed)
                errs = [run.mean_abs_err(target, denoiser, net, g, seed) for g in GAMMAS]
                by_held = GAMMAS[guided_nll(denoiser, net, held, 400 if n <= 250 else 20, 1, mask_id).argmin()]
                by_test = GAMMAS[guided_nll(denoiser, net, test, 2, 2, mask_id).argmin()]
                print(f"| {target} | {n} | {seed} | " + " | ".join(f"{e:.4f}" for e in errs)
                      + f" | {by_held:g} | {by_test:g} |", flush=True)


if __name__ == "__main__":
    setup_logging()
    main()
