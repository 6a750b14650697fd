"""Configuration: presets load, unknown keys are named with their file, overrides work, hashing."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gtl_dist.config import ConfigError, RunConfig, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["markov", "tiny", "demo", "jsonl_example"])
def test_presets_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, RunConfig)
    assert cfg.name == name


def test_arxiv_preset_needs_a_path_and_has_paper_sizes():
    with pytest.raises(ConfigError, match="data.path"):
        load_config(CONFIGS / "arxiv.yaml")
    cfg = load_config(CONFIGS / "arxiv.yaml", ["data.path=/data/arxiv.json"])
    assert cfg.models.denoiser.hidden == 512 and cfg.models.ratio.hidden == 96
    assert cfg.data.source_domains == ["cs", "math"] and cfg.data.target_domains == ["physics"]
    assert cfg.data.target_fractions == [1.0, 0.3, 0.05, 0.01]


def test_jsonl_example_reads_a_users_corpus_and_plans_offline(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{d} document number {i}.", "domain": d, "id": f"{d}{i}"}) + "\n"
                              for d in ("news", "legal", "medical") for i in range(5)))
    cfg = load_config(CONFIGS / "jsonl_example.yaml", [f"data.path={corpus}"])
    assert (cfg.data.corpus, cfg.data.path) == ("jsonl", str(corpus))
    assert cfg.sample.methods == ["gtl", "source", "vanilla", "finetune"]
    from gtl_dist.data.corpus import read_corpus
    assert {k: len(v) for k, v in read_corpus(cfg).items()} == {"news": 5, "legal": 5, "medical": 5}
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "launchers/submit.py", "--config", "configs/jsonl_example.yaml",
                          "--set", f"data.path={corpus}", "--plan", "--cluster", "local", "--run-dir", str(run_dir)],
                         cwd=CONFIGS.parent, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "preflight: passed" in res.stdout and "adapter" in res.stdout and "finetune" in res.stdout
    assert "domain_classifier" in res.stdout
    assert not run_dir.exists()  # --plan writes nothing


def test_the_smoke_overlay_shortens_every_stage_and_keeps_the_science_settings():
    """configs/smoke.yaml names every stage of the stage table, so that a stage added later cannot
    silently keep its full length in a smoke run; it keeps the corpus, domains, methods and protocol."""
    overlay = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    assert set(overlay["train"]) == {f.name for f in dataclasses.fields(RunConfig().train)}
    base = load_config(CONFIGS / "jsonl_example.yaml", ["data.path=/data/c.jsonl"])
    smoke = load_config([CONFIGS / "jsonl_example.yaml", CONFIGS / "smoke.yaml"], ["data.path=/data/c.jsonl"])
    for stage in overlay["train"]:
        assert getattr(smoke.train, stage).steps <= 30
    for keep in ("source_domains", "target_domains", "corpus", "path"):
        assert getattr(smoke.data, keep) == getattr(base.data, keep)
    assert (smoke.sample.methods, smoke.protocol) == (base.sample.methods, base.protocol)
    assert smoke.data.target_fractions == [1.0] and smoke.data.max_docs_per_domain == 400


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  denoiser:\n    stepz: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    msg = str(exc.value)
    assert str(bad) in msg and "train.denoiser.stepz" in msg and "did you mean 'steps'" in msg


def test_unknown_key_in_second_file_names_that_file(tmp_path):
    good, bad = tmp_path / "a.yaml", tmp_path / "b.yaml"
    good.write_text("seed: 3\n")
    bad.write_text("sample:\n  gama: 2\n")
    with pytest.raises(ConfigError, match=r"b\.yaml.*sample\.gama"):
        load_config([good, bad])


def test_overrides_apply_in_order_and_are_typed():
    cfg = load_config(CONFIGS / "tiny.yaml", ["models.denoiser.hidden=64", "train.ratio.lr=1e-3",
                                              "sample.methods=[gtl, source]"])
    assert cfg.models.denoiser.hidden == 64
    assert cfg.train.ratio.lr == pytest.approx(1e-3)  # "1e-3" is a string to YAML 1.1
    assert cfg.sample.methods == ["gtl", "source"]


def test_override_errors_are_clear():
    with pytest.raises(ConfigError, match="--set model.hidden=256.*unknown key 'model'.*did you mean 'models'"):
        load_config(CONFIGS / "tiny.yaml", ["model.hidden=256"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("models.denoiser.hidden")
    with pytest.raises(ConfigError, match="models.denoiser.hidden: expected an integer"):
        load_config(CONFIGS / "tiny.yaml", ["models.denoiser.hidden=wide"])


@pytest.mark.parametrize("bad", ["models.denoiser.hidden", "models..hidden=3"])
def test_the_example_a_bad_override_suggests_is_a_real_key(bad):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", [bad])
    example = re.search(r"e\.g\. --set (\S+)$", str(err.value)).group(1)
    assert example.startswith("models.denoiser.")
    load_config(CONFIGS / "tiny.yaml", [example])  # raises on a key the config does not have


@pytest.mark.parametrize("override, key", [
    ("sample.gamma=-1", "sample.gamma"),
    ("sample.top_k=0", "sample.top_k"),
    ("data.target_fractions=[1.0, 0.0]", "data.target_fractions"),
    ("train.denoiser.zero_stage=4", "train.denoiser.zero_stage"),
    ("train.denoiser.micro_batch=7", "train.denoiser.micro_batch"),
    ("models.denoiser.heads=3", "models.denoiser.hidden"),
    ("data.overlap=1.0", "data.overlap"),
    ("train.planner.precision=fp16", "train.planner.precision"),
])
def test_cross_field_validation_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_a_model_grid_entry_is_checked_like_the_model_section_it_changes():
    """train.<stage>.model_grid: each entry is type-checked and validated against the stage's own
    model section, its errors naming the entry; a stage with no model section of its own is refused."""
    with pytest.raises(ConfigError, match=r"train\.adapter\.model_grid\[1\] \(models\.adapter\)\.attentin"):
        load_config(CONFIGS / "tiny.yaml", ["train.adapter.select_best=true",
                                            "train.adapter.model_grid=[{rank: 2}, {attentin: true}]"])
    with pytest.raises(ConfigError, match=r"train\.adapter\.model_grid\[0\]\.rank: .*even rank"):
        load_config(CONFIGS / "tiny.yaml", ["train.adapter.select_best=true",
                                            "train.adapter.model_grid=[{attention: true, rank: 3}]"])
    with pytest.raises(ConfigError, match=r"train\.adapter\.model_grid: .*select_best=true"):
        load_config(CONFIGS / "tiny.yaml", ["train.adapter.select_best=false",
                                            "train.adapter.model_grid=[{rank: 2}]"])
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.adapter.select_best=true",
                                              "train.adapter.model_grid=[{rank: 2}, {attention: true, heads: 2}]"])
    assert [p[2] for p in cfg.train.adapter.grid()] == [0, 1]


def test_a_choice_outside_its_options_is_refused_naming_file_key_and_options(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  planner: {precision: fp16}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: train\.planner\.precision: 'fp16' is not "
                                          r"one of auto, fp32, bf16$"):
        load_config([CONFIGS / "tiny.yaml", path])
    with pytest.raises(ConfigError, match=r"sample\.methods: 'gtl2' is not a method; choose from gtl, gtl_edit, gtl_paper"):
        load_config(CONFIGS / "tiny.yaml", ["sample.methods=[source, gtl2]"])
    with pytest.raises(ConfigError, match=r"zero_stage: True is not one of 0, 1, 2, 3"):
        load_config(CONFIGS / "tiny.yaml", ["train.denoiser.zero_stage=true"])


def test_a_layer_may_be_incomplete_until_merged(tmp_path):
    """Rules run on the merged config: an overlay that names a file corpus may leave the path to a
    later layer, and a micro-batch may come before the batch it divides."""
    overlay = tmp_path / "text.yaml"
    overlay.write_text("data: {corpus: jsonl, source_domains: [a], target_domains: [b]}\n"
                       "train:\n  denoiser: {micro_batch: 24}\n")
    cfg = load_config([CONFIGS / "tiny.yaml", overlay], ["data.path=/corpus.jsonl", "train.denoiser.global_batch=48"])
    assert (cfg.data.path, cfg.train.denoiser.micro_batch) == ("/corpus.jsonl", 24)
    with pytest.raises(ConfigError, match=r"data\.path: corpus 'jsonl' reads a file or folder"):
        load_config([CONFIGS / "tiny.yaml", overlay], ["train.denoiser.global_batch=48"])


def test_hash_is_stable_and_sections_are_independent():
    a = load_config(CONFIGS / "tiny.yaml")
    b = load_config(CONFIGS / "tiny.yaml", ["sample.gamma=3.0"])
    assert a.hash() == load_config(CONFIGS / "tiny.yaml").hash()
    assert a.hash() != b.hash()
    # A sampler setting does not change what the denoiser depends on.
    assert a.section_hash("data", "models.denoiser", "train.denoiser") == \
        b.section_hash("data", "models.denoiser", "train.denoiser")


def test_an_unset_weight_decay_grid_keeps_earlier_hashes_and_run_dirs(tmp_path):
    """train.<stage>.weight_decay_grid came after run directories existed (UNSET_UNHASHED_KEYS):
    unset it changes no input hash (tests/test_task_hashes.py pins them) and a run directory
    whose config.yaml lacks it is resubmitted as is; set, it retrains the stage it names only."""
    from gtl_dist.cluster.run_dir import prepare_run_dir
    from gtl_dist.stages import StageGraph
    base = load_config(CONFIGS / "tiny.yaml")
    searched = load_config(CONFIGS / "tiny.yaml", ["train.vanilla.weight_decay_grid=[0.1, 1]",
                                                   "train.vanilla.select_best=true"])
    before, after = StageGraph(base), StageGraph(searched)
    changed = {t.kind for kind in before.plan.values() for t in kind
               if before.input_hash(t) != after.input_hash(t)}
    assert "vanilla" in changed and not changed & {"data", "denoiser", "finetune", "edit_ratio"}
    prepare_run_dir(base, run_dir_made_without(base, "weight_decay_grid", tmp_path))  # no "differing keys"


def test_one_adapter_attention_head_keeps_earlier_hashes_and_more_retrain_the_adapter_only():
    """models.adapter.heads came after run directories existed: its default (1) hashes as absent,
    so earlier runs' adapters stay done; 2 heads retrain the adapter stage (and what samples and scores
    it) and nothing else."""
    from gtl_dist.stages import StageGraph
    base = StageGraph(load_config(CONFIGS / "tiny.yaml", ["models.adapter.attention=true"]))
    for heads, retrained in ((1, set()), (2, {"adapter"})):
        other = StageGraph(load_config(CONFIGS / "tiny.yaml", ["models.adapter.attention=true",
                                                               f"models.adapter.heads={heads}"]))
        changed = {t.kind for kind in base.plan.values() for t in kind
                   if base.input_hash(t) != other.input_hash(t)}
        assert changed - {"sample", "eval"} == retrained, heads


def run_dir_made_without(cfg, train_key: str, tmp_path: Path) -> Path:
    """A run directory whose config.yaml is ``cfg`` less ``train.<every stage>.<train_key>``: as
    one made before the key existed."""
    saved = cfg.to_dict()
    for section in saved["train"].values():
        del section[train_key]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return run


def test_yaml_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", ["seed=7"])
    out = tmp_path / "resolved.yaml"
    out.write_text(cfg.to_yaml())
    assert load_config(out).hash() == cfg.hash()


def test_build_only_keys_do_not_change_what_the_data_hash_covers():
    a = load_config(CONFIGS / "demo.yaml")
    b = load_config(CONFIGS / "demo.yaml", ["shards.build_workers=7", "shards.dir=/elsewhere"])
    c = load_config(CONFIGS / "demo.yaml", ["shards.seq_len=96"])
    assert a.data_hash() == b.data_hash() != c.data_hash()
    assert a.section_hash("shards") == b.section_hash("shards")


def test_execution_only_keys_change_no_input_hash_and_may_change_in_a_run_dir(tmp_path):
    """train.<stage>.compile says how a stage runs, not what it computes (EXECUTION_ONLY_KEYS):
    switching it retrains nothing, and a run directory takes it on resubmission."""
    from gtl_dist.cluster.run_dir import prepare_run_dir
    from gtl_dist.stages import StageGraph, stage_input_hash
    eager = load_config(CONFIGS / "tiny.yaml")
    compiled = load_config(CONFIGS / "tiny.yaml", [f"train.{stage}.compile=true" for stage in
                                                   ("denoiser", "vanilla", "finetune", "ar2diff")])
    before, after = StageGraph(eager), StageGraph(compiled)
    tasks = [task for kind in before.plan.values() for task in kind]
    assert [before.input_hash(t) for t in tasks] == [after.input_hash(t) for t in tasks]
    # Every task's input hash is pinned by tests/test_task_hashes.py.
    assert stage_input_hash(eager, "denoiser", None, None) == before.input_hash(tasks[1])

    # A run directory made before the key existed (its config.yaml lacks it) takes it on.
    run = run_dir_made_without(eager, "compile", tmp_path)
    paths = prepare_run_dir(compiled, run)
    assert yaml.safe_load(paths.config_yaml.read_text())["train"]["denoiser"]["compile"] is True
    with pytest.raises(ValueError, match=r"differing keys.*\n  seed: 0 -> 1"):
        prepare_run_dir(load_config(CONFIGS / "tiny.yaml", ["seed=1"]), run)


def test_a_section_overlays_its_own_stage_and_role_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  vanilla: {steps: 20}\n  ar2diff: {lr: 1e-4}\nmodels:\n  ratio: {blocks: 2}\n")
    cfg = load_config(path)
    assert cfg.train.vanilla.steps == 20
    assert cfg.train.vanilla.ema == 0.9999 and cfg.train.vanilla.select_best  # vanilla's defaults
    assert cfg.train.ar2diff.ema == 0.9999 and cfg.train.ar2diff.lr == pytest.approx(1e-4)
    assert (cfg.models.ratio.blocks, cfg.models.ratio.hidden, cfg.models.ratio.cond_dim) == (2, 96, 48)
    assert cfg.models.denoiser.hidden == 512


@pytest.mark.parametrize("overrides, message", [
    (["data.markov.source_matrix=[[0.5, 0.4, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25], "
      "[0.25, 0.25, 0.25, 0.25]]"], r"data\.markov\.source_matrix: row 0 .* sum to 1"),
    (["data.markov.target_matrices={sticky: [[1.2, -0.2, 0, 0], [0.25, 0.25, 0.25, 0.25], "
      "[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]}"],
     r"data\.markov\.target_matrices\.sticky: row 0 .* non-negative"),
    (["data.markov.target_matrices={sticky: [[0.5, 0.5], [0.5, 0.5]]}"],
     r"data\.markov\.target_matrices\.sticky: expected a 4x4 matrix \(data\.markov\.num_states=4\)"),
    (["data.markov.source_dirichlet=0"], r"data\.markov\.source_dirichlet: 0.*must be > 0"),
    (["data.markov.target_dirichlet={a: 1.0}", "data.markov.target_matrices={b: [[1, 0, 0, 0], "
      "[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}"], r"data\.markov\.target_dirichlet: the targets are given 2 times"),
])
def test_bad_transition_matrices_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", overrides)


def test_random_chains_from_a_seed(tmp_path):
    from gtl_dist.data.markov import transition_matrices
    cfg = load_config(CONFIGS / "tiny.yaml", ["data.markov.num_states=6", "data.markov.source_dirichlet=0.5",
                                              "data.markov.target_dirichlet={a: 2.0, b: 0.3}",
                                              "data.markov.dirichlet_seed=4"])
    chains = transition_matrices(cfg.data.markov)
    assert cfg.targets == ["a", "b"] and all(m.shape == (6, 6) for m in chains.values())
    again = load_config(CONFIGS / "tiny.yaml", ["data.markov.num_states=6", "data.markov.source_dirichlet=0.5",
                                                "data.markov.target_dirichlet={b: 0.3}", "data.markov.dirichlet_seed=4"])
    assert (transition_matrices(again.data.markov)["b"] == chains["b"]).all()  # seeded by name


@pytest.mark.parametrize("overrides, message", [
    (["protocol.selection=test"], r"protocol\.selection: 'test' would select checkpoints on the targets' test sets"),
    (["protocol.selection=eval"], r"evaluation only"),
    (["protocol.holdout_min=0"], r"protocol\.holdout_min: 0: holdout selection needs at least one"),
    (["protocol.holdout_min=40"], r"protocol: protocol\.holdout_fraction=0\.2 with protocol\.holdout_min=40 "
                                  r"holds out 40 of the 40 target sequences of fraction 0\.2 .* leaves none"),
    (["data.target_fractions=[1.0, 0.005]"], r"holds out 2 of the 1 target sequences"),
])
def test_a_protocol_that_leaves_no_data_or_reads_the_test_set_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", overrides)
    budget = overrides + ["protocol.selection=budget"] if "protocol.selection" not in overrides[0] else None
    if budget and "holdout_min=0" not in overrides[0]:
        load_config(CONFIGS / "tiny.yaml", budget)  # a fixed budget needs no held-out sequence


def test_markov_replicates_that_cannot_draw_disjoint_data_are_refused():
    """protocol.replicates=redraw: each replicate draws its own n_T sequences; a Markov run whose
    target set cannot hold them all is refused, naming the keys to change."""
    with pytest.raises(ConfigError, match=r"pipeline\.seeds: replicates \[0, 1, 2\] each draw their own "
                                          r"n_T = 100 .* needs 300 .* data\.markov\.num_target gives 200"):
        load_config(CONFIGS / "tiny.yaml", ["data.target_fractions=[1.0, 0.5]", "pipeline.seeds=[0, 1, 2]"])
    load_config(CONFIGS / "tiny.yaml", ["data.target_fractions=[1.0, 0.5]", "pipeline.seeds=[0, 1]"])
    load_config(CONFIGS / "tiny.yaml", ["data.target_fractions=[1.0, 0.5]", "pipeline.seeds=[0, 1, 2]",
                                        "protocol.replicates=shared"])


def test_fewer_replicates_where_the_data_draw_matters_less():
    """pipeline.replicates_at: the first n seeds replicate a fraction; the plan and the Markov
    disjointness check follow it."""
    from gtl_dist.stages import StageGraph
    cfg = load_config(CONFIGS / "tiny.yaml", ["pipeline.seeds=[0, 1, 2]", "pipeline.replicates_at={1.0: 1}",
                                              "data.markov.num_target=300"])
    assert cfg.pipeline.seeds_at(1.0) == [0] and cfg.pipeline.seeds_at(0.2) == [0, 1, 2]
    vanilla = {(t.fraction, t.seed) for t in StageGraph(cfg).plan["vanilla"]}
    assert vanilla == {(1.0, 0), (0.2, 0), (0.2, 1), (0.2, 2)}
    with pytest.raises(ConfigError, match=r"pipeline\.replicates_at\.1: 4: between 1 and the 3 seeds"):
        load_config(CONFIGS / "tiny.yaml", ["pipeline.seeds=[0, 1, 2]", "pipeline.replicates_at={1.0: 4}"])
