"""Objectives of the small GTL networks: label smoothing, frozen teachers, masked-only planner BCE,
the poor-overlap guard, and tiny learning problems whose answer is known by enumeration."""

import itertools
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_oracles import (TableDenoiser, all_states, chain_matrix, consistent, enumerate_chain,
                               posterior_table, state_index, state_probabilities)
from gtl_dist.config import ModelConfig
from gtl_dist.diffusion import LogLinearSchedule, mask_tokens, sample_t
from gtl_dist.models import ARLM, Planner, RatioNet, SequenceClassifier, VocabSpec
from gtl_dist.objectives import (ar_loss, classifier_td_loss, classifier_ti_loss, freeze,
                                 overlap_report, planner_loss, ratio_loss, smoothed_labels)

@pytest.fixture(autouse=True)
def seeded():
    """Model initialisation draws from the global RNG: make each test independent of the order."""
    torch.manual_seed(0)


TINY = ModelConfig(hidden=32, blocks=2, heads=2, cond_dim=16, dropout=0.0)
SCHEDULE = LogLinearSchedule(eps=1e-3, t_min=1e-3)


def sample_chain(matrix: np.ndarray, length: int, n: int, g: torch.Generator,
                 initial: np.ndarray | None = None) -> torch.Tensor:
    """n sequences of a Markov chain; the first state uniform unless ``initial`` is given."""
    P = torch.as_tensor(matrix, dtype=torch.float64)
    x = torch.empty(n, length, dtype=torch.long)
    first = torch.full((P.shape[0],), 1.0 / P.shape[0], dtype=torch.float64) if initial is None \
        else torch.as_tensor(initial, dtype=torch.float64)
    x[:, 0] = torch.multinomial(first, n, True, generator=g)
    for i in range(1, length):
        x[:, i] = torch.multinomial(P[x[:, i - 1]], 1, generator=g)[:, 0]
    return x


def train(model, loss_fn, steps: int, lr: float = 3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        loss, _ = loss_fn(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Label smoothing
# ----------------------------------------------------------------------------------------------

def test_label_smoothing_has_the_beta_mean_and_is_reproducible():
    n = 20_000
    labels = torch.cat([torch.ones(n), torch.zeros(n)])
    smoothed = smoothed_labels(labels, (1.7, 15.3), torch.Generator().manual_seed(0))
    se = (0.005 / n) ** 0.5  # Beta(1.7, 15.3): mean 0.1, variance 0.005
    assert abs(smoothed[:n].mean().item() - 0.9) < 4 * se
    assert abs(smoothed[n:].mean().item() - 0.1) < 4 * se
    assert smoothed.var().item() > 0
    assert torch.equal(smoothed, smoothed_labels(labels, (1.7, 15.3), torch.Generator().manual_seed(0)))
    assert torch.equal(smoothed_labels(labels, [], None), labels)


def test_label_smoothing_is_off_at_eval():
    vocab = VocabSpec(5, 4, data_ids=4)
    clf = SequenceClassifier(TINY, vocab, 6, time_dependent=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in clf.parameters():
            p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randint(0, 4, (8, 6), generator=g), torch.randint(0, 4, (8, 6), generator=g)
    logits = clf.eval()(torch.cat([xs, xt]))
    hard = F.binary_cross_entropy_with_logits(logits, torch.cat([torch.ones(8), torch.zeros(8)]))
    loss_eval, stats = classifier_ti_loss(clf, xs, xt, torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss_eval, hard)
    assert stats["bce"] == pytest.approx(hard.item())
    loss_train, stats_train = classifier_ti_loss(clf.train(), xs, xt, torch.Generator().manual_seed(1))
    assert abs(loss_train.item() - hard.item()) > 1e-3  # smoothed targets while training
    assert stats_train["bce"] == pytest.approx(hard.item())  # logged BCE is always against hard labels
    unsmoothed, _ = classifier_ti_loss(clf, xs, xt, None, label_smoothing=None)
    torch.testing.assert_close(unsmoothed, hard)


# ----------------------------------------------------------------------------------------------
# Tiny problems with known answers
# ----------------------------------------------------------------------------------------------

@pytest.mark.exact
def test_classifier_separates_two_chains_near_the_bayes_accuracy():
    """Source diag 0.1 vs target diag 0.8 (4 states, L = 8): equal marginals, so only adjacent
    pairs tell the domains apart. Bayes accuracy (0.985) by enumeration of all 4^8 sequences;
    after 800 steps the trained classifier must come within 0.1 of it on 2,000 held-out
    sequences per domain (binomial SE about 0.003; a bag-of-tokens classifier is at chance, 0.5).
    At 300 steps initialisations differ by up to 0.06 (0.90-0.96); at 800 they reach 0.95-0.99
    (seeds 0-5 of both the initialisation and the data) with AVX2 kernels, but 0.932 at seed 0
    with ATen's default kernels (ATEN_CPU_CAPABILITY=default, as on a CPU without AVX2): float
    rounding moves the trajectory that much, so the bound leaves room for it."""
    states, length = 4, 8
    P, Q = chain_matrix(states, 0.1), chain_matrix(states, 0.8)
    _, p = enumerate_chain(P, length)
    _, q = enumerate_chain(Q, length)
    bayes = 0.5 * np.maximum(p, q).sum()
    vocab = VocabSpec(states + 1, states, data_ids=states)
    torch.manual_seed(0)
    clf = SequenceClassifier(TINY, vocab, length, time_dependent=False)
    g = torch.Generator().manual_seed(0)
    train(clf, lambda step: classifier_ti_loss(clf, sample_chain(P, length, 64, g),
                                               sample_chain(Q, length, 64, g), g), steps=800)
    xs, xt = sample_chain(P, length, 2000, g), sample_chain(Q, length, 2000, g)
    with torch.no_grad():
        report = overlap_report(clf(xs), clf(xt), warn_accuracy=1.01)
    assert report["accuracy"] >= bayes - 0.1, (report["accuracy"], bayes)


def _domain_tables(states=3, length=4):
    P, Q = chain_matrix(states, 0.1), chain_matrix(states, 0.8)
    seqs, p = enumerate_chain(P, length)
    _, q = enumerate_chain(Q, length)
    vocab = VocabSpec(states + 1, states, data_ids=states)
    zs = all_states(vocab.size, length)
    cons = consistent(zs, seqs, vocab.mask_id)
    with np.errstate(divide="ignore"):
        # log p(z)/q(z) for a masked state: the mask pattern's probability is the same under
        # both domains, so it is the ratio of the probabilities of being consistent with z.
        td_logit = np.log(cons @ p) - np.log(cons @ q)
    return P, Q, seqs, p, q, vocab, zs, cons, td_logit


def _expected_bce(logits: np.ndarray, Ps: np.ndarray, Pt: np.ndarray) -> float:
    """Exact balanced BCE over all states: source (label 1) with weight P_s/2, target P_t/2."""
    softplus = lambda v: np.logaddexp(0.0, v)  # noqa: E731
    return float(0.5 * Ps @ softplus(-logits) + 0.5 * Pt @ softplus(logits))


@pytest.mark.exact
def test_time_dependent_classifier_approaches_the_bayes_cross_entropy():
    """The optimal balanced d(z_t, t) is log p(z)/q(z) (no smoothing), the same for every t.
    Its exact expected BCE over all masked states (0.488 nats here) is the floor and a constant
    classifier sits 0.205 above it; after 600 steps the trained classifier must be within 0.1
    nats of the floor at two noise levels. Over seeds 0-5 (initialisation and data) it reaches
    0.02-0.07 above the floor; at 300 steps it was 0.03-0.14, which no fixed bound below the
    constant's 0.205 separates from rounding luck. The gap is learning speed of the tiny net on
    pairwise structure, not bias: more steps keep closing it."""
    P, Q, seqs, p, q, vocab, zs, cons, td_logit = _domain_tables()
    length = seqs.shape[1]
    clf = SequenceClassifier(TINY, vocab, length, time_dependent=True)
    g = torch.Generator().manual_seed(0)

    def loss(step):
        t = sample_t(256, g, t_min=SCHEDULE.t_min)
        return classifier_td_loss(clf, sample_chain(P, length, 128, g), sample_chain(Q, length, 128, g),
                                  SCHEDULE, t, g, label_smoothing=None)
    train(clf, loss, steps=600)
    Ps = state_probabilities(seqs, p, vocab, SCHEDULE)
    Pt = state_probabilities(seqs, q, vocab, SCHEDULE)
    seen = (Ps + Pt) > 0
    floor = _expected_bce(td_logit[seen], Ps[seen], Pt[seen])
    assert _expected_bce(np.zeros(seen.sum()), Ps[seen], Pt[seen]) > floor + 0.2
    z = torch.as_tensor(zs[seen])
    with torch.no_grad():
        for t in (0.3, 0.8):
            learned = clf(z, SCHEDULE.sigma(torch.full((len(z),), t))).double().numpy()
            assert _expected_bce(learned, Ps[seen], Pt[seen]) <= floor + 0.1, t


def _ratio_problem(P, Q, length, initial_p=None, initial_q=None, eta=0.1):
    """Exact frozen classifiers and the exact minimiser of E[L_ratio + eta L_cycle].

    With batch means the loss is sum_z P_s(z) E[(r(z) - a)^2 | z] + eta sum_z P_t(z) (r(z) - B(z))^2,
    so pointwise r*(z) = (P_s(z) A(z) + eta P_t(z) B(z)) / (P_s(z) + eta P_t(z)) with
    A(z) = E_{x ~ p(x | z)}[log q(x)/p(x)] and B(z) = log q(z)/p(z).
    """
    states = P.shape[0]
    seqs, p = enumerate_chain(P, length, initial_p)
    _, q = enumerate_chain(Q, length, initial_q)
    vocab = VocabSpec(states + 1, states, data_ids=states)
    zs = all_states(vocab.size, length)
    cons = consistent(zs, seqs, vocab.mask_id)
    log_ratio = np.log(q) - np.log(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        B = np.log(cons @ q) - np.log(cons @ p)
        A = (cons * p[None, :]) @ log_ratio / (cons @ p)
    Ps = state_probabilities(seqs, p, vocab, SCHEDULE)
    Pt = state_probabilities(seqs, q, vocab, SCHEDULE)
    seen = (Ps + Pt) > 0
    optimum = np.zeros(len(zs))
    optimum[seen] = (Ps[seen] * A[seen] + eta * Pt[seen] * B[seen]) / (Ps[seen] + eta * Pt[seen])
    weight = (Ps + eta * Pt) / (Ps + eta * Pt).sum()
    clean_logit = torch.as_tensor(-log_ratio, dtype=torch.float32)  # source = 1: logit = log p/q
    noisy_logit = torch.as_tensor(np.where(seen, -B, 0.0), dtype=torch.float32)

    def classifier_ti(x):
        return clean_logit[state_index(x, states)]

    def classifier_td(z, sigma):
        return noisy_logit[state_index(z, vocab.size)]

    return vocab, zs, optimum, weight, classifier_ti, classifier_td




def _weighted_fit(learned, optimum, weight):
    rmse = np.sqrt(weight @ (learned - optimum) ** 2)
    spread = np.sqrt(weight @ (optimum - weight @ optimum) ** 2)
    return rmse / spread


class TabularLogRatio(torch.nn.Module):
    """A free log-ratio per state: isolates the objective from the network's capacity."""

    def __init__(self, vocab: VocabSpec, num_states: int):
        super().__init__()
        self.vocab = vocab
        self.values = torch.nn.Parameter(torch.zeros(num_states))

    def forward(self, z, sigma=None):
        return self.values[state_index(z, self.vocab.size)]


@pytest.mark.exact
def test_ratio_objective_is_minimised_by_the_exact_optimal_log_ratio():
    """Markov pair (source diag 0.1, target diag 0.8; 3 states, L = 4) with exact frozen
    classifiers: a free per-state log-ratio trained with ratio_loss reaches r*(z) above within
    a weighted RMSE of 6% of r*'s spread (Adam, decaying step; it reaches 4%: SGD noise)."""
    P, Q = chain_matrix(3, 0.1), chain_matrix(3, 0.8)
    vocab, zs, optimum, weight, ti, td = _ratio_problem(P, Q, 4)
    table = TabularLogRatio(vocab, len(zs))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(table.parameters(), lr=0.1)
    steps = 1500
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for _ in range(steps):
        t = sample_t(512, g, t_min=SCHEDULE.t_min)
        loss, _ = ratio_loss(table, ti, td, sample_chain(P, 4, 256, g), sample_chain(Q, 4, 256, g),
                             SCHEDULE, t[:256], t[256:], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert _weighted_fit(table.values.detach().double().numpy(), optimum, weight) <= 0.06


@pytest.mark.exact
def test_ratio_net_learns_a_known_log_ratio():
    """The RatioNet head itself, trained with ratio_loss from exact classifiers on a pair of
    memoryless chains (source unigram (.6, .3, .1), target (.15, .3, .55); L = 4): after 300
    steps its weighted RMSE to r* is <= 25% of r*'s spread (it reaches 13%) and it ranks
    states like r* (weighted-support correlation >= 0.97)."""
    pu, qu = np.array([0.6, 0.3, 0.1]), np.array([0.15, 0.3, 0.55])
    P, Q = np.tile(pu, (3, 1)), np.tile(qu, (3, 1))
    vocab, zs, optimum, weight, ti, td = _ratio_problem(P, Q, 4, pu, qu)
    ratio = RatioNet(TINY, vocab, 4)
    g = torch.Generator().manual_seed(0)

    def loss(step):
        t = sample_t(256, g, t_min=SCHEDULE.t_min)
        return ratio_loss(ratio, ti, td, sample_chain(P, 4, 128, g, pu), sample_chain(Q, 4, 128, g, qu),
                          SCHEDULE, t[:128], t[128:], g)
    train(ratio, loss, steps=300, lr=1e-3)
    with torch.no_grad():
        learned = ratio(torch.as_tensor(zs)).double().numpy()
    support = weight > 1e-4
    assert _weighted_fit(learned, optimum, weight) <= 0.25
    assert np.corrcoef(learned[support], optimum[support])[0, 1] >= 0.97


@pytest.mark.exact
def test_planner_learns_which_positions_the_denoiser_gets_right():
    """Oracle denoiser (exact posterior of a chain with very unequal rows). For a masked
    position l of z the label is 1 iff argmax p(x^l | z) = x^l, so the optimal planner
    probability is max_v p(x^l = v | z). After 300 steps the weighted mean absolute error must
    be <= 0.06 (0.041-0.050 over seeds 0-5; the best constant predictor scores 0.133), and it
    must order the masked positions of a state as the optimum does."""
    matrix = np.array([[0.90, 0.07, 0.03], [0.10, 0.30, 0.60], [0.34, 0.33, 0.33]])
    states, length = 3, 4
    seqs, p = enumerate_chain(matrix, length, initial=np.array([0.5, 0.3, 0.2]))
    vocab = VocabSpec(states + 1, states, data_ids=states)
    oracle = freeze(TableDenoiser(posterior_table(seqs, p, vocab), vocab, length))
    planner = Planner(TINY, vocab, length)
    g = torch.Generator().manual_seed(0)
    weights = torch.as_tensor(p)

    def loss(step):
        x0 = torch.as_tensor(seqs)[torch.multinomial(weights, 256, True, generator=g)]
        return planner_loss(planner, oracle, x0, SCHEDULE, sample_t(256, g, t_min=SCHEDULE.t_min), g)
    train(planner, loss, steps=300)

    zs = all_states(vocab.size, length)
    best = np.exp(oracle.table.double().numpy()).max(-1)  # [Z, L]: P(greedy guess is right)
    Pz = state_probabilities(seqs, p, vocab, SCHEDULE)
    masked = zs == vocab.mask_id
    w = Pz[:, None] * masked
    with torch.no_grad():
        learned = torch.sigmoid(planner(torch.as_tensor(zs))).double().numpy()
    mae = (w * np.abs(learned - best)).sum() / w.sum()
    constant = (w * np.abs(best - (w * best).sum() / w.sum())).sum() / w.sum()
    assert constant > 0.12 and mae <= 0.06, (mae, constant)
    assert _pairwise_order_agreement(learned, best, masked, Pz) >= 0.8


def _pairwise_order_agreement(learned, best, masked, weight, min_gap=0.05) -> float:
    """The weighted share of pairs (state, two of its masked positions whose optimal values differ
    by more than ``min_gap``) that ``learned`` orders as ``best`` does; 0.5 is a coin flip.

    The sampler unmasks the positions a planner ranks first, so this is what it is used for. One
    pair alone is not: over seeds 0-5 the planner above orders the pair (1, 2) of [0, M, M, 2]
    (optimal values 0.137 apart) the wrong way once, while this share is 0.87-0.99. The fully
    masked state is left out: a network with rotary positions sees the same input at every
    position there and cannot tell them apart."""
    agree = total = 0.0
    partly_masked = masked.sum(-1) < masked.shape[-1]
    for i, j in itertools.combinations(range(masked.shape[-1]), 2):
        pairs = partly_masked & masked[:, i] & masked[:, j] & (np.abs(best[:, i] - best[:, j]) > min_gap)
        same = np.sign(learned[pairs, i] - learned[pairs, j]) == np.sign(best[pairs, i] - best[pairs, j])
        agree += weight[pairs] @ same
        total += weight[pairs].sum()
    return agree / total


# ----------------------------------------------------------------------------------------------
# Loss mechanics
# ----------------------------------------------------------------------------------------------

def test_ratio_loss_keeps_classifiers_frozen():
    vocab = VocabSpec(5, 4, data_ids=4)
    ti = SequenceClassifier(TINY, vocab, 6, time_dependent=False)
    td = SequenceClassifier(TINY, vocab, 6, time_dependent=True)
    ratio = RatioNet(TINY, vocab, 6)
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randint(0, 4, (8, 6), generator=g), torch.randint(0, 4, (8, 6), generator=g)
    t = sample_t(16, g, t_min=1e-3)
    with pytest.raises(ValueError, match=r"classifier_ti is in training mode.*freeze\(classifier_ti\)"):
        ratio_loss(ratio, ti, freeze(td), xs, xt, SCHEDULE, t[:8], t[8:], g)
    ti.requires_grad_(True)
    td.requires_grad_(True)
    ti.eval(), td.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for module in (ti, td, ratio):
            for prm in module.parameters():
                prm.normal_(0, 0.3)
    loss, stats = ratio_loss(ratio, ti, td, xs, xt, SCHEDULE, t[:8], t[8:], g, eta_cycle=0.5)
    loss.backward()
    assert all(prm.grad is None for prm in list(ti.parameters()) + list(td.parameters()))
    assert all(prm.grad is not None for prm in ratio.parameters())
    assert stats["loss"] == pytest.approx(stats["ratio_mse"] + 0.5 * stats["cycle_mse"], rel=1e-6)
    # L_ratio's target is the clean classifier on the clean source batch.
    assert stats["target_mean"] == pytest.approx(-ti(xs).mean().item(), rel=1e-5)


def test_planner_loss_counts_masked_positions_only():
    states, length = 3, 5
    vocab = VocabSpec(states + 1, states)
    seqs, p = enumerate_chain(chain_matrix(states, 0.6), length)
    oracle = freeze(TableDenoiser(posterior_table(seqs, p, vocab), vocab, length))
    logits = torch.zeros(64, length, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.as_tensor(seqs)[torch.randint(0, len(seqs), (64,), generator=g)]
    t = sample_t(64, g, t_min=1e-3)
    loss, stats = planner_loss(lambda z: logits, oracle, x0, SCHEDULE, t, torch.Generator().manual_seed(3))
    loss.backward()
    z = mask_tokens(x0, SCHEDULE.move_chance(t), vocab.mask_id, torch.Generator().manual_seed(3))
    masked = z == vocab.mask_id
    assert torch.all(logits.grad[~masked] == 0) and torch.all(logits.grad[masked] != 0)
    assert loss.item() == pytest.approx(np.log(2), rel=1e-6)  # zero logits: BCE = log 2 everywhere
    right = (oracle(z).argmax(-1) == x0) & masked
    assert stats["positive_rate"] == pytest.approx(right.sum().item() / masked.sum().item())
    with pytest.raises(ValueError, match="denoiser is in training mode"):
        planner_loss(lambda z: logits, oracle.train(), x0, SCHEDULE, t, g)


def test_ar_loss_is_next_token_cross_entropy_without_pad_targets():
    vocab = VocabSpec(7, 6, pad_id=0)
    model = ARLM(TINY, vocab, 8)
    torch.manual_seed(0)
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.3)
    x = torch.randint(1, 6, (4, 8), generator=torch.Generator().manual_seed(0))
    x[:, -2:] = 0
    loss, stats = ar_loss(model, x)
    logits = model(x)[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, 7), x[:, 1:].reshape(-1), reduction="none").view(4, 7)
    torch.testing.assert_close(loss, ce[:, :5].mean())
    assert stats["perplexity"] == pytest.approx(np.exp(stats["loss"]))
    no_pad = ARLM(TINY, VocabSpec(7, 6), 8).eval()
    no_pad.load_state_dict(model.state_dict())
    torch.testing.assert_close(ar_loss(no_pad, x)[0], ce.mean())


def test_overlap_report_warns_on_perfect_separation(caplog):
    logger = logging.getLogger("gtl_dist")
    logger.addHandler(caplog.handler)
    try:
        g = torch.Generator().manual_seed(0)
        separated = overlap_report(torch.randn(1000, generator=g) + 12, torch.randn(100, generator=g) - 12)
        assert separated["poor_overlap"] and separated["accuracy"] == 1.0
        assert any(r.levelno == logging.WARNING and "data.overlap" in r.getMessage()
                   and "sample.gamma" in r.getMessage() for r in caplog.records)
        assert separated["ratio_target_mean"] == pytest.approx(-12, abs=0.2)
        assert separated["ratio_target_q01"] < separated["ratio_target_q50"] < separated["ratio_target_q99"]
        caplog.clear()
        mixed = overlap_report(torch.randn(1000, generator=g) + 0.5, torch.randn(1000, generator=g) - 0.5)
        assert not mixed["poor_overlap"] and 0.6 < mixed["accuracy"] < 0.75
        assert not any(r.levelno == logging.WARNING for r in caplog.records)
        # Balanced accuracy: calling everything "source" is not 99% accurate on a 99:1 split.
        lazy = overlap_report(torch.ones(990), torch.ones(10))
        assert lazy["accuracy"] == 0.5 and lazy["pooled_accuracy"] == pytest.approx(0.99)
    finally:
        logger.removeHandler(caplog.handler)
