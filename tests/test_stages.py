"""The stage and method tables (gtl_dist/stages.py, gtl_dist/methods.py): their rows agree with the
code, each stage reads only the config keys its input hash covers, and every task loads exactly the
exports its declared dependencies give it.

A stage's input hash covers the config sections of its row and, through its dependencies, those of
every task upstream of it. A key it reads outside all of them could change what it trains without
making it train again. ``test_every_stage_reads_only_its_inputs`` trains every stage for two steps
in one process (as the debug launcher runs them), records each read of a RunConfig field while a
stage runs, and compares the keys with the sections its hash covers. It runs configs/tiny.yaml,
a Markov run, with the planner shared. The same process then draws one sample shard of every
method (with the planner sampler, so that GTL reads the planner) and records, for every stage and
sample task, the exports it loads: ``test_every_task_loads_exactly_its_dependencies`` compares
them with the task's dependencies in the stage graph.

The same process records the shard sets every stage's loaders read, for training and for
validation: ``test_only_the_evaluators_models_train_on_the_evaluator_split`` checks that the
evaluation's own models train on the evaluator split alone and that no other stage reads it.

Run as a script, this file is that process: it prints ``READS {stage: [dotted keys]}``,
``LOADS {task: {"loaded": [paths], "declared": [paths]}}`` and ``SETS {stage: {"train": [sets],
"val": [sets]}}``.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from gtl_dist.config import BUILD_ONLY_KEYS, COMPILED_STAGES, RunConfig, StagesConfig, execution_only, load_config
from gtl_dist.methods import METHODS, SOURCE
from gtl_dist.stages import EVALUATOR_STAGES, STAGES, TASK_KINDS, StageGraph, task_sections
from train_helpers import PYTHON, REPO, deepspeed_ops, rank_env  # noqa: F401

TARGET, FRACTION = "sticky", 1.0
SETTINGS = [
    "data.markov.target_diagonals={sticky: 0.95}",
    "models.reference_lm={hidden: 32, blocks: 1, heads: 2, cond_dim: 16, dropout: 0.0}",
    "sample.sampler=planner", "sample.n_ratio=4",
] + [f"train.{stage}.{key}={value}" for stage in STAGES for key, value in
     {"steps": 2, "val_every": 1, "save_every": 2, "log_every": 1, "val_batches": 1}.items()]

# Keys a stage may read outside its inputs, and why reading them leaves what it trains unchanged.
NOT_INPUTS = {
    "pipeline.seeds": "check_stage_args refuses a --seed outside it; each replicate is a task of its "
                      "own, with its own input hash",
    "pipeline.replicates_at": "as pipeline.seeds: it only says which seeds a fraction replicates "
                              "(check_stage_args refuses the others)",
    "pipeline.ar2diff": "picks the source stage (denoiser or ar2diff) whose export a stage reads; that "
                        "task's key and input hash are part of the reader's",
    "shards.dir": "where the shards are (config.BUILD_ONLY_KEYS: excluded from every hash)",
    **{f"train.{stage}.compile": "whether the loop compiles the stage's network and loss: the same "
                                 "computation (config.EXECUTION_ONLY_KEYS: excluded from every hash)"
       for stage, spec in STAGES.items() if spec.role != "chain"},
}

def test_rows_come_after_the_stages_they_read():
    for i, (name, spec) in enumerate(STAGES.items()):
        assert spec.name == name
        earlier = ("data", SOURCE) + tuple(STAGES)[:i]
        assert set(spec.deps) <= set(earlier), f"{name}: reads {spec.deps}, not all of them earlier rows"


def test_every_stage_has_a_train_section_a_network_and_a_task_class():
    from gtl_dist.models import ROLES
    from gtl_dist.train.jobs import RECIPES
    from gtl_dist.train.recipe import Recipe
    assert [f.name for f in dataclasses.fields(StagesConfig)] == list(STAGES)
    assert set(RECIPES) == {name for name, spec in STAGES.items() if spec.role != "chain"}
    assert {spec.role for spec in STAGES.values()} <= set(ROLES)
    for name, spec in STAGES.items():
        assert f"train.{name}" in spec.sections and "seed" in spec.sections, name
        assert (name in COMPILED_STAGES) == (name in RECIPES and RECIPES[name].compile is not Recipe.compile), name
    assert TASK_KINDS == ("data", *STAGES, "sample", "eval")


def test_every_method_samples_stages_of_the_table():
    for name, spec in METHODS.items():
        assert spec.name == name
        for stage in spec.stages() + spec.calibrated:
            assert stage == SOURCE or stage in STAGES, f"method {name} reads unknown stage {stage}"
        if spec.guided:
            assert hasattr(RunConfig().sample, spec.gamma_key), name


def hashed_sections(cfg: RunConfig, stage: str) -> set[str]:
    """The config sections a stage's input hash covers: its own and every upstream task's."""
    graph = StageGraph(cfg)
    todo, sections = [graph.stage_task(stage, TARGET, FRACTION)], set()
    while todo:
        task = todo.pop()
        sections.update(task_sections(task))
        todo += graph.task_deps(task)
    return sections


def covered(key: str, sections: set[str]) -> bool:
    """Whether the hash of ``sections`` changes with ``key`` (build-only and execution-only keys
    never count)."""
    return (key not in BUILD_ONLY_KEYS and not execution_only(key)
            and any(key == s or key.startswith(s + ".") for s in sections))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, deepspeed_ops) -> dict[str, dict]:  # noqa: F811
    """The recording process's READS and LOADS, run once for both tests below."""
    from gtl_dist.data import prepare_data
    run_dir = tmp_path_factory.mktemp("stages") / "run"
    config = REPO / "configs" / "tiny.yaml"
    prepare_data(load_config(config, SETTINGS), run_dir)
    env = {k: v for k, v in rank_env(0, 1, 0).items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([PYTHON, __file__, str(config), str(run_dir), json.dumps(SETTINGS)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    found = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])
             for line in proc.stdout.splitlines() if line.startswith(("READS ", "LOADS ", "SETS "))}
    assert proc.returncode == 0 and set(found) == {"READS", "LOADS", "SETS"}, proc.stdout[-3000:] + proc.stderr[-5000:]
    return found


@pytest.mark.distributed
def test_every_task_loads_exactly_its_dependencies(recorded):
    loads = recorded["LOADS"]
    assert {key.split("/")[0] for key in loads} == set(STAGES) | {"sample"}
    assert {key.split("/")[1] for key in loads if key.startswith("sample/")} == set(METHODS)
    for key, seen in loads.items():
        assert seen["loaded"] == seen["declared"], (
            f"task {key} loads the exports {seen['loaded']} but the stage graph gives it "
            f"{seen['declared']}: fix the row of its stage (gtl_dist/stages.py) or method "
            f"(gtl_dist/methods.py), so that its input hash covers what it reads and the launcher "
            f"runs what it needs first")


@pytest.mark.distributed
def test_only_the_evaluators_models_train_on_the_evaluator_split(recorded):
    """The reference LM and the domain classifier train on the evaluator split (the classifier on
    the source's and the target's) and validate on the test text; no other stage reads it, so no
    instrument of the evaluation is trained on text a method trains on."""
    sets = recorded["SETS"]
    assert sets["reference_lm"] == {"train": [f"{TARGET}/evaluator"], "val": [f"{TARGET}/test"]}
    assert sets["domain_classifier"] == {"train": ["source/evaluator", f"{TARGET}/evaluator"],
                                         "val": ["source/test", f"{TARGET}/test"]}
    for stage, read in sets.items():
        if stage not in EVALUATOR_STAGES:
            assert not any(s.endswith("/evaluator") for s in read["train"] + read["val"]), (stage, read)


@pytest.mark.distributed
def test_every_stage_reads_only_its_inputs(recorded):
    cfg = load_config(REPO / "configs" / "tiny.yaml", SETTINGS)
    reads = recorded["READS"]
    assert list(reads) == list(STAGES)
    for stage, keys in reads.items():
        sections = hashed_sections(cfg, stage)
        outside = [k for k in keys if not covered(k, sections) and k not in NOT_INPUTS]
        assert not outside, (
            f"stage {stage} reads {outside}, which its input hash does not cover (its sections and "
            f"its upstream tasks': {sorted(sections)}). Add the section to its row in "
            f"gtl_dist/stages.py (this changes its input hash: existing runs retrain it and "
            f"everything downstream), or, if reading it cannot change what the stage writes, list "
            f"it in NOT_INPUTS here with the reason")
    read_anywhere = {k for keys in reads.values() for k in keys}
    assert set(NOT_INPUTS) <= read_anywhere, f"no stage reads {set(NOT_INPUTS) - read_anywhere}: drop it"


# ----------------------------------------------------------------------------------------------
# The recording process
# ----------------------------------------------------------------------------------------------

def record_reads(cfg: RunConfig) -> tuple[set[str], dict[str, bool]]:
    """Make every read of a field of ``cfg`` (and of its sections) add its dotted key to the
    returned set while ``switch["on"]``. RunConfig.to_dict copies the whole config for hashes and
    export metadata, so it records nothing; what a stage reads of those copies does not show."""
    paths: dict[int, str] = {}
    fields: dict[type, set[str]] = {}

    def walk(node: object, prefix: str) -> None:
        paths[id(node)] = prefix  # cfg stays alive, so the ids stay its nodes'
        fields[type(node)] = {f.name for f in dataclasses.fields(node)}
        for name in fields[type(node)]:
            value = getattr(node, name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{name}.")

    walk(cfg, "")
    reads: set[str] = set()
    switch = {"on": False}

    def getattribute(self: object, name: str) -> object:
        value = object.__getattribute__(self, name)
        if switch["on"] and name in fields[type(self)] and not dataclasses.is_dataclass(value):
            prefix = paths.get(id(self))
            if prefix is not None:
                reads.add(prefix + name)
        return value

    for cls in fields:
        cls.__getattribute__ = getattribute
    to_dict = RunConfig.to_dict

    def quiet_to_dict(self: RunConfig) -> dict:
        on, switch["on"] = switch["on"], False
        try:
            return to_dict(self)
        finally:
            switch["on"] = on

    RunConfig.to_dict = quiet_to_dict
    return reads, switch


def record_loads() -> list[str]:
    """Make every export a task checks before loading it (exports.upstream_export_path, the
    one door to an upstream export) add its path to the returned list."""
    import gtl_dist.exports as export
    loaded: list[str] = []
    read_meta = export.read_export_meta

    def recording(path):
        loaded.append(str(path))
        return read_meta(path)

    export.read_export_meta = recording
    return loaded


def record_sets() -> dict[str, list[str]]:
    """Make every shard loader a stage opens (gtl_dist.data.make_loader, the one door to the shards)
    add its set to the returned lists, "train" or "val" by whether it is a training stream."""
    import gtl_dist.data as data
    opened: dict[str, list[str]] = {"train": [], "val": []}
    make_loader = data.make_loader

    def recording(manifest, set_name, *args, **kwargs):
        opened["train" if kwargs.get("infinite") else "val"].append(set_name)
        return make_loader(manifest, set_name, *args, **kwargs)

    data.make_loader = recording
    return opened


def declared_exports(graph: StageGraph, run_dir: str, task) -> list[str]:
    from gtl_dist.paths import RunPaths
    paths = RunPaths(run_dir)
    return sorted(str(paths.export(d.kind, d.target, d.fraction, d.seed))
                  for d in graph.task_deps(task) if d.kind in STAGES)


def main(config: str, run_dir: str, settings: str) -> None:
    from gtl_dist.cluster.tasks import run_task
    from gtl_dist.stages import PER_FRACTION, PER_TARGET, Task
    from gtl_dist.train import run_stage
    cfg = load_config(config, json.loads(settings))
    graph = StageGraph(cfg)
    reads, switch = record_reads(cfg)
    loaded = record_loads()
    opened = record_sets()
    out, loads, sets = {}, {}, {}
    for stage, spec in STAGES.items():  # in table order: every stage after those it reads
        target = TARGET if spec.scope in (PER_FRACTION, PER_TARGET) else None
        fraction = FRACTION if spec.scope == PER_FRACTION else None
        reads.clear()
        loaded.clear()
        for kind in opened.values():
            kind.clear()
        switch["on"] = True
        result = run_stage(cfg, run_dir, stage, target, fraction)
        switch["on"] = False
        assert result.status == "finished", (stage, result)
        out[stage] = sorted(reads)
        sets[stage] = {kind: sorted(set(names)) for kind, names in opened.items()}
        task = graph.stage_task(stage, target, fraction)
        loads[task.key] = {"loaded": sorted(set(loaded)), "declared": declared_exports(graph, run_dir, task)}
    for method, spec in METHODS.items():
        task = Task("sample", TARGET if spec.per_target else None, FRACTION if spec.per_target else None,
                    method, 0)
        loaded.clear()
        assert run_task(cfg, run_dir, task) == "done", task
        loads[task.key] = {"loaded": sorted(set(loaded)), "declared": declared_exports(graph, run_dir, task)}
    print("READS " + json.dumps(out), flush=True)
    print("LOADS " + json.dumps(loads), flush=True)
    print("SETS " + json.dumps(sets), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
