"""Shared helpers for the training tests: a toy job kind, a rank launcher, result readers.

Run as a script, this file is one rank of a toy training stage (the driver the multi-process
tests spawn)::

    RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \\
        python tests/train_helpers.py --run-dir D [--set train.denoiser.zero_stage=2 ...]

The toy task goes through exactly the loop, engine, checkpointing, preemption and metrics code
the real job kinds use; only its network (embeddings + one mixing layer, with dropout) and its
data (an in-memory Markov chain behind the ShardLoader cursor protocol) are small stand-ins, so
these tests do not depend on the data and model packages.
"""

from __future__ import annotations

import json
import re
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TOY_VOCAB = 6          # data ids 0..5, mask id 6
TOY_LEN = 8


# ----------------------------------------------------------------------------------------------
# The toy job kind
# ----------------------------------------------------------------------------------------------

def toy_sequences(n: int, seed: int) -> torch.Tensor:
    """A sticky Markov chain: the next token repeats the previous one with probability 0.7."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, TOY_LEN, dtype=torch.long)
    x[:, 0] = torch.randint(0, TOY_VOCAB, (n,), generator=g)
    for i in range(1, TOY_LEN):
        stay = torch.rand(n, generator=g) < 0.7
        x[:, i] = torch.where(stay, x[:, i - 1], torch.randint(0, TOY_VOCAB, (n,), generator=g))
    return x


class ToyLoader:
    """In-memory stand-in for gtl_dist.data.ShardLoader with the same cursor protocol."""

    def __init__(self, data: torch.Tensor, batch_size: int, rank: int, world_size: int, seed: int,
                 infinite: bool = True, shuffle: bool = True):
        self.mine = data[rank::world_size]
        self.batch_size, self.seed, self.world_size = batch_size, seed, world_size
        self.infinite, self.shuffle = infinite, shuffle
        self.batches_per_epoch = len(data) // world_size // batch_size
        self.epoch, self.batch = 0, 0

    def __iter__(self):
        if not self.infinite:  # one pass from the start each time, like ShardLoader
            self.epoch, self.batch = 0, 0
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(self.mine), generator=g) if self.shuffle \
                else torch.arange(len(self.mine))
            while self.batch < self.batches_per_epoch:
                idx = order[self.batch * self.batch_size:(self.batch + 1) * self.batch_size]
                self.batch += 1
                yield {"tokens": self.mine[idx]}
            if not self.infinite:
                return
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cursor {key}={state[key]} does not match loader's "
                                 f"{getattr(self, key)}")
        self.epoch, self.batch = state["epoch"], state["batch"]


class ToyNet(nn.Module):
    """Per-position logits from the token and the mean of the sequence (bidirectional context)."""

    def __init__(self, hidden: int = 16, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(TOY_VOCAB + 1, hidden)
        self.pos = nn.Parameter(torch.zeros(TOY_LEN, hidden))
        self.mix = nn.Linear(2 * hidden, hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, TOY_VOCAB)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))  # a persistent buffer

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.embed(z) + self.pos
        left = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        h = torch.tanh(self.mix(torch.cat([h, left], dim=-1)))
        return self.out(self.drop(h)).float()


def toy_masked_loss(model: nn.Module, x0: torch.Tensor, shared: torch.Generator,
                    local: torch.Generator) -> torch.Tensor:
    t = torch.rand((), generator=shared, device=x0.device) * 0.8 + 0.2
    masked = torch.rand(x0.shape, generator=local, device=x0.device) < t
    z = torch.where(masked, torch.full_like(x0, TOY_VOCAB), x0)
    logp = torch.log_softmax(model(z), dim=-1)
    nll = -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    return (nll * masked).sum() / masked.sum().clamp(min=1)


class ToyRecipe:
    """A job kind for the loop's own tests (see the module docstring)."""

    role = "toy"
    seq_len = TOY_LEN

    def __init__(self, ctx: Any):
        # Tests change it to play "the shards were rebuilt with another tokenizer".
        self.tokenizer_hash = os.environ.get("TOY_TOKENIZER_HASH", "toy-tokenizer")
        self.stage = ctx.stage
        self.cfg = ctx.cfg
        self.train_config = getattr(ctx.cfg.train, ctx.stage)
        self.train_data = toy_sequences(512, seed=1)
        self.val_data = toy_sequences(128, seed=2)

    def build_model(self) -> nn.Module:
        return ToyNet(dropout=0.1)

    def initial_weights(self):
        return None

    def prepare(self, device):
        pass

    def train_loaders(self, micro_batch, dist_env, seed):
        return {"train": ToyLoader(self.train_data, micro_batch, dist_env.rank,
                                   dist_env.world_size, seed)}

    def training_loss(self, model, batches, rng):
        time.sleep(float(os.environ.get("TOY_STEP_SLEEP", "0")))
        loss = toy_masked_loss(model, batches["train"]["tokens"], rng.shared, rng.local)
        return loss, {"tokens": float(batches["train"]["tokens"].numel())}

    def validation_loaders(self, micro_batch, dist_env):
        return {"val": ToyLoader(self.val_data, micro_batch, dist_env.rank, dist_env.world_size, 0,
                                 infinite=False, shuffle=False)}

    def validate(self, model, rng, loaders, dist_env):
        from gtl_dist.train import dist
        loader = loaders["val"]
        losses = [toy_masked_loss(model, b["tokens"], rng.shared, rng.local).item()
                  for _, b in zip(range(self.train_config.val_batches), loader)]
        total, count = dist.all_reduce([sum(losses), len(losses)], "sum")
        return {"loss": total / count}

    def export_info(self):
        return {"role": self.role, "config": self.cfg.to_dict(), "seq_len": TOY_LEN}

    def validation_report(self):
        return None


def toy_main(argv: Optional[list[str]] = None) -> int:
    import argparse
    from gtl_dist.config import load_config
    from gtl_dist.log import setup_logging
    from gtl_dist.stages import stage_input_hash
    from gtl_dist.train.loop import execute
    from gtl_dist.train.preempt import EXIT_PREEMPTED

    setup_logging()  # a program of its own, as a pipeline task's process is
    parser = argparse.ArgumentParser(description="one rank of the toy training stage")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--chain-marker", help="play submitit: install a USR2 handler first that "
                        "records the checkpoints it sees in this file and exits with code 42")
    args = parser.parse_args(argv)
    if args.chain_marker:
        def requeue(signum, frame):
            ckpt = Path(args.run_dir) / "denoiser" / "ckpt"
            Path(args.chain_marker).write_text(json.dumps(committed(ckpt)))
            os._exit(42)
        signal.signal(signal.SIGUSR2, requeue)
    cfg = load_config([REPO / "configs" / "tiny.yaml"], args.set)
    stage = "denoiser"
    result = execute(cfg, args.run_dir, stage, None, None,
                     stage_input_hash(cfg, stage, None, None), ToyRecipe)
    print("RESULT " + json.dumps({"status": result.status, "step": result.step,
                                  "val_loss": result.val_loss}), flush=True)
    print("THREADS " + json.dumps(native_threads()), flush=True)
    return EXIT_PREEMPTED if result.status == "preempted" else 0


def native_threads() -> list[str]:
    """The names of this process's threads (Linux) besides the main one."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        if int(task.name) == os.getpid():
            continue
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(names)


def threads_after_stage(log_text: str) -> list[str]:
    """What :func:`toy_main` reported running once its stage had returned."""
    found = re.findall(r"^THREADS (.*)$", log_text, re.MULTILINE)
    assert found, "no THREADS line in the log"
    return json.loads(found[-1])


# ----------------------------------------------------------------------------------------------
# Launching ranks
# ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, extra: Optional[dict] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SUBMITIT_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                "GTL_NO_PROGRESS_BAR": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


class Ranks:
    """A group of rank subprocesses with logs in ``log_dir``; every wait has a deadline."""

    def __init__(self, cmd: list[str], world: int, log_dir: Path, extra_env: Optional[dict] = None,
                 tag: str = "run"):
        self.port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"{tag}-rank{r}.log" for r in range(world)]
        self.procs = []
        for r in range(world):
            with open(self.logs[r], "w") as fh:
                self.procs.append(subprocess.Popen(
                    cmd, env=rank_env(r, world, self.port, extra_env), stdout=fh,
                    stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True))

    def wait(self, timeout: float = 180.0) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"ranks did not finish within {timeout:.0f} s; logs:\n{self.tails()}")
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait(timeout=30)

    def signal(self, rank: int, sig: int) -> None:
        self.procs[rank].send_signal(sig)

    def tails(self, lines: int = 25) -> str:
        out = []
        for path in self.logs:
            text = path.read_text().splitlines() if path.exists() else []
            out.append(f"--- {path.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def expect(self, codes: list[int] | int, timeout: float = 180.0) -> None:
        got = self.wait(timeout)
        want = codes if isinstance(codes, list) else [codes] * len(got)
        assert got == want, f"exit codes {got}, expected {want}; logs:\n{self.tails()}"

    def log_text(self, rank: int = 0) -> str:
        return self.logs[rank].read_text()


def toy_cmd(run_dir: Path, *overrides: str) -> list[str]:
    cmd = [PYTHON, str(REPO / "tests" / "train_helpers.py"), "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def wait_for(predicate, timeout: float, what: str, ranks: Optional[Ranks] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if ranks is not None and any(p.poll() is not None for p in ranks.procs):
            pytest.fail(f"a rank exited while waiting for {what}; logs:\n{ranks.tails()}")
        time.sleep(0.1)
    if ranks is not None:
        ranks.kill()
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}"
                + (f"; logs:\n{ranks.tails()}" if ranks else ""))


# ----------------------------------------------------------------------------------------------
# Reading what a stage left behind
# ----------------------------------------------------------------------------------------------

def train_records(stage_dir: Path, kind: str = "train") -> dict[int, dict]:
    """step -> the last JSONL record of that kind (a resumed run rewrites later steps)."""
    out = {}
    path = stage_dir / "train_log.jsonl"
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == kind:
            out[rec["step"]] = rec
    return out


def committed(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in ckpt_dir.glob("step-*") if (p / "COMMIT.json").is_file())


def consolidated_params(step_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights stored in one DeepSpeed checkpoint, whatever its ZeRO stage."""
    commit = json.loads((step_dir / "COMMIT.json").read_text())
    if commit["zero_stage"] == 0:
        states = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)
        return {k: v.float() for k, v in states["module"].items() if k != "model.calls"}
    from gtl_dist.train.dist import import_deepspeed
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name))


def params_fingerprint(params: dict[str, torch.Tensor]) -> str:
    """The fingerprint the loop logs on resume ("weights fingerprint ..."), from a checkpoint's
    consolidated parameters (names carry the LossModule's ``model.`` prefix)."""
    from gtl_dist.train.state import fingerprint
    names = {n for n, _ in ToyNet().named_parameters()}
    plain = {k[len("model."):]: v for k, v in params.items() if k[len("model."):] in names}
    assert set(plain) == names, sorted(params)
    return f"{fingerprint(plain):08x}"


def shared_state(step_dir: Path) -> dict:
    return torch.load(step_dir / "shared_state.pt", map_location="cpu", weights_only=False)


def rank_state(step_dir: Path, rank: int) -> dict:
    return torch.load(step_dir / f"rank{rank:05d}_state.pt", map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    """Build DeepSpeed's JIT op once per session (only the first session pays the ~40 s)."""
    proc = subprocess.run([PYTHON, "-m", "gtl_dist.train.dist", "prebuild"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


if __name__ == "__main__":
    sys.exit(toy_main())
