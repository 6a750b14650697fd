"""Sampler behaviour users rely on: early errors, network-evaluation counts, γ = 0 and caching
reproduce the unguided samples bit for bit, the stabiliser, candidate-only emission, sharded
seeding, the pipeline entry point, and the real gtl_dist.models networks end to end."""

import json

import pytest
import torch

from gtl_dist.config import AdapterConfig, LoraConfig, ModelConfig, SampleConfig
from gtl_dist.diffusion import LogLinearSchedule
from gtl_dist.models import Denoiser, EditRatioNet, Planner, RatioNet, VocabSpec, subs_log_probs
from gtl_dist.models.adapter import AdaptedDenoiser, GuideAdapter
from gtl_dist.models.lora import LoraDenoiser
from gtl_dist.sample import (AncestralSampler, MethodNetworks, PlannerSampler, SamplerConfigError,
                             SamplerStats, build_sampler, sample_sequences, sample_shard, shard_seed,
                             shard_sizes, stabilise_mask_mass, unguided_sampler, write_sample_shard)
from gtl_dist.sample.guidance import draw_categorical, joint_mask_kernel

V, L = 5, 5  # five data tokens, [MASK] = 5
MASK = V
VOCAB = VocabSpec(size=V + 1, mask_id=MASK, data_ids=V)
SCHEDULE = LogLinearSchedule(eps=1e-3)


def random_linear(seed, out_features, scale=1.0, size=V + 1, length=L):
    """A fixed random function of z: one-hot(z) flattened -> linear."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(length * size, out_features, generator=g) * scale
    b = torch.randn(out_features, generator=g) * scale
    return lambda z: torch.nn.functional.one_hot(z, size).float().flatten(1) @ w + b


def random_denoiser(seed=0, size=V + 1, length=L, mask_id=MASK):
    f = random_linear(seed, length * size, 1.5, size, length)
    return lambda z: subs_log_probs(f(z).view(-1, length, size), z, mask_id)


def random_ratio(seed=1, scale=1.0):
    f = random_linear(seed, 1, scale)
    return lambda z: f(z)[:, 0]


def random_planner(seed=2):
    return random_linear(seed, L)


def planner_sampler(**kw):
    args = dict(vocab=VOCAB, seq_len=L, gamma=2.0, n_ratio=4, top_k=3)
    args.update(kw)
    return PlannerSampler(args.pop("denoiser", random_denoiser()), args.pop("ratio_net", random_ratio()),
                          args.pop("planner", random_planner()), **args)


def ancestral_sampler(**kw):
    args = dict(vocab=VOCAB, seq_len=L, gamma=2.0, n_ratio=4, top_k=3, steps=16)
    args.update(kw)
    return AncestralSampler(args.pop("denoiser", random_denoiser()), args.pop("ratio_net", random_ratio()),
                            SCHEDULE, **args)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- construction-time errors ------------------------------------------------------------------------

@pytest.mark.parametrize("build, needle", [
    (lambda: planner_sampler(gamma=-1.0), "gamma=-1.0 < 0"),
    (lambda: ancestral_sampler(gamma=-0.5), "gamma=-0.5 < 0"),
    (lambda: planner_sampler(n_ratio=V + 1), "n_ratio=6 must be in [1, |V|=5]"),
    (lambda: ancestral_sampler(n_ratio=0), "n_ratio=0"),
    (lambda: planner_sampler(top_k=0), "top_k=0"),
    (lambda: ancestral_sampler(top_k=0), "top_k=0"),
    (lambda: ancestral_sampler(steps=0), "steps=0"),
    (lambda: ancestral_sampler(t_end=1.0), "t_end=1.0"),
    (lambda: planner_sampler(ratio_net=None), "gamma=2.0 needs a ratio_net"),
    (lambda: planner_sampler(planner=None), "planner_mode='sample' needs a planner"),
    (lambda: planner_sampler(planner_mode="greedy"), "planner_mode='greedy'"),
    (lambda: planner_sampler(planner_temperature=0.0), "planner_temperature=0.0"),
    (lambda: planner_sampler(denoiser=random_denoiser(size=V + 2, mask_id=V + 1)),
     "denoiser: returned shape"),
    (lambda: planner_sampler(denoiser=lambda z: torch.zeros(z.shape[0], L, V + 1)), "SUBS"),
    (lambda: planner_sampler(ratio_net=lambda z: torch.zeros(z.shape[0], 1)), "ratio_net: returned shape"),
    (lambda: planner_sampler(planner=lambda z: torch.zeros(z.shape[0], L + 1)), "planner: returned shape"),
    (lambda: PlannerSampler(random_denoiser(), None, None, gamma=0.0, planner_mode="uniform"), "pass vocab="),
])
def test_bad_settings_fail_at_construction_naming_the_parameter(build, needle):
    with pytest.raises(SamplerConfigError) as exc:
        build()
    assert needle in str(exc.value)


def tiny_models(vocab=VOCAB, length=L, planner_len=None):
    cfg = ModelConfig(hidden=16, blocks=1, heads=2, cond_dim=8, dropout=0.0)
    torch.manual_seed(0)
    nets = (Denoiser(cfg, vocab, length), RatioNet(cfg, vocab, length),
            Planner(cfg, vocab, planner_len or length))
    return [n.eval() for n in nets]


def test_mismatched_model_heads_fail_at_construction():
    denoiser, ratio_net, _ = tiny_models()
    _, other_ratio, _ = tiny_models(vocab=VocabSpec(size=V + 2, mask_id=V + 1))
    with pytest.raises(SamplerConfigError, match="vocabulary mismatch"):
        PlannerSampler(denoiser, other_ratio, None, gamma=1.0, n_ratio=2, planner_mode="uniform")
    short_planner = tiny_models(planner_len=L - 1)[2]
    with pytest.raises(SamplerConfigError, match="seq_len"):
        PlannerSampler(denoiser, ratio_net, short_planner, gamma=1.0, n_ratio=2)
    with pytest.raises(SamplerConfigError, match=r"ratio_net: is in training mode.*\.eval\(\)"):
        PlannerSampler(denoiser, ratio_net.train(), None, gamma=1.0, n_ratio=2, planner_mode="uniform")
    timed = Denoiser(ModelConfig(hidden=16, blocks=1, heads=2, cond_dim=8, time_conditioning=True), VOCAB, L)
    with pytest.raises(SamplerConfigError, match="denoiser: was built with time_conditioning=true"):
        unguided_sampler(timed.eval(), SCHEDULE)


# -- counts, γ = 0, caching ---------------------------------------------------------------------------

def test_planner_sampler_counts_network_evaluations():
    batch, n_ratio, chunk = 6, 4, 5
    out = planner_sampler(n_ratio=n_ratio, ratio_batch_size=chunk).sample(batch, gen(), batch_size=batch)
    s = out.stats
    assert out.tokens.shape == (batch, L) and (out.tokens < V).all()
    assert (s.sequences, s.steps) == (batch, L)
    assert (s.denoiser.calls, s.denoiser.rows) == (L, batch * L)
    assert (s.planner.calls, s.planner.rows) == (L, batch * L)
    # batch·n_ratio = 24 edited sequences per step, in ceil(24 / 5) = 5 ratio-net passes.
    assert (s.ratio.calls, s.ratio.rows) == (L * 5, L * batch * n_ratio)
    assert s.per_sequence() == {"denoiser": L, "ratio": L * n_ratio, "planner": L}
    uniform = planner_sampler(planner_mode="uniform").sample(batch, gen(), batch_size=batch)
    assert uniform.stats.planner.calls == 0


def test_gamma_zero_reproduces_unguided_sampling_bit_for_bit():
    """γ = 0 runs the whole guidance path (ratio net evaluated, candidates, ρ) yet draws the same
    tokens as the unguided sampler with the same seed, for both samplers."""
    guided = planner_sampler(gamma=0.0).sample(12, gen(3), batch_size=5)
    unguided = planner_sampler(gamma=0.0, ratio_net=None).sample(12, gen(3), batch_size=5)
    assert guided.stats.ratio.rows > 0 and unguided.stats.ratio.rows == 0
    assert torch.equal(guided.tokens, unguided.tokens)
    assert not torch.equal(planner_sampler(gamma=2.0).sample(12, gen(3), batch_size=5).tokens, guided.tokens)

    guided = ancestral_sampler(gamma=0.0, n_ratio=4, top_k=3).sample(12, gen(4), batch_size=5)
    unguided = unguided_sampler(random_denoiser(), SCHEDULE, vocab=VOCAB, seq_len=L, top_k=3,
                                steps=16).sample(12, gen(4), batch_size=5)
    assert guided.stats.ratio.rows > 0
    assert torch.equal(guided.tokens, unguided.tokens)


def test_cached_sampling_skips_networks_without_changing_samples():
    cached = ancestral_sampler(steps=64).sample(8, gen(5), batch_size=8)
    uncached = ancestral_sampler(steps=64, cache=False).sample(8, gen(5), batch_size=8)
    assert torch.equal(cached.tokens, uncached.tokens)
    # 64 steps for 5 tokens: most steps change nothing in a sequence, so it is not re-evaluated.
    assert cached.stats.cached_steps > 0
    assert cached.stats.denoiser.rows < uncached.stats.denoiser.rows / 2
    assert cached.stats.ratio.rows < uncached.stats.ratio.rows / 2


# -- the stabiliser -----------------------------------------------------------------------------------

@pytest.mark.exact
def test_stabiliser_keeps_stay_probability_exactly_unguided():
    g = gen(6)
    for stay in (0.0, 0.3, 0.9, 0.999):
        stay_logprob = torch.log(torch.tensor(stay, dtype=torch.float64)).item()
        for gamma in (0.0, 0.5, 1.0, 3.0, 10.0):
            logits = torch.randn(64, 8, generator=g, dtype=torch.float64) * 3
            rho = torch.log_softmax(torch.randn(64, 8, generator=g, dtype=torch.float64) * 4, -1)
            tokens, mask = stabilise_mask_mass(logits + gamma * rho, stay_logprob)
            assert torch.equal(mask, torch.full((64,), stay_logprob, dtype=torch.float64))
            torch.testing.assert_close(tokens.exp().sum(-1), torch.full((64,), 1 - stay, dtype=torch.float64),
                                       rtol=0, atol=1e-12)
            # Token proportions are those of the guided logits: only the unmasking mass is rescaled.
            torch.testing.assert_close(tokens - tokens.logsumexp(-1, keepdim=True),
                                       torch.log_softmax(logits + gamma * rho, -1))


@pytest.mark.exact
def test_stabiliser_in_the_sampler_and_the_collapse_without_it():
    """Through the ancestral sampler's kernel: with the stabiliser P(stay) is the unguided value at
    every γ; without it (one softmax over [MASK] and the tokens), γ·ρ ≤ 0 shifts mass onto [MASK],
    and at large γ the schedule stalls: nearly every position is still masked after the last step.
    The shift is largest when the ratio net barely separates the candidates (ρ ≈ −log n_ratio for
    all of them), as here; a peaked ratio keeps ρ ≈ 0 for its favourite."""
    z = torch.full((1, L), MASK)
    z[0, 1] = 2
    unguided_stay = None
    mass_on_mask = []
    for gamma in (0.0, 0.5, 2.0, 8.0):
        for stabilise in (True, False):
            s = ancestral_sampler(gamma=gamma, stabilise=stabilise, ratio_net=random_ratio(scale=0.05))
            k = s.step_distribution(z, step=8)
            unguided_stay = s.stay_logprobs[8]
            stay = k.stay_logprob.exp()
            torch.testing.assert_close(stay + k.token_logprobs.exp().sum(-1), torch.ones_like(stay))
            if stabilise:
                assert torch.equal(k.stay_logprob, torch.full_like(stay, unguided_stay))
            else:
                mass_on_mask.append(stay.mean().item())
    # Unstabilised: the top-K truncation alone already adds mass to [MASK] at γ = 0; γ adds more.
    assert mass_on_mask[0] > torch.tensor(unguided_stay).exp().item()
    assert mass_on_mask == sorted(mass_on_mask) and mass_on_mask[-1] > 0.95

    flat = random_ratio(scale=0.05)
    stable = ancestral_sampler(gamma=8.0, ratio_net=flat).sample(16, gen(7), 16)
    collapsed = ancestral_sampler(gamma=8.0, ratio_net=flat, stabilise=False).sample(16, gen(7), 16)
    assert stable.stats.filled_at_end == 0
    assert collapsed.stats.filled_at_end > 0.9 * 16 * L


# -- candidates, categorical draws, planner positions --------------------------------------------------

def preference_denoiser(z):
    """p(v) ∝ exp(-v) at every masked position: token V-1 is always the least likely."""
    logits = -torch.arange(V + 1, dtype=torch.float32).expand(z.shape[0], L, V + 1).clone()
    return subs_log_probs(logits, z, MASK)


def loves_last_token(z):
    return 50.0 * (z == V - 1).sum(-1).float()


@pytest.mark.parametrize("kind", ["planner", "ancestral"])
def test_guidance_only_reweights_the_denoisers_candidates(kind):
    """A ratio net that wants token V-1 everywhere gets it only if it is among the top-n_ratio."""
    build = planner_sampler if kind == "planner" else ancestral_sampler
    excluded = build(denoiser=preference_denoiser, ratio_net=loves_last_token, gamma=1.0, n_ratio=V - 1,
                     top_k=V).sample(32, gen(8), 32)
    assert not (excluded.tokens == V - 1).any()
    included = build(denoiser=preference_denoiser, ratio_net=loves_last_token, gamma=1.0, n_ratio=V,
                     top_k=V).sample(32, gen(8), 32)
    assert (included.tokens == V - 1).float().mean() > 0.9


def test_categorical_draws_follow_probabilities_and_never_pick_zero_mass():
    logp = torch.log(torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]], dtype=torch.float64))
    u = torch.tensor([0.0, 0.19999, 0.2001, 0.71, 0.99999, 1 - 2 ** -53], dtype=torch.float64)
    picks = draw_categorical(logp.expand(len(u), -1), u)
    assert picks.tolist() == [1, 1, 3, 4, 4, 4]
    u = torch.rand(200_000, generator=gen(9), dtype=torch.float64)
    many = draw_categorical(logp.expand(200_000, -1), u)
    freq = torch.bincount(many, minlength=6).double() / 200_000
    torch.testing.assert_close(freq, logp[0].exp(), atol=4e-3, rtol=0)  # > 4 standard errors


def test_unstabilised_kernel_is_the_joint_softmax():
    tokens = torch.tensor([[0.0, -1.0]], dtype=torch.float64)
    tok, mask = joint_mask_kernel(tokens, torch.tensor(0.0, dtype=torch.float64).log1p())
    joint = torch.log_softmax(torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64), -1)
    torch.testing.assert_close(torch.cat([mask[:, None], tok], -1), joint)


def test_planner_reveals_only_masked_positions_with_tempered_softmax():
    logits = torch.tensor([[3.0, 0.5, -1.0, 1.0, 0.0]])
    sampler = planner_sampler(planner=lambda z: logits.expand(z.shape[0], L), planner_temperature=0.5)
    z = torch.full((200_000, L), MASK)
    z[:, 0] = 1  # the planner's favourite is already revealed
    stats = SamplerStats()
    picks = sampler.choose_positions(z, torch.rand(len(z), generator=gen(10), dtype=torch.float64), stats)
    freq = torch.bincount(picks, minlength=L).double() / len(z)
    want = torch.softmax(logits[0, 1:].double() / 0.5, -1)
    assert freq[0] == 0
    torch.testing.assert_close(freq[1:], want, atol=4e-3, rtol=0)
    argmax = planner_sampler(planner=lambda z: logits.expand(z.shape[0], L), planner_mode="argmax")
    assert argmax.choose_positions(z[:3], torch.zeros(3, dtype=torch.float64), stats).tolist() == [3, 3, 3]


# -- the pipeline entry point and shards ---------------------------------------------------------------

def test_build_sampler_follows_the_sample_config():
    denoiser, ratio_net, planner = random_denoiser(), random_ratio(), random_planner()
    gtl = MethodNetworks(denoiser, ratio_net, planner, vocab=VOCAB, seq_len=L, gamma=2.0)
    base = MethodNetworks(denoiser, vocab=VOCAB, seq_len=L)
    cfg = SampleConfig(sampler="planner", n_ratio=3, top_k=2, steps=8)
    s = build_sampler(gtl, cfg, SCHEDULE)
    assert isinstance(s, PlannerSampler) and (s.gamma, s.n_ratio, s.top_k) == (2.0, 3, 2)
    s = build_sampler(gtl, SampleConfig(sampler="ancestral", gamma=2.0, n_ratio=3, steps=8), SCHEDULE)
    assert isinstance(s, AncestralSampler) and s.ratio_net is ratio_net and (s.n_ratio, s.steps) == (3, 8)
    s = build_sampler(gtl, SampleConfig(sampler="exact", gamma=2.0, steps=8), SCHEDULE)
    assert isinstance(s, AncestralSampler) and s.n_ratio == V
    for sampler in ("planner", "ancestral", "exact"):
        s = build_sampler(base, SampleConfig(sampler=sampler, steps=8, top_k=2), SCHEDULE)
        assert isinstance(s, AncestralSampler) and s.ratio_net is None and s.gamma == 0 and s.top_k == 2
    # γ = 0 for GTL: the ratio net is not evaluated (the samples are the same, tested above).
    cfg = SampleConfig(sampler="planner", n_ratio=3)
    unguided = MethodNetworks(denoiser, ratio_net, planner, vocab=VOCAB, seq_len=L, gamma=0.0)
    out = sample_sequences(unguided, cfg, SCHEDULE, num=4, seed=1)
    assert out.stats.ratio.rows == 0 and out.tokens.shape == (4, L)


def test_shards_are_a_function_of_seed_and_shard_only(tmp_path):
    cfg = SampleConfig(sampler="planner", num_samples=11, shards=3, batch_size=4, gamma=2.0, n_ratio=3,
                       top_k=2, seed=77)
    assert shard_sizes(11, 3) == [4, 4, 3]
    assert len({shard_seed(77, i) for i in range(3)} | {shard_seed(78, 0)}) == 4

    def nets():  # rebuilt per "task", as an array task would load them
        return MethodNetworks(random_denoiser(), random_ratio(), random_planner(), vocab=VOCAB, seq_len=L)

    one_task = [sample_shard(nets(), cfg, SCHEDULE, i) for i in range(3)]
    tasks = {}
    for i in (2, 0, 1):  # separate tasks, any order, whatever the global RNG state
        torch.manual_seed(1000 + i)
        torch.rand(17)
        tasks[i] = sample_shard(nets(), cfg, SCHEDULE, i)
    for i in range(3):
        assert torch.equal(one_task[i].tokens, tasks[i].tokens)
    merged = torch.cat([s.tokens for s in one_task])
    assert merged.shape == (11, L) and not torch.equal(one_task[0].tokens[:3], one_task[2].tokens)

    for shard in one_task:
        write_sample_shard(tmp_path / f"shard-{shard.shard:04d}.jsonl", shard)
    records = [json.loads(line) for path in sorted(tmp_path.glob("*.jsonl"))
               for line in path.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(11))
    assert torch.equal(torch.tensor([r["tokens"] for r in records]), merged)
    assert {r["seed"] for r in records} == {shard_seed(77, i) for i in range(3)}
    assert all(r["text"] is None for r in records)
    with pytest.raises(ValueError, match="shard=3"):
        sample_shard(nets(), cfg, SCHEDULE, 3)


@pytest.mark.parametrize("sampler", ["planner", "ancestral", "exact"])
def test_real_models_end_to_end(sampler):
    denoiser, ratio_net, planner = tiny_models()
    cfg = SampleConfig(sampler=sampler, gamma=3.0, n_ratio=3, top_k=2, steps=6, batch_size=3)
    out = sample_sequences(MethodNetworks(denoiser, ratio_net, planner), cfg, SCHEDULE, num=5, seed=0)
    assert out.tokens.shape == (5, L) and out.tokens.dtype == torch.long
    assert ((out.tokens >= 0) & (out.tokens < MASK)).all()
    assert out.stats.sequences == 5 and out.stats.ratio.rows > 0
    again = sample_sequences(MethodNetworks(denoiser, ratio_net, planner), cfg, SCHEDULE, num=5, seed=0)
    assert torch.equal(out.tokens, again.tokens)


def randomized(net, scale=0.3):
    """A network with every weight drawn (fresh ones start neutral: a uniform denoiser)."""
    with torch.no_grad():
        for prm in net.parameters():
            prm.normal_(0.0, scale)
    return net.eval()


class FullOutput:
    """A denoiser seen only through its [B, L, V] output: the planner sampler's route before it
    scored the chosen positions alone."""

    def __init__(self, denoiser):
        self.denoiser, self.vocab, self.seq_len = denoiser, denoiser.vocab, denoiser.seq_len

    def __call__(self, z):
        return self.denoiser(z)


def scored_denoiser(kind, cfg, vocab, length):
    """A denoiser of each kind the planner sampler scores at the chosen positions alone: plain, a
    LoRA fine-tune of it, and one with a guide adapter composed in (the edit through the output
    layer or direct, with and without its attention heads), every weight drawn."""
    if kind == "denoiser":
        return randomized(Denoiser(cfg, vocab, length))
    if kind == "lora":
        return randomized(LoraDenoiser(cfg, vocab, length, LoraConfig(rank=2, layers=["attn_qkv", "mlp.0"])))
    through, attention = kind.split("-")[1:]
    adapter = GuideAdapter(AdapterConfig(rank=4, through=through, attention=attention == "attention", heads=2),
                           vocab, length, cfg.hidden)
    return AdaptedDenoiser(randomized(Denoiser(cfg, vocab, length)), randomized(adapter), gamma=1.5).eval()


@pytest.mark.parametrize("kind", ["denoiser", "lora", "adapter-output-attention", "adapter-direct-attention",
                                  "adapter-output-plain"])
@pytest.mark.parametrize("guided", [True, False])
def test_the_planner_sampler_scores_only_the_chosen_positions_and_draws_the_same_tokens(kind, guided):
    """masked_log_probs runs the output layer (and an adapter's maps to |V|) at one position per
    sequence. Its values are the full output's up to float rounding (a matrix product of another
    shape may round some last bits otherwise, as it does on some CPUs at this size), and the
    tokens are those of the full route."""
    vocab, length = VocabSpec(1001, 1000), 24
    cfg = ModelConfig(hidden=64, blocks=2, heads=4, cond_dim=32, dropout=0.0)
    torch.manual_seed(3)
    denoiser = scored_denoiser(kind, cfg, vocab, length)
    edit, planner = (randomized(net(cfg, vocab, length)) for net in (EditRatioNet, Planner))
    z = torch.randint(0, vocab.mask_id, (6, length), generator=gen(0))
    z[:, ::2] = vocab.mask_id
    rows, positions = torch.arange(6), torch.arange(6) * 2
    with torch.no_grad():
        fast, full = denoiser.masked_log_probs(z, rows, positions), denoiser(z)[rows, positions]
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    guide = dict(ratio_net=edit, gamma=2.0, n_ratio=32) if guided else dict(ratio_net=None, gamma=0.0)
    for seed in range(2):
        fast = PlannerSampler(denoiser, planner=planner, top_k=8, **guide).sample(6, gen(seed), 6)
        full = PlannerSampler(FullOutput(denoiser), planner=planner, top_k=8, **guide).sample(6, gen(seed), 6)
        assert torch.equal(fast.tokens, full.tokens)
        assert fast.stats.denoiser.rows == full.stats.denoiser.rows == 6 * length


def test_tiny_preset_samples_every_method_through_the_entry_point(configs_dir):
    """The pipeline's path: networks from build_model, the schedule from NoiseConfig, SampleConfig
    from the preset (exact sampler), GTL and a baseline, one shard each."""
    from gtl_dist.config import load_config
    from gtl_dist.diffusion import NoiseSchedule
    from gtl_dist.models import build_model

    cfg = load_config(configs_dir / "tiny.yaml")
    states = cfg.data.markov.num_states
    vocab = VocabSpec(size=states + 1, mask_id=states, data_ids=states)
    torch.manual_seed(0)
    denoiser, ratio_net, planner = (build_model(role, cfg, vocab).eval()
                                    for role in ("denoiser", "ratio", "planner"))
    schedule = NoiseSchedule.from_config(cfg.noise)
    for nets in (MethodNetworks(denoiser, ratio_net, planner), MethodNetworks(denoiser)):
        shard = sample_shard(nets, cfg.sample, schedule, shard=1)
        assert shard.tokens.shape == (shard_sizes(cfg.sample.num_samples, cfg.sample.shards)[1], cfg.seq_len)
        assert ((shard.tokens >= 0) & (shard.tokens < states)).all()
        assert shard.stats.steps == cfg.sample.steps * -(-len(shard.tokens) // cfg.sample.batch_size)
        assert (shard.stats.ratio.rows > 0) == (nets.ratio_net is not None)


def test_long_sampling_reports_progress_in_the_job_log(caplog):
    from gtl_dist.sample.stats import SampleResult, SamplerStats, sample_in_batches

    def batch(n, generator):
        return SampleResult(torch.zeros(n, 4, dtype=torch.long), SamplerStats())

    with caplog.at_level("INFO", logger="gtl_dist.progress"):
        out = sample_in_batches(batch, 10, torch.Generator().manual_seed(0), batch_size=4)
    assert out.tokens.shape == (10, 4)
    lines = [r.getMessage() for r in caplog.records if r.name == "gtl_dist.progress"]
    assert lines and lines[0].startswith("sampling [") and "4/10" in lines[0]
    assert "10/10" in lines[-1]
