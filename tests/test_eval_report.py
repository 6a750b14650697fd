"""The report: files exist and parse, results.csv round-trips, every (method, fraction) is in the
tables, the paper's numbers appear exactly where the set-up is the paper's, TensorBoard holds the
scalars and is replaced (not appended to) on a re-run."""

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from gtl_dist.config import load_config
from gtl_dist.methods import METHODS
from gtl_dist.data.markov import diagonal_matrix
from gtl_dist.eval.mauve import MauveResult
from gtl_dist.eval.paper import paper_rows
from gtl_dist.eval.report import MarkovMatrices, render_table, seeds_text, write_report
from gtl_dist.eval.results import ResultRow, mauve_row, read_results_csv, rows_from_metrics
from gtl_dist.paths import RunPaths
from gtl_dist.stages import run_variants

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _markov_rows(fractions):
    rows = []
    for i, method in enumerate(METHODS):
        for j, f in enumerate(fractions):
            rows += rows_from_metrics(method, "sticky", f, {
                "transition_mean_abs_err": 0.01 * (i + 1) + 0.1 * j,
                "transition_mean_abs_err[paper sampler]": 0.02 * (i + 1) + 0.1 * j,
                "nll_target_per_token": 0.5 + i / 7,
            }, n=4096)
    rows.append(ResultRow("target_chain", "sticky", None, "nll_target_per_token", 0.4,
                          notes='expected NLL of exact samples, "entropy", no seeds'))
    return rows


def _table(md: str, target: str, metric: str) -> dict[str, list[str]]:
    """Parse the markdown table under '## Target: target' / '### metric' into label -> cells."""
    section = md.split(f"## Target: {target}\n", 1)[1].split(f"### {metric}", 1)[1].split("\n", 1)[1]
    lines = [ln for ln in section.strip().splitlines()]
    out = {}
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out["_header"] = header[1:]
    for ln in lines[2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


@pytest.fixture(scope="module")
def markov_report(tmp_path_factory):
    # The paper's three n_T (1000 / 100 / 20 of a 5,000-sequence pool), where its numbers exist.
    cfg = load_config(CONFIGS / "markov.yaml", ["data.target_fractions=[0.2, 0.02, 0.004]"])
    paths = RunPaths(tmp_path_factory.mktemp("run"))
    rows = _markov_rows(cfg.data.target_fractions)
    q, p = diagonal_matrix(5, 0.8), diagonal_matrix(5, 0.1)
    est = {(m, f): diagonal_matrix(5, 0.7) for m in METHODS if m != "source"
           for f in cfg.data.target_fractions}
    est[("source", None)] = diagonal_matrix(5, 0.2)  # sampled once, for every fraction
    files = write_report(rows, paths, cfg, command="python launchers/submit.py --config configs/markov.yaml",
                         date="2026-01-02T03:04:05+00:00", markov={"sticky": MarkovMatrices(p, q, est)})
    return cfg, paths, rows, files


def test_results_csv_round_trips(markov_report):
    _, paths, rows, files = markov_report
    assert files.results_csv == paths.eval / "results.csv"
    assert read_results_csv(files.results_csv) == rows  # quotes and commas in notes survive


def test_table_has_every_method_and_fraction(markov_report):
    cfg, _, rows, files = markov_report
    md = files.report_md.read_text()
    table = _table(md, "sticky", "transition_mean_abs_err")
    assert table["_header"] == ["n_T = 1000", "n_T = 100", "n_T = 20"]  # a Markov run: its n_T
    for i, method in enumerate(METHODS):
        assert table[method] == [f"{0.01 * (i + 1) + 0.1 * j:.4g}" for j in range(3)]
    # The paper's numbers came from its 20-step sampler: they sit under the run's row measured
    # with that sampler (the markov preset is the paper's set-up), not under the exact sampler's.
    assert "gtl (paper)" not in table
    paper = _table(md, "sticky", "transition_mean_abs_err[paper sampler]")
    assert paper["gtl"] == [f"{0.02 + 0.1 * j:.4g}" for j in range(3)]
    assert paper["gtl (paper)"] == ["0.045", "0.077", "0.124"]
    assert paper["vanilla (paper)"] == ["0.053", "0.116", "0.19"]
    assert "source (paper)" not in paper  # the paper has no unguided-source number here
    nll = _table(md, "sticky", "nll_target_per_token")
    # A fraction-independent row (here the chain's own entropy) fills every column.
    assert nll["target_chain"] == ["0.4", "0.4", "0.4"] and "gtl (paper)" not in nll
    assert f"`{cfg.hash()}`" in md and "configs/markov.yaml" in md and "2026-01-02T03:04:05" in md


def test_plots_are_png_images(markov_report):
    _, paths, _, files = markov_report
    names = sorted(p.name for p in files.plots)
    assert names == ["nll_target_per_token.png", "transition_mean_abs_err.png",
                     "transition_mean_abs_err_paper_sampler.png", "transitions-sticky.png"]
    for p in files.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not [p for p in paths.eval.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_and_tables(markov_report):
    cfg, paths, rows, files = markov_report
    assert files.tensorboard == paths.tb("eval")
    acc, scalars = _scalars(files.tensorboard)
    assert scalars["sticky/transition_mean_abs_err/gtl"] == [
        (2000, pytest.approx(0.01)), (200, pytest.approx(0.11)), (40, pytest.approx(0.21))]
    assert len(scalars) == 3 * len(METHODS) + 1
    assert [s for s, _ in scalars["sticky/nll_target_per_token/target_chain"]] == [40, 200, 2000]
    assert any("report/sticky" in t for t in acc.Tags()["tensors"])


def test_rerun_replaces_tensorboard_events(markov_report):
    cfg, paths, rows, _ = markov_report
    write_report(rows[:1], paths, cfg, command="again", date="d", tensorboard=True)
    event_files = list(paths.tb("eval").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    _, scalars = _scalars(paths.tb("eval"))
    assert list(scalars) == ["sticky/transition_mean_abs_err/gtl"]
    assert not [p for p in paths.tb("eval").parent.iterdir() if p.name.startswith(".")]
    assert read_results_csv(paths.eval / "results.csv") == rows[:1]


def test_text_report_shows_paper_mauve_with_its_featuriser(tmp_path):
    cfg = load_config(CONFIGS / "arxiv.yaml", ["data.path=/data/arxiv.json"])
    paper = paper_rows(cfg)
    assert {(r.method, r.fraction) for r in paper} == {(m, f) for m in ("gtl", "vanilla", "finetune")
                                                        for f in (1.0, 0.3, 0.05, 0.01)}
    res = MauveResult(0.7, 0.01, (0.69, 0.71), "tfidf-svd", 102, 1024)
    rows = [mauve_row(m, "physics", f, res) for m in METHODS for f in (1.0, 0.3, 0.05, 0.01)]
    table = render_table(rows, paper, "physics", "mauve[tfidf-svd]")
    lines = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")[1:]]
             for ln in table.splitlines() if ln.startswith("| ") and "method" not in ln}
    assert lines["gtl"] == ["0.7 ± 0.01"] * 4
    assert lines["gtl (paper, mauve[gpt2-large])"] == ["0.719 ± 0.008", "0.689 ± 0.004",
                                                        "0.695 ± 0.006", "0.657 ± 0.004"]
    assert "2 seeds, 102 clusters" in table
    files = write_report(rows, RunPaths(tmp_path), cfg, command="c", date="d", tensorboard=False)
    assert files.tensorboard is None and (tmp_path / "eval" / "plots" / "mauve_tfidf-svd.png").is_file()


def test_paper_numbers_only_for_the_papers_setup():
    assert paper_rows(load_config(CONFIGS / "tiny.yaml")) == []
    assert paper_rows(load_config(CONFIGS / "markov.yaml", ["data.markov.length=30"])) == []
    overlap = load_config(CONFIGS / "arxiv.yaml", ["data.path=/x", "data.overlap=0.25"])
    assert paper_rows(overlap) == []


def test_bad_inputs_fail_with_the_file_named(tmp_path):
    with pytest.raises(ValueError, match="no result rows"):
        write_report([], RunPaths(tmp_path))
    bad = tmp_path / "results.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=str(bad)):
        read_results_csv(bad)
    bad.write_text("method,target,fraction,metric,value,std,n,ci_low,ci_high,notes\ngtl,t,half,m,1,,,,,\n")
    with pytest.raises(ValueError, match=rf"{bad}:2"):
        read_results_csv(bad)
    nan = tmp_path / "nan.csv"
    from gtl_dist.eval.results import write_results_csv
    write_results_csv(nan, [ResultRow("gtl", "t", 0.5, "distinct_1", float("nan"))])
    assert np.isnan(read_results_csv(nan)[0].value)


def test_the_cost_section_counts_exported_parameters_and_logged_step_time(tmp_path):
    """Parameters from each export's state dict; minutes from the train logs' throughput (steps
    since the previous record x global batch / samples_per_s), validation records ignored."""
    import json

    import torch

    from gtl_dist.eval.cost import render_costs, stage_costs, training_seconds
    from gtl_dist.exports import write_export
    log = [{"kind": "val", "step": 0, "loss": 1.0}, {"kind": "train", "step": 10, "samples_per_s": 20.0},
           {"kind": "train", "step": 20, "samples_per_s": 40.0}, {"kind": "val", "step": 20, "loss": 0.5}]
    assert training_seconds(log, global_batch=4) == pytest.approx(10 * 4 / 20 + 10 * 4 / 40)

    # edit_ratio runs a learning-rate grid: one log per run, each counted.
    grid = ["pipeline.seeds=[0, 1]", "train.edit_ratio.lr_grid=[0.001, 0.01]"]
    cfg = load_config(CONFIGS / "tiny.yaml", grid)
    paths = RunPaths(tmp_path)
    sizes = {"denoiser": 1000, "edit_ratio": 50, "finetune_small": 1000}
    for stage, size in sizes.items():
        cells = [(None, None, 0)] if stage == "denoiser" else [
            ("sticky", f, s) for f in cfg.data.target_fractions for s in (0, 1)]
        # A low-rank fine-tune exports its frozen base too: what it trains is the metadata's count.
        meta = {"stage": stage, **({"trainable_parameters": 30} if stage == "finetune_small" else {})}
        for target, fraction, seed in cells:
            write_export(paths.export(stage, target, fraction, seed), {"w": torch.zeros(size)}, meta)
            tc = getattr(cfg.train, stage)
            for log in paths.train_logs(stage, target, fraction, seed, run_variants(cfg, stage, fraction)):
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text(json.dumps({"kind": "train", "step": 60, "samples_per_s": tc.global_batch})
                               + "\n")  # 60 s
    cfg = load_config(CONFIGS / "tiny.yaml", [*grid, "sample.methods=[gtl_edit, finetune_small, source]"])
    costs = {c.stage: c for c in stage_costs(cfg, paths)}
    assert set(costs) == set(sizes)  # stages without an export are left out
    assert (costs["edit_ratio"].tasks, costs["edit_ratio"].parameters) == (4, 50)
    assert costs["finetune_small"].parameters == 30
    assert costs["denoiser"].minutes == [pytest.approx(1.0)]
    text = render_costs(list(costs.values()), "denoiser", ["gtl_edit", "finetune_small", "source"])
    assert "| edit_ratio | 4 | 50 | 2.0 | 8.0 |" in text  # two grid runs of 1 minute per task
    assert ("source denoiser's 1,000 parameters: gtl_edit trains 50 (edit_ratio, 5.0%); finetune_small "
            "trains 30 (finetune_small, 3.0%).") in text


def test_the_cost_of_a_kfold_task_counts_every_fold_and_the_refit(tmp_path):
    """Under protocol.selection=kfold a task trains each grid point once per fold, then the refit
    (docs/method.md §12): its cost is all of those runs' step time."""
    import json
    import torch
    from gtl_dist.eval.cost import stage_costs
    from gtl_dist.exports import write_export
    cfg = load_config(CONFIGS / "tiny.yaml", ["protocol.selection=kfold", "protocol.folds=3",
                                              "train.finetune.lr_grid=[0.001, 0.01]", "train.finetune.select_best=true",
                                              "sample.methods=[finetune, source]"])
    paths, tc = RunPaths(tmp_path), cfg.train.finetune
    variants = run_variants(cfg, "finetune", 0.2)
    assert variants == [f"lr-{lr}/fold-{f}" for lr in ("0.001", "0.01") for f in range(3)] + ["refit"]
    write_export(paths.export("finetune", "sticky", 0.2, 0), {"w": torch.zeros(10)}, {"stage": "finetune"})
    for log in paths.train_logs("finetune", "sticky", 0.2, 0, variants):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(json.dumps({"kind": "train", "step": 60, "samples_per_s": tc.global_batch}) + "\n")
    assert [c.minutes for c in stage_costs(cfg, paths) if c.stage == "finetune"] == [[pytest.approx(7.0)]]


@pytest.mark.parametrize("replicates,says", [
    ("redraw", "each seed is a replicate that draws its own n_T target sequences"),
    ("shared", "the same n_T target sequences for every seed"),
])
def test_the_report_says_what_each_seed_redraws(replicates, says):
    cfg = load_config(CONFIGS / "markov.yaml", [f"protocol.replicates={replicates}"])
    text = seeds_text(cfg)
    assert text.startswith("seeds: 3 (0, 1, 2); ") and says in text
    assert "the source denoiser" in text and "shared by all" in text
