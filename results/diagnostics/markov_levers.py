"""Levers for gtl at the low end, measured on a finished Markov run before any study adopts them.

Every lever is scored like the report scores the methods: masked cross-entropy (nats per masked
token, mean over ``eval.ce_mask_rates``) on the target's test sequences, with the evaluation's
masks, paired over the run's replicates with 95 % t-intervals. Only ``gamma-schedule`` and
``grid-oracle`` read test data to choose anything, and they say so: upper bounds, not methods.

- ``refit``: retrain gtl's adapter and the fine-tunes on all n_T sequences (``selection: budget``)
  for the step and at the learning rate their held-out selection kept (kept step 0 = the source:
  nothing to retrain). Does the fifth of the data that selection holds out pay for itself?
- ``weight-decay``: gtl's adapter retrained under holdout selection at other weight decays (the
  pull toward the source, docs/method.md §5a), the decay then chosen with the learning rate by the
  same held-out loss. Shrinkage chosen by the n_T sequences themselves.
- ``gamma-schedule``: the adapter's guidance strength per mask rate, chosen per rate on the test
  set from a grid: the most any γ(t) schedule (or one γ) could gain over the trained γ = 1.
- ``lr-ensemble``: each method's grid runs (its learning rates, crossed with the decays and
  models its grid searched) averaged (mean of log-probabilities, renormalised) instead of the
  best one: does variance reduction favour gtl or the fine-tunes?
- ``no-decay``: for a run whose stages searched ``weight_decay_grid``, each method's selection
  redone over its weight-decay-0 runs only (the same runs, the same held-out losses): the study
  as it would have come out without the decay lever, for every method alike. Needs no training.
- ``grid-oracle``: each method's grid runs (learning rates, and decays where searched) scored on
  the **test** set, the best one kept: how much a perfect choice among the runs its held-out part
  chose between would add (each run at its own held-out-chosen step). An upper bound that reads
  test data, not a method: it says whether a method trails for its selection's noise or for what
  its runs can reach.
- ``guidance-weight``: Domain Guidance's extrapolation, adapted + w·(adapted − source) in log
  space (renormalised), for gtl and the fine-tunes alike, w chosen per replicate from a grid by
  the masked cross-entropy on the replicate's own held-out sequences (the ones its selection used,
  ``protocol.holdout_views`` masked views each at the evaluation's mask rates). For gtl this is
  exactly its guidance strength γ = 1 + w; w < 0 shrinks toward the source.

    python results/diagnostics/markov_levers.py refit --run-dir runs/markov_low_perturbed \\
        --scratch runs/levers_perturbed --out results/diagnostics/markov_levers_refit.md

and likewise ``weight-decay``, ``gamma-schedule``, ``lr-ensemble``, ``no-decay``, ``grid-oracle``
and ``guidance-weight`` (the last five need no ``--scratch``). The run directory is read, never written; retrained stages go to ``--scratch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from gtl_dist.config import RunConfig, check_split, load_config, replicate_start
from gtl_dist.data import load_run_manifest, read_samples
from gtl_dist.eval.evaluate_markov import heldout_views
from gtl_dist.eval.paired import t_interval
from gtl_dist.eval.scores import MaskedViews, masked_ce, masked_views
from gtl_dist.exports import load_exported, read_export_meta
from gtl_dist.io import atomic_write_text
from gtl_dist.models.adapter import AdaptedDenoiser
from gtl_dist.paths import RunPaths, grid_variant
from gtl_dist.sample import MethodNetworks
from gtl_dist.sample.networks import method_log_probs, method_networks
from gtl_dist.train.jobs import run_stage

# method -> the stage it trains per target
STAGE_OF = {"gtl": "adapter", "finetune": "finetune", "finetune_small": "finetune_small"}
# no-decay also redoes vanilla's selection: the decay study searched its decay too
DECAY_STAGE_OF = {**STAGE_OF, "vanilla": "vanilla"}
GAMMAS = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
GUIDANCE_WEIGHTS = (-0.5, -0.25, 0.0, 0.25, 0.5, 1.0)


@dataclasses.dataclass
class Run:
    """A finished Markov run, its replicates and the evaluation's test views."""
    root: Path
    seeds: list[int] | None
    targets: list[str] | None = None

    @cached_property
    def cfg(self) -> RunConfig:
        return load_config([self.root / "config.yaml"])

    @cached_property
    def manifest(self):
        return load_run_manifest(self.cfg, self.root)

    def cells(self) -> Iterator[tuple[str, float, int, MaskedViews]]:
        for target in self.targets or self.cfg.targets:
            views = heldout_views(self.cfg, self.manifest, target)
            for fraction in self.cfg.data.target_fractions:
                for seed in self.seeds or self.cfg.pipeline.seeds_at(fraction):
                    yield target, fraction, seed, views

    def scored(self, methods: Iterable[str], rows: list[dict]) -> Iterator[tuple[dict, tuple[str, float, int, MaskedViews]]]:
        """Each replicate's row, with every method's masked cross-entropy as the run kept it, and
        its cell; the lever adds its own entries, and the row joins ``rows`` (and is printed) when
        the lever moves on to the next replicate."""
        for target, fraction, seed, views in self.cells():
            row = {"target": target, "fraction": fraction, "seed": seed}
            for method in methods:
                row[method] = self.method_ce(method, target, fraction, seed, views)
            yield row, (target, fraction, seed, views)
            rows.append(row)
            print(json.dumps(row), flush=True)

    def ce(self, log_probs: Callable[[torch.Tensor], torch.Tensor], views: MaskedViews) -> float:
        return masked_ce(log_probs, views, self.manifest.mask_id)

    def method_ce(self, method: str, target: str, fraction: float, seed: int, views: MaskedViews,
                  cfg: RunConfig | None = None, root: Path | None = None) -> float:
        nets = method_networks(cfg or self.cfg, RunPaths(root or self.root), method, target, fraction, seed,
                               needed_by="markov_levers.py")
        return self.ce(lambda z: method_log_probs(nets, z), views)

    def selection_views(self, target: str, fraction: float, seed: int) -> MaskedViews:
        """The replicate's own held-out sequences (the last k of its n_T draw, as its stages'
        selection read them), each masked ``protocol.holdout_views`` times per evaluation rate."""
        cfg, man, name = self.cfg, self.manifest, f"{target}/train"
        n, total = man.num_samples(name, fraction), man.num_samples(name)
        split = check_split(n, cfg.protocol, f"target '{target}' at fraction {fraction}")
        if not split.held:
            raise SystemExit(f"{self.root}: protocol.selection={cfg.protocol.selection} leaves its exports no "
                             f"held-out sequences of their own to choose on; run this lever on a holdout run")
        start = (replicate_start(total, n, seed, cfg.protocol) + split.held_at) % total
        x = read_samples(man, name, start, start + split.held, man.tokenizer_hash)
        return masked_views(x.repeat(cfg.protocol.holdout_views, 1), cfg.eval.ce_mask_rates,
                            cfg.sample.seed + 1 + seed, man.mask_id)

    def n_t(self, fraction: float) -> int:
        return round(fraction * self.cfg.data.markov.num_target)


def scratch_dir(run: Run, scratch: Path) -> Path:
    """A run directory that shares the run's data and source and trains stages of its own."""
    for shared in ("data", "denoiser"):
        link = scratch / shared
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(run.root / shared, link)
    return scratch


def with_train(cfg: RunConfig, stage: str, protocol: dict | None = None, **train) -> RunConfig:
    tc = dataclasses.replace(getattr(cfg.train, stage), **train)
    return dataclasses.replace(cfg, protocol=dataclasses.replace(cfg.protocol, **(protocol or {})),
                               train=dataclasses.replace(cfg.train, **{stage: tc}))


def kept_choice(run: Run, stage: str, target: str, fraction: float, seed: int) -> tuple[float, int, float]:
    """(learning rate, step, held-out loss) the run's selection kept for one task."""
    meta = read_export_meta(RunPaths(run.root).export(stage, target, fraction, seed))
    best = min(meta["lr_grid"], key=lambda r: r["val_loss"])
    return best["lr"], int(meta["step"]), float(meta["val_loss"])


def variant_pairs(variant: str, both: str, methods: list[str] | None = None) -> list[tuple[str, str, str]]:
    """The comparisons of a lever applied to every method alike (gtl first): each method against
    its variant, then each baseline against gtl, as the run kept them and with the lever on both."""
    methods = methods or list(STAGE_OF)
    return ([(m, f"{m}:{variant}", f"{m}: kept − {variant}") for m in methods]
            + [(m, "gtl", f"{m} − gtl") for m in methods[1:]]
            + [(f"{m}:{variant}", f"gtl:{variant}", f"{m} − gtl, {both}") for m in methods[1:]])


# -- the levers: each returns per-replicate rows and the comparisons to report ------------------
def refit(run: Run, args) -> tuple[list[dict], list[tuple[str, str, str]]]:
    scratch, rows = scratch_dir(run, args.scratch), []
    for row, (target, fraction, seed, views) in run.scored(STAGE_OF, rows):
        for method, stage in STAGE_OF.items():
            lr, step, _ = kept_choice(run, stage, target, fraction, seed)
            row[f"{method}:refit"] = row[method]
            if step:  # step 0 kept the source: nothing to retrain
                cfg = with_train(run.cfg, stage, {"selection": "budget"}, lr=lr, lr_grid=None, steps=step,
                                 save_every=step, val_every=step)
                run_stage(cfg, scratch, stage, target, fraction, seed)
                row[f"{method}:refit"] = run.method_ce(method, target, fraction, seed, views, cfg, scratch)
    return rows, variant_pairs("refit", "both refit")


def weight_decay(run: Run, args) -> tuple[list[dict], list[tuple[str, str, str]]]:
    rows, own = [], run.cfg.train.adapter.weight_decay
    for row, (target, fraction, seed, views) in run.scored(STAGE_OF, rows):
        held = {own: kept_choice(run, "adapter", target, fraction, seed)[2]}
        scores = {own: row["gtl"]}
        for decay in args.decays:
            cfg = with_train(run.cfg, "adapter", weight_decay=decay)
            root = scratch_dir(run, args.scratch / f"wd-{decay:g}")
            held[decay] = run_stage(cfg, root, "adapter", target, fraction, seed).val_loss
            scores[decay] = run.method_ce("gtl", target, fraction, seed, views, cfg, root)
            row[f"gtl:wd {decay:g}"] = scores[decay]
        chosen = min(held, key=held.get)
        row["gtl:wd chosen"], row["chosen_decay"] = scores[chosen], chosen
    pairs = [("gtl", f"gtl:wd {d:g}", f"gtl (wd {own:g}) − gtl at wd {d:g}") for d in args.decays]
    pairs.append(("gtl", "gtl:wd chosen", f"gtl (wd {own:g}) − gtl, decay chosen on held-out"))
    pairs += [(m, "gtl:wd chosen", f"{m} − gtl, decay chosen on held-out") for m in ("finetune", "finetune_small")]
    return rows, pairs


def gamma_schedule(run: Run, args) -> tuple[list[dict], list[tuple[str, str, str]]]:
    rows = []
    for target, fraction, seed, views in run.cells():
        nets = method_networks(run.cfg, RunPaths(run.root), "gtl", target, fraction, seed, needed_by="markov_levers.py")
        per_rate = [MaskedViews(views.x[i:i + 1], views.z[i:i + 1], (r,)) for i, r in enumerate(views.rates)]
        table = {}
        for gamma in GAMMAS:
            nets.denoiser.gamma = gamma
            table[gamma] = [run.ce(lambda z: method_log_probs(nets, z), v) for v in per_rate]
        mean = {g: sum(v) / len(v) for g, v in table.items()}
        best = [min(GAMMAS, key=lambda g: table[g][i]) for i in range(len(per_rate))]
        row = {"target": target, "fraction": fraction, "seed": seed, "gtl": mean[1.0],
               "gtl:best single γ": min(mean.values()), "single γ": min(mean, key=mean.get),
               "gtl:best γ per rate": sum(table[g][i] for i, g in enumerate(best)) / len(best), "γ per rate": best}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, [("gtl", "gtl:best single γ", "γ = 1 − best single γ (test-chosen)"),
                  ("gtl", "gtl:best γ per rate", "γ = 1 − best γ per mask rate (test-chosen)")]


def grid_run_export(paths: RunPaths, stage: str, target: str, fraction: float, seed: int, entry: dict) -> Path:
    """The export of one run that a task's export metadata lists (``lr_grid``; an entry carries its
    decay where the stage searched one, as gtl_dist.eval.selection.searched_decay reads it, and
    its model's index where the stage searched ``model_grid``)."""
    return paths.export(stage, target, fraction, seed,
                        variant=grid_variant(entry["lr"], entry.get("weight_decay"), entry.get("model")))


def grid_run_networks(source: torch.nn.Module, method: str, path: Path) -> MethodNetworks:
    """The networks one grid run of a method's stage exported (gtl's adapter over the source)."""
    model = load_exported(path)
    return MethodNetworks(AdaptedDenoiser(source, model).eval()) if method == "gtl" else MethodNetworks(model)


def grid_runs(paths: RunPaths, source: torch.nn.Module, method: str, stage: str, target: str,
              fraction: float, seed: int) -> list[MethodNetworks]:
    """The networks of every run a task's export metadata lists (its whole grid)."""
    return [grid_run_networks(source, method, grid_run_export(paths, stage, target, fraction, seed, r))
            for r in read_export_meta(paths.export(stage, target, fraction, seed))["lr_grid"]]


def lr_ensemble(run: Run, args) -> tuple[list[dict], list[tuple[str, str, str]]]:
    paths, rows = RunPaths(run.root), []
    source = load_exported(paths.export("denoiser"))
    for row, (target, fraction, seed, views) in run.scored(STAGE_OF, rows):
        for method, stage in STAGE_OF.items():
            runs = grid_runs(paths, source, method, stage, target, fraction, seed)
            row[f"{method}:ensemble"] = run.ce(
                lambda z: torch.log_softmax(torch.stack([method_log_probs(n, z) for n in runs]).mean(0), -1), views)
    return rows, variant_pairs("ensemble", "both ensembles")


def no_decay(run: Run, args) -> tuple[list[dict], list[tuple[str, str, str]]]:
    paths, rows = RunPaths(run.root), []
    source = load_exported(paths.export("denoiser"))
    for row, (target, fraction, seed, views) in run.scored(DECAY_STAGE_OF, rows):
        for method, stage in DECAY_STAGE_OF.items():
            meta = read_export_meta(paths.export(stage, target, fraction, seed))
            undecayed = [r for r in meta["lr_grid"] if r.get("weight_decay") == 0.0]
            if not undecayed:
                sys.exit(f"{paths.export(stage, target, fraction, seed)}: no weight-decay-0 run in its grid; "
                         "no-decay needs a run whose train.<stage>.weight_decay_grid includes 0")
            best = min(undecayed, key=lambda r: r["val_loss"])
            nets = grid_run_networks(source, method, grid_run_export(paths, stage, target, fraction, seed, best))
            row[f"{method}:no decay"] = run.ce(lambda z: method_log_probs(nets, z), views)
            row[f"{method}:kept decay"] = min(meta["lr_grid"], key=lambda r: r["val_loss"])["weight_decay"]
    return rows, variant_pairs("no decay", "neither searching decay", list(DECAY_STAGE_OF))


def grid_oracle(run: Run, args) -> tuple[list[dict], list[tuple[str, str, str]]]:
    paths, rows = RunPaths(run.root), []
    source = load_exported(paths.export("denoiser"))
    for row, (target, fraction, seed, views) in run.scored(STAGE_OF, rows):
        for method, stage in STAGE_OF.items():
            row[f"{method}:test-chosen run"] = min(
                run.ce(lambda z, nets=nets: method_log_probs(nets, z), views)
                for nets in grid_runs(paths, source, method, stage, target, fraction, seed))
    return rows, variant_pairs("test-chosen run", "both test-chosen")


def guidance_weight(run: Run, args) -> tuple[list[dict], list[tuple[str, str, str]]]:
    rows, paths = [], RunPaths(run.root)
    source = method_networks(run.cfg, paths, "source", None, None, 0, needed_by="markov_levers.py")
    for target, fraction, seed, views in run.cells():
        row = {"target": target, "fraction": fraction, "seed": seed}
        held = run.selection_views(target, fraction, seed)
        for method in STAGE_OF:
            nets = method_networks(run.cfg, paths, method, target, fraction, seed, needed_by="markov_levers.py")

            def guided(w: float):  # -inf (the mask token) held finite: 0·(-inf) would be nan
                return lambda z: torch.log_softmax((1 + w) * method_log_probs(nets, z).clamp_min(-1e30)
                                                   - w * method_log_probs(source, z).clamp_min(-1e30), -1)

            chosen = min(GUIDANCE_WEIGHTS, key=lambda w: run.ce(guided(w), held))
            row[method], row[f"{method}:w chosen"] = run.ce(guided(0.0), views), run.ce(guided(chosen), views)
            row[f"{method}:w"] = chosen
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, variant_pairs("w chosen", "both with w chosen on held-out")


LEVERS = {"refit": refit, "weight-decay": weight_decay, "gamma-schedule": gamma_schedule, "lr-ensemble": lr_ensemble,
          "no-decay": no_decay, "grid-oracle": grid_oracle, "guidance-weight": guidance_weight}


def report(run: Run, lever: str, rows: list[dict], pairs: list[tuple[str, str, str]], command: str) -> str:
    lines = [f"# Lever `{lever}` on {run.root.name}", "", f"    {command}", "",
             f"Masked cross-entropy on {run.cfg.eval.ce_sequences} test sequences (the evaluation's masks); "
             "a − b per replicate, mean and 95 % t-interval (> 0: b scores lower, i.e. better).", "",
             "| target | n_T | a − b | mean | 95 % interval | replicates |", "|---|---|---|---|---|---|"]
    for target in run.targets or run.cfg.targets:
        for fraction in run.cfg.data.target_fractions:
            cell = [r for r in rows if (r["target"], r["fraction"]) == (target, fraction)]
            for a, b, label in pairs:
                mean, _, lo, hi = t_interval([r[a] - r[b] for r in cell])
                lines.append(f"| {target} | {run.n_t(fraction)} | {label} | {mean:+.4f} | "
                             f"[{lo:+.4f}, {hi:+.4f}] | {len(cell)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lever", choices=LEVERS)
    parser.add_argument("--run-dir", required=True, type=Path, help="a finished Markov run directory")
    parser.add_argument("--scratch", type=Path, help="where retrained stages go (refit, weight-decay)")
    parser.add_argument("--out", required=True, type=Path, help="the Markdown table (rows beside it, .jsonl)")
    parser.add_argument("--seeds", type=int, nargs="+", help="replicates (default: the run's)")
    parser.add_argument("--targets", nargs="+", help="targets (default: the run's)")
    parser.add_argument("--decays", type=float, nargs="+", default=[0.1, 10.0], help="weight-decay: the other decays")
    args = parser.parse_args()
    if args.lever in ("refit", "weight-decay") and args.scratch is None:
        parser.error(f"{args.lever} retrains stages: pass --scratch DIR (not the run directory)")
    run = Run(args.run_dir.resolve(), args.seeds, args.targets)
    rows, pairs = LEVERS[args.lever](run, args)
    command = "python results/diagnostics/markov_levers.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, report(run, args.lever, rows, pairs, command))
    atomic_write_text(args.out.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
