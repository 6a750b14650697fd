"""Construction-time checks for the samplers: bad settings fail before the first step.

Each network is also probed once with an all-[MASK] sequence, so a vocabulary or length
mismatch between the denoiser, ratio net and planner is reported by name here rather than
as a shape error deep inside a sampling loop.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from gtl_dist.config import PLANNER_MODES
from gtl_dist.models import check_compatible


class SamplerConfigError(ValueError):
    """A sampler was built with settings or networks that cannot work together."""


def emittable_tokens(vocab: Any) -> int:
    """|V| for the candidate bound: every id except [MASK] (the denoiser decides which are likely)."""
    return int(vocab.size) - 1


def check_vocab(vocab: Any, seq_len: int) -> None:
    for attr in ("size", "mask_id"):
        if not hasattr(vocab, attr):
            raise SamplerConfigError(f"vocab: expected a VocabSpec with .size and .mask_id, got {vocab!r}")
    if not 0 <= vocab.mask_id < vocab.size:
        raise SamplerConfigError(f"vocab.mask_id={vocab.mask_id} is outside [0, vocab.size={vocab.size})")
    if vocab.size < 2:
        raise SamplerConfigError(f"vocab.size={vocab.size}: need [MASK] and at least one token")
    if seq_len < 1:
        raise SamplerConfigError(f"seq_len={seq_len} must be at least 1")


def check_guidance(gamma: float, n_ratio: int, top_k: int, vocab: Any, ratio_net: Optional[Callable],
                   ratio_batch_size: int) -> None:
    if gamma < 0:
        raise SamplerConfigError(f"gamma={gamma} < 0: guidance strength must be >= 0 (0 = unguided)")
    if top_k < 1:
        raise SamplerConfigError(f"top_k={top_k} must be at least 1 (K tokens kept per position)")
    if ratio_net is None and gamma != 0:
        raise SamplerConfigError(f"gamma={gamma} needs a ratio_net; pass one, or gamma=0 for unguided "
                                 f"sampling")
    if ratio_net is not None:
        tokens = emittable_tokens(vocab)
        if not 1 <= n_ratio <= tokens:
            raise SamplerConfigError(
                f"n_ratio={n_ratio} must be in [1, |V|={tokens}] (candidates per position among the "
                f"{tokens} non-[MASK] ids); use n_ratio={tokens} for exact full-vocabulary guidance")
        if ratio_batch_size < 1:
            raise SamplerConfigError(f"ratio_batch_size={ratio_batch_size} must be at least 1")


def check_planner_mode(mode: str, temperature: float, planner: Optional[Callable]) -> None:
    if mode not in PLANNER_MODES:
        raise SamplerConfigError(f"planner_mode='{mode}' is not one of {', '.join(PLANNER_MODES)}")
    if temperature <= 0:
        raise SamplerConfigError(f"planner_temperature={temperature} must be > 0")
    if mode != "uniform" and planner is None:
        raise SamplerConfigError(f"planner_mode='{mode}' needs a planner; pass one or use "
                                 f"planner_mode='uniform'")


def check_networks(denoiser: Callable, ratio_net: Optional[Callable], planner: Optional[Callable],
                   vocab: Any, seq_len: int, device: torch.device) -> None:
    """Probe each network once on an all-[MASK] batch of one and check shapes and the SUBS contract."""
    _check_declared_vocab(denoiser, ratio_net, planner, vocab, seq_len)
    for name, net in (("denoiser", denoiser), ("ratio_net", ratio_net), ("planner", planner)):
        if isinstance(net, torch.nn.Module) and net.training:
            raise SamplerConfigError(f"{name}: is in training mode (dropout would be on while sampling); "
                                     f"call .eval() on it first")
        if getattr(getattr(net, "cfg", None), "time_conditioning", False):
            # The samplers pass z alone (and cache on it): a time-conditioned network would silently
            # see sigma = 0 at every step.
            raise SamplerConfigError(f"{name}: was built with time_conditioning=true, but the samplers "
                                     f"evaluate networks on z alone (docs/method.md §2: time conditioning off); "
                                     f"set models.*.time_conditioning=false")
    z = torch.full((1, seq_len), vocab.mask_id, dtype=torch.long, device=device)
    with torch.inference_mode():
        out = denoiser(z)
        if tuple(out.shape) != (1, seq_len, vocab.size):
            raise SamplerConfigError(
                f"denoiser: returned shape {tuple(out.shape)} for z of shape (1, {seq_len}); expected "
                f"(batch, seq_len, vocab.size) = (1, {seq_len}, {vocab.size}). Check that the denoiser "
                f"was built for this vocabulary and sequence length")
        if not torch.isneginf(out[..., vocab.mask_id]).all():
            raise SamplerConfigError(
                f"denoiser: the [MASK] column (id {vocab.mask_id}) must be -inf (SUBS log-probabilities); "
                f"got {out[0, 0, vocab.mask_id].item()}. Pass the denoiser's log-probabilities, not logits")
        if ratio_net is not None and getattr(ratio_net, "edit_form", False):
            scores = ratio_net.edit_scores(z, torch.zeros(1, dtype=torch.long, device=device),
                                           torch.zeros(1, dtype=torch.long, device=device))
            if tuple(scores.shape) != (1, vocab.size):
                raise SamplerConfigError(
                    f"ratio_net: an edit-ratio network returned edit scores of shape "
                    f"{tuple(scores.shape)} for one position; expected one score per token, "
                    f"(1, {vocab.size})")
        elif ratio_net is not None:
            r = ratio_net(z)
            if tuple(r.shape) != (1,):
                raise SamplerConfigError(
                    f"ratio_net: returned shape {tuple(r.shape)} for z of shape (1, {seq_len}); expected "
                    f"one log-ratio per sequence, shape (1,)")
        if planner is not None:
            logits = planner(z)
            if tuple(logits.shape) != (1, seq_len):
                raise SamplerConfigError(
                    f"planner: returned shape {tuple(logits.shape)} for z of shape (1, {seq_len}); "
                    f"expected one logit per position, shape (1, {seq_len}). Was it built for "
                    f"seq_len={seq_len}?")


def _check_declared_vocab(denoiser: Callable, ratio_net: Optional[Callable], planner: Optional[Callable],
                          vocab: Any, seq_len: int) -> None:
    """Networks that carry ``.vocab``/``.seq_len`` (gtl_dist.models heads) must agree with each other
    and with what the sampler was given."""
    try:
        check_compatible(denoiser, ratio_net, planner)
    except ValueError as exc:
        raise SamplerConfigError(str(exc)) from None
    for name, net in (("denoiser", denoiser), ("ratio_net", ratio_net), ("planner", planner)):
        declared = getattr(net, "vocab", None)
        if declared is not None and (declared.size, declared.mask_id) != (vocab.size, vocab.mask_id):
            raise SamplerConfigError(
                f"{name}: built for vocabulary size {declared.size} with [MASK]={declared.mask_id}, but the "
                f"sampler was given size {vocab.size} with [MASK]={vocab.mask_id}; all networks must share "
                f"one tokenizer")
        declared_len = getattr(net, "seq_len", None)
        if isinstance(declared_len, int) and declared_len != seq_len:
            raise SamplerConfigError(f"{name}: built for seq_len={declared_len}, but the sampler was given "
                                     f"seq_len={seq_len}")


def resolve_shape(denoiser: Callable, vocab: Any, seq_len: Optional[int]) -> tuple[Any, int]:
    """``vocab`` and ``seq_len`` default to the denoiser's own (gtl_dist.models.Denoiser has both)."""
    vocab = vocab if vocab is not None else getattr(denoiser, "vocab", None)
    seq_len = seq_len if seq_len is not None else getattr(denoiser, "seq_len", None)
    if vocab is None or seq_len is None:
        raise SamplerConfigError("vocab and seq_len: the denoiser does not carry them (a plain callable?); "
                                 "pass vocab=VocabSpec(...) and seq_len=... to the sampler")
    check_vocab(vocab, seq_len)
    return vocab, int(seq_len)


def network_device(denoiser: Callable) -> torch.device:
    """The device of the denoiser's parameters (CPU for plain callables)."""
    if isinstance(denoiser, torch.nn.Module):
        for p in denoiser.parameters():
            return p.device
    return torch.device("cpu")
