"""Exact Markov oracles (forward–backward) against brute-force enumeration, and the guidance
identity through the package's own samplers: exact source + exact h is the exact target model."""

import itertools

import numpy as np
import pytest
import torch

from gtl_dist.diffusion import GeometricSchedule, LogLinearSchedule
from gtl_dist.eval.oracles import EditRatioOracle, LogRatioOracle, jensen_log_ratio, log_h
from gtl_dist.models.chain import ChainDenoiser, MarkovChain
from gtl_dist.sample import AncestralSampler, exact_guided_sampler, unguided_sampler

pytestmark = pytest.mark.exact

S, L = 3, 4
RNG = np.random.default_rng(11)
P = RNG.dirichlet(np.ones(S), size=S)
Q = RNG.dirichlet(np.full(S, 0.5), size=S)
INIT_P = np.array([0.2, 0.5, 0.3])
SOURCE, TARGET = MarkovChain(P, INIT_P), MarkovChain(Q)


def enumerate_chain(chain: MarkovChain) -> tuple[np.ndarray, np.ndarray]:
    """Every sequence of S^L and its probability."""
    xs = np.array(list(itertools.product(range(S), repeat=L)))
    a, init = chain.matrix.numpy(), chain.initial.numpy()
    probs = init[xs[:, 0]] * np.prod(a[xs[:, :-1], xs[:, 1:]], axis=1)
    return xs, probs


XS, PROBS_P = enumerate_chain(SOURCE)
_, PROBS_Q = enumerate_chain(TARGET)
STATES = np.array(list(itertools.product(range(S + 1), repeat=L)))  # every partly masked z
AGREES = ((STATES[:, None, :] == S) | (STATES[:, None, :] == XS[None])).all(-1)  # x0 ⊒ z
Z = torch.as_tensor(STATES)


def test_evidence_and_log_h_match_enumeration():
    p_mass, q_mass = AGREES @ PROBS_P, AGREES @ PROBS_Q
    np.testing.assert_allclose(SOURCE.log_evidence(Z).numpy(), np.log(p_mass), atol=1e-12)
    np.testing.assert_allclose(SOURCE.run(Z).log_evidence.numpy(), np.log(p_mass), atol=1e-12)
    np.testing.assert_allclose(log_h(SOURCE, TARGET, Z).numpy(), np.log(q_mass / p_mass), atol=1e-12)


def test_posterior_marginals_are_the_exact_subs_denoiser():
    post = AGREES * PROBS_P / (AGREES @ PROBS_P)[:, None]  # p(x0 | z)
    marginals = np.einsum("zx,xlv->zlv", post, np.eye(S)[XS])
    out = ChainDenoiser(SOURCE, L)(Z).double().numpy()
    masked = STATES == S
    np.testing.assert_allclose(np.exp(out[..., :S])[masked], marginals[masked], atol=1e-6)
    assert np.isneginf(out[..., S]).all()  # SUBS: [MASK] is never predicted
    observed = np.argwhere(~masked)
    assert (out[observed[:, 0], observed[:, 1], STATES[~masked]] == 0.0).all()  # carried over


def test_jensen_form_matches_enumeration():
    post = AGREES * PROBS_P / (AGREES @ PROBS_P)[:, None]
    expected = post @ (np.log(PROBS_Q) - np.log(PROBS_P))
    np.testing.assert_allclose(jensen_log_ratio(SOURCE, TARGET, Z).numpy(), expected, atol=1e-10)
    # Jensen: E[log ratio] <= log E[ratio] = log h.
    assert (jensen_log_ratio(SOURCE, TARGET, Z) <= log_h(SOURCE, TARGET, Z) + 1e-12).all()


def test_edit_oracle_is_the_log_h_difference_of_each_edit():
    scores = EditRatioOracle(SOURCE, TARGET, L)(Z).numpy()
    lh = log_h(SOURCE, TARGET, Z).numpy()
    index = {tuple(z): i for i, z in enumerate(STATES)}
    for i in RNG.choice(len(STATES), size=60, replace=False):
        z = STATES[i]
        for pos in np.flatnonzero(z == S):
            for v in range(S):
                edited = z.copy()
                edited[pos] = v
                assert scores[i, pos, v] == pytest.approx(lh[index[tuple(edited)]] - lh[i], abs=1e-10)


@pytest.mark.parametrize("schedule", [LogLinearSchedule(eps=1e-3), GeometricSchedule()])
@pytest.mark.parametrize("oracle", ["edit", "sequence"])
def test_exact_h_guidance_draws_what_the_exact_target_denoiser_draws(schedule, oracle):
    """q(z_s | z_t) = p(z_s | z_t) h(z_s) / h(z_t): at γ = 1 the guided sampler with the exact h is
    the exact target model, so with the same random stream it draws the same tokens."""
    guide = (EditRatioOracle(SOURCE, TARGET, L) if oracle == "edit"
             else LogRatioOracle(SOURCE, TARGET, L, form="h"))
    kw = dict(steps=6, top_k=S)
    target = unguided_sampler(ChainDenoiser(TARGET, L), schedule, **kw)
    guided = exact_guided_sampler(ChainDenoiser(SOURCE, L), guide, schedule, gamma=1.0, **kw)
    a = target.sample(512, torch.Generator().manual_seed(5), batch_size=128).tokens
    b = guided.sample(512, torch.Generator().manual_seed(5), batch_size=128).tokens
    assert torch.equal(a, b)


def test_edit_form_scores_give_the_sequence_form_kernel():
    """One pass of an edit-ratio network and n_ratio passes of a sequence-level ratio net give the
    same guided kernel when both are exact (they differ by a per-position constant)."""
    kw = dict(gamma=2.0, n_ratio=S, top_k=S, steps=4, vocab=ChainDenoiser(SOURCE, L).vocab, seq_len=L)
    edit = AncestralSampler(ChainDenoiser(SOURCE, L), EditRatioOracle(SOURCE, TARGET, L),
                            LogLinearSchedule(), **kw)
    seq = AncestralSampler(ChainDenoiser(SOURCE, L), LogRatioOracle(SOURCE, TARGET, L, form="h"),
                           LogLinearSchedule(), **kw)
    z = Z[STATES.__eq__(S).any(1)][:40]
    a, b = edit.step_distribution(z, 1), seq.step_distribution(z, 1)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=1e-9, rtol=0)


def test_scaled_oracle_and_bad_forms():
    half = LogRatioOracle(SOURCE, TARGET, L, form="h", scale=0.5)
    torch.testing.assert_close(half(Z), 0.5 * log_h(SOURCE, TARGET, Z))
    with pytest.raises(ValueError, match="form='clean' is not one of h, jensen"):
        LogRatioOracle(SOURCE, TARGET, L, form="clean")
    with pytest.raises(ValueError, match="ids in 0..3"):
        SOURCE.log_evidence(torch.tensor([[0, 4, 1, 2]]))
