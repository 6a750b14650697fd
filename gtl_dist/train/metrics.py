"""TensorBoard and the per-step JSONL log of one job, written by global rank 0 only.

One ``SummaryWriter`` per job under ``RunPaths.tb(stage, target, fraction)``, x = optimiser
step. A resumed job reopens the same directory with ``purge_step`` = first step it will log, so
TensorBoard hides what the killed run logged after its last committed checkpoint and the curves
carry no duplicate points (docs/operations.md); the JSONL log is truncated the same way.
``flush()`` runs before every checkpoint and on preemption, since the writer otherwise buffers
up to two minutes; the JSONL log is line-buffered, each record on disk as soon as it is logged.

Tags: ``train/{loss,lr,grad_norm,tokens_per_s,samples_per_s}``, ``val/*``,
``sys/{rss_gb,peak_rss_gb,cuda_max_allocated_gb}``, the config as text, and hparams at the end.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gtl_dist.io import atomic_write_text, read_json_lines
from gtl_dist.models import count_parameters


def flops_per_token(model: torch.nn.Module, seq_len: int, train: bool = True) -> float:
    """The package's MFU formula: 6N + 12·B·H·L FLOPs a token to train a network of N parameters
    (B blocks, hidden H) at sequence length L, 2N + 4·B·H·L for a forward pass."""
    n = count_parameters(model)
    attention = model.cfg.blocks * model.cfg.hidden * seq_len
    return 6 * n + 12 * attention if train else 2 * n + 4 * attention


def memory_stats(device: torch.device) -> dict[str, float]:
    """Resident memory of this process now (Linux /proc) and at its peak, and the CUDA
    allocator's peak."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    out = {"peak_rss_gb": peak / (2**30 if sys.platform == "darwin" else 2**20)}
    try:
        with open("/proc/self/statm") as fh:
            out["rss_gb"] = int(fh.read().split()[1]) * resource.getpagesize() / 2**30
        # the kernel's high-water mark is updated lazily and can trail the current reading
        out["peak_rss_gb"] = max(out["peak_rss_gb"], out["rss_gb"])
    except OSError:
        pass
    if device.type == "cuda":
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def profile_operators(run: Callable[[], Any], device: torch.device, rows: int) -> tuple[str, Any]:
    """Where the time of one call of ``run`` goes: torch.profiler's table of its operators by
    their own time on the device (CUDA kernels on a GPU, host time on a CPU), ``rows`` rows, and
    the per-operator averages the table is made of. The device is drained before the profile
    closes, so queued kernels are counted."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        torch.get_device_module(device).synchronize(device)
    averages = prof.key_averages()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return averages.table(sort_by=sort, row_limit=rows), averages


def read_val_curve(log: Path) -> dict[int, float]:
    """Step -> validation loss, from a run's train_log.jsonl (a step logged twice, by a run
    resumed after preemption, keeps its last value); empty without a log or validations."""
    if not log.is_file():
        return {}
    return {int(e["step"]): float(e["loss"]) for e in read_json_lines(log) if e.get("kind") == "val"}


def carried(curve: dict[int, float], steps: np.ndarray) -> np.ndarray:
    """The curve at ``steps``: before its first step its first value, after its last its last
    (a run stopped by patience stays where it stopped)."""
    own = np.array(sorted(curve))
    index = np.clip(np.searchsorted(own, steps, side="right") - 1, 0, len(own) - 1)
    return np.array([curve[int(own[i])] for i in index])


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop records with ``step > after_step`` (written by a run that did not commit them)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= after_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class StageMetrics:
    """Rank 0 writes; on other ranks every method is a no-op."""

    def __init__(self, tb_dir: Path, log_path: Path, enabled: bool, start_step: int):
        self.enabled = enabled
        self.writer = None
        self.log_path = log_path
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        tb_dir.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(log_path, start_step)
        self.writer = SummaryWriter(str(tb_dir), purge_step=start_step + 1)
        # Line-buffered: the launcher following the run reads the step from it (cluster/status.py).
        self._log = open(log_path, "a", buffering=1)

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag if "/" in tag else f"{kind}/{tag}", value, step)
        record = {"step": step, "kind": kind, **values}
        self._log.write(json.dumps(record) + "\n")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def hparams(self, hparams: dict[str, Any], results: dict[str, float]) -> None:
        if self.enabled:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                     for k, v in hparams.items()}
            self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in results.items()
                                            if v is not None and math.isfinite(v)},
                                    run_name="hparams")

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()
            self._log.flush()

    def close(self) -> None:
        if self.enabled and self.writer is not None:
            self.writer.close()
            self._log.close()
            self.writer = None
