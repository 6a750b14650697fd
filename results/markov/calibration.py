"""How well a Markov run's learned log-ratios track the exact one.

GTL's guidance is only as strong as the ratio it learns. On the synthetic chains the exact
log q(x)/p(x) is known, so for every (target, fraction) this script draws fresh sequences from
the true source and target chains and regresses two learned quantities on the exact log-ratio:

- the clean classifier's -logit d(x) (the ratio network's regression target, docs/method.md §5),
- the ratio network r(x) on the clean sequence.

A slope of 1 would be a calibrated log-ratio; the sampler multiplies it by gamma.

    python results/markov/calibration.py --run-dir runs/markov [--num 4000] [--seed 123]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from gtl_dist.config import load_config
from gtl_dist.data.markov import SOURCE, log_prob, sample_sequences, transition_matrices
from gtl_dist.paths import RunPaths, fraction_name
from gtl_dist.train.export import load_exported


def _scores(path: Path, seqs: np.ndarray, negate: bool) -> np.ndarray:
    model = load_exported(path)
    with torch.no_grad():
        out = model(torch.as_tensor(seqs)).double().reshape(-1).numpy()
    return -out if negate else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a finished Markov run directory")
    ap.add_argument("--num", type=int, default=4000, help="fresh sequences per domain")
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args()
    torch.set_num_threads(1)

    paths = RunPaths(args.run_dir)
    cfg = load_config(paths.config_yaml)
    if cfg.data.corpus != "markov":
        raise SystemExit(f"{paths.config_yaml}: data.corpus is '{cfg.data.corpus}'; this script needs a markov run")
    mcfg = cfg.data.markov
    chains = transition_matrices(mcfg)
    rng = np.random.default_rng(args.seed)
    print(f"run: {paths.root}; {args.num} fresh sequences per domain (seed {args.seed}); "
          f"slope and correlation of the learned value against the exact log q/p\n")
    print("| target | fraction | network | on | exact mean ± std | learned mean ± std | slope | corr |")
    print("|---|---|---|---|---|---|---|---|")
    for target in cfg.targets:
        seqs = {dom: sample_sequences(chains[dom], args.num, mcfg.length, rng) for dom in (SOURCE, target)}
        exact = {dom: log_prob(s, chains[target]) - log_prob(s, chains[SOURCE]) for dom, s in seqs.items()}
        for fraction in cfg.data.target_fractions:
            for stage, negate in (("classifier_ti", True), ("ratio", False)):
                export = paths.export(stage, target, fraction)
                if not export.is_file():
                    raise SystemExit(f"{export}: missing; finish the run first (launchers/submit.py)")
                for dom, s in seqs.items():
                    learned = _scores(export, s, negate)
                    e = exact[dom]
                    slope = np.polyfit(e, learned, 1)[0]
                    corr = np.corrcoef(e, learned)[0, 1]
                    name = "-logit d(x)" if negate else "r(x)"
                    print(f"| {target} | {fraction_name(fraction)} | {stage} {name} | {dom} | "
                          f"{e.mean():.2f} ± {e.std():.2f} | {learned.mean():.2f} ± {learned.std():.2f} | "
                          f"{slope:.3f} | {corr:.3f} |")


if __name__ == "__main__":
    main()
