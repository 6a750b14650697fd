"""The DiT backbone shared by every network in gtl_dist (docs/method.md §2).

A DiT-style transformer as in MDLM: token embedding, rotary positions, adaLN-zero blocks
(shift/scale/gate for attention and MLP, modulation initialised to zero so every block starts
as the identity), GELU-tanh MLP, LayerNorm without bias, dropout on the residual branches, and
attention through ``scaled_dot_product_attention`` (CPU and GPU alike).

The conditioning vector ``c = silu(sigma_map(sigma))`` always exists. With time conditioning off
(the default) sigma is replaced by zeros, so ``c`` is a learned constant: that is what MDLM does,
it keeps parameter counts equal to the paper's (59.83M / 4.06M), and it lets a checkpoint be
loaded with time conditioning switched on later.

The attention mode (bidirectional / causal) is an attribute, not part of the weights: AR2Diff
(docs/method.md §11) runs the same parameters causally as an AR model, then bidirectionally.

Precision: with fp32 parameters on CUDA the blocks run under bf16 autocast; LayerNorm, rotary
positions and everything the heads return are fp32. With bf16 parameters (DeepSpeed bf16) the
blocks run in bf16 and the heads still return fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gtl_dist.config import ATTENTION_MODES, ModelConfig

# MDLM's timestep embedder: 256 sinusoidal features of sigma, then a 2-layer MLP to cond_dim.
SIGMA_FEATURES = 256


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y = F.layer_norm(x.float(), (self.dim,)) * self.weight.float()
        return y.to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class SigmaEmbedder(nn.Module):
    """Noise level sigma -> cond_dim vector (sinusoidal features, then MLP), as in DiT/MDLM."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(SIGMA_FEATURES, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))
        half = SIGMA_FEATURES // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        angles = sigma.float()[:, None] * self.freqs[None]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class Rotary(nn.Module):
    """Rotary position embedding over the full head dimension (rotate-half form), fp32."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_sin_at(torch.arange(start, start + length, device=device))

    def cos_sin_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [len(positions), head_dim] at integer positions given as a tensor (no host sync)."""
        angles = positions.float()[:, None] * self.inv_freq.to(positions.device)[None]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, L, D]; cos/sin: [L, D]."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


@dataclass
class KVCache:
    """Keys and values of every block for causal decoding: [B, heads, max_len, head_dim] each.

    Preallocated once, in the blocks' compute dtype (bf16 under CUDA autocast), and written in
    place: a cached call writes its new keys and values at their positions and attends over all
    ``max_len`` slots with a mask, so every decoding step has the same shapes (the condition for
    CUDA graphs) and never copies the cache. ``length`` is the number of positions written.
    """
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def attention(self, layer: int, positions: torch.Tensor, visible: torch.Tensor
                  ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """Attention for block ``layer`` whose new keys/values sit at ``positions`` [T]; query t
        sees slot j where ``visible[t, j]`` (causal: j <= positions[t])."""
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = self.keys[layer], self.values[layer]
            keys.index_copy_(2, positions, k.to(keys.dtype))
            values.index_copy_(2, positions, v.to(values.dtype))
            return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype),
                                                  attn_mask=visible)
        return attend


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, cond_dim: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = LayerNorm(hidden)
        self.attn_qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = LayerNorm(hidden)
        mlp_hidden = int(round(mlp_ratio * hidden))
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden))
        self.dropout = nn.Dropout(dropout)
        # adaLN-zero: shift/scale/gate for attention and MLP; zero init makes the block the identity.
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * hidden)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        B, L, H = x.shape
        mod = self.adaLN_modulation(c)[:, None, :].chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod

        qkv = self.attn_qkv(modulate(self.norm1(x), shift_msa, scale_msa))
        q, k, v = qkv.view(B, L, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = attend(q, k, v).transpose(1, 2).reshape(B, L, H)
        x = x + gate_msa * self.dropout(self.attn_out(attn))
        x = x + gate_mlp * self.dropout(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class DiT(nn.Module):
    """Token ids (and optionally a noise level) -> hidden states [B, L, hidden] and conditioning c."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, seq_len: int, *,
                 attention: str | None = None, time_conditioning: bool | None = None):
        super().__init__()
        attention = cfg.attention if attention is None else attention
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention='{attention}' is not one of {ATTENTION_MODES} "
                             f"(models.<role>.attention in the config)")
        if cfg.hidden % cfg.heads or (cfg.hidden // cfg.heads) % 2:
            raise ValueError(f"hidden={cfg.hidden} must split into {cfg.heads} heads of even size "
                             f"(rotary positions); fix models.<role>.hidden / heads")
        if vocab_size < 2 or seq_len < 1:
            raise ValueError(f"vocab_size={vocab_size} and seq_len={seq_len} must be >= 2 and >= 1")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.attention = attention
        self.time_conditioning = cfg.time_conditioning if time_conditioning is None else time_conditioning

        self.vocab_embed = nn.Embedding(vocab_size, cfg.hidden)
        # MDLM's initialisation of the input embedding (kaiming-uniform on a [V, H] matrix).
        nn.init.kaiming_uniform_(self.vocab_embed.weight, a=math.sqrt(5))
        self.sigma_map = SigmaEmbedder(cfg.cond_dim)
        self.rotary = Rotary(cfg.hidden // cfg.heads)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.hidden, cfg.heads, cfg.cond_dim, cfg.mlp_ratio, cfg.dropout)
            for _ in range(cfg.blocks))

    @property
    def causal(self) -> bool:
        return self.attention == "causal"

    def set_attention(self, mode: str) -> None:
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode '{mode}' is not one of {ATTENTION_MODES}")
        self.attention = mode

    def check_tokens(self, z: torch.Tensor, start: int = 0) -> None:
        """Cheap input check on shapes alone: an integer tensor [batch, length] that fits seq_len
        from ``start`` on, with an error that says what to fix. The ids themselves are checked
        where batches are loaded and prompts are given (:func:`check_token_ids`), not here:
        reading them on a device would make every forward pass wait for it."""
        if z.dim() != 2 or z.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected token ids as an integer tensor [batch, length], got "
                             f"{tuple(z.shape)} {z.dtype}")
        if start + z.shape[1] > self.seq_len:
            raise ValueError(f"sequence length {start + z.shape[1]} exceeds the model's seq_len "
                             f"{self.seq_len} (built from the config's sequence length)")

    def conditioning(self, sigma: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if sigma is None or not self.time_conditioning:
            sigma = torch.zeros(batch, device=device)
        elif sigma.numel() == 1:
            sigma = sigma.reshape(1).expand(batch)
        elif tuple(sigma.shape) != (batch,):
            raise ValueError(f"sigma must have shape [batch]=[{batch}], got {tuple(sigma.shape)}")
        return F.silu(self.sigma_map(sigma.to(device)))

    def forward(self, z: torch.Tensor, sigma: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_tokens(z)
        cos, sin = self.rotary.cos_sin(0, z.shape[1], z.device)
        attend = partial(F.scaled_dot_product_attention, is_causal=self.causal)
        return self._run_blocks(z, sigma, cos, sin, lambda layer: attend)

    def forward_cached(self, z: torch.Tensor, cache: KVCache, positions: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal pass over new tokens z [B, T] placed at ``positions`` [T] (a tensor on z's
        device), reading and extending ``cache``. No host synchronisation and no token check
        (the decoder checks its prompt once), so one decoding step can be a CUDA graph; the
        caller keeps ``cache.length``."""
        if not self.causal:
            raise ValueError("a KV cache only makes sense with causal attention")
        cos, sin = self.rotary.cos_sin_at(positions)
        visible = torch.arange(cache.max_len, device=z.device)[None, :] <= positions[:, None]
        return self._run_blocks(z, None, cos, sin,
                                lambda layer: cache.attention(layer, positions, visible))

    def _run_blocks(self, z: torch.Tensor, sigma: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                    attention: Callable[[int], Callable]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.vocab_embed(z)
        c = self.conditioning(sigma, z.shape[0], z.device)
        autocast = z.device.type == "cuda" and x.dtype == torch.float32
        # No cast cache: each weight is cast once per pass anyway, and a cached cast made while a
        # CUDA graph is captured would outlive the graph's memory pool.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            for i, block in enumerate(self.blocks):
                x = block(x, c, cos, sin, attention(i))
        return x, c

    def compute_dtype(self) -> torch.dtype:
        """The blocks' activation dtype: bf16 under CUDA autocast, else the parameters' dtype."""
        p = self.vocab_embed.weight
        return torch.bfloat16 if p.device.type == "cuda" and p.dtype == torch.float32 else p.dtype

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        max_len = self.seq_len if max_len is None else max_len
        if not 1 <= max_len <= self.seq_len:
            raise ValueError(f"cache length {max_len} must be in [1, the model's seq_len {self.seq_len}]")
        shape = (batch_size, self.cfg.heads, max_len, self.cfg.hidden // self.cfg.heads)
        device, dtype = self.vocab_embed.weight.device, self.compute_dtype()
        return KVCache([torch.zeros(shape, dtype=dtype, device=device) for _ in self.blocks],
                       [torch.zeros(shape, dtype=dtype, device=device) for _ in self.blocks])


def check_token_ids(tokens: torch.Tensor, vocab_size: int, where: str,
                    mask_id: int | None = None) -> None:
    """Refuse ids outside the vocabulary [0, vocab_size) and, in clean data (``mask_id`` given),
    the [MASK] id, naming ``where`` (the file or set the ids come from).

    Run once on the host, where a batch is loaded (gtl_dist.data's readers) or a prompt is given
    (gtl_dist.sample.ar), before the ids move to a device: no step re-checks them, because
    reading ids back from a device makes the host wait for every kernel queued before.
    """
    if not tokens.numel():
        return
    found = [*torch.aminmax(tokens)] + ([(tokens == mask_id).sum()] if mask_id is not None else [])
    lo, hi, *masks = torch.stack(found).tolist()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{where}: token id {hi if hi >= vocab_size else lo} is outside the model's "
                         f"vocabulary [0, {vocab_size}); the data and the model were built with "
                         f"different vocabularies (check the manifest)")
    if masks and masks[0]:
        raise ValueError(f"{where}: clean data contains the [MASK] id {mask_id}; the data and the "
                         f"model disagree about the vocabulary (check the manifest's mask_id)")


def float32_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """Apply an output projection outside autocast and return fp32 (loss math is fp32)."""
    with torch.autocast(x.device.type, enabled=False):
        w = linear.weight
        return F.linear(x.to(w.dtype), w, linear.bias).float()
