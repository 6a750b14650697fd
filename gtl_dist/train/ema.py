"""Exponential moving average of the weights, correct under every ZeRO stage.

The average is kept in full (unpartitioned) fp32 on every rank. Under ZeRO-3 the parameters
are partitioned, so each update gathers them first (one collective per step); under stages
0-2 every rank already holds the full weights after ``engine.step()``. Because the shadow is
the same on every rank and independent of how parameters are partitioned, rank 0 alone saves
it, and it loads unchanged at any world size. The update is deterministic, so a resumed run
reproduces it bit for bit.

Decay warm-up as in MDLM's EMA (``min(decay, (1 + n) / (10 + n))`` after n updates): the first
updates follow the weights closely instead of averaging in the random initialisation for
~1/(1 - decay) steps.

Under bf16 the module's parameters are bf16 copies of the fp32 master weights; the shadow is
accumulated in fp32 from those copies (the rounding averages out over the window).
"""

from __future__ import annotations

import torch
from torch import nn

from gtl_dist.train.engine import gathered, persistent_buffers


class WeightEMA:
    def __init__(self, decay: float, module: nn.Module, zero_stage: int):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.zero_stage = zero_stage
        self.updates = 0
        with gathered(module, zero_stage):
            self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters()}

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """shadow += (1 - d)·(weights − shadow), every parameter in one fused call (no host
        read). Not bit for bit the ``d·shadow + (1 − d)·weights`` form: the two round
        differently, and this one is the closer to an EMA kept in float64."""
        weight = 1.0 - self.current_decay()
        with gathered(module, self.zero_stage):
            named = list(module.named_parameters())
            torch._foreach_lerp_([self.shadow[name] for name, _ in named],
                                 [p.detach().float() for _, p in named], weight)
        self.updates += 1

    def weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """A full CPU state dict for ``module``'s architecture: the averaged parameters plus the
        module's own buffers (they are not averaged)."""
        out = {name: t.detach().cpu().clone() for name, t in self.shadow.items()}
        out.update(persistent_buffers(module))
        return out

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {k: v.detach().cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: parameters {sorted(missing)[:5]} "
                             f"differ (was the checkpoint written for another model config?)")
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        self.updates = int(state["updates"])
