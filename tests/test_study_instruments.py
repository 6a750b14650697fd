"""The study's instruments (docs/method.md §10, §12): the exact evaluation sampler, the masked
cross-entropy against enumeration, paired intervals, and the settings a study refuses."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from gtl_dist.config import ConfigError, SampleConfig, load_config
from gtl_dist.data.markov import diagonal_matrix, sample_sequences
from gtl_dist.diffusion import GeometricSchedule
from gtl_dist.eval.markov import markov_counts, markov_metrics
from gtl_dist.eval.paired import paired_rows, t_interval, verdict
from gtl_dist.eval.scores import masked_ce, masked_views
from gtl_dist.models.chain import ChainDenoiser, MarkovChain
from gtl_dist.sample import MethodNetworks, sample_sequences as draw

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.exact
def test_the_first_hitting_sampler_of_the_exact_target_is_at_the_sampling_noise():
    """Revealing one uniformly chosen position per step draws exactly from an exact model: at
    4,096 samples of a short sticky chain its transition error is sampling noise (<= 0.005), where
    the paper's 20-step geometric sampler, drawing many positions at once, is biased (about 0.03)."""
    q = diagonal_matrix(5, 0.8)
    nets = MethodNetworks(ChainDenoiser(MarkovChain(q), 20))
    errors = {}
    for sampler in ("first_hitting", "exact"):
        cfg = SampleConfig(sampler=sampler, top_k=5, steps=20, num_samples=4096, batch_size=1024)
        tokens = draw(nets, cfg, GeometricSchedule(1e-4, 20.0), 4096, seed=3).tokens.numpy()
        errors[sampler] = markov_metrics(markov_counts(tokens, q, q), q)["transition_mean_abs_err"]
    assert errors["first_hitting"] <= 0.005, errors
    assert errors["exact"] > 0.02, errors


@pytest.mark.exact
def test_masked_cross_entropy_of_the_exact_chain_is_the_enumerated_posterior():
    """On a chain short enough to enumerate, the score of the chain's own denoiser is
    −log p(x0^ℓ | z) from summing over every sequence that agrees with z."""
    S, L = 3, 4
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.ones(S), size=S)
    x = torch.as_tensor(sample_sequences(p, 50, L, rng))
    views = masked_views(x, [0.3, 0.7], seed=9, mask_id=S)
    got = masked_ce(lambda z: ChainDenoiser(MarkovChain(p), L)(z), views, mask_id=S)

    xs = np.array(list(itertools.product(range(S), repeat=L)))
    probs = np.prod(p[xs[:, :-1], xs[:, 1:]], axis=1) / S
    per_rate = []
    for xv, zv in zip(views.x.numpy(), views.z.numpy()):
        nll, count = 0.0, 0
        for xi, zi in zip(xv, zv):
            agree = ((zi == S) | (zi == xs)).all(-1)
            for pos in np.flatnonzero(zi == S):
                nll -= np.log(probs[agree & (xs[:, pos] == xi[pos])].sum() / probs[agree].sum())
                count += 1
        per_rate.append(nll / count)
    assert got == pytest.approx(np.mean(per_rate), abs=1e-6)


def test_every_method_is_scored_on_the_same_masks():
    x = torch.randint(0, 4, (30, 10))
    a, b = masked_views(x, [0.2, 0.8], seed=1, mask_id=4), masked_views(x, [0.2, 0.8], seed=1, mask_id=4)
    assert torch.equal(a.z, b.z) and not torch.equal(a.z[0], a.z[1])
    assert abs((a.z[1] == 4).float().mean().item() - 0.8) < 0.1


def test_paired_intervals_follow_student_t_and_say_who_wins():
    mean, sd, lo, hi = t_interval([0.1, 0.3, 0.2, 0.4])
    assert mean == pytest.approx(0.25) and sd == pytest.approx(0.1290994, rel=1e-6)
    assert hi - mean == pytest.approx(3.182 * sd / 2)
    assert verdict(lo, hi) == "wins" and verdict(-0.2, 0.1) == "ties" and verdict(-0.3, -0.1) == "loses"
    per_seed = {("gtl", 0.5): {0: {"masked_ce": 1.0}, 1: {"masked_ce": 1.1}, 2: {"masked_ce": 0.9}},
                ("vanilla", 0.5): {0: {"masked_ce": 1.5}, 1: {"masked_ce": 1.4}, 2: {"masked_ce": 1.5}},
                ("source", None): {0: {"masked_ce": 2.0}, 1: {"masked_ce": 2.0}, 2: {"masked_ce": 2.0}}}
    rows = {r.method: r for r in paired_rows(per_seed, "t", ["masked_ce"], [0.5])}
    assert rows["vanilla"].value == pytest.approx(0.4667, abs=1e-4) and rows["vanilla"].n == 3
    assert rows["vanilla"].ci_low > 0 and rows["vanilla"].notes.endswith("gtl wins")
    assert rows["source"].fraction == 0.5  # the source pairs with every fraction
    assert "gtl" not in rows


def test_a_study_setting_that_cannot_work_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.adapter\.lr_grid: \[\]: a learning-rate grid needs"):
        load_config(CONFIGS / "tiny.yaml", ["train.adapter.lr_grid=[]", "train.adapter.select_best=true"])
    with pytest.raises(ConfigError, match=r"train\.vanilla\.lr_grid: \[0\.001, -0\.1\]"):
        load_config(CONFIGS / "tiny.yaml", ["train.vanilla.lr_grid=[1e-3, -0.1]"])
    with pytest.raises(ConfigError, match=r"train\.edit_ratio\.lr_grid: picking a learning rate needs"):
        load_config(CONFIGS / "tiny.yaml", ["train.edit_ratio.lr_grid=[1e-3]", "train.edit_ratio.select_best=false"])
    with pytest.raises(ConfigError, match=r"train\.adapter\.weight_decay_grid: \[1\.0, -1\.0\]: a weight-decay grid needs"):
        load_config(CONFIGS / "tiny.yaml", ["train.adapter.weight_decay_grid=[1, -1]", "train.adapter.select_best=true"])
    with pytest.raises(ConfigError, match=r"train\.adapter\.weight_decay_grid: \[\]"):
        load_config(CONFIGS / "tiny.yaml", ["train.adapter.weight_decay_grid=[]", "train.adapter.select_best=true"])
    with pytest.raises(ConfigError, match=r"train\.vanilla\.weight_decay_grid: picking a weight decay needs"):
        load_config(CONFIGS / "tiny.yaml", ["train.vanilla.weight_decay_grid=[0, 1]", "train.vanilla.select_best=false"])
    with pytest.raises(ConfigError, match=r"holds out 2 of the 2 target sequences .* leaves none to train on"):
        load_config(CONFIGS / "tiny.yaml", ["data.target_fractions=[1.0, 0.01]"])
    with pytest.raises(ConfigError, match=r"sample\.methods: \['counts'\] estimate a Markov chain"):
        load_config(CONFIGS / "demo.yaml", ["sample.methods=[gtl, counts]"])
    with pytest.raises(ConfigError, match=r"eval\.ce_mask_rates: \[0\.5, 1\.0\]"):
        load_config(CONFIGS / "tiny.yaml", ["eval.ce_mask_rates=[0.5, 1.0]"])
    with pytest.raises(ConfigError, match=r"protocol\.folds=50 splits the 40 target sequences of fraction 0\.2"):
        load_config(CONFIGS / "tiny.yaml", ["protocol.selection=kfold", "protocol.folds=50"])
    with pytest.raises(ConfigError, match=r"protocol\.folds: 1: k-fold selection needs at least 2 folds"):
        load_config(CONFIGS / "tiny.yaml", ["protocol.selection=kfold", "protocol.folds=1"])


STUDIES = {"markov_study": ["markov.yaml", "markov_study.yaml"],
           "low_end": ["markov.yaml", "markov_perturbed.yaml", "markov_low_end.yaml"],
           "decay": ["markov.yaml", "markov_perturbed.yaml", "markov_low_end.yaml", "markov_decay.yaml"],
           "attention": ["markov.yaml", "markov_low_end.yaml", "markov_attention.yaml"],
           "capacity": ["markov.yaml", "markov_perturbed.yaml", "markov_low_end.yaml", "markov_capacity.yaml"],
           "kfold": ["markov.yaml", "markov_perturbed.yaml", "markov_low_end.yaml", "markov_kfold.yaml"],
           "demo_rank8": ["demo.yaml", "demo_rank8.yaml"]}


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_every_trained_method_of_a_study_gets_the_same_budget_and_search(study):
    """Equal budgets (docs/method.md §12): the same step budget, validation interval, patience,
    learning rates and number of runs for every per-target stage a study trains (a stage's second
    knob, a decay or a model, may be its own)."""
    from gtl_dist.eval.selection import trained_stage
    cfg = load_config([CONFIGS / name for name in STUDIES[study]])
    stages = {trained_stage(m) for m in cfg.sample.methods} - {None, "counts", "counts_source"}
    budgets = {stage: (tc.steps, tc.global_batch, tc.val_every, tc.patience, tc.ema, tc.select_best,
                       sorted({lr for lr, _, _ in tc.grid()}), len(tc.grid()))
               for stage in stages for tc in [getattr(cfg.train, stage)]}
    assert len({repr(b) for b in budgets.values()}) == 1, budgets
    assert len(stages) >= 3


@pytest.mark.parametrize("selection", ["holdout", "kfold"])
def test_the_counts_control_picks_its_prior_by_the_protocol_and_kfold_refits_on_every_sequence(tmp_path, selection):
    """docs/method.md §12 for the closed-form counts stage: under holdout the chain is fitted on the
    n_T sequences less the held-out part that picked its prior strength; under kfold the strength
    is picked by the folds (each fitted on the rest) and the chain refitted on all n_T."""
    import numpy as np
    import torch
    from gtl_dist.data import prepare_data, read_samples
    from gtl_dist.exports import read_export
    from gtl_dist.train import run_stage
    from gtl_dist.train.counts import posterior_mean, transition_counts
    cfg = load_config(CONFIGS / "tiny.yaml", [f"protocol.selection={selection}", "protocol.folds=4",
                                              "sample.methods=[counts]"])
    run_dir = tmp_path / "run"
    manifest = prepare_data(cfg, run_dir)
    n = manifest.num_samples("sticky/train", 0.2)
    meta = read_export(run_stage(cfg, run_dir, "counts", target="sticky", fraction=0.2).export)
    fitted_on = n if selection == "kfold" else n - max(2, round(0.2 * n))
    assert meta["meta"]["sequences"] == fitted_on
    grid = meta["meta"]["strength_grid"]
    assert [g["strength"] for g in grid] == cfg.models.counts.strengths and all(np.isfinite(g["val_loss"]) for g in grid)
    assert meta["meta"]["prior_strength"] == min(grid, key=lambda g: g["val_loss"])["strength"]
    counts = transition_counts(read_samples(manifest, "sticky/train", 0, fitted_on), cfg.data.markov.num_states)
    centre = np.full(counts.shape, 1.0 / counts.shape[0])
    expected = posterior_mean(counts, centre, meta["meta"]["prior_strength"])
    assert torch.allclose(meta["state_dict"]["matrix"].double(), torch.from_numpy(expected))
