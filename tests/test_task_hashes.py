"""Every task's input hash, pinned: a refactor of the stage or method tables must keep them.

A task's input hash decides whether a run directory's work is still valid (gtl_dist/stages.py).
A change to it retrains or resamples every affected task of every existing run, so it must only
ever change on purpose. ``tests/golden/task_input_hashes.json`` holds the hash of every task of
every config in ``configs/`` and of a few overlays; this test recomputes them.

After a deliberate change (a new input of a stage, a fix to what a task reads), rewrite the file
with ``python tests/test_task_hashes.py --write`` and name the changed tasks in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gtl_dist.config import load_config
from gtl_dist.stages import StageGraph

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "task_input_hashes.json"

# (name, config files, --set overrides): every preset, and overlays that reach the branches the
# presets do not (the paper recipe, AR2Diff, the planner sampler and its modes and scopes).
CASES = [
    ("markov", ["configs/markov.yaml"], []),
    ("markov+gtl_paper", ["configs/markov.yaml"],
     ["sample.methods=[gtl, gtl_paper, source, vanilla, finetune]"]),
    ("tiny", ["configs/tiny.yaml"], []),
    ("tiny+ar2diff", ["configs/tiny.yaml"], ["pipeline.ar2diff=true"]),
    ("tiny+planner", ["configs/tiny.yaml"], ["sample.sampler=planner"]),
    ("tiny+planner-uniform", ["configs/tiny.yaml"],
     ["sample.sampler=planner", "sample.planner_mode=uniform"]),
    ("tiny+planner-per-target", ["configs/tiny.yaml"],
     ["sample.sampler=planner", "pipeline.planner_scope=per_target"]),
    ("demo", ["configs/demo.yaml"], []),
    ("arxiv", ["configs/arxiv.yaml"], ["data.path=/data/arxiv-metadata-oai-snapshot.json"]),
    ("jsonl_example", ["configs/jsonl_example.yaml"], []),
]


def task_hashes(files: list[str], overrides: list[str]) -> dict[str, str]:
    cfg = load_config([REPO / f for f in files], overrides)
    graph = StageGraph(cfg)
    return {task.key: graph.input_hash(task) for tasks in graph.plan.values() for task in tasks}


def all_hashes() -> dict[str, dict[str, str]]:
    return {name: task_hashes(files, overrides) for name, files, overrides in CASES}


def test_every_task_keeps_its_input_hash():
    golden = json.loads(GOLDEN.read_text())
    now = all_hashes()
    assert set(now) == set(golden), f"cases differ: {sorted(set(now) ^ set(golden))}"
    for name in golden:
        added = sorted(set(now[name]) - set(golden[name]))
        gone = sorted(set(golden[name]) - set(now[name]))
        changed = sorted(k for k in set(now[name]) & set(golden[name]) if now[name][k] != golden[name][k])
        assert not (added or gone or changed), (
            f"{name}: tasks added {added[:8]}, gone {gone[:8]}, changed hash {changed[:8]} "
            f"(of {len(golden[name])}); if this is deliberate, rewrite {GOLDEN.relative_to(REPO)} with "
            f"`python tests/test_task_hashes.py --write` and name the changed tasks in the commit")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_task_hashes.py --write  (rewrites the pinned hashes)")
    tmp = GOLDEN.with_suffix(".tmp")
    tmp.write_text(json.dumps(all_hashes(), indent=1, sort_keys=True) + "\n")
    tmp.replace(GOLDEN)
    print(f"wrote {GOLDEN}")
