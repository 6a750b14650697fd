"""The SentencePiece tokenizer, trained on the SOURCE training text only.

Reserved ids: pad=0, unk=1, bos=2, eos=3 and [MASK]=4. [MASK] is a CONTROL symbol: SentencePiece
never produces a control id from text, so a document that contains the literal string "[MASK]" is
tokenized like any other text and the absorbing token of the diffusion process only ever comes
from the noising process. The tokenizer's identity is the sha256 of its .model bytes; manifests
and checkpoints record it, and every consumer compares it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from gtl_dist.config import TokenizerConfig
from gtl_dist.io import atomic_write_bytes, sha256_bytes, sha256_file
from gtl_dist.log import get_logger

log = get_logger("data.tokenizer")

PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3, 4
MASK_PIECE = "[MASK]"
# SentencePiece skips training sentences longer than this many bytes; longer lines are cut first.
MAX_SENTENCE_CHARS = 2000


class TokenizerMismatch(ValueError):
    """Data, tokenizer and model disagree about what the token ids mean."""


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Training lines: one per paragraph, long ones cut at a space near MAX_SENTENCE_CHARS."""
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            while len(line) > MAX_SENTENCE_CHARS:
                cut = line.rfind(" ", 0, MAX_SENTENCE_CHARS)
                cut = cut if cut > 0 else MAX_SENTENCE_CHARS
                yield line[:cut]
                line = line[cut:].strip()
            if line:
                yield line


def sample_sentences(texts: Iterable[str], max_sentences: int, seed: int) -> list[str]:
    """A seeded uniform sample of at most ``max_sentences`` lines (reservoir sampling).

    Memory stays bounded by the sample, whatever the corpus size, and the sample depends only on
    the text and the seed, so training is deterministic.
    """
    rng = np.random.default_rng(seed)
    reservoir: list[str] = []
    for i, line in enumerate(_sentences(texts)):
        if i < max_sentences:
            reservoir.append(line)
        else:
            j = int(rng.integers(0, i + 1))
            if j < max_sentences:
                reservoir[j] = line
    return reservoir


def train_tokenizer(texts: Iterable[str], tcfg: TokenizerConfig, path: str | Path, seed: int) -> str:
    """Train on ``texts`` (the source training documents), write ``path`` atomically, return its hash."""
    sentences = sample_sentences(texts, tcfg.max_sentences, seed)
    if not sentences:
        raise ValueError("tokenizer: the source training text is empty; nothing to train on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model,
        vocab_size=tcfg.vocab_size, model_type=tcfg.model_type,
        character_coverage=tcfg.character_coverage, num_threads=tcfg.num_threads,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, control_symbols=[MASK_PIECE],
        # We sampled already; SentencePiece's own sampling would add a second source of randomness.
        input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=4 * MAX_SENTENCE_CHARS + 16,
        # A small corpus cannot fill a large vocabulary: take what it supports instead of failing.
        hard_vocab_limit=False, minloglevel=2)
    data = model.getvalue()
    got = spm.SentencePieceProcessor(model_proto=data).get_piece_size()
    if got < tcfg.vocab_size:
        log.warning("tokenizer.vocab_size: %d was reduced to %d: the source training text (%d lines sampled, "
                    "%d characters) does not hold enough distinct pieces for more. The vocabulary is what the "
                    "models are sized by; set tokenizer.vocab_size: %d to make this explicit, or give the "
                    "source domains more text", tcfg.vocab_size, got, len(sentences),
                    sum(map(len, sentences)), got)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


class Tokenizer:
    """A loaded SentencePiece model with the project's reserved ids checked."""

    def __init__(self, path: str | Path, expected_hash: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: tokenizer model not found (build the data first: "
                                    f"python shards/build.py --config <cfg> --run-dir <run>)")
        self.hash = sha256_file(self.path)
        if expected_hash is not None and expected_hash != self.hash:
            raise TokenizerMismatch(
                f"{self.path}: tokenizer hash {self.hash[:12]}… does not match the expected "
                f"{expected_hash[:12]}… (the shards or model were built with another tokenizer; "
                f"rebuild the data with the same tokenizer config)")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        expected = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>", MASK_ID: MASK_PIECE}
        found = {i: self.sp.id_to_piece(i) for i in expected}
        if found != expected or not self.sp.is_control(MASK_ID):
            raise TokenizerMismatch(f"{self.path}: reserved ids are {found}, expected {expected} with "
                                    f"{MASK_PIECE} as a control symbol; retrain it with gtl_dist")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    pad_id, unk_id, bos_id, eos_id, mask_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; [MASK], pad, bos and eos are control pieces and decode to nothing."""
        return self.sp.decode([int(i) for i in ids])
