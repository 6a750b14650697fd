"""The distributed environment: who am I, who is rank 0, and DeepSpeed's process group.

This is the one place that reads RANK/WORLD_SIZE/SLURM_* and imports DeepSpeed.

Resolution order (:func:`resolve_dist_env`, a pure function of an environment mapping):

1. explicit ``RANK`` + ``WORLD_SIZE`` (torchrun, submitit's ``TorchDistributedEnvironment``,
   the tests): ``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` taken from the environment;
2. SLURM (``srun`` one task per GPU): ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``;
   ``MASTER_ADDR`` is the ``NodeAddr`` of the first node of ``SLURM_JOB_NODELIST`` (listed by
   submitit's hostlist parser, the one its ``SlurmJobEnvironment`` uses), falling back to the
   name; ``MASTER_PORT`` is derived from ``SLURM_JOB_ID`` so every rank computes the same port
   without talking to the others. submitit's ``TorchDistributedEnvironment`` would give the node's
   *name* as MASTER_ADDR, which need not resolve in DNS (a one-machine cluster names its nodes n1,
   n2 on 127.0.0.1), so it is used only under the local executor (gtl_dist/cluster/tasks.py);
3. a single process.

DeepSpeed is initialised with ``auto_mpi_discovery=False`` (without the variables above it would
try mpi4py, docs/operations.md), NCCL on GPUs and gloo on CPU; on GPUs a gloo group beside it
carries the loop's host values (:func:`all_reduce`), so agreeing on them never waits for the
device. ``DS_ACCELERATOR`` must be chosen before DeepSpeed is first imported (its accelerator
choice is cached), so every module imports DeepSpeed through :func:`import_deepspeed`.

On CPU DeepSpeed's process-group wrapper JIT-compiles a C++ op (``deepspeed_shm_comm``) the first
time it starts, about 40 s. SLURM's preemption signal reaches every process of a job step, the
compiler included, so a build inside a job can be killed half-way. Build it once at set-up::

    python -m gtl_dist.train.dist prebuild

into ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/gtl_dist/torch_extensions/<versions>``, override
with ``GTL_TORCH_EXTENSIONS_DIR`` or ``TORCH_EXTENSIONS_DIR``). Inside a SLURM job a missing build
is an error that says to run that command; outside SLURM it is built on first use.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from gtl_dist import slurm_query
from gtl_dist.compat import slurm_hostnames
from gtl_dist.log import get_logger, set_log_context

log = get_logger("train.dist")

# Ports derived from a job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN): below Linux's default
# ephemeral range (32768-60999), where every outgoing connection (gloo's among them) takes its
# local port, so a port derived inside it can be held already (EADDRINUSE at the rendezvous).
PORT_BASE = 20_000
PORT_SPAN = 12_768


class DistError(RuntimeError):
    """The distributed environment is inconsistent or incomplete; the message says how to fix it."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "env" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def variables(self) -> dict[str, str]:
        """The torch.distributed variables this environment stands for."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(self.local_rank), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise DistError(f"environment variable {key}={env[key]!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist (it runs rank 0 under srun's block distribution), by
    submitit's parser: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"``."""
    try:
        hosts = [h.strip() for h in slurm_hostnames(nodelist) if h.strip()]
    except ValueError as exc:
        raise DistError(f"SLURM_JOB_NODELIST={nodelist!r} is not a SLURM hostlist ({exc})") from None
    if not hosts:
        raise DistError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts[0]


def job_port(job_id: str) -> int:
    """A port every rank of one job (SLURM's, or the local executor's) derives alike;
    consecutive job ids get distinct ports."""
    digits = re.sub(r"\D", "", job_id)
    if not digits:
        raise DistError(f"job id {job_id!r} has no digits to derive MASTER_PORT from; "
                        f"set MASTER_PORT explicitly")
    return PORT_BASE + int(digits) % PORT_SPAN


def default_node_addr(node: str) -> str:
    """``NodeAddr`` of a SLURM node from ``scontrol show node``, or the name when unavailable."""
    try:
        return slurm_query.node_addr(node, timeout_s=20.0)
    except slurm_query.SlurmCommandError as exc:
        log.warning("MASTER_ADDR: could not ask SLURM for the address of %s (%s); using the "
                    "node name, which must then resolve on every node", node, exc)
        return node


def resolve_dist_env(env: Mapping[str, str],
                     node_addr: Callable[[str], str] = default_node_addr,
                     free_port: Callable[[], int] | None = None) -> DistEnv:
    """Rank, world size, local rank and rendezvous address from ``env`` (see module doc).

    ``node_addr`` maps a SLURM node name to its address; ``free_port`` picks a port for a
    single process (the default finds a free local port).
    """
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
        if missing:
            raise DistError(f"RANK and WORLD_SIZE must be set together; {missing[0]} is missing")
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        if world < 1 or not 0 <= rank < world:
            raise DistError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else (rank if world == 1 else None)
        if local_rank is None:
            raise DistError(f"RANK={rank}, WORLD_SIZE={world}: LOCAL_RANK is missing (the rank on "
                            f"this node; it picks the GPU). Set it, e.g. LOCAL_RANK=$SLURM_LOCALID")
        if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
            raise DistError(f"RANK={rank}, WORLD_SIZE={world}: MASTER_ADDR and MASTER_PORT must be "
                            f"set (the address and a free port of rank 0's host)")
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else (free_port or find_free_port)()
        return DistEnv(rank, world, local_rank, addr, port, "env")

    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env:
            addr = node_addr(first_host(env["SLURM_JOB_NODELIST"]))
        else:
            raise DistError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: cannot tell where "
                            "rank 0 runs; set MASTER_ADDR")
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = job_port(env["SLURM_JOB_ID"])
        else:
            raise DistError("SLURM_PROCID is set but SLURM_JOB_ID is not: cannot derive "
                            "MASTER_PORT; set MASTER_PORT")
        return DistEnv(rank, world, local_rank, addr, port, "slurm")

    return DistEnv(0, 1, 0, "127.0.0.1", (free_port or find_free_port)(), "single")


def find_free_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# DeepSpeed import, its JIT op, and the process group
# ----------------------------------------------------------------------------------------------

def extensions_dir() -> Path:
    """Where DeepSpeed's JIT ops are built: versioned, so an upgrade never loads a stale build."""
    explicit = os.environ.get("GTL_TORCH_EXTENSIONS_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    import torch
    from importlib.metadata import version
    tag = (f"torch{torch.__version__.replace('+', '-')}-ds{version('deepspeed')}"
           f"-py{sys.version_info.major}{sys.version_info.minor}")
    return Path.home() / ".cache" / "gtl_dist" / "torch_extensions" / tag


def import_deepspeed() -> Any:
    """Import DeepSpeed with the accelerator and extension directory fixed first."""
    if "deepspeed" not in sys.modules and "DS_ACCELERATOR" not in os.environ:
        import torch
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    # torch reads this at build/load time, so it also matters when DeepSpeed is already imported.
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir())
    import deepspeed
    return deepspeed


def _comm_op_builder() -> Any:
    """DeepSpeed's shared-memory comm op builder for this accelerator, or None if it has none."""
    import_deepspeed()
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def ops_built() -> bool:
    """True when the JIT op DeepSpeed needs at start-up exists (or this accelerator needs none)."""
    builder = _comm_op_builder()
    if builder is None:
        return True
    from deepspeed.git_version_info import installed_ops
    if installed_ops.get(builder.NAME, False):
        return True  # compiled into the DeepSpeed wheel (DS_BUILD_SHM_COMM=1)
    return (extensions_dir() / builder.name / f"{builder.name}.so").is_file()


def prebuild_ops() -> Path:
    """Build DeepSpeed's JIT op into :func:`extensions_dir` (idempotent; ~40 s the first time)."""
    builder = _comm_op_builder()
    out = extensions_dir()
    if builder is None:
        log.info("DeepSpeed needs no JIT op on this accelerator")
        return out
    if ops_built():
        log.info("DeepSpeed op %s already built in %s", builder.name, out)
        return out
    log.info("building DeepSpeed op %s into %s (once; about 40 s)", builder.name, out)
    out.mkdir(parents=True, exist_ok=True)
    builder.load(verbose=False)
    if not ops_built():
        raise DistError(f"building {builder.name} finished but {out / builder.name} holds no "
                        f"{builder.name}.so; check that gcc and ninja work")
    log.info("built %s", builder.name)
    return out


def require_ops(env: Mapping[str, str]) -> None:
    """Fail fast inside a SLURM job when the JIT op is missing; build it elsewhere."""
    if ops_built():
        return
    if "SLURM_JOB_ID" in env:
        raise DistError(
            f"DeepSpeed's JIT op is not built in {extensions_dir()}. Building it inside a "
            f"preemptible job can be killed half-way by the preemption signal; build it once "
            f"with `python -m gtl_dist.train.dist prebuild` on a login node (same venv and "
            f"TORCH_EXTENSIONS_DIR/GTL_TORCH_EXTENSIONS_DIR as the job), then resubmit")
    prebuild_ops()


# The values the torch.distributed variables had before init_distributed exported its own;
# shutdown puts them back, so a later stage in the same process resolves its environment afresh
# (a single process gets a new free port instead of inheriting the last stage's).
_saved_env: dict[str, Optional[str]] = {}
# The gloo group that carries host values beside NCCL ("gloo" -> group; empty: the default group
# is gloo already, or none is up). Set by init_distributed, dropped by shutdown.
_host_group: dict[str, Any] = {}


def init_distributed(env: Optional[Mapping[str, str]] = None, timeout_s: float = 1800.0) -> DistEnv:
    """Resolve the environment, export it, and start DeepSpeed's process group (idempotent).

    Pair it with :func:`shutdown`: one process may run several stages one after another (the
    launcher's ``--cluster debug``), each between one init and one shutdown."""
    env = os.environ if env is None else env
    dist_env = resolve_dist_env(env)
    exported = dist_env.variables()
    if not _saved_env:
        _saved_env.update({k: os.environ.get(k) for k in exported})
    os.environ.update(exported)
    deepspeed = import_deepspeed()
    import torch
    require_ops(env)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch.distributed.is_initialized():
        # Imported before the group exists: its functions take ``group=group.WORLD`` as a default
        # argument, evaluated at import. Imported later (DeepSpeed does, building an optimiser),
        # they would pin the world group, and its gloo threads, past destroy_process_group.
        import torch.distributed.nn.functional  # noqa: F401
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=timeout_s),
                                   rank=dist_env.rank, world_size=dist_env.world_size)
        if backend == "nccl":  # every rank creates it, in the same place: a collective
            _host_group["gloo"] = torch.distributed.new_group(backend="gloo",
                                                              timeout=timedelta(seconds=timeout_s))
    set_log_context(rank=dist_env.rank)
    log.debug("rank %d/%d (local %d) via %s, rendezvous %s:%d, backend %s", dist_env.rank,
              dist_env.world_size, dist_env.local_rank, dist_env.source, dist_env.master_addr,
              dist_env.master_port, backend)
    return dist_env


def _main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gtl_dist.train.dist",
        description="Distributed set-up helpers. `prebuild` compiles DeepSpeed's JIT op once, "
                    "outside any preemptible job (see the module docstring); `env` prints the "
                    "rank/world/rendezvous this process would use.")
    parser.add_argument("command", choices=["prebuild", "env"])
    args = parser.parse_args(argv)
    if args.command == "prebuild":
        print(prebuild_ops())
    else:
        d = resolve_dist_env(os.environ)
        print(" ".join(f"{k}={v}" for k, v in d.variables().items()) + f" (from {d.source})")
    return 0


if __name__ == "__main__":
    sys.exit(_main())


# ----------------------------------------------------------------------------------------------
# Small collectives the loop and the checkpointer share
# ----------------------------------------------------------------------------------------------

def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Reduce a short list of host floats over all ranks in one collective (float64), on the
    host: through gloo, the process group on CPUs and a group of its own beside NCCL on GPUs
    (:func:`init_distributed`), so that it never waits for the device (an NCCL collective is
    queued behind every kernel before it, and its result read back after them)."""
    import torch
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
           "min": torch.distributed.ReduceOp.MIN}
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t, op=ops[op], group=_host_group.get("gloo"))
    return t.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    import torch
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    import torch
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch
    torch.distributed.barrier()


def shutdown(barrier: bool = True) -> None:
    """Tear the process group down, after a final barrier unless ``barrier`` is False (a failing
    rank), so no rank leaves while another is still inside a collective (a rank exiting first
    aborts the others' gloo calls).

    Through DeepSpeed's ``destroy_process_group``, not torch's: DeepSpeed caches the groups it
    built (world, data parallel, ...) in module globals, and only its own teardown drops them.
    Destroyed behind its back, the next stage in this process (the launcher's ``--cluster
    debug`` runs every task in one process) would be handed the dead group ("Group ... is not
    registered") by ``deepspeed.initialize``.

    A group is only torn down (its gloo threads stopped) once nothing holds it any more. Left
    running, they outlive the stage: into the next task of the process, and into interpreter
    exit, where a rank whose peer has already exited can abort ("terminate called without an
    active exception"). So the engine is released first (TrainState.release), the collector
    runs here, and init_distributed keeps torch.distributed.nn from pinning the world group."""
    import torch
    if torch.distributed.is_initialized():
        if barrier:
            torch.distributed.barrier()
        gc.collect()  # a released engine (TrainState.release) in a cycle still holds its groups
        import_deepspeed().comm.destroy_process_group()
    _host_group.clear()  # destroyed with the process group
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()
