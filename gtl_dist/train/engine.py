"""The one wrapper around ``deepspeed.initialize``: batch geometry, precision, ZeRO, optimiser, LR.

Every stage trains through :func:`build_engine`; what varies is only the module it wraps
(a :class:`~gtl_dist.train.recipe.LossModule` around the stage's network). Choices made here:

- Batch: ``micro_batch`` None -> ``global_batch / world`` per rank, no accumulation; otherwise
  ``grad_accum = global_batch / (micro_batch * world)``. Only micro-batch and accumulation are
  given to DeepSpeed, which derives ``train_batch_size`` (docs/operations.md).
- Precision ``auto``: bf16 on GPUs that have it, fp32 otherwise (CPU). bf16 keeps fp32 master
  weights in the optimiser. On GPUs, fp32 matrix products (the fp32 output projection, fp32
  training) run on TF32 tensor cores; CPU math is untouched.
- Optimiser: AdamW with ``torch_adam`` everywhere. DeepSpeed's own fused/CPU Adam are JIT-built
  C++/CUDA ops, and a JIT build inside a preemptible job can be killed half-way by the
  preemption signal; torch's AdamW needs no build and is what DeepSpeed's own CPU tests use.
  Where its state lives on a GPU (no optimizer offload) it is torch's fused AdamW, one kernel per
  update: DeepSpeed hands the ``fused`` flag to ``torch.optim.AdamW`` and wraps the result like any
  torch AdamW (ZeRO 0-3, bf16). A checkpoint restores the optimiser settings it was saved with
  (torch's ``load_state_dict``), so a run resumed from an unfused checkpoint stays unfused.
- ``train.<stage>.compile``: :func:`compile_step` compiles the recipe's network forward and loss
  into one graph (``Recipe.compile``).
- LR: linear warm-up over ``warmup_frac`` of the steps, then cosine down to ``min_lr``
  (docs/method.md: "cosine with 10% warm-up"), as a client scheduler whose state DeepSpeed saves.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from gtl_dist.config import ConfigError, TrainConfig
from gtl_dist.log import get_logger
from gtl_dist.train.dist import import_deepspeed

log = get_logger("train.engine")


@dataclass(frozen=True)
class Hardware:
    device_type: str  # "cpu" | "cuda"
    bf16: bool        # the device computes in bf16
    name: str

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.device_type == "cuda" \
            else torch.device("cpu")


def detect_hardware() -> Hardware:
    if torch.cuda.is_available():
        return Hardware("cuda", torch.cuda.is_bf16_supported(), torch.cuda.get_device_name())
    return Hardware("cpu", True, "cpu")


@dataclass(frozen=True)
class BatchGeometry:
    global_batch: int
    micro_batch: int   # per rank, per forward pass
    grad_accum: int
    world_size: int


def batch_geometry(tc: TrainConfig, world_size: int, stage: str) -> BatchGeometry:
    """Split ``global_batch`` into micro-batches × accumulation × ranks, or say which key to fix."""
    key = f"train.{stage}"
    g = tc.global_batch
    if tc.micro_batch is None:
        if g % world_size:
            raise ConfigError(
                f"{key}.global_batch: {g} is not divisible by the world size {world_size}; use a "
                f"multiple of {world_size} ({_multiples_near(g, world_size)}), or a world size "
                f"that divides {g}")
        return BatchGeometry(g, g // world_size, 1, world_size)
    m = tc.micro_batch
    if g % (m * world_size):
        other_micro = f", or a {key}.micro_batch that divides {g // world_size}" if g % world_size == 0 else ""
        raise ConfigError(
            f"{key}.global_batch / {key}.micro_batch: global_batch={g} is not divisible by "
            f"micro_batch × world size = {m} × {world_size} = {m * world_size}; use a global_batch "
            f"that is a multiple of {m * world_size} ({_multiples_near(g, m * world_size)})"
            f"{other_micro}")
    return BatchGeometry(g, m, g // (m * world_size), world_size)


def _multiples_near(value: int, factor: int) -> str:
    """``"e.g. 63 or 66"``: the multiples of ``factor`` on either side of ``value``."""
    below = value // factor * factor
    return f"e.g. {below} or {below + factor}" if below else f"e.g. {factor}"


def resolve_precision(tc: TrainConfig, hw: Hardware, stage: str) -> str:
    key = f"train.{stage}.precision"
    if tc.precision == "auto":
        if hw.device_type == "cuda" and not hw.bf16:
            log.warning("%s=auto: %s has no bf16, training in fp32", key, hw.name)
        return "bf16" if hw.device_type == "cuda" and hw.bf16 else "fp32"
    if tc.precision == "bf16" and not hw.bf16:
        raise ConfigError(f"{key}: bf16 was asked for but {hw.name} cannot compute in bf16; set "
                          f"{key}=fp32 (or auto)")
    if tc.precision == "bf16" and hw.device_type == "cpu":
        log.warning("%s=bf16 on a CPU: it runs (DeepSpeed's CPU accelerator) but is slow; fp32 "
                    "(auto) is the CPU default", key)
    return tc.precision


class CosineWithWarmup:
    """LR multiplier: linear warm-up to ``lr``, then cosine to ``min_lr`` at the last step.

    An object (not a lambda) so the LambdaLR state DeepSpeed saves is complete. Called with the
    number of optimiser steps already taken: the first step runs at ``lr / warmup``.
    """

    def __init__(self, steps: int, warmup_frac: float, lr: float, min_lr: float):
        self.steps = steps
        self.warmup = int(round(warmup_frac * steps))
        self.floor = min(min_lr / lr, 1.0) if lr > 0 else 1.0

    def __call__(self, taken: int) -> float:
        if taken < self.warmup:
            return (taken + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        progress = min(1.0, (taken - self.warmup) / span)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fused_adamw(tc: TrainConfig, hw: Hardware) -> bool:
    """Whether the optimiser is torch's fused AdamW: where its state lives on a GPU."""
    return hw.device_type == "cuda" and not tc.offload_optimizer


def use_tensor_cores(hw: Hardware) -> None:
    """On GPUs, fp32 matrix products run on TF32 tensor cores; CPU math stays as it is."""
    if hw.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True


def compile_step(fn: Callable) -> Callable:
    """``fn`` compiled into ONE graph (``fullgraph``: a graph break fails the first step instead
    of silently slowing every step), for fixed shapes (training micro-batches do not change)."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


def deepspeed_config(tc: TrainConfig, geometry: BatchGeometry, precision: str,
                     load_universal: bool = False, fused: bool = False) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": geometry.micro_batch,
        "gradient_accumulation_steps": geometry.grad_accum,
        "gradient_clipping": tc.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": tc.lr, "betas": list(tc.betas), "eps": 1e-8, "weight_decay": tc.weight_decay,
            "torch_adam": True, **({"fused": True} if fused else {})}},
        "zero_optimization": zero,
        "checkpoint": {"load_universal": load_universal, "tag_validation": "Fail"},
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
        if tc.zero_stage == 1:
            # Selects DeepSpeed's BF16_Optimizer (fp32 gradient accumulation). Stage 0 rejects an
            # fp32 accumulation dtype with bf16 weights; stages 2-3 reduce into fp32 partitions.
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def build_engine(module: nn.Module, tc: TrainConfig, geometry: BatchGeometry, precision: str,
                 hw: Hardware, load_universal: bool = False) -> Any:
    """``deepspeed.initialize`` over ``module``'s trainable parameters with our config."""
    deepspeed = import_deepspeed()
    use_tensor_cores(hw)
    schedule = CosineWithWarmup(tc.steps, tc.warmup_frac, tc.lr, tc.min_lr)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=deepspeed_config(tc, geometry, precision, load_universal, fused_adamw(tc, hw)),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine


@contextlib.contextmanager
def gathered(module: nn.Module, zero_stage: int) -> Iterator[None]:
    """Inside, every parameter of ``module`` holds its full value (collective under ZeRO-3)."""
    if zero_stage == 3:
        deepspeed = import_deepspeed()
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def full_fp32_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's complete state on CPU in fp32, with the optimiser's fp32 master weights.

    Collective under ZeRO (each parameter is assembled from its partitions), so every rank must
    call it. Under bf16 the module holds bf16 copies; the master weights are what an export
    should contain.
    """
    import_deepspeed()
    from deepspeed.utils import safe_get_full_fp32_param
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (full if full is not None else p.data).detach().float().cpu().clone()
    out.update(persistent_buffers(module))
    return out


def persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict holds, as CPU copies. Read directly rather than through
    ``module.state_dict()``, which under ZeRO-3 also walks the partitioned parameters."""
    out = {}
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf.detach().cpu().clone()
    return out
