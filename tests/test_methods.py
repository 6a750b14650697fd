"""The methods table (gtl_dist/methods.py): a method that samples an existing stage's export is one
row, and the whole pipeline (plan, sampling, evaluation and report) picks it up from there."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from gtl_dist.cluster.dag import build_pipeline
from gtl_dist.cluster.tasks import run_task
from gtl_dist.config import ConfigError, load_config
from gtl_dist.methods import METHODS, MethodSpec
from gtl_dist.stages import Task
from train_helpers import deepspeed_ops  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def throwaway_method(monkeypatch):
    """One new row: the fine-tuned denoiser sampled under another name."""
    monkeypatch.setitem(METHODS, "finetune_twin", MethodSpec(
        "finetune_twin", model="finetune", summary="the fine-tuned denoiser, sampled again"))
    return "finetune_twin"


def test_an_unknown_method_is_refused_naming_the_table():
    with pytest.raises(ConfigError, match=r"sample\.methods: 'nope' is not a method; choose from gtl, "):
        load_config(REPO / "configs" / "tiny.yaml", ["sample.methods=[nope]"])


@pytest.mark.distributed
def test_a_new_row_runs_through_plan_sample_and_eval(tmp_path, throwaway_method, deepspeed_ops):  # noqa: F811
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"sample.methods=[{throwaway_method}, source]", "sample.shards=1",
                       "data.target_fractions=[1.0]"])
    pipeline = build_pipeline(cfg)
    plan = pipeline.plan
    # The plan trains what the row reads (the fine-tuned denoiser and the source it starts from)
    # and nothing else.
    assert list(plan) == ["data", "denoiser", "finetune", "sample", "eval"]
    assert Task("sample", "sticky", 1.0, throwaway_method, 0) in plan["sample"]
    run_dir = tmp_path / "run"
    for tasks in plan.values():  # in submission order, as --cluster debug runs them
        for task in tasks:
            assert run_task(cfg, run_dir, task) == "done", task.key
    with open(run_dir / "eval" / "results.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["method"] == throwaway_method]
    assert {r["metric"] for r in rows} >= {"transition_mean_abs_err", "nll_target_per_token"}
    assert f"| {throwaway_method} |" in (run_dir / "eval" / "report.md").read_text()
