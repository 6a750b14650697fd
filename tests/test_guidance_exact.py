"""GTL guidance against exact enumeration (docs/method.md §3, §7).

A known source p and target q over V^L (two 3-state Markov chains, L = 3: 27 sequences, 64
masked states) give the exact posterior denoiser p(x0^ℓ | z) and the exact
h(z) = E_{p(x0|z)}[q(x0)/p(x0)] = q(x0 ⊒ z)/p(x0 ⊒ z) (x0 ⊒ z: x0 agrees with z's unmasked tokens).
In masked diffusion p(x0 | z_t) does not depend on t (the mask pattern carries the noise level),
so h_t = h for every t and the log-ratio oracle is a function of z alone, like r_φ.
"""

import itertools
import math

import pytest
import torch

from gtl_dist.diffusion import LogLinearSchedule
from gtl_dist.models import VocabSpec
from gtl_dist.sample import PlannerSampler, SamplerStats, exact_guided_sampler

pytestmark = pytest.mark.exact

V, L = 3, 3
MASK = V
VOCAB = VocabSpec(size=V + 1, mask_id=MASK, data_ids=V)
SCHEDULE = LogLinearSchedule(eps=1e-3)


def markov_table(init, transition):
    """p(x) for every x in V^L, x enumerated in lexicographic order."""
    init, transition = torch.tensor(init, dtype=torch.float64), torch.tensor(transition, dtype=torch.float64)
    probs = []
    for x in itertools.product(range(V), repeat=L):
        pr = init[x[0]]
        for a, b in zip(x, x[1:]):
            pr = pr * transition[a, b]
        probs.append(pr)
    return torch.stack(probs)


P_TABLE = markov_table([0.5, 0.3, 0.2], [[0.2, 0.5, 0.3], [0.4, 0.2, 0.4], [0.35, 0.45, 0.2]])
Q_TABLE = markov_table([0.2, 0.3, 0.5], [[0.7, 0.1, 0.2], [0.15, 0.7, 0.15], [0.1, 0.25, 0.65]])


class Oracle:
    """Exact tables for every masked state z in (V+1)^L."""

    def __init__(self, p, q):
        self.p, self.q = p, q
        self.x0 = torch.tensor(list(itertools.product(range(V), repeat=L)))  # [27, L]
        self.states = torch.tensor(list(itertools.product(range(V + 1), repeat=L)))  # [64, L]
        z, x = self.states[:, None, :], self.x0[None, :, :]
        self.agrees = ((z == MASK) | (z == x)).all(-1).double()  # [64, 27]: x0 ⊒ z
        p_mass, q_mass = self.agrees @ p, self.agrees @ q
        self.log_h = torch.log(q_mass) - torch.log(p_mass)
        # p(x0^ℓ = v | z) for masked ℓ; SUBS rows (one-hot) at unmasked ℓ; [MASK] column -inf.
        post = self.agrees * p / p_mass[:, None]  # [64, 27]
        onehot_x0 = torch.nn.functional.one_hot(self.x0, V + 1).double()  # [27, L, V+1]
        marg = torch.einsum("sx,xlv->slv", post, onehot_x0)
        onehot_z = torch.nn.functional.one_hot(self.states, V + 1).double()
        table = torch.where((self.states == MASK)[..., None], marg, onehot_z)
        self.logp_table = torch.log(table)  # mask column: log 0 = -inf

    def index(self, z):
        weights = (V + 1) ** torch.arange(L - 1, -1, -1)
        return (z.cpu() * weights).sum(-1)

    def denoiser(self, z):
        return self.logp_table[self.index(z)]

    def ratio(self, z):
        return self.log_h[self.index(z)]

    def target_conditional(self, z, pos):
        """q(x0^ℓ = v | z) from the target table directly: the exact guided step's token law."""
        post = self.agrees[self.index(z)] * self.q / (self.agrees[self.index(z)] @ self.q)[:, None]
        onehot = torch.nn.functional.one_hot(self.x0[:, pos], V).double()  # [27, V]
        return post @ onehot


ORACLE = Oracle(P_TABLE, Q_TABLE)


def forward_kernel(alpha):
    """k_t(z | x0) for every (z, x0): each token independently kept w.p. alpha, else [MASK]."""
    z, x = ORACLE.states[:, None, :], ORACLE.x0[None, :, :]
    per_pos = torch.where(z == MASK, torch.tensor(1 - alpha, dtype=torch.float64),
                          torch.where(z == x, torch.tensor(alpha, dtype=torch.float64),
                                      torch.tensor(0.0, dtype=torch.float64)))
    return per_pos.prod(-1)  # [64, 27]


def reverse_kernel(table, alpha_s, alpha_t):
    """The exact joint reverse kernel table(z_s | z_t) [64_t, 64_s] by Bayes' rule on the forward
    process of `table` (s < t): q_s(z_s) k(z_t | z_s) / q_t(z_t)."""
    marg_s = forward_kernel(alpha_s) @ table
    marg_t = forward_kernel(alpha_t) @ table
    zs, zt = ORACLE.states[None, :, :], ORACLE.states[:, None, :]
    keep = alpha_t / alpha_s
    step = torch.where(zs == MASK, (zt == MASK).double(),
                       torch.where(zt == MASK, 1 - keep, (zt == zs).double() * keep))
    k_ts = step.prod(-1)  # [64_t, 64_s] = k(z_t | z_s)
    return marg_s[None, :] * k_ts / marg_t[:, None], marg_t


def test_theorem_guided_source_kernel_is_the_target_kernel():
    """q(z_s|z_t) = p(z_s|z_t)·h_s(z_s)/h_t(z_t) for every (z_t, z_s), and q_t = p_t·h_t."""
    h = ORACLE.log_h.exp()
    for s, t in [(0.1, 0.3), (0.5, 0.9), (0.0, 1.0), (0.2, 0.21)]:
        alpha_s = 1 - float(SCHEDULE.move_chance(torch.tensor(s, dtype=torch.float64)))
        alpha_t = 1 - float(SCHEDULE.move_chance(torch.tensor(t, dtype=torch.float64)))
        p_rev, p_t = reverse_kernel(P_TABLE, alpha_s, alpha_t)
        q_rev, q_t = reverse_kernel(Q_TABLE, alpha_s, alpha_t)
        torch.testing.assert_close(q_t, p_t * h, rtol=1e-12, atol=1e-15)
        guided = p_rev * h[None, :] / h[:, None]
        torch.testing.assert_close(guided, q_rev, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(q_rev.sum(-1), torch.ones(64, dtype=torch.float64))
    # The joint kernel is a mixture over x0, not a product over positions: that is why a step that
    # may reveal several positions (here all of them: t = 1 -> s = 0) is only approximately factorised.
    p_rev, _ = reverse_kernel(P_TABLE, 1.0, 1e-3)
    assert (p_rev - _product_of_marginals(p_rev)).abs().max() > 0.05


def _product_of_marginals(kernel):
    """Per row z_t: the product over positions of the kernel's per-position marginals."""
    out = torch.ones_like(kernel)
    for pos in range(L):
        onehot = torch.nn.functional.one_hot(ORACLE.states[:, pos], V + 1).double()  # [64_s, V+1]
        marginal = kernel @ onehot  # [64_t, V+1]
        out = out * (marginal @ onehot.T)
    return out


def masked_cases():
    """Every (state, masked position) pair, batched."""
    rows, positions = torch.nonzero(ORACLE.states == MASK, as_tuple=True)
    return ORACLE.states[rows], positions


def planner_sampler(**kw):
    kw = {"gamma": 1.0, "n_ratio": V, "top_k": V, "planner_mode": "uniform", **kw}
    return PlannerSampler(ORACLE.denoiser, ORACLE.ratio, None, vocab=VOCAB, seq_len=L, **kw)


def dense(ids, logprobs, width=V + 1):
    out = torch.zeros(ids.shape[0], width, dtype=torch.float64)
    return out.scatter_add(1, ids, logprobs.exp())


def test_planner_step_is_the_exact_target_conditional():
    """n_ratio = |V|, γ = 1: the planner sampler's token law at ℓ is q(x0^ℓ | z), for every z and ℓ."""
    z, positions = masked_cases()
    ids, logp = planner_sampler().token_distribution(z, positions, SamplerStats())
    got = dense(ids, logp)
    want = torch.stack([ORACLE.target_conditional(z[i:i + 1], int(positions[i]))[0] for i in range(len(z))])
    torch.testing.assert_close(got[:, :V], want, rtol=1e-10, atol=1e-12)
    assert (got[:, MASK] == 0).all()


def test_planner_step_equals_exact_guidance_step():
    """The planner step equals the exact full-vocabulary ancestral step conditioned on unmasking,
    and that step keeps P(stay masked) at the unguided value."""
    z, positions = masked_cases()
    ids, logp = planner_sampler().token_distribution(z, positions, SamplerStats())
    exact = exact_guided_sampler(ORACLE.denoiser, ORACLE.ratio, SCHEDULE, vocab=VOCAB, seq_len=L,
                                 gamma=1.0, top_k=V, steps=10)
    for step in (0, 4, 9):
        k = exact.step_distribution(ORACLE.states, step)
        assert torch.equal(k.stay_logprob, torch.full_like(k.stay_logprob, exact.stay_logprobs[step]))
        per_state = {(int(b), int(pos)): i for i, (b, pos) in enumerate(k.positions)}
        rows = [per_state[(int(ORACLE.index(z[i:i + 1])), int(positions[i]))] for i in range(len(z))]
        unmask = 1 - k.stay_logprob[rows].exp()
        conditional = dense(k.ids[rows], k.token_logprobs[rows]) / unmask[:, None]
        torch.testing.assert_close(conditional, dense(ids, logp), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.5])
def test_candidate_truncation_is_exact_on_the_candidates(gamma):
    """n_ratio < |V|: only the denoiser's top-n tokens can be emitted, with weights
    ∝ p(v|z)·h(z[ℓ:=v])^γ."""
    n = 2
    z, positions = masked_cases()
    ids, logp = planner_sampler(gamma=gamma, n_ratio=n).token_distribution(z, positions, SamplerStats())
    got = dense(ids, logp)
    a = ORACLE.denoiser(z)[torch.arange(len(z)), positions]  # [N, V+1]
    top = torch.topk(a, n, dim=-1).indices
    assert ((got > 0).sum(-1) <= n).all()
    outside = torch.ones_like(got, dtype=torch.bool).scatter(1, top, False)
    assert (got[outside] == 0).all()
    edited = z[:, None, :].repeat(1, V, 1)
    edited[torch.arange(len(z))[:, None], torch.arange(V)[None, :], positions[:, None]] = torch.arange(V)
    log_h = ORACLE.ratio(edited.reshape(-1, L)).view(len(z), V)
    weight = (a[:, :V] + gamma * log_h).exp() * (~outside[:, :V])
    torch.testing.assert_close(got[:, :V], weight / weight.sum(-1, keepdim=True), rtol=1e-10, atol=1e-12)


def chi_square_pvalue(samples, probs):
    """Pearson's chi-square test of sequence counts against `probs` over all |V|^L sequences.
    p-value = Q(df/2, X²/2), the chi-square survival function (regularised upper gamma)."""
    index = (samples * V ** torch.arange(L - 1, -1, -1)).sum(-1)
    counts = torch.bincount(index, minlength=V ** L).double()
    expected = probs * len(samples)
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor((V ** L - 1) / 2, dtype=torch.float64)
    total_variation = 0.5 * (counts / len(samples) - probs).abs().sum()
    return float(torch.special.gammaincc(df, stat / 2)), float(total_variation)


N_SAMPLES = 20_000
P_MIN = 1e-3  # test level: a correct sampler fails with probability 1e-3 per seed (seeds are fixed)


@pytest.mark.parametrize("mode", ["uniform", "sample", "argmax"])
def test_planner_sampler_samples_the_target(mode):
    """Exact oracles, γ = 1, n_ratio = |V|: samples are distributed as q, whatever the reveal order.

    Expected counts are ≥ 35 in every one of the 27 cells, so the chi-square law holds; the same
    statistic rejects the source p with an astronomically small p-value (the test has power).
    """
    planner = lambda z: torch.tensor([[0.0, 2.0, -1.0]]).expand(z.shape[0], L)  # noqa: E731
    sampler = planner_sampler(planner_mode=mode) if mode == "uniform" else PlannerSampler(
        ORACLE.denoiser, ORACLE.ratio, planner, vocab=VOCAB, seq_len=L, gamma=1.0, n_ratio=V, top_k=V,
        planner_mode=mode)
    out = sampler.sample(N_SAMPLES, torch.Generator().manual_seed(11), batch_size=N_SAMPLES)
    assert (out.tokens < V).all()
    p_value, tv = chi_square_pvalue(out.tokens, Q_TABLE)
    print(f"planner sampler ({mode}) vs q: p-value {p_value:.3f}, TV {tv:.4f}")
    assert p_value > P_MIN
    assert chi_square_pvalue(out.tokens, P_TABLE)[0] < 1e-100
    # Network evaluations: one denoiser row per sequence and step, n_ratio ratio rows per step.
    assert out.stats.denoiser.rows == N_SAMPLES * L and out.stats.ratio.rows == N_SAMPLES * L * V


def test_unguided_planner_sampler_samples_the_source():
    out = planner_sampler(gamma=0.0).sample(N_SAMPLES, torch.Generator().manual_seed(12),
                                            batch_size=N_SAMPLES)
    p_value, _ = chi_square_pvalue(out.tokens, P_TABLE)
    assert p_value > P_MIN


def exact_output_distribution(sampler):
    """The ancestral sampler's exact output law over V^L, by propagating its step kernels over all
    64 states (the positions of one step are drawn independently given z), then the greedy fill."""
    dist = torch.zeros(len(ORACLE.states), dtype=torch.float64)
    dist[-1] = 1.0  # all-[MASK]
    index_of = {tuple(s.tolist()): i for i, s in enumerate(ORACLE.states)}
    for step in range(sampler.steps):
        k = sampler.step_distribution(ORACLE.states, step)
        options = {}  # (state, position) -> [(token, prob)]
        for i, (b, pos) in enumerate(k.positions.tolist()):
            probs = [(MASK, math.exp(k.stay_logprob[i]))]
            probs += [(int(v), math.exp(lp)) for v, lp in zip(k.ids[i], k.token_logprobs[i])
                      if lp > -math.inf]
            options.setdefault(b, []).append((pos, probs))
        new = torch.zeros_like(dist)
        for b, mass in enumerate(dist.tolist()):
            if mass == 0:
                continue
            if b not in options:
                new[b] += mass
                continue
            positions = [pos for pos, _ in options[b]]
            for combo in itertools.product(*[probs for _, probs in options[b]]):
                z = ORACLE.states[b].clone()
                weight = mass
                for pos, (token, pr) in zip(positions, combo):
                    z[pos] = token
                    weight *= pr
                new[index_of[tuple(z.tolist())]] += weight
        dist = new
    # Greedy fill of what is still masked: the denoiser's argmax at each remaining [MASK].
    out = torch.zeros(V ** L, dtype=torch.float64)
    greedy = ORACLE.logp_table.argmax(-1)
    for b, mass in enumerate(dist.tolist()):
        z = torch.where(ORACLE.states[b] == MASK, greedy[b], ORACLE.states[b])
        out[int((z * V ** torch.arange(L - 1, -1, -1)).sum())] += mass
    return out


def test_multi_position_ancestral_sampler_approaches_the_target():
    """Exact guided ancestral sampling (full vocabulary, exact h, γ = 1) factorises each step over
    positions, which is exact only when at most one position unmasks per step: its output law,
    computed exactly, approaches q as the number of steps grows. Its samples follow that law."""
    tvs = {}
    for steps in (1, 2, 4, 16, 64):
        sampler = exact_guided_sampler(ORACLE.denoiser, ORACLE.ratio, SCHEDULE, vocab=VOCAB, seq_len=L,
                                       gamma=1.0, top_k=V, steps=steps)
        law = exact_output_distribution(sampler)
        torch.testing.assert_close(law.sum(), torch.tensor(1.0, dtype=torch.float64))
        tvs[steps] = 0.5 * float((law - Q_TABLE).abs().sum())
        if steps == 4:
            out = sampler.sample(N_SAMPLES, torch.Generator().manual_seed(13), batch_size=N_SAMPLES)
            assert chi_square_pvalue(out.tokens, law)[0] > P_MIN
    print("exact ancestral sampler, TV(output, q) by steps:", {s: round(v, 5) for s, v in tvs.items()})
    assert tvs[1] > 0.05  # one step reveals all three positions independently: far from q
    assert tvs[1] > tvs[4] > tvs[16] > tvs[64]
    assert tvs[64] < 0.01
