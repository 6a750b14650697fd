"""Submit-time preflight: the problems launchers/submit.py can know before it queues a job.

A problem found only when a job starts fails that job, and SLURM then cancels every job that
depends on it (``--kill-on-invalid-dep``). The preflight looks at the config, the plan (the tasks
about to run, each group at its own world size, :func:`gtl_dist.cluster.options.world_size`), the
run directory and SLURM, and reports one line per problem: the file or flag, the key, what was
expected and the fix. Notes say what it skipped and why. docs/operations.md, "Preflight", lists
what it cannot know.

- corpus: ``data.path`` exists and is the file or folder ``data.corpus`` reads; the configured
  domains are in the corpus, where a quick look tells (a folder's sub-folders, a JSON-lines file
  up to 64 MiB, the demo's packages), else the data build checks them;
- batches: ``train.<stage>.global_batch`` against micro-batch × world size, by the function the
  training loop calls (``engine.batch_geometry``), and the classifiers' source/target split;
- target data: a target fraction with no training sequences, or none left after the holdout
  (Markov: from the config; text: from the manifest);
- finite passes: a validation pass over a set with fewer samples than ranks, which the loader
  refuses (``data/loader.py``); a set with fewer shards than readers is fine (read by sample);
- SLURM: the controller answers, the partition exists and has the nodes and GPUs the jobs ask for;
- time limits: a job limit shorter than one checkpoint interval at the step time measured in an
  earlier run's ``train_log.jsonl`` (none measured: skipped, never guessed);
- disk: room on the run directory's filesystem for the checkpoints and exports to be written;
- node-local run directory or shards on SLURM (/tmp, /dev/shm, /var/tmp): a warning.

The manifest checks need the data stage to have run; until then they are skipped with a note.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gtl_dist.cluster.dag import Group, Pipeline
from gtl_dist.cluster.options import LaunchOptions, time_limit_key, world_size
from gtl_dist.cluster.sbatch import slurm_parameters
from gtl_dist.cluster.submissions import Plan
from gtl_dist.cluster.estimate import step_seconds
from gtl_dist.config import ConfigError, RunConfig, TrainConfig, check_split
from gtl_dist.paths import RunPaths
from gtl_dist.slurm_query import SlurmCommandError, run_slurm
from gtl_dist.stages import HELD_OUT, STAGES, StageGraph, Task

NODE_LOCAL = ("/tmp", "/dev/shm", "/var/tmp")
# A DeepSpeed checkpoint holds fp32 weights and two fp32 Adam moments (bf16 weights with an fp32
# master copy come to about the same); EMA copies, best-weights files and exports are fp32.
CHECKPOINT_BYTES_PER_PARAM = 16
WEIGHTS_BYTES_PER_PARAM = 4
# GPUs in an sinfo GRES field: "gpu:8", "gpu:a100:4(S:0-1),gpu:v100:2", "(null)".
_GPUS = re.compile(r"gpu(?::[^:,()]+)?:(\d+)")


@dataclass(frozen=True)
class Node:
    """One line of ``sinfo -N``: a node as a member of one partition."""
    name: str
    partition: str
    gpus: int
    default: bool  # the partition is the cluster's default


@dataclass
class Facts:
    """What the preflight learns outside the config and the run directory (tests pass their
    own): free bytes on the run directory's filesystem, SLURM's nodes or why it gave none."""
    free_bytes: int
    nodes: Optional[list[Node]] = None
    slurm_error: Optional[str] = None


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return bool(self.problems)


@dataclass
class Context:
    """The submission as planned: what every check reads."""
    cfg: RunConfig
    opts: LaunchOptions
    pipeline: Pipeline
    plan: Plan
    paths: RunPaths
    source: str  # the config file(s), for messages

    def groups_to_run(self, training: bool = False) -> list[tuple[Group, list[Task]]]:
        """Selected groups with tasks to run (training tasks only, if asked), with those tasks."""
        out = []
        for group in self.pipeline.groups:
            todo = [t for t in group.tasks if t in self.plan.to_run and (t.kind in STAGES or not training)]
            if todo:
                out.append((group, todo))
        return out

    def ranks(self, group: Group) -> str:
        """How many ranks the group's job runs, and which flags say so."""
        n = world_size(group, self.cfg, self.opts)
        if n == 1:
            return f"the {group.name} job runs 1 rank"
        if self.opts.cluster == "local":
            return f"the {group.name} job runs --nodes {n} ranks on this machine"
        gpus = self.opts.gpus(self.cfg)
        per_node = f"one per GPU, --gpus-per-node {gpus}" if gpus else "no GPUs: one per node"
        return (f"the {group.name} job runs {n} ranks: --nodes {self.opts.nodes} × {n // self.opts.nodes} "
                f"({per_node})")


# -- facts from outside ---------------------------------------------------------------------------------

def gather_facts(opts: LaunchOptions, run_dir: str | Path) -> Facts:
    """Free disk space and, for --cluster slurm, the nodes sinfo lists (or why it could not)."""
    facts = Facts(free_bytes=free_bytes(run_dir))
    if opts.cluster == "slurm":
        try:
            facts.nodes = sinfo_nodes()
        except SlurmCommandError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            facts.slurm_error = lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else "")
    return facts


def sinfo_nodes() -> list[Node]:
    """Every node of every partition, as the SLURM controller sees them now."""
    return parse_sinfo(run_slurm(["sinfo", "-h", "-N", "-o", "%N|%P|%G"]).stdout)


def free_bytes(path: str | Path) -> int:
    """Free space on the filesystem that holds ``path`` (or will, once it is created)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def parse_sinfo(text: str) -> list[Node]:
    """Lines ``<node>|<partition>[*]|<gres>`` of ``sinfo -h -N -o %N|%P|%G``."""
    nodes = []
    for line in text.splitlines():
        if line.strip():
            name, partition, gres = line.strip().split("|")
            nodes.append(Node(name, partition.rstrip("*"), sum(int(n) for n in _GPUS.findall(gres)),
                              partition.endswith("*")))
    return nodes


# -- the checks -------------------------------------------------------------------------------------------

def preflight(cfg: RunConfig, opts: LaunchOptions, pipeline: Pipeline, plan: Plan, run_dir: str | Path,
              facts: Facts, source: str, live: bool = True) -> Report:
    """Every check. ``live=False`` (--plan, --dry-run) makes an unreachable SLURM a note, not a
    problem."""
    ctx = Context(cfg, opts, pipeline, plan, RunPaths(Path(run_dir).resolve()), source)
    report = Report()
    manifest = _manifest(ctx, report)
    check_corpus(ctx, report)
    check_batches(ctx, report)
    check_target_data(ctx, report, manifest)
    check_finite_passes(ctx, report, manifest)
    check_slurm(ctx, report, facts, live)
    check_time_limits(ctx, report)
    check_disk(ctx, report, facts.free_bytes, manifest)
    check_node_local(ctx, report)
    return report


def _manifest(ctx: Context, report: Report):
    """The run's shard manifest once the data stage has run; None (and a note) before."""
    if Task("data") not in ctx.plan.done:
        report.notes.append("the data stage has not run, so the checks that read its manifest (validation "
                            "passes against ranks, text targets' sequence counts) are skipped; submit "
                            "--stages data first to have them before the rest is queued")
        return None
    from gtl_dist.data import load_run_manifest
    return load_run_manifest(ctx.cfg, ctx.paths.root)


def check_corpus(ctx: Context, report: Report) -> None:
    """The corpus the data stage is about to read: data.path exists and is the file or folder
    data.corpus reads, and the configured domains are in it (where a quick look can tell)."""
    if Task("data") not in ctx.plan.to_run:
        return
    from gtl_dist.data.corpus import precheck
    from gtl_dist.data.documents import CorpusError
    try:
        note = precheck(ctx.cfg)
    except CorpusError as exc:
        report.problems.append(f"{ctx.source}: {exc}")
        return
    if note:
        report.notes.append(note)


def check_batches(ctx: Context, report: Report) -> None:
    """``global_batch`` splits into micro-batches × accumulation × the stage's world size exactly
    as the training loop splits it, and a classifier micro-batch holds both domains."""
    from gtl_dist.train.engine import batch_geometry
    from gtl_dist.train.jobs import check_classifier_micro_batch
    for group, tasks in ctx.groups_to_run(training=True):
        stage = tasks[0].kind
        tc = getattr(ctx.cfg.train, stage)
        try:
            geometry = batch_geometry(tc, world_size(group, ctx.cfg, ctx.opts), stage)
            if STAGES[stage].role in ("classifier_ti", "classifier_td"):
                check_classifier_micro_batch(tc, stage, geometry.micro_batch)
        except ConfigError as exc:
            report.problems.append(f"{ctx.source}: {exc} [{ctx.ranks(group)}]")


def check_target_data(ctx: Context, report: Report, manifest) -> None:
    """Every target fraction keeps training sequences, also after the holdout; replicates that
    share target sequences and a Markov sampler that truncates are named (warnings)."""
    if ctx.cfg.data.corpus == "markov":
        _check_markov_fractions(ctx, report)
        _check_markov_truncation(ctx, report)
        return
    if manifest is None:
        return
    _check_replicate_overlap(ctx, report, manifest)
    from gtl_dist.data.manifest import ManifestError
    cells = {(t.target, t.fraction) for t in ctx.plan.to_run if t.kind in STAGES and t.fraction is not None}
    for target, fraction in sorted(cells):
        try:
            n = manifest.num_samples(f"{target}/train", fraction)
            check_split(n, ctx.cfg.protocol, f"target '{target}' at fraction {fraction} (n_T = {n}, "
                                             f"{manifest.path})")
        except (ManifestError, ConfigError) as exc:
            report.problems.append(str(exc))


def _check_markov_fractions(ctx: Context, report: Report) -> None:
    from gtl_dist.data.manifest import fraction_count
    d = ctx.cfg.data
    train = d.markov.num_target - round(d.overlap * d.markov.num_target)
    for target in ctx.cfg.targets:
        for f in d.target_fractions:
            if fraction_count(f, train) < 1:
                report.problems.append(
                    f"{ctx.source}: data.target_fractions: fraction {f} of target '{target}' leaves no "
                    f"training sequences ({train} available after data.overlap={d.overlap}); raise "
                    f"data.markov.num_target or the fraction")


def _check_markov_truncation(ctx: Context, report: Report) -> None:
    """With top_k below the number of states a sampler never emits the least likely state, and the
    exact model's samples are no longer its own (docs/method.md §10)."""
    s, states = ctx.cfg.sample, ctx.cfg.data.markov.num_states
    if s.top_k < states:
        report.notes.append(f"warning: {ctx.source}: sample.top_k={s.top_k} is below data.markov.num_states="
                            f"{states}: every sampler drops the least likely states at each step, so even "
                            f"the exact target chain's samples are biased; set sample.top_k={states}")


def _check_replicate_overlap(ctx: Context, report: Report, manifest) -> None:
    """Replicates that cannot draw disjoint target sequences (protocol.replicates: redraw) are not
    independent there: the report's intervals then understate the spread of the data draw."""
    from gtl_dist.config import replicates_disjoint
    pipeline = ctx.cfg.pipeline
    for target in ctx.cfg.targets:
        total = manifest.num_samples(f"{target}/train")
        shared = [f for f in ctx.cfg.data.target_fractions
                  if not replicates_disjoint(total, manifest.num_samples(f"{target}/train", f),
                                             pipeline.seeds_at(f), ctx.cfg.protocol)]
        if shared:
            report.notes.append(f"warning: target '{target}': at fraction(s) {', '.join(map(str, shared))} the "
                                f"replicates of pipeline.seeds share target sequences ({total} in all); their "
                                f"spread leaves out part of the data draw")


def finite_sets(cfg: RunConfig, task: Task) -> list[str]:
    """The shard sets ``task`` reads in finite passes: the loaders of its ``validation_loaders``
    (gtl_dist/train/shard_recipe.py), its row's validation sets; held-out target parts are read whole, not
    through a loader, and a stage that validates on one validates on nothing under selection budget."""
    val_sets = list(StageGraph(cfg).stage_sets(task.kind)[1].values())
    if HELD_OUT in val_sets and cfg.protocol.selection != "holdout":
        return []
    return [s.format(target=task.target) for s in val_sets if s != HELD_OUT]


def check_finite_passes(ctx: Context, report: Report, manifest) -> None:
    """Each rank of a validation pass gets a sample, which the loader requires (its own check)."""
    if manifest is None:
        return
    from gtl_dist.data.loader import pass_batches
    from gtl_dist.data.manifest import ManifestError
    for group, tasks in ctx.groups_to_run(training=True):
        ranks = world_size(group, ctx.cfg, ctx.opts)
        for set_name in sorted({s for t in tasks for s in finite_sets(ctx.cfg, t)}):
            try:
                pass_batches(f"{manifest.path} [{set_name}]", manifest.num_samples(set_name), 0, ranks, 1, 1)
            except ManifestError as exc:
                report.problems.append(f"{exc} [{ctx.ranks(group)}]")


def check_slurm(ctx: Context, report: Report, facts: Facts, live: bool) -> None:
    """The controller answers; the partition exists and has the nodes and GPUs each job asks for."""
    if ctx.opts.cluster != "slurm":
        return
    if facts.nodes is None:
        if live and ctx.opts.cluster_chosen:
            report.problems.append(f"--cluster slurm: cannot reach the SLURM controller: {facts.slurm_error}")
        elif live:
            report.problems.append(f"sbatch is on PATH, so the launcher submits to SLURM by default, but the "
                                   f"SLURM controller does not answer ({facts.slurm_error}); to run on this "
                                   f"machine instead, add --cluster local")
        else:
            report.notes.append(f"SLURM is not reachable, so the partition, node and GPU checks are skipped "
                                f"and recorded jobs count as not queued ({facts.slurm_error})")
        return
    asked = ctx.opts.partition or ctx.cfg.cluster.partition
    known = sorted({n.partition for n in facts.nodes})
    if asked and asked not in known:
        report.problems.append(f"--partition {asked} (or cluster.partition): SLURM has no such partition; "
                               f"partitions: {', '.join(known) or 'none'}")
        return
    name = asked or next((n.partition for n in facts.nodes if n.default), None)
    if name is None:
        report.problems.append(f"--partition: none given and SLURM has no default partition; pass one of "
                               f"{', '.join(known) or 'none'} (or set cluster.partition)")
        return
    members = [n for n in facts.nodes if n.partition == name]
    asks: dict[tuple[int, int], str] = {}
    for group, _ in ctx.groups_to_run():
        params = slurm_parameters(group, ctx.cfg, ctx.opts, run_name="")
        asks.setdefault((params["nodes"], params.get("gpus_per_node", 0)), group.name)
    for (nodes, gpus), group_name in sorted(asks.items()):
        fit = sum(n.gpus >= gpus for n in members)
        if fit < nodes:
            most = max(n.gpus for n in members)
            fix = (f"use --nodes {fit} or fewer" if fit else
                   f"use --gpus-per-node {most} or fewer (0: CPU only)") + " or another --partition"
            report.problems.append(
                f"--nodes {ctx.opts.nodes} --gpus-per-node {ctx.opts.gpus(ctx.cfg)}: the {group_name} job "
                f"asks for {nodes} node(s) with {gpus} GPU(s) each, and partition '{name}' has {fit} such "
                f"node(s) of {len(members)} (sinfo; at most {most} GPUs on a node); {fix}")


def check_time_limits(ctx: Context, report: Report) -> None:
    """A job's time limit holds one checkpoint interval at the step time an earlier run measured."""
    if ctx.opts.cluster == "debug":
        return
    unmeasured = []
    for group, tasks in ctx.groups_to_run(training=True):
        stage = tasks[0].kind
        tc = getattr(ctx.cfg.train, stage)
        measured = step_seconds(ctx.cfg, ctx.paths, group.tasks)
        if measured is None:
            unmeasured.append(stage)
            continue
        step_s, log_path = measured
        limit = slurm_parameters(group, ctx.cfg, ctx.opts, run_name="")["time"]  # the local executor's too
        interval = min(tc.save_every, tc.steps)
        if interval * step_s <= 60 * limit:
            continue
        key = time_limit_key(group, ctx.opts)
        most = math.floor(60 * limit / step_s)
        lower = f"lower train.{stage}.save_every to at most {most} or " if most >= 1 else ""
        report.problems.append(
            f"{ctx.source}: train.{stage}.save_every: a checkpoint every {interval} steps takes "
            f"{interval * step_s / 60:.0f} min at the {step_s:.2f} s/step measured in {log_path}, more than "
            f"the {group.name} job's time limit of {limit} min ({key}): every job would end in a time-out "
            f"before its first periodic checkpoint, requeued at most cluster.max_requeue="
            f"{ctx.cfg.cluster.max_requeue} times; {lower}raise {key} to at least "
            f"{math.ceil(interval * step_s / 60)}")
    if unmeasured:
        report.notes.append(f"time limits against checkpoint intervals not checked for "
                            f"{', '.join(unmeasured)}: no step time measured yet (train_log.jsonl of an "
                            f"earlier run in this run directory)")


def checkpoint_bytes(tc: TrainConfig, params: int) -> int:
    """Disk one training task holds at most: keep_last + 1 DeepSpeed checkpoints (the newest is
    written before the oldest is pruned) with their fp32 EMA copy, the best-weights files they
    refer to, and the export."""
    kept = tc.keep_last + 1
    per_checkpoint = CHECKPOINT_BYTES_PER_PARAM + (WEIGHTS_BYTES_PER_PARAM if tc.ema > 0 else 0)
    best = kept * WEIGHTS_BYTES_PER_PARAM if tc.select_best else 0
    return params * (kept * per_checkpoint + best + WEIGHTS_BYTES_PER_PARAM)


def parameter_count(cfg: RunConfig, stage: str, vocab) -> int:
    """Parameters of the stage's network, built on the meta device (no memory, no init)."""
    import torch

    from gtl_dist.models import build_model, count_parameters
    models_log = logging.getLogger("gtl_dist.models")
    level = models_log.level
    models_log.setLevel(logging.WARNING)  # build_model logs every size; the plan needs none of it
    try:
        with torch.device("meta"):
            return count_parameters(build_model(STAGES[stage].role, cfg, vocab))
    finally:
        models_log.setLevel(level)


def _vocab(cfg: RunConfig, manifest):
    """The run's id space: the manifest's once the data is built, else the one the build gives."""
    from gtl_dist.models import VocabSpec
    if manifest is not None:
        return VocabSpec.from_manifest(manifest)
    if cfg.data.corpus == "markov":
        states = cfg.data.markov.num_states
        return VocabSpec(size=states + 1, mask_id=states, data_ids=states)
    from gtl_dist.data.tokenizer import MASK_ID, PAD_ID
    return VocabSpec(size=cfg.tokenizer.vocab_size, mask_id=MASK_ID, pad_id=PAD_ID)


def check_disk(ctx: Context, report: Report, free: int, manifest) -> None:
    """The run directory's filesystem has room for the checkpoints and exports of the stages to run."""
    vocab = _vocab(ctx.cfg, manifest)
    need = {}
    for _, tasks in ctx.groups_to_run(training=True):
        stage = tasks[0].kind
        tc = getattr(ctx.cfg.train, stage)
        need[stage] = len(tasks) * checkpoint_bytes(tc, parameter_count(ctx.cfg, stage, vocab))
    if not need:
        return
    total, top = sum(need.values()), max(need, key=need.get)
    summary = (f"the checkpoints and exports of the stages to run need about {_size(total)} "
               f"(train.<stage>.keep_last + 1 checkpoints at {CHECKPOINT_BYTES_PER_PARAM} B/param each; "
               f"most: {top}, {_size(need[top])})")
    if total > free:
        report.problems.append(f"{ctx.paths.root}: {summary}, and its filesystem has {_size(free)} free; "
                               f"free space, lower train.{top}.keep_last, or use a --run-dir on a larger "
                               f"filesystem")
    else:
        report.notes.append(f"disk: {summary}; {_size(free)} free at {ctx.paths.root}")


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_node_local(ctx: Context, report: Report) -> None:
    """SLURM runs one run's jobs on several nodes, which must share the run directory and the
    shards; that cannot be checked from here, but obviously node-local paths are flagged."""
    if ctx.opts.cluster != "slurm":
        return
    from gtl_dist.data import data_dir
    shards = data_dir(ctx.cfg, ctx.paths.root).resolve()
    outside = ctx.paths.root not in shards.parents
    for key, path in [("--run-dir", ctx.paths.root)] + [("shards.dir", shards)] * outside:
        local = next((p for p in NODE_LOCAL if Path(p) == path or Path(p) in path.parents), None)
        if local:
            report.notes.append(f"warning: {key} {path} is under {local}, which is local to each node; the "
                                f"jobs of a run land on different nodes (and the source stage spans --nodes "
                                f"{ctx.opts.nodes}), so use a filesystem every node shares (ignore this on "
                                f"a one-machine cluster)")
