"""Where a Markov run loses accuracy: the oracle ladder and the calibration diagnostics
(docs/method.md §12).

On the synthetic chains every piece of GTL has an exact counterpart (gtl_dist.eval.oracles), so
the run's learned pieces can be swapped in one at a time.

Oracle ladder: mean |P̂ − Q| of samples drawn with the exact full-vocabulary ancestral sampler at
the run's steps, top-K, schedule and sample count:

    exact target denoiser                     the floor of the sampler itself
    exact source + exact h, γ = 1             equals the floor (the guidance identity)
    exact source + Jensen r, γ = 1 and 2      what the paper's ratio network regresses on
    learned source + exact h, γ = 1           what the learned denoiser costs
    exact source + learned gtl guide, γ       what the learned edit-ratio net costs (per fraction
                                              and seed; gtl_paper is diagnosed by its calibration
                                              rows and its own pipeline row)

and the full pipeline is the method's own row.

Calibration: on partly masked sequences of both domains (mask rate uniform in [0.1, 0.9], one
masked position ℓ, two distinct states v, v′), the learned edit difference
r(z[ℓ := v]) − r(z[ℓ := v′]) is regressed on the exact log h(z[ℓ := v]) − log h(z[ℓ := v′]).
A slope of 1 is a calibrated ratio at γ = 1; the correlation says how much of it is noise.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
import torch

from gtl_dist.config import RunConfig
from gtl_dist.data.markov import SOURCE, sample_sequences, transition_matrices
from gtl_dist.diffusion import NoiseSchedule, mask_tokens
from gtl_dist.eval.markov import markov_counts, markov_metrics
from gtl_dist.eval.oracles import EditRatioOracle, LogRatioOracle, log_h
from gtl_dist.models.chain import ChainDenoiser, MarkovChain
from gtl_dist.eval.results import ResultRow, seed_rows
from gtl_dist.log import get_logger
from gtl_dist.methods import METHODS
from gtl_dist.paths import RunPaths
from gtl_dist.sample import MethodNetworks, sample_sequences as draw_samples, shard_seed
from gtl_dist.stages import StageGraph
from gtl_dist.exports import load_exported

log = get_logger("eval.ladder")

LADDER_METRIC = "ladder_mean_abs_err"
EDIT_SET_SIZE = 2000  # partly masked sequences per domain for the calibration diagnostics
MASK_RATES = (0.1, 0.9)


@dataclasses.dataclass
class MarkovRun:
    cfg: RunConfig
    paths: RunPaths
    source: MarkovChain
    targets: dict[str, MarkovChain]
    schedule: NoiseSchedule
    length: int

    @classmethod
    def load(cls, cfg: RunConfig, paths: RunPaths) -> "MarkovRun":
        chains = {name: MarkovChain(m) for name, m in transition_matrices(cfg.data.markov).items()}
        return cls(cfg, paths, chains.pop(SOURCE), chains, NoiseSchedule.from_config(cfg.noise),
                   cfg.data.markov.length)

    def export(self, stage: str, target: Optional[str] = None, fraction: Optional[float] = None,
               seed: int = 0) -> torch.nn.Module:
        path = self.paths.export(stage, target, fraction, seed)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the {stage} stage has not finished (run the "
                                    f"pipeline: launchers/submit.py)")
        return load_exported(path)

    def mean_abs_err(self, target: str, denoiser: Callable, guide: Optional[Callable], gamma: float,
                     replicate: int = 0) -> float:
        """Mean |P̂ − Q| of samples from the exact sampler with these networks."""
        nets = MethodNetworks(denoiser, guide, gamma=gamma if guide is not None else 0.0,
                              vocab=self.source_denoiser.vocab, seq_len=self.length)
        # The run's own sampler when it is exact for every model (first_hitting), else the exact
        # ancestral sampler at the run's steps.
        sampler = "first_hitting" if self.cfg.sample.sampler == "first_hitting" else "exact"
        settings = dataclasses.replace(self.cfg.sample, sampler=sampler)
        seed = shard_seed(self.cfg.sample.seed, 0, replicate)
        with torch.inference_mode():
            tokens = draw_samples(nets, settings, self.schedule, settings.num_samples, seed).tokens.numpy()
        q = self.targets[target].matrix.numpy()
        counts = markov_counts(tokens, q, self.source.matrix.numpy())
        return markov_metrics(counts, q)["transition_mean_abs_err"]

    @property
    def source_denoiser(self) -> ChainDenoiser:
        return ChainDenoiser(self.source, self.length)


def ladder_rows(cfg: RunConfig, paths: RunPaths) -> list[ResultRow]:
    run = MarkovRun.load(cfg, paths)
    methods = cfg.sample.methods
    learned_source = run.export(StageGraph(cfg).source_stage)
    rows = []
    for target, chain in run.targets.items():
        exact_p = run.source_denoiser

        def row(label: str, value: float, fraction: Optional[float] = None) -> ResultRow:
            log.info("ladder %s / %s%s: %.4f", target, label,
                     "" if fraction is None else f" @ {fraction:g}", value)
            return ResultRow(label, target, fraction, LADDER_METRIC, value, None, cfg.sample.num_samples)

        rows.append(row("exact target denoiser (floor)",
                        run.mean_abs_err(target, ChainDenoiser(chain, run.length), None, 0.0)))
        rows.append(row("exact source + exact h, γ = 1",
                        run.mean_abs_err(target, exact_p, EditRatioOracle(run.source, chain, run.length), 1.0)))
        jensen = LogRatioOracle(run.source, chain, run.length, form="jensen")
        for gamma in (1.0, 2.0):
            rows.append(row(f"exact source + Jensen r, γ = {gamma:g}",
                            run.mean_abs_err(target, exact_p, jensen, gamma)))
        rows.append(row("learned source + exact h, γ = 1",
                        run.mean_abs_err(target, learned_source,
                                         EditRatioOracle(run.source, chain, run.length), 1.0)))
        # An edit-ratio network reads z, so it can guide the exact source; an adapter reads the
        # learned source's features and has no such row (its method row is the learned pair), and
        # gtl_paper has its calibration rows (a sequence-level ratio net makes the exact sampler
        # cost L·|V| ratio passes a step, as long as its own sampling again).
        for method in methods:
            if METHODS[method].guide != "edit_ratio":
                continue
            label = f"exact source + learned {method} guide, γ = {METHODS[method].gamma(cfg.sample):g}"
            for fraction in cfg.data.target_fractions:
                per_seed = {s: {LADDER_METRIC: run.mean_abs_err(
                    target, exact_p, run.export("edit_ratio", target, fraction, s),
                    METHODS[method].gamma(cfg.sample), s)} for s in cfg.pipeline.seeds_at(fraction)}
                log.info("ladder %s / %s @ %g: %s", target, label, fraction, per_seed)
                rows += seed_rows(label, target, fraction, per_seed, n=cfg.sample.num_samples)
    return rows


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EditSet:
    """Partly masked sequences with one masked position ℓ and two tokens v, v′ to put there."""
    z: torch.Tensor  # [N, L], position ℓ masked
    rows: torch.Tensor
    positions: torch.Tensor
    v: torch.Tensor
    v_other: torch.Tensor
    mask_rate: torch.Tensor
    exact: np.ndarray  # log h(z[ℓ:=v]) − log h(z[ℓ:=v′])

    def edited(self, token: torch.Tensor) -> torch.Tensor:
        z = self.z.clone()
        z[self.rows, self.positions] = token
        return z


def edit_set(run: MarkovRun, target: str, domain: str, seed: int, size: int = EDIT_SET_SIZE) -> EditSet:
    """``size`` edits on sequences of ``domain`` (the source or ``target``)."""
    chain = run.source if domain == SOURCE else run.targets[target]
    rng = np.random.default_rng([seed, 0 if domain == SOURCE else 1])
    gen = torch.Generator().manual_seed(seed)
    n, s = size, run.source.num_states
    x = torch.as_tensor(sample_sequences(chain.matrix.numpy(), n, run.length, rng))
    lo, hi = MASK_RATES
    rate = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    z = mask_tokens(x, rate.float(), s, gen)
    rows = torch.arange(n)
    positions = torch.randint(0, run.length, (n,), generator=gen)
    z[rows, positions] = s
    v = torch.randint(0, s, (n,), generator=gen)
    v_other = (v + torch.randint(1, s, (n,), generator=gen)) % s
    out = EditSet(z, rows, positions, v, v_other, rate, np.zeros(n))
    target_chain = run.targets[target]
    out.exact = (log_h(run.source, target_chain, out.edited(v))
                 - log_h(run.source, target_chain, out.edited(v_other))).numpy()
    return out


def edit_calibration(stage: str, net: torch.nn.Module, edits: EditSet, schedule: NoiseSchedule,
                     source: Optional[torch.nn.Module] = None) -> tuple[float, float]:
    """(slope, correlation) of the network's edit differences against the exact ones; an adapter
    reads the learned ``source``'s features. A network whose edit differences are all equal (the
    zero edit, which selection keeps when the source itself scores best on the held-out part) has
    slope 0 and correlation 0, not an undefined correlation that would make its cell's mean nan."""
    learned = learned_edit_differences(stage, net, edits, schedule, source)
    slope = float(np.polyfit(edits.exact, learned, 1)[0])
    if np.ptp(learned) == 0.0:
        return slope, 0.0
    return slope, float(np.corrcoef(edits.exact, learned)[0, 1])


def learned_edit_differences(stage: str, net: torch.nn.Module, edits: EditSet, schedule: NoiseSchedule,
                             source: Optional[torch.nn.Module] = None) -> np.ndarray:
    """The network's r(z[ℓ := v]) − r(z[ℓ := v′]) on the same edits (classifiers: −logit)."""
    with torch.inference_mode():
        if stage in ("edit_ratio", "adapter"):
            if stage == "adapter":
                scores = net(source.features(edits.z), source.output.linear)[edits.rows, edits.positions].double()
            else:
                scores = net.edit_scores(edits.z, edits.rows, edits.positions).double()
            diff = scores.gather(-1, edits.v[:, None]) - scores.gather(-1, edits.v_other[:, None])
            return diff.squeeze(-1).numpy()
        sign = -1.0 if stage.startswith("classifier") else 1.0
        if stage == "classifier_td":
            sigma = schedule.sigma(schedule.time_at(edits.mask_rate)).float()
            score = lambda z: net(z, sigma).double()  # noqa: E731
        else:
            score = lambda z: net(z).double()  # noqa: E731
        return sign * (score(edits.edited(edits.v)) - score(edits.edited(edits.v_other))).numpy()


CALIBRATED = {"adapter": "gtl: adapter", "edit_ratio": "gtl_edit: edit-ratio net",
              "classifier_ti": "gtl_paper: clean classifier", "classifier_td": "gtl_paper: masked classifier",
              "ratio": "gtl_paper: ratio net"}


def calibration_rows(cfg: RunConfig, paths: RunPaths) -> list[ResultRow]:
    run = MarkovRun.load(cfg, paths)
    stages = [s for m in cfg.sample.methods for s in METHODS[m].calibrated]
    learned_source = run.export(StageGraph(cfg).source_stage)
    rows = []
    for target in run.targets:
        edits = {d: edit_set(run, target, d, seed=cfg.sample.seed) for d in (SOURCE, target)}
        for stage in stages:
            for fraction in cfg.data.target_fractions:
                per_seed = {}
                for s in cfg.pipeline.seeds_at(fraction):
                    net = run.export(stage, target, fraction, s)
                    stats = {}
                    for domain, es in edits.items():
                        side = "source" if domain == SOURCE else "target"
                        stats[f"edit_slope[{side}]"], stats[f"edit_corr[{side}]"] = edit_calibration(
                            stage, net, es, run.schedule, learned_source)
                    per_seed[s] = stats
                rows += seed_rows(CALIBRATED[stage], target, fraction, per_seed, n=EDIT_SET_SIZE)
    return rows
