"""AR sampling with a KV cache: cached (op by op or compiled) decoding equals uncached decoding and
the reference decoder token for token, the step is one graph, draws are exact."""

import math

import pytest
import torch

from gtl_dist.config import ModelConfig
from gtl_dist.models import ARLM, VocabSpec
from gtl_dist.sample.ar import decode_step, draw_next_token, sample_ar
from gtl_dist.sample.guidance import draw_categorical

CFG = ModelConfig(hidden=32, blocks=2, heads=4, cond_dim=16, dropout=0.0)
VOCAB = VocabSpec(9, mask_id=8, pad_id=0)
L = 16


def random_ar(seed: int = 0) -> ARLM:
    torch.manual_seed(seed)
    model = ARLM(CFG, VOCAB, L)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def prompt(batch: int = 5, length: int = 3) -> torch.Tensor:
    return torch.randint(1, 8, (batch, length), generator=torch.Generator().manual_seed(0))


def test_chunked_cached_forward_equals_the_full_forward():
    """Prefill and decode in uneven chunks: positions, rotary offsets and the causal mask agree."""
    model = random_ar()
    x = torch.randint(0, 8, (3, L), generator=torch.Generator().manual_seed(1))
    full = model(x)
    cache = model.new_cache(3)
    pieces, start = [], 0
    for size in (5, 1, 3, 1, 6):
        pieces.append(model.forward_cached(x[:, start:start + size], cache))
        start += size
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == L
    with pytest.raises(ValueError, match="cache holds 16 positions; 16 used"):
        model.forward_cached(x[:, :1], cache)


def test_a_decoding_step_never_reads_unwritten_cache_slots():
    """The cache is attended over all its slots with a mask (fixed shapes for CUDA graphs): what
    lies in slots not yet written must not change the logits."""
    model = random_ar()
    x = torch.randint(0, 8, (2, 6), generator=torch.Generator().manual_seed(2))
    clean, dirty = model.new_cache(2), model.new_cache(2)
    for tensor in dirty.keys + dirty.values:
        tensor.normal_(0.0, 100.0, generator=torch.Generator().manual_seed(3))
    for cache in (clean, dirty):
        model.forward_cached(x[:, :5], cache)
    step = [model.logits_at(x[:, 5:], cache, torch.tensor([5])) for cache in (clean, dirty)]
    torch.testing.assert_close(step[0], step[1], rtol=0, atol=0)
    torch.testing.assert_close(step[0], model(x)[:, 5:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_cache_is_preallocated_and_written_in_place():
    model = random_ar()
    cache = model.new_cache(2, 10)
    assert [t.shape for t in cache.keys] == [(2, CFG.heads, 10, CFG.hidden // CFG.heads)] * CFG.blocks
    storage = [t.data_ptr() for t in cache.keys + cache.values]
    x = torch.randint(0, 8, (2, 5), generator=torch.Generator().manual_seed(2))
    model.forward_cached(x[:, :4], cache)
    model.logits_at(x[:, 4:], cache, torch.tensor([4]))
    assert [t.data_ptr() for t in cache.keys + cache.values] == storage
    written = cache.keys[0][:, :, :5].abs().sum(dim=(0, 1, 3))
    assert bool((written > 0).all()) and float(cache.keys[0][:, :, 5:].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="cache length 17 must be in"):
        model.new_cache(1, L + 1)


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.7, 3)])
def test_cached_and_uncached_decoding_give_the_same_tokens(temperature, top_k):
    model = random_ar()
    p = prompt()
    cached, s_cached = sample_ar(model, p, L - 3, generator=torch.Generator().manual_seed(4),
                                 temperature=temperature, top_k=top_k, use_cache=True)
    plain, s_plain = sample_ar(model, p, L - 3, generator=torch.Generator().manual_seed(4),
                               temperature=temperature, top_k=top_k, use_cache=False)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :3], p) and cached.shape == (5, L)
    # One network evaluation per new token either way; the cache computes each position once.
    assert s_cached.network_evals == s_plain.network_evals == L - 3
    assert s_cached.positions == 5 * (L - 1)
    assert s_plain.positions == 5 * sum(range(3, L))


def reference_decode(model, p, num_tokens, seed, temperature, top_k):
    """Decoding as the package did before its step was compiled: the whole prefix re-run for
    every token, [MASK] banned, and one float64 inverse-CDF draw per token with uniforms drawn
    from the generator token by token."""
    g = torch.Generator().manual_seed(seed)
    tokens = p.clone()
    for _ in range(num_tokens):
        scores = model(tokens)[:, -1].double()
        scores[:, VOCAB.mask_id] = -math.inf
        if temperature == 0:
            nxt = scores.argmax(-1)
        else:
            scores = scores / temperature
            if top_k is not None:
                scores = scores.masked_fill(scores < scores.topk(top_k, dim=-1).values[:, -1:], -math.inf)
            u = torch.rand(len(tokens), generator=g, dtype=torch.float64)
            nxt = draw_categorical(scores, u)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    return tokens


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.7, 3), (1.3, 8)])
def test_every_decoding_path_gives_the_tokens_of_the_reference_decoder(temperature, top_k, monkeypatch):
    """Cached op by op, cached and compiled (the step and its draw as one graph), and uncached:
    the same tokens as the reference under every seed. The compiled step uses the aot_eager
    backend here (same graph, eager kernels: compiled in seconds); the GPU suite runs inductor."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "aot_eager"}))
    model, p = random_ar(), prompt()
    try:
        for seed in range(3):
            expected = reference_decode(model, p, L - 3, seed, temperature, top_k)
            for kwargs in (dict(), dict(compile=True), dict(use_cache=False)):
                out, _ = sample_ar(model, p, L - 3, generator=torch.Generator().manual_seed(seed),
                                   temperature=temperature, top_k=top_k, **kwargs)
                assert torch.equal(out, expected), (seed, kwargs)
    finally:
        torch._dynamo.reset()


def test_the_decoding_step_is_one_graph_without_a_host_read():
    """fullgraph tracing fails on any host read (.item(), .tolist(), a tensor in an if)."""
    model = random_ar()
    cache = model.new_cache(2, 8)
    model.forward_cached(prompt(batch=2), cache)
    args = (model, cache, torch.tensor([[5], [6]]), torch.tensor([3]), torch.rand(2, dtype=torch.float64))
    explained = torch._dynamo.explain(decode_step)(*args, temperature=0.8, top_k=4,
                                                   banned=torch.tensor([VOCAB.mask_id]))
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_greedy_is_the_argmax_continuation_and_seeds_are_reproducible():
    model = random_ar()
    p = prompt(batch=2)
    out, _ = sample_ar(model, p, 4, temperature=0.0)
    for i in range(3, 7):
        logits = model(out[:, :i])[:, -1]
        logits[:, VOCAB.mask_id] = float("-inf")
        assert torch.equal(out[:, i], logits.argmax(-1))
    a, _ = sample_ar(model, p, 10, generator=torch.Generator().manual_seed(9))
    b, _ = sample_ar(model, p, 10, generator=torch.Generator().manual_seed(9))
    c, _ = sample_ar(model, p, 10, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    top1, _ = sample_ar(model, p, 10, generator=torch.Generator().manual_seed(9), top_k=1)
    greedy, _ = sample_ar(model, p, 10, temperature=0.0)
    assert torch.equal(top1, greedy)


def test_mask_id_is_never_sampled():
    model = random_ar()
    with torch.no_grad():
        model.output.linear.bias[VOCAB.mask_id] = 100.0  # the network would always pick [MASK]
    out, _ = sample_ar(model, prompt(), L - 3, generator=torch.Generator().manual_seed(0))
    assert not (out == VOCAB.mask_id).any()


@pytest.mark.exact
def test_draw_next_token_matches_the_tempered_top_k_distribution():
    """Frequencies over 40,000 draws vs softmax(logits / T) restricted to the top K: every
    frequency within 4.5 binomial standard errors; tokens outside the top K never drawn."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0, -3.0]])
    n, temperature, k = 40_000, 0.8, 4
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([draw_next_token(logits.expand(1000, -1), torch.rand(1000, generator=g, dtype=torch.float64),
                                       temperature=temperature, top_k=k) for _ in range(n // 1000)])
    scores = logits[0].double() / temperature
    keep = scores >= scores.topk(k).values[-1]
    probs = torch.where(keep, torch.softmax(scores.masked_fill(~keep, -math.inf), -1), 0.0)
    freq = torch.bincount(draws, minlength=6).double() / n
    se = torch.sqrt(probs * (1 - probs) / n)
    assert torch.all((freq - probs).abs() <= 4.5 * se + 1e-12), (freq, probs)
    assert torch.all(freq[~keep] == 0)


def test_input_checks():
    model = random_ar()
    with pytest.raises(ValueError, match="exceeds the model's seq_len 16"):
        sample_ar(model, prompt(), L)
    with pytest.raises(ValueError, match="length >= 1"):
        sample_ar(model, torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="temperature"):
        sample_ar(model, prompt(), 2, temperature=-1.0)
    bad = prompt()
    bad[1, 2] = VOCAB.size
    with pytest.raises(ValueError, match=r"prompt: token id 9 is outside the model's vocabulary \[0, 9\)"):
        sample_ar(model, bad, 2)
    with pytest.raises(ValueError, match="compile=True compiles the cached decoding step"):
        sample_ar(model, prompt(), 2, compile=True, use_cache=False)
    model.train()
    sample_ar(model, prompt(), 2)
    assert model.training  # the caller's mode is restored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")
def test_cuda_graph_decoding_gives_the_eager_tokens():
    model = random_ar().cuda()
    p = prompt().cuda()
    kwargs = dict(temperature=1.0, top_k=None)
    eager, _ = sample_ar(model, p, L - 3, generator=torch.Generator("cuda").manual_seed(4), **kwargs)
    graphed, _ = sample_ar(model, p, L - 3, generator=torch.Generator("cuda").manual_seed(4),
                           cuda_graph=True, **kwargs)
    assert torch.equal(eager, graphed)


def test_cuda_graph_needs_a_cuda_model():
    with pytest.raises(ValueError, match="cuda_graph=True needs the KV cache and a model on a CUDA device"):
        sample_ar(random_ar(), prompt(), 2, cuda_graph=True)
