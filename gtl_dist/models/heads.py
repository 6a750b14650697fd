"""The networks of the method, each a DiT backbone plus a head (docs/method.md §2, §4-§6, §11).

    Denoiser            SUBS log-probabilities p_theta(x0 | z_t) per position
    ARLM                next-token logits, causal; same parameter names as Denoiser (AR2Diff)
    SequenceClassifier  one domain logit per sequence (source = 1), clean or masked input
    RatioNet            one log-ratio r_phi(z) per sequence (mean-pooled; the paper's recipe)
    EditRatioNet        log h(z[l := v]) - log h(z) for every position l and token v at once
    Planner             one logit per position ("decoding this position now would be right")

Bad input fails at construction: vocabularies, mask ids and sequence lengths are checked when
a model is built, and ``check_compatible`` checks the networks a sampler combines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from gtl_dist.config import ModelConfig, RunConfig
from gtl_dist.log import get_logger
from gtl_dist.models.dit import DiT, KVCache, LayerNorm, float32_linear, modulate

log = get_logger("models")

ROLES = ("denoiser", "ar", "classifier_ti", "classifier_td", "ratio", "edit_ratio", "adapter",
         "finetune_small", "scratch_head", "chain", "planner", "reference_lm")


@dataclass(frozen=True)
class VocabSpec:
    """The id space every network and data set of a run agrees on.

    ``data_ids``: when known, the number of leading ids the data may use (e.g. 5 for a 5-state
    Markov chain); the absorbing [MASK] must then lie outside them.
    """
    size: int  # number of ids including [MASK]
    mask_id: int
    pad_id: int | None = None
    data_ids: int | None = None

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ValueError(f"VocabSpec: size={self.size}; need at least one data id plus [MASK]")
        if not 0 <= self.mask_id < self.size:
            raise ValueError(f"VocabSpec: mask_id={self.mask_id} is outside [0, size={self.size}); "
                             f"[MASK] must be one of the model's ids")
        if self.pad_id is not None:
            if not 0 <= self.pad_id < self.size:
                raise ValueError(f"VocabSpec: pad_id={self.pad_id} is outside [0, size={self.size})")
            if self.pad_id == self.mask_id:
                raise ValueError(f"VocabSpec: pad_id and mask_id are both {self.mask_id}; [MASK] must "
                                 f"be a token of its own")
        if self.data_ids is not None:
            if not 1 <= self.data_ids <= self.size:
                raise ValueError(f"VocabSpec: data_ids={self.data_ids} is outside [1, size={self.size}]")
            if self.mask_id < self.data_ids:
                raise ValueError(f"VocabSpec: mask_id={self.mask_id} lies inside the data's ids "
                                 f"[0, {self.data_ids}); data tokens would be read as [MASK]. Put "
                                 f"[MASK] after them (mask_id={self.data_ids}, size={self.data_ids + 1})")

    @classmethod
    def from_manifest(cls, manifest: Any) -> "VocabSpec":
        """From a shard manifest (attributes or a mapping): vocab_size, mask_id, pad_id[, data_ids]."""
        def get(key: str, default: Any = KeyError) -> Any:
            if isinstance(manifest, Mapping):
                value = manifest.get(key, default)
            else:
                value = getattr(manifest, key, default)
            if value is KeyError:
                raise ValueError(f"manifest has no '{key}'; rebuild the shards with this version "
                                 f"of gtl_dist (shards/ CLI)")
            return value
        return cls(size=int(get("vocab_size")), mask_id=int(get("mask_id")),
                   pad_id=get("pad_id", None), data_ids=get("data_ids", None))


def masked_subs_log_probs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """:func:`subs_log_probs` of logits [P, V] taken at masked positions only: the softmax
    without [MASK]. In place on ``logits``, as subs_log_probs."""
    logits[..., mask_id] = float("-inf")
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def subs_log_probs(logits: torch.Tensor, z: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS parameterisation (MDLM): [MASK] never predicted, observed tokens carried over.

    Works in place on ``logits`` (a fresh fp32 tensor): the output projection's backward needs
    its inputs, not its output, and the subtraction's backward needs neither.
    """
    logits[..., mask_id] = float("-inf")
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    carry = (z != mask_id).unsqueeze(-1)
    logp.masked_fill_(carry, float("-inf"))
    observed = z.unsqueeze(-1)
    zero_if_carried = torch.where(carry, 0.0, logp.gather(-1, observed))
    return logp.scatter(-1, observed, zero_if_carried)


def subs_token_log_probs(logits: torch.Tensor, x0: torch.Tensor, mask_id: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_θ(x0^ℓ | z) at every position as if it were masked, and the greedy prediction:
    what the MDLM loss reads from :func:`subs_log_probs`, without building its [B, L, V] tensor.

    At masked positions the value is bit-for-bit ``subs_log_probs(logits, z)[..., x0]``, and the
    gradient to the logits is too (:class:`_TrueTokenLogProb`; docs/architecture.md, "Training",
    the loss head). The tensor route costs one fp32 [B, L, V] copy per operation it passes
    through (4 GB each for the paper-size model at micro-batch 64), forward and backward. Works
    in place on ``logits`` (a fresh fp32 tensor), as subs_log_probs.
    """
    logits[..., mask_id] = float("-inf")
    with torch.no_grad():
        greedy = logits.argmax(-1)
    return _TrueTokenLogProb.apply(logits, x0), greedy


class _TrueTokenLogProb(torch.autograd.Function):
    """logits[x0] − logsumexp(logits), with a backward that builds the logits' gradient in one
    tensor: −g·softmax (in place), then +g at x0. Autograd through the same two operations makes
    the same products and sums in separate tensors (logsumexp's backward: three; gather's: one;
    their sum: one), so the bits agree, which the tests check."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, lse, x0)
        return logits.gather(-1, x0.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, lse, x0 = ctx.saved_tensors
        grad_logits = (logits - lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))
        return grad_logits.scatter_add_(-1, x0.unsqueeze(-1), grad.unsqueeze(-1)), None


class DenoiserOutput(nn.Module):
    """MDLM's final layer: adaLN-modulated LayerNorm, then a zero-initialised projection to V."""

    def __init__(self, hidden: int, cond_dim: int, vocab_size: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden)
        self.linear = nn.Linear(hidden, vocab_size)
        for layer in (self.adaLN_modulation, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def features(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """What the projection reads: the modulated, normalised last hidden state [B, L, H]."""
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        return modulate(self.norm_final(h), shift, scale)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return float32_linear(self.features(h, c), self.linear)


class ScalarHead(nn.Module):
    """LayerNorm then Linear(hidden, 1): per position, or mean-pooled over the sequence."""

    def __init__(self, hidden: int, pooled: bool):
        super().__init__()
        self.pooled = pooled
        self.norm_final = LayerNorm(hidden)
        self.linear = nn.Linear(hidden, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm_final(h)
        if self.pooled:
            h = h.float().mean(dim=1)
        return float32_linear(h, self.linear).squeeze(-1)


class _Network(nn.Module):
    """Shared checks and metadata: ``vocab``, ``seq_len``, ``cfg``."""

    def __init__(self, cfg: ModelConfig, vocab: VocabSpec, seq_len: int):
        super().__init__()
        if not isinstance(vocab, VocabSpec):
            raise TypeError(f"vocab must be a VocabSpec, got {type(vocab).__name__}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.cfg = cfg
        self.vocab = vocab
        self.seq_len = seq_len


class Denoiser(_Network):
    """p_theta(x0 | z_t) in the SUBS parameterisation (docs/method.md §2)."""

    def __init__(self, cfg: ModelConfig, vocab: VocabSpec, seq_len: int):
        super().__init__(cfg, vocab, seq_len)
        self.backbone = DiT(cfg, vocab.size, seq_len)
        self.output = DenoiserOutput(cfg.hidden, cfg.cond_dim, vocab.size)

    def logits(self, z: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """The raw network output [B, L, V], fp32."""
        h, c = self.backbone(z, sigma)
        return self.output(h, c)

    def features(self, z: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """The input of the output projection [B, L, H]: logits = output.linear(features); what
        a guide adapter reads (gtl_dist/models/adapter.py)."""
        h, c = self.backbone(z, sigma)
        return self.output.features(h, c)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 log-probabilities [B, L, V]: [MASK] column -inf, unmasked rows one-hot on z."""
        return subs_log_probs(self.logits(z, sigma), z, self.vocab.mask_id)

    def masked_log_probs(self, z: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """fp32 [P, V]: ``forward(z)[rows, positions]`` where every z[rows[p], positions[p]] is
        [MASK], i.e. the softmax of the logits without [MASK] there; the output layer runs at
        those positions only (with |V| in the tens of thousands it is most of a pass)."""
        h, c = self.backbone(z)
        return masked_subs_log_probs(self.output(h[rows, positions].unsqueeze(1), c[rows]).squeeze(1),
                                     self.vocab.mask_id)


class ARLM(_Network):
    """Autoregressive LM with the Denoiser's parameter names (AR2Diff, docs/method.md §11).

    Always causal and never time-conditioned; position i predicts token i + 1.
    """

    def __init__(self, cfg: ModelConfig, vocab: VocabSpec, seq_len: int):
        super().__init__(cfg, vocab, seq_len)
        self.backbone = DiT(cfg, vocab.size, seq_len, attention="causal", time_conditioning=False)
        self.output = DenoiserOutput(cfg.hidden, cfg.cond_dim, vocab.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, c = self.backbone(x)
        return self.output(h, c)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return self.backbone.new_cache(batch_size, max_len)

    def forward_cached(self, x_new: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, T, V] for ``x_new`` placed at positions cache.length .. cache.length + T - 1;
        checks the shapes and advances ``cache.length`` (the ids: ``check_token_ids``)."""
        if x_new.shape[0] != cache.batch_size:
            raise ValueError(f"batch size {x_new.shape[0]} does not match the cache's {cache.batch_size}")
        if cache.length + x_new.shape[1] > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} positions; {cache.length} used, "
                             f"{x_new.shape[1]} more requested")
        self.backbone.check_tokens(x_new, cache.length)
        start = cache.length
        positions = torch.arange(start, start + x_new.shape[1], device=x_new.device)
        logits = self.logits_at(x_new, cache, positions)
        cache.length = start + x_new.shape[1]
        return logits

    def logits_at(self, x_new: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        """The decoding step: logits [B, T, V] at ``positions`` (a device tensor); unchecked, no
        host synchronisation, ``cache.length`` left to the caller."""
        h, c = self.backbone.forward_cached(x_new, cache, positions)
        return self.output(h, c)


class SequenceClassifier(_Network):
    """Domain classifier d_omega: one logit per sequence, source = 1 (docs/method.md §4).

    ``time_dependent=True`` (d_omega(z_t, t)) switches time conditioning on and needs sigma;
    the time-independent classifier reads clean sequences and ignores sigma.
    """

    def __init__(self, cfg: ModelConfig, vocab: VocabSpec, seq_len: int, time_dependent: bool):
        super().__init__(cfg, vocab, seq_len)
        self.time_dependent = bool(time_dependent)
        self.backbone = DiT(cfg, vocab.size, seq_len, time_conditioning=self.time_dependent)
        self.head = ScalarHead(cfg.hidden, pooled=True)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        if self.time_dependent and sigma is None:
            raise ValueError("the time-dependent classifier needs sigma (the noise level of z_t)")
        h, _ = self.backbone(z, sigma if self.time_dependent else None)
        return self.head(h)


class RatioNet(_Network):
    """r_phi(z): the log density ratio log q/p, up to an additive constant (docs/method.md §5)."""

    def __init__(self, cfg: ModelConfig, vocab: VocabSpec, seq_len: int):
        super().__init__(cfg, vocab, seq_len)
        self.backbone = DiT(cfg, vocab.size, seq_len)
        self.head = ScalarHead(cfg.hidden, pooled=True)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        h, _ = self.backbone(z, sigma)
        return self.head(h)


class EditRatioNet(_Network):
    """The edit-ratio network e_phi(z) of the default GTL recipe (docs/method.md §5).

    For a masked position l and a token v it estimates the change of the log density ratio that
    revealing v there causes:

        e_phi(z)[l, v]  ~  log h(z[l := v]) - log h(z)  =  log q(x0^l = v | z) - log p(x0^l = v | z)

    which is all a guided step needs (q(z_s | z_t) = p(z_s | z_t) h(z_s) / h(z_t) for one revealed
    token). One pass scores every edit of every position, where a sequence-level ratio net needs
    one pass per edit. Same backbone and output layer as the denoiser (zero-initialised, so an
    untrained network is no guidance at all); raw fp32 scores [B, L, V], meaningful at masked
    positions and non-[MASK] ids only.
    """

    # Samplers score edits with ``edit_scores`` (one pass) instead of calling it per edit.
    edit_form = True

    def __init__(self, cfg: ModelConfig, vocab: VocabSpec, seq_len: int):
        super().__init__(cfg, vocab, seq_len)
        self.backbone = DiT(cfg, vocab.size, seq_len, time_conditioning=False)
        self.output = DenoiserOutput(cfg.hidden, cfg.cond_dim, vocab.size)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        h, c = self.backbone(z)
        return self.output(h, c)

    def edit_scores(self, z: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[P, V]: the scores of position positions[p] of sequence rows[p]; the output layer runs
        at those positions only (with |V| in the tens of thousands it is most of the cost)."""
        h, c = self.backbone(z)
        return self.output(h[rows, positions].unsqueeze(1), c[rows]).squeeze(1)


class Planner(_Network):
    """Per-position logits: which masked position to reveal next (docs/method.md §6). Time-independent."""

    def __init__(self, cfg: ModelConfig, vocab: VocabSpec, seq_len: int):
        super().__init__(cfg, vocab, seq_len)
        self.backbone = DiT(cfg, vocab.size, seq_len, time_conditioning=False)
        self.head = ScalarHead(cfg.hidden, pooled=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, _ = self.backbone(z)
        return self.head(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_vocab_for_config(cfg: RunConfig, vocab: VocabSpec) -> None:
    """The Markov task's ids are the chain states 0..S-1: [MASK] must come after them."""
    if cfg.data.corpus == "markov":
        states = cfg.data.markov.num_states
        if vocab.mask_id < states or vocab.size < states + 1:
            raise ValueError(f"data.markov.num_states={states} uses ids 0..{states - 1}, but the "
                             f"vocabulary is size={vocab.size}, mask_id={vocab.mask_id}; the Markov "
                             f"vocabulary must be size={states + 1}, mask_id={states}")


def build_model(role: str, cfg: RunConfig, vocab: VocabSpec) -> nn.Module:
    """The network of a job role, sized by cfg.models.<...> and cfg.seq_len.

    The AR model uses the denoiser's size: AR2Diff turns it into the denoiser. The reference LM
    (the evaluation's causal LM for generative perplexity) is an ARLM sized by
    cfg.models.reference_lm.
    """
    from gtl_dist.models.adapter import GuideAdapter
    from gtl_dist.models.chain import ChainDenoiser, MarkovChain
    from gtl_dist.models.lora import LoraDenoiser
    check_vocab_for_config(cfg, vocab)
    m = cfg.models
    states = vocab.size - 1
    builders = {
        "denoiser": lambda: Denoiser(m.denoiser, vocab, cfg.seq_len),
        "ar": lambda: ARLM(m.denoiser, vocab, cfg.seq_len),
        "classifier_ti": lambda: SequenceClassifier(m.classifier, vocab, cfg.seq_len, time_dependent=False),
        "classifier_td": lambda: SequenceClassifier(m.classifier, vocab, cfg.seq_len, time_dependent=True),
        "ratio": lambda: RatioNet(m.ratio, vocab, cfg.seq_len),
        "edit_ratio": lambda: EditRatioNet(m.edit_ratio, vocab, cfg.seq_len),
        "adapter": lambda: GuideAdapter(m.adapter, vocab, cfg.seq_len, m.denoiser.hidden),
        "finetune_small": lambda: LoraDenoiser(m.denoiser, vocab, cfg.seq_len, m.finetune_small),
        "scratch_head": lambda: Denoiser(m.edit_ratio, vocab, cfg.seq_len),
        # The counts stages' estimate of the target chain (its matrix is the export's buffer).
        "chain": lambda: ChainDenoiser(MarkovChain(np.full((states, states), 1.0 / states)), cfg.seq_len),
        "planner": lambda: Planner(m.planner, vocab, cfg.seq_len),
        "reference_lm": lambda: ARLM(m.reference_lm, vocab, cfg.seq_len),
    }
    if role not in builders:
        raise ValueError(f"unknown model role '{role}'; expected one of {', '.join(ROLES)}")
    model = builders[role]()
    log.info("%s: %.4gM parameters, %.4gM trainable (vocab %d, seq_len %d)", role,
             count_parameters(model) / 1e6, trainable_parameters(model) / 1e6, vocab.size, cfg.seq_len)
    return model


def check_compatible(denoiser: Any, ratio_net: Any = None, planner: Any = None) -> None:
    """Fail before sampling if the networks disagree on vocabulary, [MASK] or sequence length.

    Arguments may be None (not used) or plain callables without ``vocab``/``seq_len`` (skipped).
    """
    named = [(n, m) for n, m in (("denoiser", denoiser), ("ratio_net", ratio_net), ("planner", planner))
             if m is not None]
    with_vocab = [(n, m.vocab) for n, m in named if isinstance(getattr(m, "vocab", None), VocabSpec)]
    for name, v in with_vocab[1:]:
        ref_name, ref = with_vocab[0]
        if (v.size, v.mask_id) != (ref.size, ref.mask_id):
            raise ValueError(f"vocabulary mismatch: {ref_name} has size={ref.size}, mask_id={ref.mask_id} "
                             f"but {name} has size={v.size}, mask_id={v.mask_id}; all networks must be "
                             f"built from the same manifest (tokenizer)")
    with_len = [(n, m.seq_len) for n, m in named if isinstance(getattr(m, "seq_len", None), int)]
    for name, length in with_len[1:]:
        ref_name, ref_len = with_len[0]
        if length != ref_len:
            raise ValueError(f"sequence length mismatch: {ref_name} has seq_len={ref_len} but {name} "
                             f"has seq_len={length}; train them with the same shards.seq_len")
