"""The pieces every GTL sampler shares (docs/method.md §7).

- ``score_edits``: r_φ of single-token edits z[ℓ := v], batched into few ratio-net passes, or
  read from one pass of an edit-ratio network (``edit_form``: it scores every edit at once).
- ``guided_logits``: g = a + γ·ρ with ρ = log_softmax of the edit scores over the candidates.
- ``keep_top_k``: the top-K truncation used by guided and unguided samplers alike.
- ``stabilise_mask_mass``: the stabiliser of the ancestral sampler.
- ``draw_categorical``: inverse-CDF draws in float64 from pre-drawn uniforms.
- ``draw_uniforms``: those uniforms, from the caller's generator, sent to the device without waiting.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from gtl_dist.sample.stats import NetworkCount, counted


def score_edits(ratio_net: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor,
                rows: torch.Tensor, positions: torch.Tensor, candidates: torch.Tensor,
                batch_rows: int, count: NetworkCount) -> torch.Tensor:
    """Scores ``s[p, j] = r_φ(z[rows[p]] with position positions[p] := candidates[p, j])``.

    Each edit is scored with every other position of its sequence as it is in ``z`` (other
    masked positions stay [MASK]: the ratio net was trained on exactly such partially masked
    inputs). The P·n edited sequences are built chunk by chunk, so at most ``batch_rows`` of them
    exist at a time, and each chunk is one ratio-net pass.

    An edit-ratio network (``ratio_net.edit_form``, gtl_dist.models.EditRatioNet) returns
    log h(z[ℓ := v]) − log h(z) for every v in one pass over z: its scores differ from r_φ's by a
    per-position constant, which ``guided_logits`` removes either way.
    """
    if getattr(ratio_net, "edit_form", False):
        count.calls += 1
        count.rows += int(z.shape[0])
        per_token = ratio_net.edit_scores(z, rows, positions)  # [P, V]
        return per_token.gather(-1, candidates).double()
    num_edits, num_candidates = candidates.shape
    total = num_edits * num_candidates
    scores = torch.empty(total, dtype=torch.float64, device=z.device)
    edit_of_row = torch.arange(total, device=z.device) // num_candidates
    flat_candidates = candidates.reshape(-1)
    for start in range(0, total, batch_rows):
        chunk = slice(start, min(start + batch_rows, total))
        edit = edit_of_row[chunk]
        edited = z[rows[edit]]  # advanced indexing copies, so z itself is never written
        edited[torch.arange(edited.shape[0], device=z.device), positions[edit]] = flat_candidates[chunk]
        scores[chunk] = counted(ratio_net, count, edited).double()
    return scores.view(num_edits, num_candidates)


def guided_logits(denoiser_logp: torch.Tensor, edit_scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """g = a + γ·ρ over the candidates, in float64.

    ρ = log_softmax(s) over the candidates removes r_φ's arbitrary additive constant (the
    class-prior term of the classifier logit, docs/method.md §5).
    """
    rho = torch.log_softmax(edit_scores.double(), dim=-1)
    return denoiser_logp.double() + gamma * rho


def keep_top_k(ids: torch.Tensor, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest logits per row and their token ids, ordered by token id.

    Ordering by id (not by rank) makes the draw that follows depend only on the kept *set*,
    so paths that reach the same set differently (top-K of all |V| tokens for the unguided
    sampler, top-K of the top-n_ratio candidates at γ = 0) draw the same token bit for bit.
    """
    k = min(k, logits.shape[-1])
    top_logits, top_index = torch.topk(logits, k, dim=-1)
    top_ids = torch.gather(ids, -1, top_index)
    top_ids, order = torch.sort(top_ids, dim=-1)
    return top_ids, torch.gather(top_logits, -1, order)


def stabilise_mask_mass(token_logits: torch.Tensor, stay_logprob: float | torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stabiliser: P(stay masked) is reset to its unguided value exactly.

    The token logits are shifted by one constant per position so that their probabilities sum to
    1 − P(stay); the returned mask log-probability is ``stay_logprob`` itself. Guidance then only
    redistributes the unmasking mass among the candidates. Without it the kernel would be the
    joint softmax over [MASK] and the tokens, and γ·ρ ≤ 0 (ρ is a log-softmax) pushes mass onto
    [MASK]: large γ stalls the unmasking schedule and samples collapse to all-mask. With the
    exact h it is also the exact target kernel: Σ_v p(v|z)·h(z[ℓ:=v]) = h(z), so the target's
    unmasking rate equals the source's (docs/method.md §3).

    Returns float64 ``(token_logprobs [..., K], stay_logprob [...])``.
    """
    token_logits = token_logits.double()
    stay = torch.as_tensor(stay_logprob, dtype=torch.float64, device=token_logits.device)
    stay = stay.expand(token_logits.shape[:-1])
    unmask = torch.log1p(-torch.exp(stay)).unsqueeze(-1)
    return torch.log_softmax(token_logits, dim=-1) + unmask, stay.clone()


def joint_mask_kernel(token_logits: torch.Tensor, stay_logprob: float | torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The unstabilised kernel: one softmax over [MASK] (logit log P(stay)) and the token logits
    (which already carry log(1 − P(stay))). Kept as an option to show what the stabiliser
    prevents; same return convention as ``stabilise_mask_mass``."""
    token_logits = token_logits.double()
    stay = torch.as_tensor(stay_logprob, dtype=torch.float64, device=token_logits.device)
    stay = stay.expand(token_logits.shape[:-1]).unsqueeze(-1)
    joint = torch.log_softmax(torch.cat([stay, token_logits], dim=-1), dim=-1)
    return joint[..., 1:], joint[..., 0]


def draw_categorical(logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index per row drawn from softmax(logprobs) by inverse CDF, in float64.

    ``uniforms`` (one U[0, 1) per row) come from the caller's seeded generator, so a draw is a
    deterministic function of (probabilities, uniform). Entries of probability 0 are never drawn:
    the search is right-sided and clamped to the last entry with positive probability.
    """
    probs = torch.softmax(logprobs.double(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = (uniforms.double() * cdf[..., -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    positive = probs > 0
    last_positive = positive.shape[-1] - 1 - torch.argmax(positive.flip(-1).to(torch.int8), dim=-1)
    return torch.minimum(index, last_positive)


def draw_uniforms(shape: tuple[int, ...], generator: Optional[torch.Generator],
                  device: torch.device) -> torch.Tensor:
    """float64 U[0, 1) of ``shape`` from the caller's generator (torch's global CPU one if None),
    drawn where the generator lives and sent to ``device``.

    A CPU generator keeps the random stream the same on every device (samples do not depend on
    where they are drawn). On a GPU its draws go through pinned memory without blocking, so the
    copy does not make the host wait for the kernels already queued.
    """
    home = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=home)
    if device.type != "cuda" or home.type == "cuda":
        return u.to(device)
    return u.pin_memory().to(device, non_blocking=True)
