"""Corpus -> per-domain train/test split -> the sets the pipeline trains on, written to disk.

Sets (docs/architecture.md "Data contracts"):
  source/train   the source domains' training documents, plus the overlap documents: the first
                 round(r * N_t) of each target t's training documents (docs/method.md §8, data.overlap)
  source/test    the source domains' test documents
  <t>/train      target t's remaining training documents, in a seeded random order (the target
                 fractions are prefixes of the chunks built from them, so they are nested)
  <t>/test       target t's test documents (never touched by overlap or fractions)
  <d>/evaluator  for every domain d (source: the source domains' together), documents no method
                 trains on: the evaluator's own models (the reference LM, the scoring domain
                 classifier, docs/method.md §10) train on them; Markov data draws data.markov.num_test
                 fresh sequences per chain

Every split and order is drawn from a generator seeded by data.split_seed and the name of what is
split, so one domain's split does not change when another domain is added.

Text sets are stored as ``corpus/<set>-<split>.jsonl`` (one document a line) with a byte-offset
index ``.offsets.npy`` and character counts ``.chars.npy``, so a build slice can read any range of
documents without scanning the file. Markov sets are ``corpus/<set>-<split>.npz`` (states and the
domain of every sequence).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from gtl_dist.config import RunConfig
from gtl_dist.data import markov
from gtl_dist.data.documents import CorpusError, Document
from gtl_dist.io import atomic_path

SOURCE = "source"
SPLITS = ("train", "test", "evaluator")


def set_names(targets: list[str]) -> list[str]:
    """All set names in build order: source/train, source/test, source/evaluator, then the same
    three per target."""
    return [f"{name}/{split}" for name in [SOURCE] + list(targets) for split in SPLITS]


def file_stem(set_name: str) -> str:
    """"physics/train" -> "physics-train" (shard and corpus file names)."""
    return set_name.replace("/", "-")


def seeded_rng(seed: int, *names: str) -> np.random.Generator:
    tag = int.from_bytes(hashlib.sha256("/".join(names).encode()).digest()[:8], "little")
    return np.random.default_rng([seed, tag])


def overlap_count(overlap: float, n_train: int, target: str) -> int:
    """How many of a target's training items move into the source set (docs/method.md §8)."""
    moved = round(overlap * n_train)
    if n_train - moved < 1:
        raise CorpusError(f"data.overlap={overlap} moves {moved} of target '{target}''s {n_train} "
                          f"training documents into the source set and leaves none for the target; "
                          f"lower data.overlap or add target data")
    return moved


def split_domain(docs: list, test_fraction: float, evaluator_fraction: float, seed: int,
                 domain: str) -> dict[str, list]:
    """The domain's documents by split (SPLITS), in a seeded random order, each at least one
    document: test takes
    the first round(test_fraction·N) of the order, the evaluator split the next
    round(evaluator_fraction·N), training the rest (so the test split does not depend on
    evaluator_fraction)."""
    n = len(docs)
    order = seeded_rng(seed, "split", domain).permutation(n)
    n_test = min(max(round(test_fraction * n), 1), n - 1)
    n_eval = max(round(evaluator_fraction * n), 1)
    if n - n_test - n_eval < 1:
        raise CorpusError(f"domain '{domain}' has {n} documents: data.test_fraction={test_fraction} holds out "
                          f"{n_test} and data.evaluator_fraction={evaluator_fraction} {n_eval}, which leaves "
                          f"none for training; add documents to '{domain}' or lower the two fractions")
    parts = {"train": order[n_test + n_eval:], "test": order[:n_test], "evaluator": order[n_test:n_test + n_eval]}
    return {split: [docs[i] for i in part] for split, part in parts.items()}


def _shuffled(docs: list, seed: int, set_name: str) -> list:
    """A set that pools several domains, in a seeded order, so that its chunks of every domain
    spread over all its shards."""
    order = seeded_rng(seed, "order", set_name).permutation(len(docs))
    return [docs[i] for i in order]


def build_text_sets(cfg: RunConfig, docs: dict[str, list[Document]]) -> dict[str, list[Document]]:
    d = cfg.data
    split = {name: split_domain(docs[name], d.test_fraction, d.evaluator_fraction, d.split_seed, name)
             for name in list(d.source_domains) + list(d.target_domains)}
    pooled = {s: [doc for name in d.source_domains for doc in split[name][s]] for s in SPLITS}
    sets: dict[str, list[Document]] = {}
    for t in d.target_domains:
        train = split[t]["train"]
        moved = overlap_count(d.overlap, len(train), t)
        pooled["train"] += train[:moved]
        sets.update({f"{t}/train": train[moved:], f"{t}/test": split[t]["test"],
                     f"{t}/evaluator": split[t]["evaluator"]})
    for s in SPLITS:  # the overlap documents too spread over all of the source's shards
        sets[f"source/{s}"] = _shuffled(pooled[s], d.split_seed, f"source/{s}")
    return {name: sets[name] for name in set_names(cfg.targets)}


@dataclass
class MarkovSet:
    states: np.ndarray  # [n, length] int
    domains: list[str]  # the chain each sequence was drawn from


def build_markov_sets(cfg: RunConfig) -> dict[str, MarkovSet]:
    m, seed = cfg.data.markov, cfg.data.split_seed
    chains = markov.transition_matrices(m)

    def draw(name: str, split: str, num: int) -> np.ndarray:
        return markov.generate_domain(chains[name], num, m.length, seed, name, split)

    source_train = [draw(SOURCE, "train", m.num_source)]
    domains = [SOURCE] * m.num_source
    sets = {f"source/{split}": MarkovSet(draw(SOURCE, split, m.num_test), [SOURCE] * m.num_test)
            for split in ("test", "evaluator")}
    for t in cfg.targets:
        train = draw(t, "train", m.num_target)
        moved = overlap_count(cfg.data.overlap, m.num_target, t)
        source_train.append(train[:moved])
        domains += [t] * moved
        sets[f"{t}/train"] = MarkovSet(train[moved:], [t] * (m.num_target - moved))
        for split in ("test", "evaluator"):
            sets[f"{t}/{split}"] = MarkovSet(draw(t, split, m.num_test), [t] * m.num_test)
    states = np.concatenate(source_train)
    order = seeded_rng(seed, "order", "source/train").permutation(len(states))
    sets["source/train"] = MarkovSet(states[order], [domains[i] for i in order])
    return {name: sets[name] for name in set_names(cfg.targets)}


# -- storage ----------------------------------------------------------------------------------

def write_text_set(folder: Path, set_name: str, docs: list[Document]) -> None:
    stem = folder / file_stem(set_name)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    chars = np.zeros(len(docs), dtype=np.int64)
    with atomic_path(stem.with_suffix(".jsonl")) as tmp, open(tmp, "wb") as fh:
        for i, doc in enumerate(docs):
            line = json.dumps({"text": doc.text, "domain": doc.domain, "id": doc.doc_id},
                              ensure_ascii=False).encode("utf-8") + b"\n"
            fh.write(line)
            offsets[i + 1] = offsets[i] + len(line)
            chars[i] = len(doc.text)
    for suffix, array in ((".offsets.npy", offsets), (".chars.npy", chars)):
        with atomic_path(stem.with_name(stem.name + suffix)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)  # a file object: np.save would add ".npy" to a name


def iter_text_set(folder: Path, set_name: str) -> Iterator[str]:
    """The texts of a set, streamed (the tokenizer samples from them without holding them all)."""
    with open(folder / f"{file_stem(set_name)}.jsonl", encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)["text"]


def text_set_chars(folder: Path, set_name: str) -> np.ndarray:
    return np.load(folder / f"{file_stem(set_name)}.chars.npy")


def read_text_range(folder: Path, set_name: str, start: int, stop: int) -> list[Document]:
    stem = folder / file_stem(set_name)
    offsets = np.load(stem.with_name(stem.name + ".offsets.npy"), mmap_mode="r")
    with open(stem.with_suffix(".jsonl"), "rb") as fh:
        fh.seek(int(offsets[start]))
        blob = fh.read(int(offsets[stop] - offsets[start]))
    records = [json.loads(line) for line in blob.splitlines()]
    return [Document(r["text"], r["domain"], r["id"]) for r in records]


def write_markov_set(folder: Path, set_name: str, data: MarkovSet) -> None:
    names = sorted(set(data.domains))
    index = np.array([names.index(d) for d in data.domains], dtype=np.int64)
    with atomic_path(folder / f"{file_stem(set_name)}.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, states=data.states, domain_index=index, domain_names=np.array(names))


def read_markov_range(folder: Path, set_name: str, start: int, stop: int) -> MarkovSet:
    with np.load(folder / f"{file_stem(set_name)}.npz", allow_pickle=False) as z:
        names = [str(x) for x in z["domain_names"]]
        return MarkovSet(z["states"][start:stop], [names[i] for i in z["domain_index"][start:stop]])
