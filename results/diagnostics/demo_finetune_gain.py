#!/usr/bin/env python
"""GTL's edit-ratio nets against fine-tuning, on the same yardstick: masked-token cross-entropy
saved over the source denoiser on the target's held-out text.

The demo report's ``guide_ce_gain`` scores each gtl edit-ratio net this way
(gtl_dist/eval/guide_gain.py). This script scores each fine-tuned denoiser on the very same masked
copies (same sequences, mask rates and masks), so the two columns compare what the target data
taught each method, with sampling left out. Writes a markdown table to stdout.

    python results/diagnostics/demo_finetune_gain.py --run-dir runs/demo > results/diagnostics/demo_finetune_gain.md
"""

from __future__ import annotations

import argparse
import statistics

import torch

from gtl_dist.config import load_config
from gtl_dist.data import load_run_manifest, read_samples
from gtl_dist.eval.guide_gain import guided_and_source_ce, masked_views
from gtl_dist.objectives import freeze
from gtl_dist.paths import RunPaths
from gtl_dist.stages import StageGraph
from gtl_dist.exports import load_exported, upstream_export_path


class AsEdit(torch.nn.Module):
    """A denoiser seen as an edit on the source: source + (model − source) = model's log-probs."""

    def __init__(self, model: torch.nn.Module, source: torch.nn.Module):
        super().__init__()
        self.model, self.source, self.vocab = model, source, source.vocab

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        model, source = self.model(z).float(), self.source(z).float()
        # Ids both rule out (the [MASK] id: -inf in both) stay ruled out: no -inf - -inf = nan.
        return torch.where(torch.isfinite(source), model - source, torch.zeros((), device=z.device))


def heldout_tokens(cfg, run_dir, target: str) -> list[list[int]]:
    """The target's held-out test sequences, in shard order (the evaluation's references)."""
    manifest = load_run_manifest(cfg, run_dir)
    name = f"{target}/test"
    return read_samples(manifest, name, 0, manifest.num_samples(name), manifest.tokenizer_hash).tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    args = p.parse_args()
    paths = RunPaths(args.run_dir)
    cfg = load_config(paths.config_yaml)
    who = "demo_finetune_gain.py"
    source = freeze(load_exported(upstream_export_path(cfg, paths, StageGraph(cfg).source_stage, needed_by=who)))
    print(f"# Masked-token cross-entropy saved over the source on held-out target text\n\n"
          f"`{' '.join(['python', 'results/diagnostics/demo_finetune_gain.py', '--run-dir', args.run_dir])}`; "
          f"nats per masked token, mean ± std over seeds {cfg.pipeline.seeds}, the same masked copies "
          f"for every network (higher is better; 0 = the source).\n")
    print("| target | fraction | gtl (edit-ratio net) | finetune |\n|---|---|---|---|")
    for target in cfg.targets:
        x, rates = masked_views(heldout_tokens(cfg, args.run_dir, target), cfg.sample.seed)
        for fraction in cfg.data.target_fractions:
            gains = {"edit_ratio": [], "finetune": []}
            for seed in cfg.pipeline.seeds:
                for stage in gains:
                    net = load_exported(upstream_export_path(cfg, paths, stage, target, fraction, seed,
                                                             needed_by=who))
                    edit = net if stage == "edit_ratio" else AsEdit(net, source)
                    guided, plain = guided_and_source_ce(edit, source, x, rates, cfg.sample.seed,
                                                         cfg.eval.batch_size)
                    gains[stage].append(float(plain - guided))
            cells = [f"{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}" for v in gains.values()]
            print(f"| {target} | {fraction:g} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
