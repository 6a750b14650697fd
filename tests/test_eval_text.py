"""Text metrics on hand-computable cases: classifier domain score, generative perplexity, diversity."""

import math

import numpy as np
import pytest

from gtl_dist.eval import text


# ---- classifier domain score ------------------------------------------------------------------

def test_source_probability_is_a_stable_sigmoid():
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p = text.source_probability([0.0, math.log(3), -math.log(3), 1000.0, -1000.0])
    assert np.allclose(p, [0.5, 0.75, 0.25, 1.0, 0.0])


def test_domain_score_of_a_classifier_callable():
    # The "classifier" reads its logit off the first token: logits -2, -1, 0, 1, 2.
    seqs = [[v, 0, 0] for v in (-2, -1, 0, 1, 2)]
    seen = []

    def classifier(tokens):
        seen.append(tokens.shape)
        return tokens[:, 0].astype(float)

    counts = text.domain_counts(seqs, classifier, batch_size=2)
    assert seen == [(2, 3), (2, 3), (1, 3)]
    score = text.domain_score(counts)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert score["domain_source_prob"] == pytest.approx(sum(sig(z) for z in (-2, -1, 0, 1, 2)) / 5)
    assert score["domain_pct_target"] == pytest.approx(40.0)  # p = 0.5 is not "target"
    # Shards merge: two halves add up to the whole.
    halves = text.domain_counts(seqs[:2], classifier) + text.domain_counts(seqs[2:], classifier)
    assert halves == counts


def test_domain_score_rejects_a_wrong_number_of_logits():
    with pytest.raises(ValueError, match="one logit per sequence"):
        text.domain_counts([[1, 2], [3, 4]], lambda t: np.zeros((2, 2)))


def test_domain_score_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    counts = text.domain_counts([[1], [2]], lambda t: torch.tensor([-5.0, 5.0]))
    assert counts.target_like == 1 and counts.n == 2


# ---- generative perplexity --------------------------------------------------------------------

BIGRAM = np.array([[0.1, 0.6, 0.2, 0.1],
                   [0.3, 0.1, 0.5, 0.1],
                   [0.25, 0.25, 0.25, 0.25],
                   [0.7, 0.1, 0.1, 0.1]])


def bigram_lm(tokens):
    """A causal reference model: the next token depends on the current one through BIGRAM."""
    return np.log(BIGRAM)[tokens]


def test_uniform_model_has_perplexity_vocab_size():
    uniform = lambda t: np.zeros(t.shape + (7,))  # noqa: E731
    counts = text.generative_nll([[1, 2, 3, 4], [5, 6]], uniform)
    assert counts.tokens == 4 and counts.sequences == 2
    assert text.perplexity(counts) == pytest.approx(7.0)


def test_bigram_perplexity_hand_computed_with_eos_and_padding():
    seqs = [[0, 1, 2, 0], [1, 3, 2, 2], [2, 2]]
    eos = 3
    # [0,1,2,0]: -log .6 - log .5 - log .25; [1,3] cut at EOS (scored): -log .1; [2,2]: -log .25
    nll = -(math.log(0.6) + math.log(0.5) + math.log(0.25) + math.log(0.1) + math.log(0.25))
    for batch_size in (1, 2, 3):  # padding of shorter sequences in a batch changes nothing
        counts = text.generative_nll(seqs, bigram_lm, eos_id=eos, batch_size=batch_size)
        assert counts.tokens == 5
        assert counts.nll_sum == pytest.approx(nll)
        assert text.perplexity(counts) == pytest.approx(math.exp(nll / 5))


def test_bos_scores_the_first_token_too():
    # BOS = 2 (a uniform row): the first token costs log 4 more and counts as one more token.
    counts = text.generative_nll([[0, 1]], bigram_lm, bos_id=2)
    assert counts.tokens == 2
    assert counts.nll_sum == pytest.approx(math.log(4) - math.log(0.6))


def test_perplexity_counts_merge_across_shards():
    seqs = [[0, 1, 2, 0], [1, 0, 2, 1], [3, 3, 0]]
    whole = text.generative_nll(seqs, bigram_lm)
    parts = text.generative_nll(seqs[:1], bigram_lm) + text.generative_nll(seqs[1:], bigram_lm)
    assert parts.tokens == whole.tokens and parts.nll_sum == pytest.approx(whole.nll_sum)


def test_reference_model_with_wrong_output_shape_is_named():
    with pytest.raises(ValueError, match=r"expected \(B, T, vocab\)"):
        text.generative_nll([[0, 1, 2]], lambda t: np.zeros((1, 7)))
    with pytest.raises(ValueError, match="zero scored tokens"):
        text.perplexity(text.generative_nll([[1]], bigram_lm))


def test_truncate_at_eos():
    assert text.truncate_at_eos([5, 3, 9, 3], 3) == [5, 3]
    assert text.truncate_at_eos([5, 9], 3) == [5, 9]
    assert text.truncate_at_eos([5, 3], None) == [5, 3]


# ---- diversity --------------------------------------------------------------------------------

def test_diversity_hand_computed():
    seqs = [[1, 2, 1, 2], [1, 2, 3]]
    d = text.diversity(text.diversity_counts(seqs, max_n=3, repetition_n=2))
    # unigrams 1:3, 2:3, 3:1 (7 total); bigrams (1,2)x3, (2,1), (2,3) (5); trigrams 3 distinct of 3
    assert d["distinct_1"] == pytest.approx(3 / 7)
    assert d["distinct_2"] == pytest.approx(3 / 5)
    assert d["distinct_3"] == pytest.approx(1.0)
    assert d["unigram_entropy_bits"] == pytest.approx(
        -(2 * (3 / 7) * math.log2(3 / 7) + (1 / 7) * math.log2(1 / 7)))
    # seq 1 bigrams (1,2),(2,1),(1,2): 1 - 2/3 repeat; seq 2: none repeat -> mean 1/6
    assert d["repetition_2"] == pytest.approx(1 / 6)


def test_diversity_merges_and_handles_words():
    a, b = [["the", "cat", "the", "cat"]], [["a", "dog"], ["x"]]
    merged = text.diversity_counts(a) + text.diversity_counts(b)
    whole = text.diversity_counts(a + b)
    assert text.diversity(merged) == text.diversity(whole)
    assert text.diversity(text.diversity_counts([[7, 7, 7, 7]]))["unigram_entropy_bits"] == 0.0
    with pytest.raises(ValueError, match="different n"):
        text.diversity_counts(a, max_n=2) + text.diversity_counts(b, max_n=3)
