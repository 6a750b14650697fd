"""The SentencePiece tokenizer: reserved ids, [MASK] never produced from text, determinism, hashes."""

import random

import pytest

from gtl_dist.config import TokenizerConfig
from gtl_dist.data.tokenizer import (BOS_ID, EOS_ID, MASK_ID, PAD_ID, UNK_ID, Tokenizer, TokenizerMismatch,
                                     sample_sentences, train_tokenizer)
from gtl_dist.io import sha256_file

WORDS = ("the model learns a distribution over sequences of tokens and the sampler draws new text from "
         "it while a classifier tells the source domain from the target domain").split()


def _texts(n=400, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 30))]
        if i % 7 == 0:
            words.insert(3, "[MASK]")  # the literal string must be ordinary text
        out.append(" ".join(words).capitalize() + ".\n" + " ".join(rng.choice(WORDS) for _ in range(10)))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    digest = train_tokenizer(_texts(), TokenizerConfig(vocab_size=120, num_threads=2), path, seed=0)
    return path, digest


def test_reserved_ids_and_hash(trained):
    path, digest = trained
    tok = Tokenizer(path)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert [tok.sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<unk>", "<s>", "</s>", "[MASK]"]
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID) == (0, 1, 2, 3, 4)
    assert tok.hash == digest == sha256_file(path)
    assert 16 < tok.vocab_size <= 120


def test_mask_is_never_produced_from_text(trained):
    tok = Tokenizer(trained[0])
    texts = _texts(200, seed=1) + ["[MASK]", "a [MASK] b", "[MASK][MASK]", "<s> </s> <pad>"]
    for ids in tok.encode(texts):
        assert MASK_ID not in ids and PAD_ID not in ids and BOS_ID not in ids and EOS_ID not in ids
    assert tok.decode(tok.encode(["the model learns"])[0]) == "the model learns"
    assert tok.decode([MASK_ID, BOS_ID] + tok.encode(["the model"])[0] + [EOS_ID]) == "the model"


def test_training_is_deterministic(trained, tmp_path):
    again = train_tokenizer(_texts(), TokenizerConfig(vocab_size=120, num_threads=2), tmp_path / "t.model", seed=0)
    assert again == trained[1]
    assert (tmp_path / "t.model").read_bytes() == trained[0].read_bytes()


def test_sentence_sample_is_bounded_seeded_and_cuts_long_lines():
    texts = [f"line {i}" for i in range(1000)] + ["word " * 1000]
    a, b = sample_sentences(texts, 50, seed=1), sample_sentences(texts, 50, seed=1)
    assert a == b and len(a) == 50 and a != sample_sentences(texts, 50, seed=2)
    long = sample_sentences(["word " * 1000], 100, seed=0)
    assert len(long) == 3 and max(map(len, long)) <= 2000


def test_hash_mismatch_and_missing_model_are_clear_errors(trained, tmp_path):
    with pytest.raises(TokenizerMismatch, match="tokenizer hash .* does not match the expected 000000000000"):
        Tokenizer(trained[0], expected_hash="0" * 64)
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "nope.model")


def test_a_vocabulary_the_text_cannot_fill_is_reduced_with_a_warning_saying_why(tmp_path, caplog):
    """~30 distinct words cannot fill 8000 pieces: SentencePiece takes fewer, and the build says so."""
    with caplog.at_level("WARNING", logger="gtl_dist.data.tokenizer"):
        train_tokenizer(_texts(), TokenizerConfig(vocab_size=8000, num_threads=2), tmp_path / "t.model", seed=0)
    got = Tokenizer(tmp_path / "t.model").vocab_size
    assert got < 8000
    assert (f"tokenizer.vocab_size: 8000 was reduced to {got}: the source training text" in caplog.text
            and f"set tokenizer.vocab_size: {got}" in caplog.text)
    caplog.clear()
    with caplog.at_level("WARNING", logger="gtl_dist.data.tokenizer"):
        train_tokenizer(_texts(), TokenizerConfig(vocab_size=got, num_threads=2), tmp_path / "u.model", seed=0)
    assert "was reduced" not in caplog.text  # a vocabulary the text fills: no warning
