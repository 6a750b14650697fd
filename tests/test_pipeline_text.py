"""The text path of the pipeline end to end, in-process (--cluster debug): a JSONL corpus,
SentencePiece, shards, every training stage including the planner and the evaluator's reference LM
and domain classifier, the GTL planner sampler, decoded samples, and the text report (masked
cross-entropy, MAUVE with the offline featuriser and its ceiling, the classifier domain score,
generative perplexity, diversity). The run moves a tenth of the target's training documents into
the source (data.overlap), which the report's header must say. The evaluation is then run again
in this process with every export it loads recorded: it must load exactly its declared
dependencies, as test_stages.py checks for the stage and sample tasks."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from text_corpus import write_corpus

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/tiny.yaml", "tests/configs/tiny_text.yaml"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[str]]:
    tmp_path = tmp_path_factory.mktemp("text")
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus)
    run_dir = tmp_path / "run"
    settings = [f"data.path={corpus}", "data.overlap=0.1"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "launchers" / "submit.py"), "--config", CONFIGS[0], "--config", CONFIGS[1],
         *(arg for s in settings for arg in ("--set", s)), "--cluster", "debug", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, "GTL_NO_PROGRESS_BAR": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return run_dir, settings


def test_text_pipeline_runs_in_process_to_a_report(run):
    run_dir, _ = run
    # Samples are decoded text from the tokenizer, one shard per (method, target, fraction).
    records = [json.loads(line) for line in
               (run_dir / "samples" / "gtl" / "gardening" / "1" / "shard-0000.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all(isinstance(r["text"], str) and r["text"] for r in records)
    assert (run_dir / "planner" / "export" / "model.pt").is_file()
    for stage in ("reference_lm", "domain_classifier"):
        assert (run_dir / stage / "gardening" / "export" / "model.pt").is_file()

    with open(run_dir / "eval" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    value = {(r["method"], r["fraction"], r["metric"]): float(r["value"]) for r in rows}
    metrics = {r["metric"] for r in rows}
    assert {"mauve[tfidf-svd]", "domain_source_prob", "domain_distance", "distinct_2", "masked_ce", "ce_gain",
            "paired_diff[masked_ce]", "reference_lm_ppl"} <= metrics, metrics
    for method in ("gtl", "gtl_edit", "vanilla", "finetune"):
        for fraction in ("1.0", "0.5"):
            assert math.isfinite(value[(method, fraction, "masked_ce")]), (method, fraction)
            assert (method, fraction, "mauve[tfidf-svd]") in value, (method, fraction)
    # gtl's adapter and gtl_edit's edit-ratio net are scored as the guided conditional they sample
    # from; gtl_paper's sequence-level ratio network is not (L·|V| passes per sequence).
    assert math.isfinite(value[("gtl", "1.0", "ce_gain")]) and math.isfinite(value[("gtl_edit", "0.5", "ce_gain")])
    assert math.isnan(value[("gtl_paper", "1.0", "masked_ce")])
    assert ("vanilla", "1.0", "paired_diff[masked_ce]") in value
    # The domain score is calibrated on held-out text of both domains, which two word lists
    # that share nothing separate perfectly; MAUVE's ceiling is held-out text against held-out text.
    assert value[("heldout_target", "", "domain_pct_target")] > 90
    assert value[("heldout_source", "", "domain_pct_target")] < 10
    assert ("heldout_target", "", "mauve[tfidf-svd]") in value
    # Generative perplexity only under a reference LM far below uniform guessing.
    report = (run_dir / "eval" / "report.md").read_text()
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    usable = value[("heldout_target", "", "reference_lm_ppl")] < 0.25 * manifest["vocab_size"]
    assert ("gen_ppl" in metrics) == usable and ("gen_ppl dropped" in report) != usable
    assert "tfidf-svd" in report and "gardening" in report
    assert "## Checks" in report and "mauve[tfidf-svd] (higher is better)" in report
    # Two word lists that share nothing: the poor-overlap guard fires.
    assert "target gardening: poor overlap with the source" in report
    assert "## Cost" in report and "| adapter | 2 |" in report and "gtl trains" in report
    # The header says how much target text the source saw.
    header = report.split("## Checks")[0]
    moved = manifest["info"]["domain_documents"]["source/train"]
    assert moved["gardening"] > 0
    assert f"data.overlap = 0.1 moved part of each target's training documents into the source's training " \
           f"set (gardening: {moved['gardening']} of " in header


def test_the_evaluation_loads_exactly_its_dependencies(run, monkeypatch):
    import gtl_dist.exports as exports
    from gtl_dist.cluster.tasks import _evaluate
    from gtl_dist.config import load_config
    from gtl_dist.paths import RunPaths
    from gtl_dist.stages import StageGraph, Task
    from test_stages import declared_exports

    run_dir, settings = run
    loaded: list[str] = []
    read_meta = exports.read_export_meta

    def recording(path):
        loaded.append(str(path))
        return read_meta(path)

    monkeypatch.setattr(exports, "read_export_meta", recording)
    cfg = load_config([REPO / c for c in CONFIGS], settings)
    _evaluate(cfg, RunPaths(run_dir), None)
    declared = declared_exports(StageGraph(cfg), str(run_dir), Task("eval"))
    assert sorted(set(loaded)) == declared, (
        "the evaluation loads exports its task does not declare (fix StageGraph.task_deps for 'eval'), or "
        "declares some it never loads")
