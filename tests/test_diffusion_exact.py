"""The MDLM process and loss against exact enumeration (|V| = 4 data ids + [MASK], L = 3).

Every sequence and every mask pattern is enumerated, so "exact" means float64 sums with no
sampling error; Monte-Carlo checks use tolerances of a few standard errors measured in the test.
"""

import math

import numpy as np
import pytest
import torch

from diffusion_oracles import (TableDenoiser, entropy, enumerate_chain, exact_nelbo,
                               pattern_integral, posterior_table, table_of)
from gtl_dist.config import ModelConfig, NoiseConfig
from gtl_dist.diffusion import (GeometricSchedule, LogLinearSchedule, NoiseSchedule, mask_tokens,
                                mdlm_loss, sample_t)
from gtl_dist.models import Denoiser, VocabSpec

pytestmark = pytest.mark.exact


STATES, L = 4, 3
VOCAB = VocabSpec(STATES + 1, mask_id=STATES, data_ids=STATES)
SCHEDULES = {
    "loglinear": LogLinearSchedule(eps=1e-3, t_min=1e-3),
    "geometric": GeometricSchedule(sigma_min=1e-4, sigma_max=20.0, t_min=1e-3),
}


def data_distribution():
    """A 4-state chain with an unequal first state, so positions differ in predictability."""
    matrix = np.array([[0.70, 0.10, 0.15, 0.05],
                       [0.20, 0.50, 0.20, 0.10],
                       [0.05, 0.05, 0.30, 0.60],
                       [0.25, 0.25, 0.25, 0.25]])
    return enumerate_chain(matrix, L, initial=np.array([0.4, 0.3, 0.2, 0.1]))


def random_denoiser(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    net = Denoiser(ModelConfig(hidden=16, blocks=2, heads=2, cond_dim=8, dropout=0.0), VOCAB, L)
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised heads would make the output uniform
            p.normal_(0.0, 0.3)
    return net.eval()


def mc_loss(denoiser, seqs, probs, schedule, batches: int, batch_size: int, seed: int):
    """Per-batch mdlm_loss values for x0 ~ probs: their mean and standard error."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.as_tensor(probs)
    values = []
    for _ in range(batches):
        x0 = torch.as_tensor(seqs)[torch.multinomial(weights, batch_size, True, generator=g)]
        t = sample_t(batch_size, g, t_min=schedule.t_min)
        with torch.no_grad():
            loss, _ = mdlm_loss(denoiser, x0, schedule, t, g)
        values.append(loss.item())
    values = np.array(values)
    return values.mean(), values.std(ddof=1) / math.sqrt(batches)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_loss_weight_is_minus_alpha_prime_over_one_minus_alpha(name):
    schedule = SCHEDULES[name]
    t = torch.linspace(0.001, 1.0, 41, dtype=torch.float64, requires_grad=True)
    move = schedule.move_chance(t)
    (derivative,) = torch.autograd.grad(move.sum(), t)  # d(1 - alpha)/dt = -alpha'
    t = t.detach()
    torch.testing.assert_close(schedule.loss_weight(t), derivative / move.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(schedule.sigma(t), -torch.log1p(-schedule.move_chance(t)))
    # The closed form used by the exact NELBO (from the move chance only) agrees with a
    # 200-point Gauss-Legendre quadrature of the weight itself, to 1e-10.
    nodes, w = np.polynomial.legendre.leggauss(200)
    tq = torch.as_tensor(schedule.t_min + (1 - schedule.t_min) * (nodes + 1) / 2)
    m = schedule.move_chance(tq)
    for k in range(1, L + 1):
        quad = float((torch.as_tensor(w) * (1 - schedule.t_min) / 2
                      * schedule.loss_weight(tq) * m ** k * (1 - m) ** (L - k)).sum())
        assert pattern_integral(schedule, k, L, schedule.t_min, 1.0) == pytest.approx(quad, rel=1e-10)


def test_loglinear_weight_is_exactly_one_over_t():
    schedule = LogLinearSchedule(eps=0.3)
    t = torch.tensor([0.001, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.loss_weight(t), 1 / t, rtol=0, atol=0)
    torch.testing.assert_close(schedule.move_chance(t), 0.7 * t)


def test_schedule_from_config():
    assert isinstance(NoiseSchedule.from_config(NoiseConfig()), LogLinearSchedule)
    geo = NoiseSchedule.from_config(NoiseConfig(schedule="geometric", sigma_min=1e-3, sigma_max=10.0))
    assert isinstance(geo, GeometricSchedule)
    assert float(geo.sigma(torch.tensor(0.0))) == pytest.approx(1e-3)
    assert float(geo.sigma(torch.tensor(1.0))) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="sigma_min"):
        GeometricSchedule(sigma_min=5.0, sigma_max=1.0)


def test_sample_t_is_one_stratified_global_draw_split_over_ranks():
    t_min, per_rank, world = 1e-3, 8, 4
    n = per_rank * world
    shares = [sample_t(per_rank, torch.Generator().manual_seed(7), t_min=t_min, rank=r, world_size=world)
              for r in range(world)]
    global_draw = sample_t(n, torch.Generator().manual_seed(7), t_min=t_min)
    assert torch.equal(torch.sort(torch.cat(shares)).values, torch.sort(global_draw).values)
    # Exactly one draw in each of the n strata of [t_min, 1), and each rank's share is stratified.
    for draw, size in [(global_draw, n)] + [(s, per_rank) for s in shares]:
        strata = torch.floor((draw.double() - t_min) / (1 - t_min) * size).long()
        assert sorted(strata.tolist()) == list(range(size))
    iid = [sample_t(per_rank, torch.Generator().manual_seed(3), t_min=t_min, antithetic=False,
                    rank=r, world_size=world) for r in range(world)]
    assert len(set(torch.cat(iid).tolist())) == n  # disjoint slices of one draw
    assert float(torch.cat(iid).min()) >= t_min and float(torch.cat(iid).max()) < 1.0
    with pytest.raises(ValueError, match="rank"):
        sample_t(4, None, t_min=t_min, rank=4, world_size=4)


def test_mask_tokens_masks_at_the_move_chance_and_keeps_the_rest():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, STATES, (4000, 5), generator=g)
    move = torch.tensor([0.1, 0.5, 0.9, 0.0]).repeat_interleave(1000)
    z = mask_tokens(x0, move, VOCAB.mask_id, g)
    masked = (z == VOCAB.mask_id).float().view(4, 1000 * 5).mean(1)
    se = torch.sqrt(torch.tensor([0.1, 0.5, 0.9, 0.0]) * torch.tensor([0.9, 0.5, 0.1, 1.0]) / 5000)
    assert torch.all((masked - torch.tensor([0.1, 0.5, 0.9, 0.0])).abs() <= 4 * se + 1e-9)
    assert torch.equal(z[z != VOCAB.mask_id], x0[z != VOCAB.mask_id])


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_mdlm_loss_converges_to_the_exact_nelbo(name):
    """Monte-Carlo mean of mdlm_loss (random tiny DiT) vs the enumerated NELBO over [t_min, 1].

    The estimator averages over t ~ U[t_min, 1], so its expectation is the integral divided by
    (1 - t_min). Tolerance: 4 standard errors of the batch means (measured), and the standard
    error itself must be below 1% so that the check is sharp.
    """
    schedule = SCHEDULES[name]
    seqs, probs = data_distribution()
    net = random_denoiser()
    exact = exact_nelbo(table_of(net, VOCAB, L), seqs, probs, VOCAB, schedule,
                        schedule.t_min, 1.0) / (1 - schedule.t_min)
    mean, se = mc_loss(net, seqs, probs, schedule, batches=150, batch_size=1024, seed=1)
    assert se < 0.01 * exact
    assert abs(mean - exact) < 4 * se, (mean, exact, se)


def test_perfect_oracle_reaches_the_data_entropy():
    """The exact posterior denoiser's NELBO over t in [0, 1] with eps = 0 equals H(p) / L.

    With the defaults (eps = t_min = 1e-3) the truncated integral lies below H / L by at most
    (eps + t_min) log|V| per token: the integrand, E[sum over masked l of H(x^l | rest)] / m,
    is at most L log|V|, and the truncation removes u = 1 - alpha in [0, (1-eps) t_min] and
    [1 - eps, 1]. A denoiser that is not the posterior scores strictly above H / L.
    """
    seqs, probs = data_distribution()
    H_per_token = entropy(probs) / L
    oracle = posterior_table(seqs, probs, VOCAB)
    untruncated = LogLinearSchedule(eps=0.0)
    assert exact_nelbo(oracle, seqs, probs, VOCAB, untruncated, 0.0, 1.0) == pytest.approx(
        H_per_token, abs=1e-12)
    geometric_full = GeometricSchedule(1e-4, 20.0)  # m(0) = 1e-4, m(1) = 1 - e^-20: nearly the full range
    assert exact_nelbo(oracle, seqs, probs, VOCAB, geometric_full, 0.0, 1.0) == pytest.approx(
        H_per_token, abs=2e-4 * math.log(STATES))

    default = LogLinearSchedule(eps=1e-3, t_min=1e-3)
    truncated = exact_nelbo(oracle, seqs, probs, VOCAB, default, default.t_min, 1.0)
    gap = H_per_token - truncated
    assert 0 < gap <= (default.eps + default.t_min) * math.log(STATES)
    missing = (exact_nelbo(oracle, seqs, probs, VOCAB, untruncated, 0.0, (1 - default.eps) * default.t_min)
               + exact_nelbo(oracle, seqs, probs, VOCAB, untruncated, 1 - default.eps, 1.0))
    assert gap == pytest.approx(missing, abs=1e-12)

    other = exact_nelbo(table_of(random_denoiser(), VOCAB, L), seqs, probs, VOCAB, untruncated, 0.0, 1.0)
    assert other > H_per_token + 0.05


def test_mdlm_loss_of_the_oracle_matches_its_exact_value():
    schedule = SCHEDULES["loglinear"]
    seqs, probs = data_distribution()
    oracle = TableDenoiser(posterior_table(seqs, probs, VOCAB), VOCAB, L)
    exact = exact_nelbo(oracle.table.double().numpy(), seqs, probs, VOCAB, schedule,
                        schedule.t_min, 1.0) / (1 - schedule.t_min)
    mean, se = mc_loss(oracle, seqs, probs, schedule, batches=150, batch_size=1024, seed=2)
    assert se < 0.01 * exact
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert exact <= entropy(probs) / L / (1 - schedule.t_min)


def test_mdlm_loss_details():
    net = random_denoiser()
    schedule = SCHEDULES["loglinear"]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, STATES, (64, L), generator=g)
    t = sample_t(64, g, t_min=1e-3)
    net.train()
    loss, stats = mdlm_loss(net, x0, schedule, t, g)
    assert loss.dtype == torch.float32 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert set(stats) == {"loss", "nll", "accuracy", "masked_fraction"}
    assert all(isinstance(v, float) for v in stats.values())
    # Pad tokens are not counted: a pad-aware vocabulary changes the denominator, not the terms.
    padded = VocabSpec(VOCAB.size, VOCAB.mask_id, pad_id=0)
    z = mask_tokens(x0, schedule.move_chance(t), VOCAB.mask_id, torch.Generator().manual_seed(5))
    with torch.no_grad():
        ce = -net(z).gather(-1, x0[..., None])[..., 0]
    terms = torch.where(z == VOCAB.mask_id, ce / t[:, None], torch.zeros_like(ce))
    for vocab, valid in ((VOCAB, torch.ones_like(x0, dtype=torch.bool)), (padded, x0 != 0)):
        value, _ = mdlm_loss(net, x0, schedule, t, torch.Generator().manual_seed(5), vocab=vocab)
        torch.testing.assert_close(value.detach(), terms[valid].sum() / valid.sum())
