"""gtl's guide adapter (gtl_dist/models/adapter.py): zero is the source exactly, it is small next to
the source in every preset, and guided sampling costs no network call of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gtl_dist.config import SampleConfig, load_config
from gtl_dist.diffusion import LogLinearSchedule
from gtl_dist.models import VocabSpec, build_model
from gtl_dist.models.adapter import AdaptedDenoiser
from gtl_dist.models.heads import count_parameters
from gtl_dist.sample import MethodNetworks, sample_sequences

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB = VocabSpec(size=12, mask_id=11, pad_id=None)


def source_and_adapter(seed: int = 0, attention: bool = True, offset: bool = False):
    cfg = load_config(CONFIGS / "tiny.yaml", ["data.markov.num_states=11", f"models.adapter.attention={attention}",
                                             f"models.adapter.offset={offset}"])
    torch.manual_seed(seed)
    source = build_model("denoiser", cfg, VOCAB)
    for p in source.parameters():  # a source that predicts something, not the zero-init output
        torch.nn.init.normal_(p, std=0.3)
    return cfg, source.eval(), build_model("adapter", cfg, VOCAB)


@pytest.mark.parametrize("sampler", ["planner", "ancestral", "first_hitting"])
def test_an_adapter_at_zero_samples_what_the_source_samples(sampler):
    cfg, source, adapter = source_and_adapter()
    settings = SampleConfig(sampler=sampler, planner_mode="uniform", top_k=4, steps=8, num_samples=64,
                            batch_size=32)
    # The source sampled as GTL samples (the same sampler), with and without the adapter.
    plain = sample_sequences(MethodNetworks(source, gamma=0.0, composed_guide=True), settings,
                             LogLinearSchedule(1e-3), 64, seed=7)
    adapted = sample_sequences(MethodNetworks(AdaptedDenoiser(source, adapter, 1.0).eval(), gamma=0.0,
                                              composed_guide=True), settings, LogLinearSchedule(1e-3), 64, seed=7)
    assert torch.equal(plain.tokens, adapted.tokens)
    # ... and guidance costs no network call of its own: the adapter reads the source's pass.
    assert adapted.stats.per_sequence() == plain.stats.per_sequence()
    assert adapted.stats.ratio.calls == 0


def test_a_trained_adapter_changes_the_samples():
    cfg, source, adapter = source_and_adapter()
    torch.nn.init.normal_(adapter.up.weight, std=1.0)
    settings = SampleConfig(sampler="first_hitting", top_k=11, num_samples=64, batch_size=32)
    plain = sample_sequences(MethodNetworks(source), settings, LogLinearSchedule(1e-3), 64, seed=7)
    adapted = sample_sequences(MethodNetworks(AdaptedDenoiser(source, adapter, 1.0).eval(), gamma=0.0,
                                              composed_guide=True), settings, LogLinearSchedule(1e-3), 64, seed=7)
    assert not torch.equal(plain.tokens, adapted.tokens)


@pytest.mark.parametrize("preset,bound,extra", [
    ("demo.yaml", 0.10, []), ("arxiv.yaml", 0.05, ["data.path=/data/arxiv.json"]),
    ("markov.yaml", 0.10, [])])
def test_the_adapter_is_a_small_fraction_of_the_source(preset, bound, extra):
    cfg = load_config(CONFIGS / preset, extra)
    vocab = (VocabSpec(size=cfg.data.markov.num_states + 1, mask_id=cfg.data.markov.num_states)
             if cfg.data.corpus == "markov" else VocabSpec(size=cfg.tokenizer.vocab_size, mask_id=4, pad_id=0))
    source = count_parameters(build_model("denoiser", cfg, vocab))
    adapter = count_parameters(build_model("adapter", cfg, vocab))
    assert adapter <= bound * source, (preset, adapter, source)


def test_the_adapter_edits_through_the_source_s_own_output_layer():
    cfg, source, adapter = source_and_adapter()
    torch.nn.init.normal_(adapter.up.weight)
    z = torch.randint(0, 12, (3, cfg.seq_len))
    features = source.features(z)
    torch.nn.init.normal_(adapter.mix.weight)
    edit = adapter(features, source.output.linear)
    delta = adapter.up(adapter.down(features)) + adapter.mix(adapter.attend(features))
    expected = (delta @ source.output.linear.weight.T).float()
    torch.testing.assert_close(edit, expected)
    logits = AdaptedDenoiser(source, adapter, 0.5).logits(z)
    torch.testing.assert_close(logits, source.logits(z) + 0.5 * edit, rtol=1e-5, atol=1e-5)


def test_the_adapter_s_attention_reads_other_positions_by_their_place():
    """A position's edit depends on the source's features elsewhere in the sequence, through one
    attention head whose rotary positions tell near from far."""
    cfg, source, adapter = source_and_adapter()
    torch.nn.init.normal_(adapter.mix.weight)
    features = torch.randn(1, cfg.seq_len, source.cfg.hidden)
    changed = features.clone()
    changed[0, -1] += 5.0  # only the last position's feature moves
    edits = adapter(features, source.output.linear), adapter(changed, source.output.linear)
    assert not torch.allclose(edits[0][0, 0], edits[1][0, 0])  # the first position's edit follows it


def test_the_adapter_s_offset_shifts_every_position_s_scores_alike():
    """models.adapter.offset: one learned score per token, added at every position at strength γ,
    on the full route and on the masked-positions route the planner and first-hitting samplers
    take; through the output layer alone no such shift is reachable when |V| > H."""
    cfg, source, adapter = source_and_adapter(attention=False, offset=True)
    assert count_parameters(adapter) == 2 * source.cfg.hidden * cfg.models.adapter.rank + VOCAB.size
    z = torch.randint(0, 11, (3, cfg.seq_len))
    guided = AdaptedDenoiser(source, adapter, 0.5)
    torch.testing.assert_close(guided.logits(z), source.logits(z))  # zero at the start: the source
    with torch.no_grad():
        adapter.offset.copy_(torch.linspace(-2.0, 2.0, VOCAB.size))
    torch.testing.assert_close(guided.logits(z), source.logits(z) + 0.5 * adapter.offset, rtol=1e-5, atol=1e-5)
    z[:, :4] = VOCAB.mask_id
    rows, positions = torch.arange(3).repeat_interleave(4), torch.arange(4).repeat(3)
    torch.testing.assert_close(guided.masked_log_probs(z, rows, positions), guided(z)[rows, positions],
                               rtol=1e-5, atol=1e-5)
