"""The GPU suite (benchmarks/gpu_suite.sh) runs every step end to end; here on the CPU, CI-sized.

It will be run on a GPU machine by someone with a few minutes of device time, so each step must
work the first time: this test runs the same script with --device cpu --quick.
"""

import csv
import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("tests", "parity", "train", "loss_head", "decode", "planner")


def test_the_gpu_suite_runs_every_step_on_a_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--device", "cpu", "--quick",
                             "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    logs = {step: (tmp_path / f"{step}.txt").read_text() if (tmp_path / f"{step}.txt").exists() else None
            for step in STEPS}
    assert result.returncode == 0, (result.stdout, result.stderr, logs)
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.count("rc=0") == len(STEPS) and "suite passed" in summary
    assert "token parity 1.0000" in logs["parity"]
    assert "bit-for-bit equal: yes" in logs["loss_head"]
    assert "plain PyTorch compiled, profile of 3 steps" in logs["train"]
    assert "aten operators per token" in logs["decode"]
    for name, method in (("decode_speed.csv", "ar_cached"), ("planner_cost.csv", "gtl_planner")):
        with open(tmp_path / name, newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["method", "steps", "n_ratio", "seq_len", "batch", "device",
                                 "seconds_per_seq", "network_evals"]
        assert any(r["method"] == method and r["device"] == "cpu" and float(r["seconds_per_seq"]) > 0
                   for r in rows)


def test_the_full_size_steps_are_accepted_by_their_scripts(tmp_path, monkeypatch):
    # The full-size arguments run nowhere but on the GPU machine: a typo there would cost the
    # device run. The dry run prints each step's command; each script's own parser must take it.
    out = tmp_path / "out"
    result = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run", "--device", "cpu",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(commands) == len(STEPS) and not out.exists()  # a dry run writes nothing
    tests, *benchmarks = commands
    assert tests[1:3] == ["-m", "pytest"]
    test_files = [a for a in tests if a.endswith(".py")]
    assert test_files and all((REPO / f).is_file() for f in test_files)
    for _, script, *argv in benchmarks:
        spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look it up there
        spec.loader.exec_module(module)
        args = module.parse_args(argv)
        assert str(args.device) == "cpu", script


def test_the_gpu_suite_refuses_an_unknown_argument(tmp_path):
    result = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--devcie", "cpu"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown argument '--devcie'" in result.stderr
