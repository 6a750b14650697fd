"""The DiT backbone and the heads: paper sizes, attention modes, SUBS, AR2Diff, input checks."""

import dataclasses

import pytest
import torch

from gtl_dist.config import ModelConfig, load_config
from gtl_dist.models import (ARLM, Denoiser, Planner, RatioNet, SequenceClassifier, VocabSpec,
                             build_model, check_compatible, check_token_ids, count_parameters)
from gtl_dist.models.heads import subs_log_probs, subs_token_log_probs

SMALL = ModelConfig(hidden=32, blocks=2, heads=2, cond_dim=16, dropout=0.0)
VOCAB = VocabSpec(7, mask_id=6, data_ids=6)
L = 10


def randomized(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """adaLN-zero and zero heads make a fresh model constant; give every weight a value."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def tokens(batch: int = 3, length: int = L, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB.data_ids, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.exact
def test_paper_parameter_counts(configs_dir):
    """docs/method.md §2: denoiser 59.83M, ratio net 4.06M (|V| = 30,522, L = 512)."""
    cfg = load_config(configs_dir / "arxiv.yaml", ["data.path=/unused.json"])
    vocab = VocabSpec(30522, mask_id=103, pad_id=0)
    denoiser = build_model("denoiser", cfg, vocab)
    assert count_parameters(denoiser) == pytest.approx(59.83e6, rel=0.01)
    ratio = build_model("ratio", cfg, vocab)
    assert count_parameters(ratio) == pytest.approx(4.06e6, rel=0.01)
    assert count_parameters(ratio) / count_parameters(denoiser) == pytest.approx(0.068, abs=0.002)
    assert count_parameters(build_model("ar", cfg, vocab)) == count_parameters(denoiser)


def test_every_role_builds_with_its_output_shape(configs_dir):
    cfg = load_config(configs_dir / "tiny.yaml")
    states = cfg.data.markov.num_states
    vocab = VocabSpec(states + 1, mask_id=states, data_ids=states)
    x = torch.randint(0, states, (2, cfg.seq_len))
    sigma = torch.ones(2)
    expected = {"denoiser": (2, cfg.seq_len, states + 1), "ar": (2, cfg.seq_len, states + 1),
                "classifier_ti": (2,), "classifier_td": (2,), "ratio": (2,), "planner": (2, cfg.seq_len)}
    for role, shape in expected.items():
        model = build_model(role, cfg, vocab)
        if role in ("ar", "planner", "classifier_ti"):
            out = model(x)
        else:
            out = model(x, sigma)
        assert out.shape == shape and out.dtype == torch.float32, role
    with pytest.raises(ValueError, match="unknown model role 'critic'"):
        build_model("critic", cfg, vocab)


def test_markov_mask_id_inside_the_states_fails_at_construction(configs_dir):
    cfg = load_config(configs_dir / "markov.yaml")  # 5 states: ids 0..4, [MASK] must be 5
    with pytest.raises(ValueError, match="mask_id=5"):
        build_model("denoiser", cfg, VocabSpec(6, mask_id=3))
    with pytest.raises(ValueError, match=r"mask_id=3 lies inside the data's ids \[0, 5\).*mask_id=5"):
        VocabSpec(6, mask_id=3, data_ids=5)


def test_vocab_spec_validation_and_manifest():
    for kwargs, message in [(dict(size=5, mask_id=5), "mask_id=5 is outside"),
                            (dict(size=5, mask_id=-1), "outside"),
                            (dict(size=5, mask_id=4, pad_id=4), "pad_id and mask_id"),
                            (dict(size=5, mask_id=4, pad_id=9), "pad_id=9"),
                            (dict(size=1, mask_id=0), "at least one data id")]:
        with pytest.raises(ValueError, match=message):
            VocabSpec(**kwargs)

    @dataclasses.dataclass
    class Manifest:
        vocab_size: int = 8000
        mask_id: int = 4
        pad_id: int = 0

    assert VocabSpec.from_manifest(Manifest()) == VocabSpec(8000, 4, 0)
    assert VocabSpec.from_manifest({"vocab_size": 6, "mask_id": 5, "pad_id": None, "data_ids": 5}) == \
        VocabSpec(6, 5, None, 5)
    with pytest.raises(ValueError, match="no 'mask_id'"):
        VocabSpec.from_manifest({"vocab_size": 6})


def test_subs_parameterisation():
    model = randomized(Denoiser(SMALL, VOCAB, L))
    z = tokens()
    z[:, ::2] = VOCAB.mask_id
    logp = model(z)
    assert logp.dtype == torch.float32
    assert torch.all(logp[..., VOCAB.mask_id] == float("-inf"))
    masked = z == VOCAB.mask_id
    torch.testing.assert_close(torch.logsumexp(logp[masked], -1), torch.zeros(int(masked.sum())))
    assert torch.isfinite(logp[masked][:, :VOCAB.mask_id]).all()
    carried = logp[~masked]
    observed = z[~masked]
    assert torch.equal(carried.argmax(-1), observed)
    assert torch.all(carried.gather(-1, observed[:, None]) == 0)
    assert torch.isinf(carried).sum() == carried.numel() - carried.shape[0]
    # The raw logits are the same network output without the SUBS constraints.
    torch.testing.assert_close(torch.log_softmax(model.logits(z)[masked][:, :-1], -1),
                               logp[masked][:, :-1])


@pytest.mark.exact
def test_the_training_loss_head_is_bit_for_bit_the_subs_tensor_at_masked_positions():
    """subs_token_log_probs (what the MDLM loss reads) against gathering from subs_log_probs (what
    the samplers read): equal values, equal greedy tokens and equal gradients, to the last bit."""
    model = randomized(Denoiser(SMALL, VOCAB, L), std=0.5)
    x0 = tokens(batch=4)
    z = torch.where(torch.rand(x0.shape, generator=torch.Generator().manual_seed(1)) < 0.6, VOCAB.mask_id, x0)
    masked = z == VOCAB.mask_id
    weight = torch.rand(x0.shape, generator=torch.Generator().manual_seed(2))  # like w(t) / N

    def loss_and_grads(route):
        model.zero_grad()
        log_p, greedy = route(model.logits(z))
        loss = torch.where(masked, -weight * log_p, torch.zeros_like(log_p)).sum()
        loss.backward()
        return log_p.detach()[masked], greedy[masked], loss, [p.grad.clone() for p in model.parameters()]

    def through_tensor(logits):
        logp = subs_log_probs(logits, z, VOCAB.mask_id)
        return logp.gather(-1, x0[..., None]).squeeze(-1), logp.detach().argmax(-1)

    fused = loss_and_grads(lambda logits: subs_token_log_probs(logits, x0, VOCAB.mask_id))
    reference = loss_and_grads(through_tensor)
    assert torch.equal(fused[0], reference[0]) and torch.isfinite(fused[0]).all()
    assert torch.equal(fused[1], reference[1]) and (fused[1] != VOCAB.mask_id).all()
    assert torch.equal(fused[2], reference[2])
    assert all(torch.equal(a, b) for a, b in zip(fused[3], reference[3]))
    assert any(g.abs().sum() > 0 for g in fused[3])


@pytest.mark.exact
def test_causal_attention_ignores_the_future_and_bidirectional_does_not():
    x = tokens(batch=2)
    changed = x.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB.data_ids
    causal = randomized(Denoiser(dataclasses.replace(SMALL, attention="causal"), VOCAB, L))
    a, b = causal.logits(x), causal.logits(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3
    bidirectional = randomized(Denoiser(SMALL, VOCAB, L))
    a, b = bidirectional.logits(x), bidirectional.logits(changed)
    assert (a[:, :6] - b[:, :6]).abs().amax(-1).min() > 1e-4  # every earlier position sees the change


@pytest.mark.exact
def test_ar_and_denoiser_weights_are_interchangeable():
    """AR2Diff: the same weights run causally as an AR model and bidirectionally as a denoiser."""
    ar = randomized(ARLM(SMALL, VOCAB, L))
    denoiser = Denoiser(SMALL, VOCAB, L).eval()
    denoiser.load_state_dict(ar.state_dict())  # strict: identical parameter names and shapes
    x = tokens()
    denoiser.backbone.set_attention("causal")
    torch.testing.assert_close(denoiser.logits(x), ar(x), rtol=0, atol=0)
    denoiser.backbone.set_attention("bidirectional")
    assert (denoiser.logits(x) - ar(x)).abs().max() > 1e-3
    back = ARLM(SMALL, VOCAB, L).eval()
    back.load_state_dict(denoiser.state_dict())
    torch.testing.assert_close(back(x), ar(x), rtol=0, atol=0)


def test_time_conditioning_switch():
    x = tokens()
    off = randomized(Denoiser(SMALL, VOCAB, L))
    torch.testing.assert_close(off.logits(x, torch.full((3,), 0.3)), off.logits(x, torch.full((3,), 5.0)))
    on = randomized(Denoiser(dataclasses.replace(SMALL, time_conditioning=True), VOCAB, L))
    assert count_parameters(on) == count_parameters(off)
    assert (on.logits(x, torch.full((3,), 0.3)) - on.logits(x, torch.full((3,), 5.0))).abs().max() > 1e-3
    td = randomized(SequenceClassifier(SMALL, VOCAB, L, time_dependent=True))
    assert (td(x, torch.full((3,), 0.3)) - td(x, torch.full((3,), 5.0))).abs().max() > 1e-4
    with pytest.raises(ValueError, match="needs sigma"):
        td(x)
    ti = randomized(SequenceClassifier(SMALL, VOCAB, L, time_dependent=False))
    torch.testing.assert_close(ti(x, torch.full((3,), 5.0)), ti(x))


def test_heads_pool_and_per_position_outputs():
    x = tokens()
    ratio = randomized(RatioNet(SMALL, VOCAB, L))
    assert ratio(x).shape == (3,)
    # Mean pooling: the same tokens in each row give the same log-ratio as one row alone.
    torch.testing.assert_close(ratio(x[:1].repeat(3, 1)), ratio(x[:1]).repeat(3))
    planner = randomized(Planner(SMALL, VOCAB, L))
    assert planner(x).shape == (3, L)


def test_fresh_models_start_neutral():
    """adaLN-zero and zero heads: uniform denoiser, zero log-ratio, zero planner logits."""
    x = tokens()
    x[:, 0] = VOCAB.mask_id
    logp = Denoiser(SMALL, VOCAB, L)(x)
    torch.testing.assert_close(logp[:, 0, :-1], torch.full((3, 6), -torch.log(torch.tensor(6.0)).item()))
    assert torch.all(RatioNet(SMALL, VOCAB, L)(x) == 0)
    assert torch.all(Planner(SMALL, VOCAB, L)(x) == 0)


def test_bad_input_fails_with_a_clear_error():
    model = Denoiser(SMALL, VOCAB, L)
    # Ids are checked on the host where batches are loaded and prompts given, not in forward.
    with pytest.raises(ValueError, match=r"batch 3: token id 7 is outside the model's vocabulary \[0, 7\); "
                                         r"the data and the model were built with different"):
        check_token_ids(torch.full((1, L), 7), VOCAB.size, "batch 3")
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        check_token_ids(torch.full((1, L), -1), VOCAB.size, "batch 3")
    with pytest.raises(ValueError, match=r"x: clean data contains the \[MASK\] id 6"):
        check_token_ids(torch.tensor([[0, 6, 1]]), VOCAB.size, "x", mask_id=VOCAB.mask_id)
    check_token_ids(torch.tensor([[0, 5, 1]]), VOCAB.size, "x", mask_id=VOCAB.mask_id)
    with pytest.raises(ValueError, match="exceeds the model's seq_len 10"):
        model(torch.zeros(1, L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        model(torch.zeros(L, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible|even size"):
        Denoiser(ModelConfig(hidden=30, heads=4), VOCAB, L)
    with pytest.raises(ValueError, match="attention='sideways'"):
        Denoiser(dataclasses.replace(SMALL, attention="sideways"), VOCAB, L)
    with pytest.raises(TypeError, match="VocabSpec"):
        Denoiser(SMALL, 7, L)


def test_check_compatible():
    denoiser = Denoiser(SMALL, VOCAB, L)
    check_compatible(denoiser, RatioNet(SMALL, VOCAB, L), Planner(SMALL, VOCAB, L))
    check_compatible(denoiser, None, None)
    check_compatible(denoiser, lambda z: z.sum(-1).float(), None)  # plain callables are skipped
    with pytest.raises(ValueError, match="vocabulary mismatch.*ratio_net has size=9"):
        check_compatible(denoiser, RatioNet(SMALL, VocabSpec(9, 8), L))
    with pytest.raises(ValueError, match="vocabulary mismatch.*planner has size=7, mask_id=0"):
        check_compatible(denoiser, None, Planner(SMALL, VocabSpec(7, 0), L))
    with pytest.raises(ValueError, match="sequence length mismatch.*seq_len=12"):
        check_compatible(denoiser, RatioNet(SMALL, VOCAB, 12))


def test_bf16_parameters_still_return_float32():
    """DeepSpeed bf16 casts the whole module: outputs and SUBS must stay fp32."""
    model = randomized(Denoiser(SMALL, VOCAB, L)).to(torch.bfloat16)
    z = tokens()
    z[:, 3] = VOCAB.mask_id
    logp = model(z)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(torch.logsumexp(logp[:, 3], -1), torch.zeros(3))
    assert RatioNet(SMALL, VOCAB, L).to(torch.bfloat16)(z).dtype == torch.float32


def test_dropout_only_in_training_mode():
    model = randomized(Denoiser(dataclasses.replace(SMALL, dropout=0.5), VOCAB, L))
    x = tokens()
    torch.testing.assert_close(model.logits(x), model.logits(x))
    model.train()
    assert (model.logits(x) - model.logits(x)).abs().max() > 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")
def test_cuda_bf16_autocast_matches_fp32_closely():
    model = randomized(Denoiser(SMALL, VOCAB, L))
    z = tokens()
    z[:, ::3] = VOCAB.mask_id
    reference = model(z)
    gpu = model.cuda()(z.cuda())
    assert gpu.dtype == torch.float32
    finite = torch.isfinite(reference)
    assert (gpu.cpu()[finite] - reference[finite]).abs().max() < 0.1
