"""The submit-time preflight (gtl_dist/cluster/preflight.py, launchers/submit.py --plan / --dry-run):
each check against hand-made facts, and the launcher's refusals without a SLURM controller."""

import json
import os
from pathlib import Path

import pytest

from gtl_dist.cluster import preflight as pf
from gtl_dist.cluster import submit as submit_cli
from gtl_dist.cluster.dag import build_pipeline
from gtl_dist.cluster.launch import Launcher
from gtl_dist.cluster.options import LaunchOptions, world_size
from gtl_dist.config import ConfigError, load_config
from gtl_dist.paths import RunPaths
from gtl_dist.slurm_query import SlurmCommandError
from gtl_dist.stages import Task
from gtl_dist.train.engine import batch_geometry

REPO = Path(__file__).resolve().parents[1]
SINFO = """\
a1|gpu*|gpu:a100:8(S:0-1)
a2|gpu*|gpu:a100:8(S:0-1)
a3|gpu*|gpu:4
c1|cpu|(null)
"""


def _cfg(name="tiny", *overrides):
    return load_config(REPO / "configs" / f"{name}.yaml", list(overrides))


def _check(cfg, run_dir, facts=None, live=True, **opts):
    """The preflight of a submission of ``cfg``, with ``facts`` in place of sinfo and df."""
    opts = LaunchOptions(**{"cluster": "slurm", **opts})
    pipeline = build_pipeline(cfg)
    plan = Launcher(cfg, run_dir, opts, pipeline).plan(query_slurm=False)
    facts = facts or pf.Facts(free_bytes=10**15, nodes=pf.parse_sinfo(SINFO))
    return pf.preflight(cfg, opts, pipeline, plan, run_dir, facts, "configs/x.yaml", live=live)


@pytest.fixture
def arxiv(tmp_path):
    """The arXiv preset on SLURM, its snapshot an empty stand-in (the plan reads only its name)."""
    snapshot = tmp_path / "arxiv-metadata-oai-snapshot.json"
    snapshot.touch()
    return ["--config", "configs/arxiv.yaml", "--set", f"data.path={snapshot}", "--cluster", "slurm"]


@pytest.fixture
def submit(monkeypatch, tmp_path, capsys):
    """The launcher's main() in this process, with no SLURM controller to ask and plenty of disk
    (the disk check has its own tests); returns (exit code, stdout, stderr)."""
    def no_controller():
        raise SlurmCommandError("sinfo: no answer within 30 s (is slurmctld running?)")

    monkeypatch.setattr(pf, "sinfo_nodes", no_controller)
    monkeypatch.setattr(pf, "free_bytes", lambda path: 10**15)
    monkeypatch.chdir(REPO)

    def run(*args):
        code = submit_cli.main([*args, "--run-dir", str(tmp_path / "run")])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


# -- the launcher, away from the cluster -------------------------------------------------------------

def test_tiny_on_three_nodes_is_refused_at_plan_time_naming_key_values_and_a_fix(submit, tmp_path):
    code, out, err = submit("--config", "configs/tiny.yaml", "--nodes", "3", "--cluster", "slurm", "--plan")
    assert code == 2
    problems = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(problems) == 1, err
    assert ("configs/tiny.yaml: train.denoiser.global_batch: 64 is not divisible by the world size 3; "
            "use a multiple of 3 (e.g. 63 or 66)") in problems[0]
    assert "--nodes 3 × 1" in problems[0]
    assert "SLURM is not reachable" in out and "nothing was submitted" in err
    assert not (tmp_path / "run").exists()
    # --dry-run refuses the same (the real submission: test_a_real_submission_...).
    code, _, err = submit("--config", "configs/tiny.yaml", "--nodes", "3", "--cluster", "slurm", "--dry-run")
    assert code == 2 and "train.denoiser.global_batch: 64" in err and "#SBATCH" not in err


def test_the_suggested_value_plans_cleanly_and_dry_run_renders_the_scripts_offline(submit, tmp_path):
    code, out, err = submit("--config", "configs/tiny.yaml", "--nodes", "3", "--cluster", "slurm", "--dry-run",
                            "--set", "train.denoiser.global_batch=66")
    assert code == 0, err
    assert "preflight: passed" in out and "denoiser         1 task(s)" in out and "(3 ranks each)" in out
    assert "#SBATCH --nodes=3" in out and "#SBATCH --dependency='afterok:<job ids of data>'" in out
    assert not (tmp_path / "run").exists()  # a preview writes nothing


def test_arxiv_plans_cleanly_on_8x8_offline(submit, arxiv):
    code, out, err = submit(*arxiv, "--nodes", "8", "--gpus-per-node", "8", "--plan")
    assert code == 0, err
    assert "(64 ranks each)" in out and "preflight: passed" in out


def test_arxiv_on_64x8_needs_a_global_batch_of_at_least_512(submit, arxiv):
    """The paper's global batch of 128 cannot be split over 512 ranks: the one refusal."""
    code, out, err = submit(*arxiv, "--nodes", "64", "--gpus-per-node", "8", "--plan")
    problems = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(problems) == 1, err
    assert "train.denoiser.global_batch: 128 is not divisible by the world size 512" in problems[0]
    assert "e.g. 512" in problems[0] and "--nodes 64 × 8 (one per GPU, --gpus-per-node 8)" in problems[0]
    code, out, err = submit(*arxiv, "--nodes", "64", "--gpus-per-node", "8", "--plan",
                            "--set", "train.denoiser.global_batch=512")
    assert code == 0 and "(512 ranks each)" in out and "preflight: passed" in out, err


def test_a_real_submission_is_refused_before_anything_is_queued_or_written(submit, monkeypatch, tmp_path):
    code, _, err = submit("--config", "configs/tiny.yaml", "--cluster", "slurm")
    assert code == 2
    assert "error: --cluster slurm: cannot reach the SLURM controller: sinfo: no answer" in err
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "jobs").exists()
    cpu_nodes = pf.parse_sinfo("c1|cpu*|(null)\nc2|cpu*|(null)\nc3|cpu*|(null)")
    monkeypatch.setattr(pf, "sinfo_nodes", lambda: cpu_nodes)
    code, _, err = submit("--config", "configs/tiny.yaml", "--cluster", "slurm", "--nodes", "3")
    assert code == 2 and err.count("error: ") == 1 and "train.denoiser.global_batch: 64" in err
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "jobs").exists()


# -- everything a user can get wrong, refused before anything is queued: one line, exit 2 --------------------

@pytest.mark.parametrize("flags, line", [
    (["--nodes", "0"], "--nodes 0: the nodes of the source stage's job must be at least 1; use --nodes 1 or more"),
    (["--nodes", "-2", "--dry-run"], "--nodes -2: the nodes of the source stage's job must be at least 1"),
    (["--gpus-per-node", "-1", "--dry-run"], "--gpus-per-node -1: the GPUs per node (0: CPU-only nodes) must be "
                                            "at least 0; use --gpus-per-node 1 or more (0 for CPU-only nodes)"),
    (["--cpus-per-task", "0"], "--cpus-per-task 0: the CPUs of each task must be at least 1"),
    (["--time", "0"], "--time 0: the minutes of the source stage's time limit must be at least 1"),
    (["--local-parallelism", "0"], "--local-parallelism 0: the tasks --cluster local runs at once must be at least 1"),
    (["--wait-timeout", "nan"], "--wait-timeout nan: give the minutes to follow the run, a number above 0"),
])
def test_a_bad_launcher_flag_is_one_line_naming_it_and_the_fix(submit, tmp_path, flags, line):
    code, out, err = submit("--config", "configs/tiny.yaml", "--cluster", "slurm", *flags)
    assert code == 2
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith(f"error: {line}"), err
    assert "#SBATCH" not in out and "Traceback" not in err and not (tmp_path / "run").exists()


def test_publish_into_a_folder_of_other_files_is_refused_before_anything_runs(submit, tmp_path):
    """Publishing replaces its folder as a whole: a folder holding more than a report (say the
    repository's results/markov with its studies and scripts) is refused at once, and kept."""
    results = tmp_path / "results"
    (results / "sticky").mkdir(parents=True)
    (results / "summary.py").write_text("print('keep me')\n")
    code, out, err = submit("--config", "configs/tiny.yaml", "--cluster", "local", "--publish", str(results))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --publish {results}: it holds sticky, summary.py, which is not part of "
                          f"a published report"), err
    assert f"e.g. {results / 'main'}" in err
    assert (results / "summary.py").read_text() == "print('keep me')\n" and not (tmp_path / "run").exists()


def test_publish_may_replace_an_earlier_report_or_fill_an_empty_folder(tmp_path):
    from gtl_dist.eval.report import publish_problem, publish_report
    report = tmp_path / "report"
    assert publish_problem(report) is None  # absent
    report.mkdir()
    assert publish_problem(report) is None  # empty
    eval_dir = tmp_path / "eval"
    (eval_dir / "plots").mkdir(parents=True)
    for name in ("report.md", "results.csv", "plots/error.png"):
        (eval_dir / name).write_text(name)
    publish_report(eval_dir, report)
    assert publish_problem(report) is None  # a published report: replaced by the next one
    (report / "notes.txt").write_text("mine")
    assert "it holds notes.txt" in publish_problem(report)
    (tmp_path / "file").write_text("x")
    assert "it holds file" in publish_problem(tmp_path / "file")


@pytest.mark.parametrize("setting, line", [
    ("train.denoiser.lr=-0.001", "train.denoiser.lr: -0.001: the learning rate must be above 0 (e.g. 3e-4)"),
    ("train.vanilla.lr=0", "train.vanilla.lr: 0.0: the learning rate must be above 0"),
    ("train.edit_ratio.lr_grid=[1e-3, 0]", "train.edit_ratio.lr_grid: [0.001, 0.0]: a learning-rate grid needs "
                                           "distinct positive values"),
    ("train.denoiser.steps=0", "train.denoiser.steps: must be at least 1"),
    ("train.denoiser.val_every=0", "train.denoiser.val_every: must be at least 1"),
    ("train.finetune.save_every=-5", "train.finetune.save_every: must be at least 1"),
    ("train.ratio.log_every=0", "train.ratio.log_every: must be at least 1"),
    ("sample.gamma=nan", "sample.gamma: 'nan' is not a finite number; give a plain number"),
    ("sample.gamma=.inf", "sample.gamma: inf is not a finite number; give a plain number"),
    ("sample.paper_gamma=-1", "sample.paper_gamma: -1.0: a guidance strength must be 0 (unguided) or more"),
    ("cluster.timeout_min=0", "cluster.timeout_min: must be at least 1"),
])
def test_a_bad_config_value_is_one_line_naming_the_key_and_the_fix(submit, tmp_path, setting, line):
    code, out, err = submit("--config", "configs/tiny.yaml", "--cluster", "local", "--set", setting)
    assert code == 2
    assert len(err.splitlines()) == 1 and line in err, err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def corpus(tmp_path):
    """A small JSON-lines corpus of domains a, b and t, and the jsonl example's flags pointing at it."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} of {d}.", "domain": d}) + "\n"
                            for d in "abt" for i in range(4)))
    return path, ["--config", "configs/jsonl_example.yaml", "--set", "data.source_domains=[a, b]",
                  "--set", "data.target_domains=[t]", "--cluster", "local"]


@pytest.mark.parametrize("preview", [["--plan"], []])
def test_data_path_and_domains_are_checked_before_anything_is_queued(submit, tmp_path, corpus, preview):
    path, flags = corpus
    code, out, err = submit(*flags, "--set", f"data.path={path}", "--plan")
    assert code == 0 and "preflight: passed" in out, err
    cases = [(tmp_path / "missing.jsonl", [], f"data.path: {tmp_path / 'missing.jsonl'} does not exist; "
                                             f"data.corpus=jsonl reads a file"),
             (tmp_path, [], f"data.path: {tmp_path} is a folder, but data.corpus=jsonl reads a file"),
             (path, ["--set", "data.corpus=txt"], f"data.path: {path} is a file, but data.corpus=txt reads a folder"),
             (path, ["--set", "data.target_domains=[tt]"], f"{path}: domain 'tt' has 0 document(s); it needs at "
                                                          f"least 2 (train and test). Domains found: a (4), b (4), "
                                                          f"t (4). Fix data.source_domains / data.target_domains.")]
    for data_path, extra, line in cases:
        code, out, err = submit(*flags, "--set", f"data.path={data_path}", *extra, *preview)
        problems = [x for x in err.splitlines() if x.startswith("error: ")]
        assert code == 2 and len(problems) == 1 and line in problems[0], err
        assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "jobs").exists()


def test_a_txt_folder_without_a_configured_domain_names_the_folders_found(submit, tmp_path, corpus):
    _, flags = corpus
    for domain in ("a", "b", "t"):
        (tmp_path / "txt" / domain).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "txt" / domain / f"{i}.txt").write_text(f"document {i}")
    code, out, err = submit(*flags, "--set", "data.corpus=txt", "--set", f"data.path={tmp_path / 'txt'}", "--plan")
    assert code == 0, err
    code, out, err = submit(*flags, "--set", "data.corpus=txt", "--set", f"data.path={tmp_path / 'txt'}",
                            "--set", "data.target_domains=[u]", "--plan")
    assert code == 2 and "no folder for domain 'u'" in err and "folders found: a, b, t" in err


def test_a_run_directory_that_cannot_be_written_is_refused_also_by_plan(submit, monkeypatch, tmp_path, capsys):
    def run(run_dir, *preview):
        code = submit_cli.main(["--config", "configs/tiny.yaml", "--cluster", "local", "--run-dir", str(run_dir),
                                *preview])
        return code, capsys.readouterr().err

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for preview in (["--plan"], []):
        assert run(blocker / "run", *preview) == (2, f"error: --run-dir {blocker / 'run'}: {blocker} is a file, so "
                                                     f"no run directory can be made below it; choose another "
                                                     f"--run-dir\n")
    # Without write permission (or on a read-only filesystem), as access(2) reports it.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr("gtl_dist.cluster.run_dir.os.access",
                        lambda path, mode: Path(path) != locked and real_access(path, mode))
    code, err = run(locked / "run", "--plan")
    assert code == 2 and f"--run-dir {locked / 'run'}: {locked} cannot be written by this user" in err
    assert not (locked / "run").exists()


def test_the_default_cluster_with_no_controller_suggests_running_here(submit, monkeypatch, tmp_path):
    """sbatch on PATH makes SLURM the default; without a controller the error names no flag the
    user did not pass, and says how to run on this machine."""
    monkeypatch.setattr("gtl_dist.cluster.submit.shutil.which", lambda name: f"/usr/bin/{name}")
    code, out, err = submit("--config", "configs/tiny.yaml")
    problems = [x for x in err.splitlines() if x.startswith("error: ")]
    assert code == 2 and len(problems) == 1, err
    assert "SLURM controller does not answer (sinfo: no answer" in problems[0]
    assert problems[0].endswith("to run on this machine instead, add --cluster local")
    assert "--cluster slurm" not in err and not (tmp_path / "run" / "jobs").exists()


def test_help_explains_plan_and_the_shared_filesystem(submit, capsys):
    with pytest.raises(SystemExit):
        submit("--help")
    out = capsys.readouterr().out
    assert "--plan" in out and "Preflight" in out and "every node shares" in out


# -- batches --------------------------------------------------------------------------------------------

def test_each_group_has_its_own_world_size():
    cfg = _cfg()
    p = build_pipeline(cfg)
    big, small = p.group("denoiser"), p.group("vanilla")
    assert world_size(big, cfg, LaunchOptions("slurm", nodes=3, gpus_per_node=8)) == 24
    assert world_size(big, cfg, LaunchOptions("slurm", nodes=3, gpus_per_node=0)) == 3
    assert world_size(small, cfg, LaunchOptions("slurm", nodes=3, gpus_per_node=8)) == 1
    assert world_size(big, cfg, LaunchOptions("local", nodes=3)) == 3
    assert world_size(big, cfg, LaunchOptions("debug", nodes=3)) == 1


@pytest.mark.parametrize("nodes,gpus,micro", [(3, 0, None), (4, 0, None), (5, 2, None), (2, 4, 4), (3, 2, 4),
                                              (1, 8, 16), (2, 8, 8)])
def test_the_batch_check_agrees_with_the_training_loop(tmp_path, nodes, gpus, micro):
    cfg = _cfg("tiny", *([f"train.denoiser.micro_batch={micro}"] if micro else []))
    report = _check(cfg, tmp_path / "run", nodes=nodes, gpus_per_node=gpus)
    try:
        batch_geometry(cfg.train.denoiser, nodes * max(1, gpus), "denoiser")
        runtime = None
    except ConfigError as exc:
        runtime = str(exc)
    batch = [p for p in report.problems if "train.denoiser.global_batch" in p]
    assert len(batch) == (runtime is not None)
    assert runtime is None or batch[0].startswith(f"configs/x.yaml: {runtime} [the denoiser job runs")


def test_an_odd_classifier_micro_batch_is_refused(tmp_path):
    report = _check(_cfg("tiny", "train.classifier_ti.global_batch=3"), tmp_path / "run")
    assert report.problems == [
        "configs/x.yaml: train.classifier_ti.global_batch: balanced batches split each micro-batch in half, "
        "and 3 is odd; use an even micro-batch [the classifier_ti job runs 1 rank]"]


def test_a_markov_fraction_without_training_data_is_refused(tmp_path):
    report = _check(_cfg("tiny", "data.target_fractions=[1.0, 0.001]"), tmp_path / "run")
    assert any("data.target_fractions: fraction 0.001 of target 'sticky' leaves no training sequences" in p
               for p in report.problems)


# -- data: finite passes and target fractions, once the data stage has run ------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """tiny's data with a three-sample test set per domain, built (marker included) in a run directory."""
    from gtl_dist.cluster.tasks import run_task
    cfg = _cfg("tiny", "data.markov.num_test=3", "data.markov.num_source=200", "shards.build_workers=1")
    run_dir = tmp_path_factory.mktemp("built") / "run"
    assert run_task(cfg, run_dir, Task("data")) == "done"
    return cfg, run_dir


def test_a_validation_set_with_fewer_samples_than_ranks_is_refused(built):
    cfg, run_dir = built
    report = _check(cfg, run_dir, cluster="local", nodes=4)
    manifest = RunPaths(run_dir).data / "manifest.json"
    assert report.problems == [
        f"{manifest} [source/test]: a pass over its 3 sample(s) leaves 1 of 4 ranks without a sample, and "
        f"every rank of a validation or evaluation pass needs one; run it on at most 3 rank(s), or give the "
        f"set more samples (a test set grows with data.test_fraction) [the denoiser job runs --nodes 4 ranks "
        f"on this machine]"]
    assert _check(cfg, run_dir, cluster="local", nodes=2).problems == []  # 3 samples, 2 ranks
    assert not any("data stage has not run" in n for n in report.notes)


def test_finite_sets_follow_the_stages_validation_loaders():
    cfg = _cfg()
    assert pf.finite_sets(cfg, Task("denoiser")) == ["source/test"]
    assert pf.finite_sets(cfg, Task("ratio", "sticky", 1.0)) == ["source/test"]
    assert pf.finite_sets(_cfg("tiny", "protocol.selection=budget"), Task("ratio", "sticky", 1.0)) == []
    assert pf.finite_sets(cfg, Task("vanilla", "sticky", 1.0)) == []  # its held-out part is read whole
    assert pf.finite_sets(cfg, Task("reference_lm", "physics")) == ["physics/test"]
    assert pf.finite_sets(cfg, Task("domain_classifier", "physics")) == ["source/test", "physics/test"]
    per_target = _cfg("tiny", "pipeline.planner_scope=per_target")
    assert pf.finite_sets(per_target, Task("planner", "sticky", 1.0)) == []  # its held-out part, read whole


def test_without_built_data_the_data_checks_are_skipped_with_a_note(tmp_path):
    report = _check(_cfg(), tmp_path / "run", cluster="local", nodes=4)
    assert report.problems == []
    assert any("the data stage has not run" in n and "--stages data" in n for n in report.notes)


def test_text_target_fractions_are_checked_against_the_manifest(tmp_path):
    class Manifest:
        path = tmp_path / "manifest.json"

        def num_samples(self, set_name, fraction=None):
            return 3 if fraction == 1.0 else 1

    cfg = _cfg("demo", "data.target_fractions=[1.0, 0.3]", "protocol.holdout_min=2")
    report = pf.Report()
    ctx = _context(cfg, tmp_path)
    pf.check_target_data(ctx, report, Manifest())
    assert len(report.problems) == len({t for t in cfg.targets})
    assert all("at fraction 0.3 (n_T = 1" in p and "protocol.selection=budget" in p for p in report.problems)


def _context(cfg, run_dir, **opts):
    opts = LaunchOptions(**{"cluster": "slurm", **opts})
    pipeline = build_pipeline(cfg)
    plan = Launcher(cfg, run_dir, opts, pipeline).plan(query_slurm=False)
    return pf.Context(cfg, opts, pipeline, plan, RunPaths(run_dir), "configs/x.yaml")


# -- SLURM: partition, nodes, GPUs ---------------------------------------------------------------------------

def test_sinfo_lines_are_parsed():
    nodes = pf.parse_sinfo(SINFO + "b1|gpu|gpu:a100:4(S:0),gpu:v100:2\n")
    assert [(n.name, n.partition, n.gpus, n.default) for n in nodes] == [
        ("a1", "gpu", 8, True), ("a2", "gpu", 8, True), ("a3", "gpu", 4, True), ("c1", "cpu", 0, False),
        ("b1", "gpu", 6, False)]


def test_nodes_and_gpus_per_node_against_the_partition(tmp_path):
    run, cfg = tmp_path / "run", _cfg("tiny", "train.denoiser.global_batch=96")  # splits over 1..24 ranks
    assert _check(cfg, run, nodes=2, gpus_per_node=8).problems == []  # default partition: gpu
    assert _check(cfg, run, nodes=3, gpus_per_node=4).problems == []
    [too_many] = _check(cfg, run, nodes=3, gpus_per_node=8).problems
    assert too_many == ("--nodes 3 --gpus-per-node 8: the denoiser job asks for 3 node(s) with 8 GPU(s) each, "
                        "and partition 'gpu' has 2 such node(s) of 3 (sinfo; at most 8 GPUs on a node); use "
                        "--nodes 2 or fewer or another --partition")
    [too_big] = _check(cfg, run, nodes=1, gpus_per_node=16).problems
    assert "has 0 such node(s)" in too_big and "use --gpus-per-node 8 or fewer (0: CPU only)" in too_big
    [no_gpus] = _check(cfg, run, nodes=1, gpus_per_node=1, partition="cpu").problems
    assert "the denoiser job asks for 1 node(s) with 1 GPU(s) each, and partition 'cpu' has 0" in no_gpus
    assert _check(cfg, run, nodes=1, gpus_per_node=0, partition="cpu").problems == []
    [unknown] = _check(cfg, run, partition="gpus").problems
    assert unknown == "--partition gpus (or cluster.partition): SLURM has no such partition; partitions: cpu, gpu"


def test_an_unreachable_controller_refuses_a_submission_but_not_a_plan(tmp_path):
    facts = pf.Facts(free_bytes=10**15, slurm_error="sinfo: not found on PATH")
    assert _check(_cfg(), tmp_path / "run", facts, live=True).problems == [
        "--cluster slurm: cannot reach the SLURM controller: sinfo: not found on PATH"]
    report = _check(_cfg(), tmp_path / "run", facts, live=False)
    assert report.problems == [] and any("SLURM is not reachable" in n for n in report.notes)


# -- time limits -----------------------------------------------------------------------------------------------

def _log_step_time(run_dir, seconds_per_step, global_batch=64):
    log = RunPaths(run_dir).stage("denoiser") / "train_log.jsonl"
    log.parent.mkdir(parents=True)
    records = [{"step": 10 * i, "kind": "train", "samples_per_s": global_batch / seconds_per_step}
               for i in range(1, 4)] + [{"step": 20, "kind": "val", "loss": 1.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 40, "ki')  # cut by a kill
    return log


def test_a_time_limit_shorter_than_one_checkpoint_interval_is_refused(tmp_path):
    run = tmp_path / "run"
    report = _check(_cfg(), run)
    assert any("not checked for denoiser" in n and "no step time measured" in n for n in report.notes)
    log = _log_step_time(run, 64.0)  # tiny: save_every 20 steps -> 21 min against a 20 min limit
    [problem] = _check(_cfg(), run).problems
    assert problem == (
        f"configs/x.yaml: train.denoiser.save_every: a checkpoint every 20 steps takes 21 min at the 64.00 "
        f"s/step measured in {log}, more than the denoiser job's time limit of 20 min (cluster.timeout_min): "
        f"every job would end in a time-out before its first periodic checkpoint, requeued at most "
        f"cluster.max_requeue=5 times; lower train.denoiser.save_every to at most 18 or raise "
        f"cluster.timeout_min to at least 22")
    assert _check(_cfg(), run, time_min=30).problems == []
    [with_time] = _check(_cfg(), run, time_min=10).problems
    assert "time limit of 10 min (--time)" in with_time and "raise --time to at least 22" in with_time
    assert _check(_cfg(), run, cluster="debug").problems == []  # no time limits in the launcher's process


# -- disk -------------------------------------------------------------------------------------------------------

def test_parameters_are_counted_on_the_meta_device_exactly():
    from gtl_dist.models import build_model, count_parameters
    cfg = _cfg()
    vocab = pf._vocab(cfg, None)
    assert pf.parameter_count(cfg, "denoiser", vocab) == count_parameters(build_model("denoiser", cfg, vocab))


def test_checkpoint_bytes_count_kept_checkpoints_ema_best_files_and_the_export():
    cfg = _cfg()
    # keep_last 2 -> 3 checkpoints of 16 B/param (+4 for the EMA), no best files, a 4 B/param export
    assert pf.checkpoint_bytes(cfg.train.denoiser, 1000) == 1000 * (3 * 20 + 4)
    # select_best without EMA: 3 checkpoints of 16 B/param, 3 best files, the export
    assert pf.checkpoint_bytes(cfg.train.classifier_ti, 1000) == 1000 * (3 * 16 + 3 * 4 + 4)


def test_too_little_free_disk_is_refused(tmp_path):
    run = tmp_path / "run"
    report = _check(_cfg(), run, pf.Facts(free_bytes=1000, nodes=pf.parse_sinfo(SINFO)))
    [problem] = report.problems
    assert problem.startswith(f"{run}: the checkpoints and exports of the stages to run need about ")
    assert "and its filesystem has 0.0 MB free" in problem and "lower train.vanilla.keep_last" in problem
    assert pf.free_bytes(run / "not" / "yet") > 0  # measured where the run directory will be


# -- node-local paths --------------------------------------------------------------------------------------------

def test_node_local_run_directories_get_a_warning_on_slurm():
    def warnings(run_dir, **opts):
        return [n for n in _check(_cfg(), run_dir, **opts).notes if n.startswith("warning:")]
    assert "--run-dir /dev/shm/run is under /dev/shm" in warnings("/dev/shm/run", nodes=2)[0]
    assert warnings("/srv/shared/run", nodes=2) == []
    assert warnings("/dev/shm/run", cluster="local") == []
    shards = _check(_cfg("tiny", "shards.dir=/var/tmp/shards"), "/srv/shared/run").notes
    assert any(n.startswith("warning: shards.dir /var/tmp/shards is under /var/tmp") for n in shards)


def test_a_markov_sampler_that_truncates_states_is_warned_about(tmp_path):
    """docs/method.md §10: with top_k below the number of states no sampler ever emits the least
    likely state, and even the exact chain's samples are biased."""
    def warnings(*overrides):
        return [n for n in _check(_cfg("tiny", *overrides), tmp_path / "run").notes if "sample.top_k" in n]
    assert warnings() == []  # tiny: 4 states, top_k 4
    (warning,) = warnings("sample.top_k=3")
    assert "sample.top_k=3 is below data.markov.num_states=4" in warning and "set sample.top_k=4" in warning
