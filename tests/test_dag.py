"""The pipeline DAG: which groups exist, how they depend on each other, and input hashing."""

import pytest

from gtl_dist.cluster.dag import build_pipeline
from gtl_dist.config import load_config
from gtl_dist.stages import BIG, Task


def _cfg(configs_dir, name="tiny", *overrides):
    return load_config(configs_dir / f"{name}.yaml", list(overrides))


def test_markov_pipeline_groups_and_order(configs_dir):
    p = build_pipeline(_cfg(configs_dir))
    names = p.group_names
    assert names == ["data", "denoiser", "edit_ratio", "adapter", "classifier_ti", "classifier_td", "ratio",
                     "vanilla", "finetune", "sample", "eval"]
    # Topological: every dependency comes earlier.
    for i, g in enumerate(p.groups):
        assert all(names.index(d) < i for d in g.deps), g.name
    assert p.group("denoiser").size == BIG
    # One task per (target, fraction) in the per-target arrays.
    assert [t.key for t in p.group("ratio").tasks] == ["ratio/sticky/1", "ratio/sticky/0.2"]
    # The source model is sampled once, shared by all targets.
    src = [t for t in p.group("sample").tasks if t.method == "source"]
    assert len(src) == p.cfg.sample.shards and all(t.target is None for t in src)


def test_text_pipeline_has_planner_and_the_evaluators_models(configs_dir):
    p = build_pipeline(_cfg(configs_dir, "demo", "sample.sampler=planner"))
    assert "planner" in p.group_names and "reference_lm" in p.group_names
    gtl = next(t for t in p.group("sample").tasks if t.method == "gtl")
    assert {d.kind for d in p.task_deps(gtl)} == {"denoiser", "adapter", "planner"}
    # The evaluator's models: one of each per target, on no fraction (the evaluator split), and no
    # classifier_ti without gtl_paper.
    assert "classifier_ti" not in p.group_names
    for stage in ("reference_lm", "domain_classifier"):
        assert [(t.target, t.fraction) for t in p.group(stage).tasks] == [("numpy", None), ("python", None)]
        assert p.group(stage).deps == ["data"]
    eval_deps = p.task_deps(p.group("eval").tasks[0])
    assert {(d.kind, d.target) for d in eval_deps if d.kind in ("reference_lm", "domain_classifier")} == {
        (stage, t) for stage in ("reference_lm", "domain_classifier") for t in ("numpy", "python")}


def test_ar2diff_route_replaces_the_denoiser(configs_dir):
    p = build_pipeline(_cfg(configs_dir, "tiny", "pipeline.ar2diff=true"))
    assert "denoiser" not in p.group_names
    assert p.group("ar2diff").deps == ["ar_pretrain"]
    assert p.group("finetune").deps == ["ar2diff"]


def test_per_target_planner(configs_dir):
    p = build_pipeline(_cfg(configs_dir, "demo", "pipeline.planner_scope=per_target", "sample.sampler=planner"))
    cfg = p.cfg
    assert len(p.group("planner").tasks) == len(cfg.targets) * len(cfg.data.target_fractions) * len(cfg.pipeline.seeds)


def test_input_hash_invalidates_exactly_the_downstream(configs_dir):
    base = build_pipeline(_cfg(configs_dir))
    bigger = build_pipeline(_cfg(configs_dir, "tiny", "models.denoiser.hidden=64"))
    guided = build_pipeline(_cfg(configs_dir, "tiny", "sample.gamma=3.0"))

    def h(p, task):
        return p.input_hash(task)

    clf = Task("classifier_ti", "sticky", 1.0)
    ft = Task("finetune", "sticky", 1.0)
    gtl = Task("sample", "sticky", 1.0, "gtl", 0)
    assert h(base, clf) == h(bigger, clf)          # classifiers do not read the denoiser
    assert h(base, ft) != h(bigger, ft)            # fine-tuning starts from it
    assert h(base, Task("denoiser")) == h(guided, Task("denoiser"))
    assert h(base, gtl) != h(guided, gtl)          # γ changes GTL samples...
    assert h(base, Task("ratio", "sticky", 1.0)) == h(guided, Task("ratio", "sticky", 1.0))
    src = Task("sample", None, None, "source", 0)  # ...but not the baselines' samples
    assert h(base, src) == h(guided, src)
    assert h(base, Task("eval")) != h(guided, Task("eval"))
    fewer = build_pipeline(_cfg(configs_dir, "tiny", "sample.methods=[gtl, source]"))
    assert h(base, src) == h(fewer, src) and h(base, gtl) == h(fewer, gtl)


def test_unknown_stage_is_a_clear_error(configs_dir):
    with pytest.raises(ValueError, match="unknown stage.*denoisr.*are: data, denoiser"):
        build_pipeline(_cfg(configs_dir), only=["denoisr"])


def test_seeds_replicate_every_per_target_task_and_sample_set(configs_dir):
    p = build_pipeline(_cfg(configs_dir, "tiny", "pipeline.seeds=[0, 1, 2]"))
    assert [t.key for t in p.group("edit_ratio").tasks][:3] == [
        "edit_ratio/sticky/1", "edit_ratio/sticky/1/seed1", "edit_ratio/sticky/1/seed2"]
    assert len(p.group("vanilla").tasks) == 3 * len(p.cfg.data.target_fractions)
    assert len(p.group("denoiser").tasks) == 1  # the source is shared by all seeds
    gtl = Task("sample", "sticky", 0.2, "gtl", 1, seed=2)
    assert set(p.task_deps(gtl)) == {Task("denoiser"), Task("adapter", "sticky", 0.2, seed=2)}
    paper = Task("sample", "sticky", 0.2, "gtl_paper", 0, seed=1)
    assert Task("ratio", "sticky", 0.2, seed=1) in p.task_deps(paper)
    assert p.input_hash(Task("vanilla", "sticky", 1.0)) != p.input_hash(Task("vanilla", "sticky", 1.0, seed=1))
    # Seed 0 keeps the single-seed paths (and hashes): adding seeds reuses what a run has.
    one = build_pipeline(_cfg(configs_dir, "tiny"))
    assert one.input_hash(Task("vanilla", "sticky", 1.0)) == p.input_hash(Task("vanilla", "sticky", 1.0))
    assert Task("vanilla", "sticky", 1.0, seed=2).marker(_paths()) == _paths().root / "vanilla/sticky/1/seed-2/DONE.json"
    assert Task("vanilla", "sticky", 1.0).marker(_paths()) == _paths().root / "vanilla/sticky/1/DONE.json"


def test_the_protocol_is_an_input_of_every_per_target_stage_only(configs_dir):
    base = build_pipeline(_cfg(configs_dir))
    budget = build_pipeline(_cfg(configs_dir, "tiny", "protocol.selection=budget"))
    for task in (Task("vanilla", "sticky", 1.0), Task("edit_ratio", "sticky", 0.2), Task("ratio", "sticky", 1.0)):
        assert base.input_hash(task) != budget.input_hash(task)
    assert base.input_hash(Task("denoiser")) == budget.input_hash(Task("denoiser"))


def _paths():
    from gtl_dist.paths import RunPaths
    return RunPaths("/runs/r")
