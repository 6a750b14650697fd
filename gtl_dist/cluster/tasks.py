"""What one pipeline task does when its job runs: the single entry point behind every job.

``run_task(cfg, run_dir, task)`` dispatches on the task kind (data, a training stage, a sample
shard, evaluation), and on success rank 0 writes the task's completion marker
(``DONE.json``-style, atomically) with the task's input hash. The launcher decides what to
(re)submit from these markers alone; see ``gtl_dist.cluster.dag`` and ``gtl_dist.stages``.

``TaskRunner`` wraps ``run_task`` for submitit: it is ``Checkpointable``, so a preemption or
time-limit signal requeues the job (the training loop first saves a checkpoint collectively,
then hands over to submitit's handler on rank 0; see ``gtl_dist.train.preempt``), and a
requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from gtl_dist.cluster.dag import Pipeline
from gtl_dist.config import RunConfig, config_from_dict
from gtl_dist.io import atomic_write_json, read_json
from gtl_dist.locks import flocked
from gtl_dist.log import get_logger, set_log_context, setup_logging
from gtl_dist.paths import RunPaths
from gtl_dist.stages import STAGES, Task

log = get_logger("cluster.tasks")


class TaskFailed(RuntimeError):
    """A task could not run; the message names what is missing and which stage produces it."""


def marker_valid(pipeline: Pipeline, paths: RunPaths, task: Task) -> bool:
    """Whether ``task`` finished with the inputs the current configuration gives it."""
    path = task.marker(paths)
    if not path.is_file():
        return False
    try:
        marker = read_json(path)
    except ValueError:
        return False
    return marker.get("input_hash") == pipeline.input_hash(task)


def write_marker(pipeline: Pipeline, paths: RunPaths, task: Task, **info: Any) -> Path:
    path = task.marker(paths)
    atomic_write_json(path, {"task": task.key, "input_hash": pipeline.input_hash(task),
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info})
    return path


def _rank() -> int:
    """This process's rank in its job, from the environment alone (no rendezvous)."""
    from gtl_dist.train.dist import resolve_dist_env
    return resolve_dist_env(os.environ, node_addr=lambda name: name, free_port=lambda: 0).rank


@contextmanager
def task_lock(paths: RunPaths, task: Task, rank: int) -> Iterator[None]:
    """Hold ``task``'s lock for this rank (a flock under ``jobs/running/``) for the block, or fail
    at once: never do two jobs write one task's directory, whichever launcher started them."""
    path = paths.jobs / "running" / f"{task.key.replace('/', '+')}.rank{rank}.lock"
    with flocked(path, wait=False) as got:
        if not got:
            raise TaskFailed(
                f"{task.key}: another job runs this task right now (it holds {path}), and two jobs "
                f"must never write one task's directory; wait for it to end or stop it (python "
                f"launchers/status.py --run-dir {paths.root} names its job), then run the task again")
        yield


def run_task(cfg: RunConfig, run_dir: str | Path, task: Task, command: Optional[str] = None) -> str:
    """Run ``task`` in this process (one rank of its job), holding its task_lock. Returns "done",
    "skipped" (already complete with the same inputs) or "preempted" (saved; the job should be
    requeued). ``command`` is the launcher's command line, which the report cites."""
    paths = RunPaths(run_dir)
    rank = _rank()
    with task_lock(paths, task, rank):
        return _run_task(cfg, paths, task, command, is_main=rank == 0)


def _run_task(cfg: RunConfig, paths: RunPaths, task: Task, command: Optional[str], is_main: bool) -> str:
    pipeline = Pipeline(cfg)
    if marker_valid(pipeline, paths, task):
        log.info("%s: already done with the same inputs (%s); nothing to do", task.key, task.marker(paths))
        return "skipped"
    info: dict[str, Any] = {}
    if task.kind == "data":
        from gtl_dist.data import prepare_data
        manifest = prepare_data(cfg, paths.root)
        info["data_hash"] = manifest.data_hash
    elif task.kind in STAGES:  # gtl_dist.train.run_stage
        from gtl_dist.train import run_stage
        result = run_stage(cfg, paths.root, task.kind, task.target, task.fraction, task.seed)
        if result.status != "finished":
            return "preempted"
        info.update(step=result.step, val_loss=result.val_loss, export=str(result.export))
    elif task.kind == "sample":
        info.update(_sample(cfg, paths, task))
    elif task.kind == "eval":
        info.update(_evaluate(cfg, paths, command))
    else:
        raise TaskFailed(f"unknown task kind '{task.kind}'")
    if is_main:
        write_marker(pipeline, paths, task, **info)
    return "done"


# -- sampling ---------------------------------------------------------------------------------------

def _device():
    from gtl_dist.train.engine import detect_hardware
    return detect_hardware().device


def _tokenizer(cfg: RunConfig, paths: RunPaths):
    if not cfg.uses_tokenizer:
        return None
    from gtl_dist.data import load_run_manifest
    from gtl_dist.data.tokenizer import Tokenizer
    manifest = load_run_manifest(cfg, paths.root)
    return Tokenizer(manifest.tokenizer_path, expected_hash=manifest.tokenizer_hash)


def _sample(cfg: RunConfig, paths: RunPaths, task: Task) -> dict[str, Any]:
    from gtl_dist.diffusion import NoiseSchedule
    from gtl_dist.sample import sample_shard, write_sample_shard
    from gtl_dist.sample.networks import method_networks

    device = _device()
    nets = method_networks(cfg, paths, task.method, task.target, task.fraction, task.seed,
                           needed_by=f"task {task.key}", device=device)
    t0 = time.monotonic()
    shard = sample_shard(nets, cfg.sample, NoiseSchedule.from_config(cfg.noise), task.shard, device,
                         replicate=task.seed)
    seconds = time.monotonic() - t0
    tok = _tokenizer(cfg, paths)
    texts = [tok.decode(row) for row in shard.tokens.tolist()] if tok is not None else None
    out = paths.samples(task.method, task.target, task.fraction, task.seed) / f"shard-{task.shard:04d}.jsonl"
    write_sample_shard(out, shard, texts)
    per_seq = shard.stats.per_sequence()
    log.info("%s: %d samples in %.1fs -> %s (network evaluations per sequence: %s)", task.key,
             len(shard.tokens), seconds, out, per_seq)
    return {"samples": len(shard.tokens), "seconds": round(seconds, 3), "seed": shard.seed,
            "evaluations_per_sequence": per_seq}


# -- evaluation -------------------------------------------------------------------------------------

def _evaluate(cfg: RunConfig, paths: RunPaths, command: Optional[str]) -> dict[str, Any]:
    from gtl_dist.eval.evaluate import run_eval
    if cfg.data.corpus == "markov":
        files = run_eval(cfg, paths, command=command)
    else:
        files = run_eval(cfg, paths, command=command, **_text_eval_inputs(cfg, paths))
    return {"report": str(files.report_md)}


def _text_eval_inputs(cfg: RunConfig, paths: RunPaths) -> dict[str, Any]:
    """Held-out text and the networks the text metrics need, as plain callables: the evaluator's
    domain classifier and reference LM (stages of EVALUATOR_STAGES) per target, and every method's
    conditional per (method, target, fraction, seed)."""
    import torch

    from gtl_dist.data import load_run_manifest, read_samples
    from gtl_dist.eval.evaluate_text import HeldOut
    from gtl_dist.exports import load_upstream
    from gtl_dist.models import VocabSpec
    from gtl_dist.sample.networks import method_log_probs, method_networks, sequence_level_guide

    device = _device()
    manifest = load_run_manifest(cfg, paths.root)
    tok = _tokenizer(cfg, paths)
    who = "the evaluation"

    def heldout(set_name: str) -> HeldOut:
        tokens = read_samples(manifest, set_name, 0, manifest.num_samples(set_name),
                              expected_tokenizer_hash=manifest.tokenizer_hash).tolist()
        return HeldOut([tok.decode(row) for row in tokens], tokens)

    def instrument(stage: str):
        def load(target: str):
            model = load_upstream(cfg, paths, stage, target, needed_by=who, device=device)

            @torch.no_grad()
            def call(tokens):
                return model(torch.as_tensor(tokens, dtype=torch.long, device=device)).float().cpu()
            return call
        return load

    def conditional(method, target, fraction, seed):
        nets = method_networks(cfg, paths, method, target, fraction, seed, needed_by=who, device=device)
        if sequence_level_guide(nets):
            return None
        return lambda z: method_log_probs(nets, z.to(device))

    return dict(references={target: heldout(f"{target}/test") for target in cfg.targets},
                source_heldout=heldout("source/test"),
                evaluator_texts={target: heldout(f"{target}/evaluator") for target in cfg.targets},
                classifier=instrument("domain_classifier"), reference_lm=instrument("reference_lm"),
                conditional=conditional, vocab=VocabSpec.from_manifest(manifest),
                eos_id=manifest.eos_id, bos_id=manifest.bos_id)


# -- submitit ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskRunner:
    """The callable submitit pickles: one pipeline task per job (or array element).

    ``command`` is the launcher's command line (the report cites it); ``threads`` the torch
    threads of each rank (None: SLURM's CPUs per task, else torch's default).

    Checkpointable: on preemption or time-out submitit calls ``checkpoint`` (rank 0, inside its
    signal handler, after our collective save) and requeues the same task, which resumes.
    """
    cfg_dict: dict[str, Any]
    run_dir: str
    command: Optional[str] = None
    threads: Optional[int] = None

    def __call__(self, task: Task) -> str:
        setup_logging()
        set_log_context(task=task.key)
        _export_local_distributed_env()
        _limit_threads(self.threads)
        cfg = config_from_dict(self.cfg_dict, source=f"{self.run_dir}/config.yaml")
        where = ""
        if "SLURM_JOB_ID" in os.environ:  # which rank runs where: the first thing to check in a log
            env = os.environ
            where = (f" [slurm job {env['SLURM_JOB_ID']}, rank {env.get('SLURM_PROCID', '?')}/"
                     f"{env.get('SLURM_NTASKS', '?')} on node {env.get('SLURMD_NODENAME', '?')}, "
                     f"restart {env.get('SLURM_RESTART_COUNT', '0')}]")
        log.info("task %s (run %s)%s", task.key, self.run_dir, where)
        return run_task(cfg, self.run_dir, task, self.command)

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit
        # No I/O here: the training loop already saved before submitit's handler ran.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _limit_threads(threads: Optional[int]) -> None:
    """Use the CPUs this task was given, no more: torch's default (every core) makes tasks that
    share a node thrash; with small models that costs several times the compute itself."""
    cpus = threads or os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus:
        import torch
        torch.set_num_threads(max(1, int(cpus)))


def _export_local_distributed_env() -> None:
    """Under submitit's local executor, expose the ranks as RANK/WORLD_SIZE/... (on SLURM the
    resolver reads SLURM_* itself and finds rank 0's address through NodeAddr). The rendezvous
    port is a free one for a single rank, and one derived from the job id below the ephemeral
    range for several (train.dist.job_port): submitit's own pick, anywhere in 20000-60000, can
    be a port another connection holds."""
    if "SUBMITIT_LOCAL_JOB_ID" not in os.environ or "RANK" in os.environ:
        return
    import submitit
    from gtl_dist.train.dist import find_free_port, job_port
    ranks = submitit.helpers.TorchDistributedEnvironment()
    if "MASTER_PORT" not in os.environ:
        ranks.master_port = find_free_port() if ranks.world_size == 1 \
            else job_port(submitit.JobEnvironment().job_id)
    ranks.export(set_cuda_visible_devices=False)
