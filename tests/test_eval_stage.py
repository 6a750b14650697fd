"""The evaluation stage end to end on sample shards laid out as the sampling stage writes them:
Markov (no networks) and text (hand-written classifier and reference LM callables)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gtl_dist.config import load_config
from gtl_dist.data.markov import sample_sequences, transition_matrices
from gtl_dist.eval.evaluate import run_eval
from gtl_dist.eval.evaluate_text import HeldOut, evaluate_text
from gtl_dist.eval.results import read_results_csv
from gtl_dist.eval.samples import read_samples
from gtl_dist.models import VocabSpec
from gtl_dist.paths import RunPaths

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write_shards(folder: Path, tokens, texts=None, shards=2):
    folder.mkdir(parents=True, exist_ok=True)
    n = len(tokens)
    for s, idx in enumerate(np.array_split(np.arange(n), shards)):
        lines = [json.dumps({"tokens": [int(t) for t in tokens[i]],
                             "text": None if texts is None else texts[i], "seed": s, "index": int(i)})
                 for i in idx]
        (folder / f"shard-{s:04d}.jsonl").write_text("".join(ln + "\n" for ln in lines))


def export_chain(cfg, paths: RunPaths, stage: str, matrix, target=None, fraction=None, seed=0) -> None:
    """Stand in for a trained stage: the exact denoiser of ``matrix``, exported under ``stage``."""
    from dataclasses import asdict

    from gtl_dist.exports import write_export
    from gtl_dist.models import VocabSpec
    from gtl_dist.models.chain import ChainDenoiser, MarkovChain
    from gtl_dist.stages import stage_input_hash
    states = cfg.data.markov.num_states
    net = ChainDenoiser(MarkovChain(matrix), cfg.seq_len)
    write_export(paths.export(stage, target, fraction, seed), net.state_dict(), {
        "role": "chain", "config": cfg.to_dict(), "seq_len": cfg.seq_len, "stage": stage,
        "vocab": asdict(VocabSpec(size=states + 1, mask_id=states, data_ids=states)), "finished": True,
        "input_hash": stage_input_hash(cfg, stage, target, fraction, seed), "step": 5, "trained_steps": 10})


def chain_run(tmp_path: Path, markers: bool = False):
    """A finished tiny Markov run whose networks are exact chains: ``counts`` holds the target
    chain Q and samples from it, every other method the source chain P. With ``markers`` every
    sample set has its task's DONE file (input hash: the set's folder), as a real run's has."""
    from gtl_dist.data import prepare_data
    cfg = load_config(CONFIGS / "tiny.yaml", ["sample.num_samples=400", "eval.ladder=false",
                                              "sample.methods=[counts, source, vanilla, finetune]",
                                              "eval.ce_sequences=150"])
    paths = RunPaths(tmp_path)
    prepare_data(cfg, tmp_path)
    chains = transition_matrices(cfg.data.markov)
    q, p = chains["sticky"], chains["source"]
    rng = np.random.default_rng(0)
    L, n = cfg.data.markov.length, cfg.sample.num_samples
    export_chain(cfg, paths, "denoiser", p)
    for f in cfg.data.target_fractions:
        _write_shards(paths.samples("counts", "sticky", f), sample_sequences(q, n, L, rng))
        export_chain(cfg, paths, "counts", q, "sticky", f)
        for m in ("vanilla", "finetune"):
            _write_shards(paths.samples(m, "sticky", f), sample_sequences(p, n, L, rng))
            export_chain(cfg, paths, m, p, "sticky", f)
    _write_shards(paths.samples("source", None, None), sample_sequences(p, n, L, rng))
    for folder in (paths.root / "samples").glob("**/shard-0000.jsonl") if markers else ():
        (folder.parent / "DONE-0000.json").write_text(json.dumps({"input_hash": str(folder.parent)}))
    return cfg, paths


def test_markov_stage_scores_every_cell_and_writes_the_report(tmp_path):
    """Exact chains stand in for the trained networks (chain_run). The masked cross-entropy of
    Q's own denoiser is the exact target's forward–backward value (the floor), P's is the source's."""
    cfg, paths = chain_run(tmp_path)
    files = run_eval(cfg, paths, command="test")
    rows = read_results_csv(files.results_csv)
    err = {(r.method, r.fraction): r.value for r in rows if r.metric == "transition_mean_abs_err"}
    assert set(err) == {("counts", 1.0), ("counts", 0.2), ("vanilla", 1.0), ("vanilla", 0.2),
                        ("finetune", 1.0), ("finetune", 0.2), ("source", None),
                        ("exact target chain", None), ("exact source chain", None)}
    assert max(err[("counts", f)] for f in (1.0, 0.2)) < 0.03
    assert min(v for k, v in err.items() if k[0] in ("vanilla", "finetune", "source")) > 0.25
    ce = {(r.method, r.fraction): r.value for r in rows if r.metric == "masked_ce"}
    assert ce[("counts", 1.0)] == pytest.approx(ce[("exact target chain", None)], abs=1e-6)
    assert ce[("vanilla", 0.2)] == pytest.approx(ce[("exact source chain", None)], abs=1e-6)
    assert ce[("exact target chain", None)] < ce[("exact source chain", None)] - 0.5
    paired = {(r.method, r.fraction): r for r in rows if r.metric == "paired_diff[masked_ce]"}
    assert paired == {}  # no gtl in this run: nothing to pair against
    chain = {r.metric: r.value for r in rows if r.method == "target_chain"}
    nll = [r.value for r in rows if r.method == "counts" and r.metric == "nll_target_per_token"]
    assert all(abs(v - chain["nll_target_per_token"]) < 0.05 for v in nll)
    assert (paths.eval / "plots" / "transitions-sticky.png").is_file()
    report = files.report_md.read_text()
    assert "| source |" in report
    assert "### transition_mean_abs_err (lower is better)" in report
    assert "### masked_ce (lower is better: nats per masked token" in report
    assert "## Checks\n\nAll passed" in report  # every sample set was drawn on its own
    assert "| vanilla | vanilla | 20 | 32 | 10 | 0.003 |" in report


def test_a_rerun_evaluation_scores_only_the_sample_sets_whose_tasks_changed(tmp_path, monkeypatch):
    """Each set's network scores are kept under its sample tasks' input hashes (eval/scores/): a
    second evaluation of the same run scores no set again and writes the same results; after one
    set's samples were redrawn (its task's input hash changed) it scores that set alone. (The
    exact chains' reference rows, two per target, are scored every time.)"""
    from gtl_dist.eval import evaluate_markov
    cfg, paths = chain_run(tmp_path, markers=True)
    markers = sorted((paths.root / "samples").glob("**/DONE-0000.json"))
    scored = []
    real = evaluate_markov.network_scores
    monkeypatch.setattr(evaluate_markov, "network_scores", lambda *args: scored.append(args) or real(*args))
    first = run_eval(cfg, paths, command="test").results_csv.read_text()
    assert len(scored) == len(markers) + 2
    assert run_eval(cfg, paths, command="test").results_csv.read_text() == first
    assert len(scored) == len(markers) + 2 + 2
    markers[0].write_text(json.dumps({"input_hash": "redrawn"}))
    run_eval(cfg, paths, command="test")
    assert len(scored) == len(markers) + 2 + 2 + 3


def test_heldout_curves_show_where_selection_stopped_and_how_far_the_loss_climbed(tmp_path):
    """The report's held-out curves come from the kept learning rate's train_log.jsonl: a
    replicate stopped early by patience stays at its last loss, a step logged twice (a resumed
    run) keeps its last value, and heldout_ce[kept] / [last] give the loss at the kept step and
    at the last validation."""
    from gtl_dist.eval.report import plot_heldout_curves
    from gtl_dist.eval.selection import heldout_curves, selection_rows
    from gtl_dist.exports import write_export
    from gtl_dist.paths import grid_variant
    cfg = load_config(CONFIGS / "tiny.yaml", ["sample.methods=[finetune]", "data.target_fractions=[0.2]",
                                              "pipeline.seeds=[0, 1]", "train.finetune.lr_grid=[0.001, 0.01]",
                                              "train.finetune.select_best=true"])
    paths = RunPaths(tmp_path)
    logs = {0: [(0, 2.0), (10, 1.5), (20, 1.2), (20, 1.1), (30, 1.4)],  # resumed at 20: its last value counts
            1: [(0, 2.0), (10, 1.3)]}  # stopped by patience after step 10
    for seed, points in logs.items():
        kept_step = min(points, key=lambda p: p[1])[0] if seed else 20
        config = cfg.to_dict()
        config["train"]["finetune"]["lr"] = 0.01
        write_export(paths.export("finetune", "sticky", 0.2, seed), {}, {
            "stage": "finetune", "target": "sticky", "fraction": 0.2, "config": config, "step": kept_step,
            "trained_steps": points[-1][0], "val_loss": 1.1 if seed == 0 else 1.3,
            "lr_grid": [{"lr": 0.001}, {"lr": 0.01}]})
        folder = paths.stage("finetune", "sticky", 0.2, seed, grid_variant(0.01))
        folder.mkdir(parents=True)
        (folder / "train_log.jsonl").write_text("".join(
            json.dumps({"step": s, "kind": "val", "loss": v}) + "\n" + json.dumps({"step": s, "kind": "train", "loss": 9.0}) + "\n"
            for s, v in points))
    rows = {(r.metric): r for r in selection_rows(cfg, paths)}
    assert rows["heldout_ce[kept]"].value == pytest.approx((1.1 + 1.3) / 2)
    assert rows["heldout_ce[last]"].value == pytest.approx((1.4 + 1.3) / 2)
    assert rows["kept_step"].value == 15 and rows["out_of_budget"].value == 0.5  # seed 1 kept its last step
    curve = heldout_curves(cfg, paths)["sticky"][0.2]["finetune"]
    assert list(curve.steps) == [0, 10, 20, 30] and curve.replicates == 2 and curve.kept_step == 15
    assert curve.mean_loss == pytest.approx([2.0, (1.5 + 1.3) / 2, (1.1 + 1.3) / 2, (1.4 + 1.3) / 2])
    png = plot_heldout_curves(heldout_curves(cfg, paths)["sticky"], "sticky", tmp_path / "plots")
    assert png.name == "heldout_curves-sticky.png" and png.read_bytes().startswith(b"\x89PNG")


def test_a_searched_weight_decay_is_reported_and_its_run_gives_the_curve(tmp_path):
    """With train.<stage>.weight_decay_grid the report gives the kept decay per replicate, and the
    held-out curve comes from the kept (learning rate, decay) run's folder."""
    from gtl_dist.eval.selection import heldout_curves, selection_rows
    from gtl_dist.exports import write_export
    from gtl_dist.paths import grid_variant
    cfg = load_config(CONFIGS / "tiny.yaml", ["sample.methods=[finetune]", "data.target_fractions=[0.2]",
                                              "pipeline.seeds=[0, 1]", "train.finetune.weight_decay_grid=[0, 3]",
                                              "train.finetune.select_best=true"])
    paths = RunPaths(tmp_path)
    for seed, decay in ((0, 0.0), (1, 3.0)):
        config = cfg.to_dict()
        config["train"]["finetune"].update(weight_decay=decay, weight_decay_grid=None)
        lr = config["train"]["finetune"]["lr"]
        write_export(paths.export("finetune", "sticky", 0.2, seed), {}, {
            "stage": "finetune", "target": "sticky", "fraction": 0.2, "config": config, "step": 10,
            "trained_steps": 20, "val_loss": 1.0 + seed,
            "lr_grid": [{"lr": lr, "weight_decay": 0.0}, {"lr": lr, "weight_decay": 3.0}]})
        folder = paths.stage("finetune", "sticky", 0.2, seed, grid_variant(lr, decay))
        folder.mkdir(parents=True)
        (folder / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "kind": "val", "loss": v}) + "\n"
                                                        for s, v in ((10, 1.0 + seed), (20, 2.0 + seed))))
    rows = {r.metric: r for r in selection_rows(cfg, paths)}
    assert rows["kept_weight_decay"].value == 1.5 and rows["heldout_ce[last]"].value == 2.5
    assert list(heldout_curves(cfg, paths)["sticky"][0.2]["finetune"].steps) == [10, 20]


def test_a_searched_model_is_reported_and_its_run_gives_the_curve(tmp_path):
    """With train.<stage>.model_grid the report gives the kept entry per replicate (kept_model),
    and the held-out curve comes from the kept model's run folder (lr-<value>-m-<index>)."""
    from gtl_dist.eval.selection import heldout_curves, render_budgets, selection_rows
    from gtl_dist.exports import write_export
    from gtl_dist.paths import grid_variant
    cfg = load_config(CONFIGS / "tiny.yaml", ["sample.methods=[gtl]", "data.target_fractions=[0.2]",
                                              "pipeline.seeds=[0, 1, 2]", "train.adapter.select_best=true",
                                              "train.adapter.model_grid=[{attention: false}, {attention: true}]"])
    paths = RunPaths(tmp_path)
    for seed, model in ((0, 0), (1, 1), (2, 1)):
        config = cfg.to_dict()
        lr = config["train"]["adapter"]["lr"]
        write_export(paths.export("adapter", "sticky", 0.2, seed), {}, {
            "stage": "adapter", "target": "sticky", "fraction": 0.2, "config": config, "step": 10,
            "trained_steps": 20, "val_loss": 1.0, "model_index": model,
            "lr_grid": [{"lr": lr, "model": 0}, {"lr": lr, "model": 1}]})
        folder = paths.stage("adapter", "sticky", 0.2, seed, grid_variant(lr, None, model))
        folder.mkdir(parents=True)
        (folder / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "kind": "val", "loss": v}) + "\n"
                                                        for s, v in ((10, 1.0), (30, 2.0))))
    rows = {r.metric: r for r in selection_rows(cfg, paths)}
    assert rows["kept_model"].value == pytest.approx(2 / 3) and rows["heldout_ce[last]"].value == 2.0
    assert list(heldout_curves(cfg, paths)["sticky"][0.2]["gtl"].steps) == [10, 30]
    assert "0: attention False; 1: attention True |" in render_budgets(cfg)


def test_missing_or_mixed_shards_are_named(tmp_path):
    folder = tmp_path / "samples" / "gtl" / "sticky" / "1"
    with pytest.raises(FileNotFoundError, match="no sample shards"):
        read_samples(folder)
    _write_shards(folder, [[0, 1]] * 4, shards=2)
    assert [r["index"] for r in read_samples(folder, expected=4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="expected 0..5"):
        read_samples(folder, expected=6)
    (folder / "shard-0002.jsonl").write_text(json.dumps({"tokens": [1], "index": 0}) + "\n")
    with pytest.raises(ValueError, match="repeat"):
        read_samples(folder)
    (folder / "shard-0002.jsonl").write_text('{"tokens": [1, "x"], "index": 9}\n')
    with pytest.raises(ValueError, match=r"shard-0002.jsonl:1: 'tokens'"):
        read_samples(folder)


VOCAB = VocabSpec(size=11, mask_id=10)  # the text tests' ids: 0..9 words, 10 [MASK]


def spread_over(*ids_and_weights):
    """A conditional that gives every masked position the same distribution: weight w spread
    evenly over each id group, summed."""
    p = torch.zeros(VOCAB.size, dtype=torch.float64)
    for ids, weight in ids_and_weights:
        p[list(ids)] += weight / len(ids)
    return lambda z: torch.log(p).expand(*z.shape, VOCAB.size).clone()


TARGET_IDS, ALL_IDS = range(5), range(10)


def test_text_stage_with_callable_networks(tmp_path):
    cfg = load_config(CONFIGS / "arxiv.yaml", ["data.path=/x", "data.target_fractions=[1.0, 0.3]",
                                                "sample.num_samples=30", "eval.mauve_seeds=2",
                                                "eval.mauve_min_samples=30", "pipeline.seeds=[0, 1]",
                                                "sample.methods=[gtl, gtl_paper, source, vanilla, finetune]"])
    paths = RunPaths(tmp_path)
    rng = np.random.default_rng(0)

    def sample_set(lo):
        toks = rng.integers(lo, lo + 5, size=(30, 12))
        return toks, [" ".join(f"w{t}" for t in row) for row in toks]

    unchanged = sample_set(0)  # gtl draws the same set at every fraction: the report must say so
    degenerate = np.zeros((30, 12), dtype=int), ["w0 " * 12] * 30  # one text, repeated
    for seed in cfg.pipeline.seeds:
        for f in cfg.data.target_fractions:
            _write_shards(paths.samples("gtl", "physics", f, seed), *unchanged)
            _write_shards(paths.samples("gtl_paper", "physics", f, seed), *sample_set(0))
            _write_shards(paths.samples("vanilla", "physics", f, seed), *(degenerate if f == 0.3 else sample_set(0)))
            _write_shards(paths.samples("finetune", "physics", f, seed), *sample_set(0))
        _write_shards(paths.samples("source", None, None, seed), *sample_set(5))
    target_tokens, target_texts = sample_set(0)
    source_tokens, source_texts = sample_set(5)
    classifier_calls, masks = [], {}

    def classifier(target):
        classifier_calls.append(target)
        return lambda tokens: (tokens.mean(axis=1) - 5.0)  # high ids look like source

    # gtl and finetune know the target's words, vanilla half of them, the source none.
    conditionals = {"gtl": spread_over((TARGET_IDS, 1.0)), "finetune": spread_over((TARGET_IDS, 1.0)),
                    "vanilla": spread_over((TARGET_IDS, 0.5), (ALL_IDS, 0.5)), "source": spread_over((ALL_IDS, 1.0))}

    def conditional(method, target, fraction, seed):
        if method == "gtl_paper":
            return None  # a sequence-level ratio network: not scored on text

        def log_probs(z):
            masks.setdefault((method, fraction, seed), []).append(z.clone())
            return conditionals[method](z)
        return log_probs

    evaluator = sample_set(0)
    out = evaluate_text(
        cfg, paths, references={"physics": HeldOut(target_texts, target_tokens.tolist())},
        source_heldout=HeldOut(source_texts, source_tokens.tolist()),
        evaluator_texts={"physics": HeldOut(evaluator[1], evaluator[0].tolist())}, classifier=classifier,
        reference_lm=lambda target: (lambda t: np.zeros(t.shape + (VOCAB.size,))), conditional=conditional,
        vocab=VOCAB)
    by = {(r.method, r.fraction, r.metric): r for r in out.rows}
    # The primary score: masked cross-entropy on identical masks, nats per masked token.
    assert by[("gtl", 1.0, "masked_ce")].value == pytest.approx(math.log(5))
    assert by[("source", None, "masked_ce")].value == pytest.approx(math.log(10))
    assert by[("vanilla", 0.3, "masked_ce")].value == pytest.approx(-math.log(0.5 / 5 + 0.5 / 10))
    assert by[("gtl", 0.3, "ce_gain")].value == pytest.approx(math.log(2))
    first = next(iter(masks.values()))
    assert len(masks) == 3 * 2 * 2 + 1 and all(len(z) == len(first) for z in masks.values())
    assert all(torch.equal(a, b) for z in masks.values() for a, b in zip(z, first))
    assert math.isnan(by[("gtl_paper", 1.0, "masked_ce")].value) and "not scored" in by[("gtl_paper", 1.0, "masked_ce")].notes
    # Paired over the two replicates: vanilla is worse than gtl on every one, finetune the same.
    paired = by[("vanilla", 1.0, "paired_diff[masked_ce]")]
    assert paired.value == pytest.approx(-math.log(0.15) - math.log(5)) and paired.notes.endswith("gtl wins")
    assert by[("finetune", 1.0, "paired_diff[masked_ce]")].notes.endswith("gtl ties")
    assert by[("source", 0.3, "paired_diff[masked_ce]")].value == pytest.approx(math.log(2))
    # The domain score, and its distance to held-out target text's: one evaluator's classifier
    # scores every set; held-out text of both domains calibrates it.
    assert classifier_calls == ["physics"]
    assert by[("source", None, "domain_pct_target")].value == 0.0
    assert by[("gtl", 1.0, "domain_pct_target")].value == 100.0
    assert by[("heldout_target", None, "domain_pct_target")].value == 100.0
    assert by[("heldout_source", None, "domain_pct_target")].value == 0.0
    assert by[("gtl", 1.0, "domain_distance")].value < 0.05 < 0.7 < by[("source", None, "domain_distance")].value
    assert by[("heldout_source", None, "domain_distance")].value > 0.7
    assert by[("source", 1.0, "paired_diff[domain_distance]")].notes.endswith("gtl wins")
    # MAUVE, with held-out target text against the test references as the ceiling.
    ceiling = by[("heldout_target", None, "mauve[tfidf-svd]")]
    assert ceiling.n == 30 and "ceiling" in ceiling.notes
    assert ceiling.value > 0.5 > by[("vanilla", 0.3, "mauve[tfidf-svd]")].value + 0.3
    assert by[("source", None, "mauve[tfidf-svd]")].value < 0.01  # disjoint vocabulary
    # A reference LM no better than uniform guessing (perplexity |V|): its own perplexity is
    # shown, gen_ppl is not.
    assert by[("heldout_target", None, "reference_lm_ppl")].value == pytest.approx(VOCAB.size)
    assert not any(r.metric == "gen_ppl" for r in out.rows)
    assert by[("heldout_target", None, "distinct_1")].value == pytest.approx(5 / (30 * 12))
    assert out.examples["gtl physics @ 30% (seed 0)"] == unchanged[1][:3]
    assert set(out.examples) == {f"{m} physics @ {f}% (seed 0)" for m in ("gtl", "gtl_paper", "vanilla", "finetune")
                                 for f in (100, 30)} | {"source (seed 0)"}
    assert out.findings[:2] == [
        "target physics: poor overlap with the source: the evaluator's domain classifier tells held-out physics "
        "text from held-out source text with 100.0% balanced accuracy (eval.overlap_warn_accuracy = 0.99); "
        "guidance of the source model can only reweight what it already generates, so expect GTL's gain over "
        "the source to be small here",
        "target physics: gen_ppl dropped: the reference LM's own perplexity on held-out physics text is 11, not "
        "far below the vocabulary size |V| = 11 that uniform guessing scores (eval.gen_ppl_max_vocab_share = "
        "0.25 allows 3), so it cannot tell good text from bad; give it more text (data.evaluator_fraction) or "
        "train it longer (train.reference_lm)"]
    assert out.findings[2].startswith("identical samples: gtl physics @ 100% (seed 0), gtl physics @ 100% "
                                      "(seed 1), gtl physics @ 30% (seed 0), gtl physics @ 30% (seed 1) drew")
    with pytest.raises(ValueError, match="no reference texts for target 'physics'"):
        evaluate_text(cfg, paths, references={})


def test_gen_ppl_needs_a_reference_lm_far_below_uniform_guessing(tmp_path):
    """A reference LM that knows the target's five words (perplexity 5 on its text, |V| = 11):
    generative perplexity is reported where eval.gen_ppl_max_vocab_share allows 5, dropped where not."""
    settings = ["data.path=/x", "data.target_fractions=[1.0]", "sample.num_samples=10", "eval.mauve_seeds=1",
                "eval.mauve_min_samples=10", "sample.methods=[source]"]
    paths = RunPaths(tmp_path)
    tokens = np.random.default_rng(2).integers(0, 5, size=(10, 8))
    texts = [" ".join(f"w{t}" for t in row) for row in tokens]
    _write_shards(paths.samples("source", None, None), tokens, texts)
    knows_the_target = lambda target: (lambda t: np.where(np.arange(VOCAB.size) < 5, 0.0, -np.inf)  # noqa: E731
                                       * np.ones(t.shape + (VOCAB.size,)))
    for share, kept in ((0.5, True), (0.4, False)):
        cfg = load_config(CONFIGS / "arxiv.yaml", settings + [f"eval.gen_ppl_max_vocab_share={share}"])
        out = evaluate_text(cfg, paths, references={"physics": HeldOut(texts, tokens.tolist())},
                            reference_lm=knows_the_target, vocab=VOCAB)
        ppl = {(r.method, r.metric): r.value for r in out.rows if r.metric in ("gen_ppl", "reference_lm_ppl")}
        assert ppl[("heldout_target", "reference_lm_ppl")] == pytest.approx(5.0)
        assert (("source", "gen_ppl") in ppl) == kept, share
        assert any("gen_ppl dropped" in f for f in out.findings) != kept


def test_a_domain_score_that_cannot_separate_the_domains_is_flagged(tmp_path):
    cfg = load_config(CONFIGS / "arxiv.yaml", ["data.path=/x", "data.target_fractions=[1.0]",
                                                "sample.num_samples=8", "eval.mauve_seeds=1",
                                                "sample.methods=[source]"])
    paths = RunPaths(tmp_path)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 9, size=(8, 6))
    texts = [" ".join(f"w{t}" for t in row) for row in tokens]
    _write_shards(paths.samples("source", None, None), tokens, texts)
    heldout = HeldOut(texts, tokens.tolist())
    out = evaluate_text(cfg, paths, references={"physics": heldout}, source_heldout=heldout,
                        classifier=lambda target: (lambda t: np.full(len(t), -3.0)))
    assert [r.value for r in out.rows if r.method == "source" and r.metric == "domain_pct_target"] == [100.0]
    assert out.findings == [
        "MAUVE compares 8 samples per set, fewer than eval.mauve_min_samples = 512: on small sets its "
        "clustering is noisy enough to rank the methods at random; raise sample.num_samples",
        "target physics: the domain classifier calls 100% of held-out physics text and 100% of held-out source "
        "text target-like; it does not separate the domains, so domain_pct_target / domain_source_prob say "
        "nothing about the samples"]
    report = run_eval(cfg, paths, command="test", references={"physics": heldout}, source_heldout=heldout,
                      classifier=lambda target: (lambda t: np.full(len(t), -3.0))).report_md.read_text()
    assert "## Checks" in report and "it does not separate the domains" in report
    assert (paths.eval / "samples.md").read_text().count("> w") == 3  # the first 3 samples
    assert "### domain_pct_target (higher is more target-like)" in report


def test_a_run_with_overlap_says_so_in_its_report_header(tmp_path):
    """data.overlap moves target documents into the source's training set: the header counts them,
    per target, from the built data (tiny: round(0.1 · 200) = 20 of the 200 sticky sequences)."""
    from gtl_dist.data import prepare_data
    from gtl_dist.eval.evaluate import overlap_notes
    from gtl_dist.eval.report import render_header
    cfg = load_config(CONFIGS / "tiny.yaml", ["data.overlap=0.1"])
    prepare_data(cfg, tmp_path)
    notes = overlap_notes(cfg, RunPaths(tmp_path))
    assert notes == ["**data overlap**: data.overlap = 0.1 moved part of each target's training documents into "
                     "the source's training set (sticky: 20 of 200), so the source model has seen target text "
                     "and its gain over the source is not a transfer from the source alone (docs/method.md §8)"]
    assert f"\n- {notes[0]}\n" in render_header(cfg, "the command", "today", notes)
    assert overlap_notes(load_config(CONFIGS / "tiny.yaml"), RunPaths(tmp_path)) == []
