"""The text path of the pipeline end to end, in-process (--cluster debug): a JSONL corpus,
SentencePiece, shards, every training stage including the planner and the reference LM, the GTL
planner sampler, decoded samples, and the text report (MAUVE with the offline featuriser, the
classifier domain score, generative perplexity, diversity)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from text_corpus import write_corpus

REPO = Path(__file__).resolve().parents[1]


def test_text_pipeline_runs_in_process_to_a_report(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launchers" / "submit.py"), "--config", "configs/tiny.yaml",
         "--config", "tests/configs/tiny_text.yaml", "--set", f"data.path={corpus}",
         "--cluster", "debug", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, "GTL_NO_PROGRESS_BAR": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # Samples are decoded text from the tokenizer, one shard per (method, target, fraction).
    records = [json.loads(line) for line in
               (run_dir / "samples" / "gtl" / "gardening" / "1" / "shard-0000.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all(isinstance(r["text"], str) and r["text"] for r in records)
    assert (run_dir / "planner" / "export" / "model.pt").is_file()
    assert (run_dir / "reference_lm" / "gardening" / "export" / "model.pt").is_file()

    with open(run_dir / "eval" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    metrics = {r["metric"] for r in rows}
    assert {"mauve[tfidf-svd]", "domain_source_prob", "gen_ppl", "distinct_2"} <= metrics, metrics
    for method in ("gtl", "vanilla", "finetune"):
        for fraction in ("1.0", "0.5"):
            assert any(r["method"] == method and r["fraction"] == fraction and r["metric"] == "mauve[tfidf-svd]"
                       for r in rows), (method, fraction)
    # The domain score is calibrated on held-out text of both domains, which two word lists
    # that share nothing separate perfectly.
    heldout = {(r["method"], r["metric"]): float(r["value"]) for r in rows if r["method"].startswith("heldout_")}
    assert heldout[("heldout_target", "domain_pct_target")] > 90
    assert heldout[("heldout_source", "domain_pct_target")] < 10
    # Every edit-ratio net is scored on the held-out text against the source alone.
    gains = {r["fraction"]: float(r["value"]) for r in rows if r["metric"] == "guide_ce_gain"}
    assert set(gains) == {"1.0", "0.5"} and all(math.isfinite(v) for v in gains.values()), gains
    report = (run_dir / "eval" / "report.md").read_text()
    assert "tfidf-svd" in report and "gardening" in report
    assert "## Checks" in report and "mauve[tfidf-svd] (higher is better)" in report
    # Two word lists that share nothing: the poor-overlap guard fires.
    assert "target gardening: poor overlap with the source" in report
    assert "## Cost" in report and "| edit_ratio | 2 |" in report and "gtl trains" in report
