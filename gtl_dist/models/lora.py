"""Low-rank fine-tuning of the source denoiser (the ``finetune_small`` control, docs/method.md §9).

Every chosen linear layer of the DiT blocks gets a low-rank update through torch's own
parametrisation mechanism: W is read as W + B·A·(α/r), with W frozen at the source's value, A
(r x in) small and random and B (out x r) zero, so the network starts as the source exactly and
trains r·(in + out) parameters per layer (``models.finetune_small``: rank and layers, chosen so that
the count matches the GTL guide's).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from gtl_dist.config import LoraConfig, ModelConfig
from gtl_dist.models.heads import Denoiser, VocabSpec


class LowRankUpdate(nn.Module):
    """The parametrisation W -> W + B·A·scale."""

    def __init__(self, out_features: int, in_features: int, rank: int):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.scale = 1.0 / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.up @ self.down).to(weight.dtype) * self.scale


class LoraDenoiser(Denoiser):
    """A denoiser whose block layers named in ``lora.layers`` train only a low-rank update; all
    other parameters are frozen. Loads a plain denoiser's state dict (the source's) as its base."""

    def __init__(self, cfg: ModelConfig, vocab: VocabSpec, seq_len: int, lora: LoraConfig):
        super().__init__(cfg, vocab, seq_len)
        self.requires_grad_(False)
        for block in self.backbone.blocks:
            for name in lora.layers:
                layer = block.get_submodule(name)
                parametrize.register_parametrization(
                    layer, "weight", LowRankUpdate(layer.out_features, layer.in_features, lora.rank))

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Also takes a plain Denoiser's state dict: its weights become the frozen base and the
        low-rank updates keep their current values (zero update at the start)."""
        if not any(".parametrizations." in key for key in state_dict):
            own = self.state_dict()
            state_dict = {**own, **{_base_key(key, own): value for key, value in state_dict.items()}}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _base_key(key: str, own: Mapping[str, torch.Tensor]) -> str:
    """``blocks.0.attn_qkv.weight`` -> ``blocks.0.attn_qkv.parametrizations.weight.original`` where
    that layer is parametrised."""
    head, _, leaf = key.rpartition(".")
    wrapped = f"{head}.parametrizations.{leaf}.original"
    return wrapped if wrapped in own else key
