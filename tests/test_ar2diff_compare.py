"""results/ar2diff/compare.py: AR2Diff against a from-scratch denoiser at equal total steps. At toy
size on the toy text corpus (--cluster debug): both routes run through launchers/submit.py to a
report, the CSV / plot / README come out, the two run configs differ in pipeline.ar2diff alone, and
a second invocation reuses both finished runs without training anything."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from text_corpus import write_corpus

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "results" / "ar2diff" / "compare.py"


def _module():
    """The script as a module (its dataclasses need it in sys.modules)."""
    if "ar2diff_compare" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ar2diff_compare", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["ar2diff_compare"] = module
        spec.loader.exec_module(module)
    return sys.modules["ar2diff_compare"]


def _compare(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env={**os.environ, "GTL_NO_PROGRESS_BAR": "1"})


def test_compare_runs_both_routes_and_reuses_them(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus)
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["--config", "configs/tiny.yaml", "--config", "tests/configs/tiny_text.yaml",
            "--total-steps", "4", "--fraction", "0.5", "--cluster", "debug",
            "--run-root", str(runs), "--out", str(out),
            "--set", f"data.path={corpus}",
            # As little as makes every stage run: the unguided-style sampler (no planner), a few
            # steps per per-target stage, a validation every step, one checkpoint at the end.
            "--set", "sample.sampler=ancestral", "--set", "sample.num_samples=8", "--set", "sample.batch_size=8",
            "--set", "sample.steps=4", "--set", "eval.mauve_seeds=1",
            # A 2-step reference LM is far from |V|-better: keep its gen_ppl all the same.
            "--set", "eval.gen_ppl_max_vocab_share=1000",
            "--set", "train.denoiser.val_every=1", "--set", "train.denoiser.val_batches=1",
            "--set", "train.denoiser.save_every=100",
            "--set", "train.edit_ratio.steps=2", "--set", "train.classifier_ti.steps=2",
            "--set", "train.reference_lm.steps=2"]
    first = _compare(args)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    with open(out / "ar2diff.csv") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == ("route", "total_steps", "val_nelbo", "gen_ppl", "mauve_unguided",
                                            "mauve_gtl_5pct")
        rows = {r["route"]: r for r in reader}
    assert set(rows) == {"ar2diff", "scratch"}
    for row in rows.values():
        assert row["total_steps"] == "4"
        values = {k: float(v) for k, v in row.items() if k not in ("route", "total_steps")}
        assert all(math.isfinite(v) for v in values.values()), row
        assert values["val_nelbo"] > 0 and values["gen_ppl"] > 1
        assert 0 <= values["mauve_unguided"] <= 1 and 0 <= values["mauve_gtl_5pct"] <= 1
    assert (out / "val_nelbo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (out / "README.md").read_text()
    assert "results/ar2diff/compare.py" in readme and "--total-steps 4" in readme
    assert "target fraction **0.5**" in readme and "S_ar = 2" in readme and "S_diff = 2" in readme
    # The validation curve of route ar2diff starts where its AR pretraining ends.
    compare = _module()
    from gtl_dist.stages import Task
    from gtl_dist.paths import RunPaths
    assert [s for s, _ in compare.val_curve(RunPaths(runs / "ar2diff"), Task("ar2diff"), 2)] == [3, 4]
    assert [s for s, _ in compare.val_curve(RunPaths(runs / "scratch"), Task("denoiser"), 0)] == [1, 2, 3, 4]
    assert "\n| 1 |  | " in readme and "\n| 3 | " in readme

    # Equal protocol: same network, data, batch; the configs differ in pipeline.ar2diff alone.
    from gtl_dist.cluster.run_dir import config_differences
    cfg_a, cfg_b = (yaml.safe_load((runs / name / "config.yaml").read_text()) for name in ("ar2diff", "scratch"))
    assert config_differences(cfg_a, cfg_b) == ["pipeline.ar2diff: True -> False"]
    train = cfg_a["train"]
    assert (train["ar_pretrain"]["steps"], train["ar2diff"]["steps"], train["denoiser"]["steps"]) == (2, 2, 4)
    assert train["ar_pretrain"]["global_batch"] == train["ar2diff"]["global_batch"] == train["denoiser"]["global_batch"]

    # A second invocation: every task is done in both runs, nothing is trained again.
    exports = [runs / "ar2diff" / "ar_pretrain" / "export" / "model.pt", runs / "ar2diff" / "ar2diff" / "export" / "model.pt",
               runs / "scratch" / "denoiser" / "export" / "model.pt", runs / "scratch" / "eval" / "results.csv"]
    before = [p.stat().st_mtime_ns for p in exports]
    csv_before = (out / "ar2diff.csv").read_text()
    second = _compare(args)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert second.stdout.count("nothing to submit: every task is done") == 2, second.stdout[-4000:]
    assert "route ar2diff: reused" in second.stdout and "route scratch: reused" in second.stdout
    assert [p.stat().st_mtime_ns for p in exports] == before
    assert (out / "ar2diff.csv").read_text() == csv_before


def test_arguments_that_break_the_protocol_are_refused(tmp_path, capsys):
    compare = _module()
    assert compare.split_steps(5, 0.5) in ((2, 3), (3, 2)) and sum(compare.split_steps(7, 0.3)) == 7
    common = ["--config", "configs/tiny.yaml", "--out", str(tmp_path / "out"), "--run-root", str(tmp_path / "r")]
    for extra, words in ((["--total-steps", "4", "--ar-share", "1"], "--ar-share"),
                         (["--total-steps", "1"], "raise --total-steps"),
                         (["--total-steps", "4", "--set", "train.denoiser.steps=9"], "train.denoiser.steps"),
                         (["--total-steps", "4", "--set", "train.ar2diff.lr=0.1"], "train.denoiser.<key>"),
                         (["--total-steps", "4", "--set", "sample.methods=[gtl]"], "sample.methods"),
                         (["--total-steps", "4", "--target", "nope"], "--target nope"),
                         (["--total-steps", "4", "--fraction", "0.3"], "not one of the config's data.target_fractions")):
        assert compare.main([*common, *extra]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "out").exists()


def test_harness_overrides_copy_the_denoiser_recipe():
    compare = _module()
    from gtl_dist.config import load_config
    base = load_config([REPO / "configs/demo.yaml"], ["train.denoiser.min_lr=1e-7"])
    sets = compare.harness_overrides(base, 300, 700)
    cfg = load_config([REPO / "configs/demo.yaml"], ["train.denoiser.min_lr=1e-7", *sets, "pipeline.ar2diff=true"])
    denoiser = {k: v for k, v in vars(cfg.train.denoiser).items() if k != "steps"}
    for stage, steps in (("ar_pretrain", 300), ("ar2diff", 700)):
        tc = getattr(cfg.train, stage)
        assert tc.steps == steps and {k: v for k, v in vars(tc).items() if k != "steps"} == denoiser
    # The data section is the config's own: both routes read the shards a plain run builds.
    assert cfg.train.denoiser.steps == 1000 and cfg.data == base.data
    assert cfg.sample.methods == ["gtl", "source"]


def test_a_missing_metric_names_the_file_and_the_fix(tmp_path):
    compare = _module()
    from gtl_dist.eval.results import ResultRow, write_results_csv
    path = write_results_csv(tmp_path / "results.csv", [
        ResultRow("source", "numpy", None, "mauve[tfidf-svd]", 0.5),
        ResultRow("source", "numpy", None, "gen_ppl", 40.0),
        ResultRow("gtl", "numpy", 0.3, "mauve[tfidf-svd]", 0.6)])
    with pytest.raises(compare.CompareError, match=r"results\.csv: 0 rows for method=gtl target=numpy "
                                                   r"fraction=0\.05"):
        compare.pick_metrics(path, "numpy", 0.05)
    picked = compare.pick_metrics(path, "numpy", 0.3)
    assert (picked["gen_ppl"].value, picked["mauve_unguided"].value, picked["mauve_gtl_5pct"].value) == (40.0, 0.5, 0.6)
