"""Building a data directory: prepare -> slices (in parallel) -> finalize.

    prepare   corpus -> per-domain split -> sets (corpus/) -> tokenizer -> plan.json
    slice i   the build units u with u % n == i: tokenize, pack, write parts/<unit>-NNNN.tar and,
              last, parts/<unit>.json (the unit's completion marker)
    finalize  once every unit is done: rename parts to <set>-<split>-NNNNNN.tar in plan order,
              write manifest.json LAST

A build unit is a fixed range of documents of one set (about shards.unit_chars characters of text;
one shard's worth of sequences for Markov data). Units are packed on their own, so the shards do
not depend on how many slices ran; each unit's last partial chunk is dropped and its last shard may
be short. Every file is written under a temporary name and renamed when complete, so a killed build
leaves no file that looks complete, and a re-run skips finished units and finished shards.

    repair    a finished build re-run: verify every shard against the manifest and rebuild each
              damaged one alone from the build unit the manifest records for it

Builders of one folder may overlap (two launchers, a re-run next to a running build): prepare,
finalize, repair and clean hold build.lock exclusively (a flock, gtl_dist/locks.py), slices hold it
shared, and a slice claims each unit with a flock on parts/<unit>.lock. A unit another builder
holds is skipped, then waited for at the end; if that builder died, its claim went with it and the
unit is built here. So every unit is built once, and finalize (which deletes parts/) never runs
while a slice builds; a builder that finds the manifest already written returns it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gtl_dist.config import RunConfig
from gtl_dist.data import markov, sets
from gtl_dist.data.corpus import LineReport, read_corpus
from gtl_dist.data.manifest import (MANIFEST_NAME, Manifest, ManifestError, ShardInfo, ShardSet,
                                    build_command, fraction_count, shard_problem)
from gtl_dist.data.shards import Chunk, pack_documents, token_dtype, write_shard
from gtl_dist.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, Tokenizer, train_tokenizer
from gtl_dist.io import atomic_write_json, read_json, sha256_file
from gtl_dist.locks import flocked
from gtl_dist.log import Progress, get_logger
from gtl_dist.paths import RunPaths, fraction_name

log = get_logger("data.build")

PLAN_NAME = "plan.json"
CORPUS_DIR = "corpus"
PARTS_DIR = "parts"
TOKENIZER_NAME = "tokenizer.model"
BUILD_LOCK = "build.lock"


class BuildError(RuntimeError):
    """The data directory is in a state the requested build step cannot continue from."""


def data_dir(cfg: RunConfig, run_dir: str | Path) -> Path:
    """``shards.dir`` (relative to the run directory) or ``<run_dir>/data``."""
    if cfg.shards.dir:
        path = Path(cfg.shards.dir)
        return path if path.is_absolute() else Path(run_dir) / path
    return RunPaths(run_dir).data


def data_hash(cfg: RunConfig) -> str:
    return cfg.data_hash()


def _build_lock(root: Path, shared: bool = False, wait: bool = True) -> AbstractContextManager[bool]:
    """Exclusive for the steps that change the folder as a whole, shared while slices build units."""
    return flocked(Path(root) / BUILD_LOCK, shared=shared, wait=wait)


def _finished(root: Path, plan: dict[str, Any]) -> Manifest | None:
    """The manifest of this plan's build, if a builder has finalized it."""
    if (root / MANIFEST_NAME).is_file():
        manifest = Manifest.load(root)
        if manifest.data_hash == plan["data_hash"]:
            return manifest
    return None


@dataclass
class Unit:
    index: int  # position in the plan; slice i of n builds the units with index % n == i
    name: str
    set_name: str
    start: int  # document range [start, stop) of the set
    stop: int


# -- prepare ----------------------------------------------------------------------------------

def _check_same_build(root: Path, want: str) -> None:
    """Refuse to mix two configurations in one folder (see ``clean``)."""
    for marker in (root / MANIFEST_NAME, root / PLAN_NAME, root / CORPUS_DIR / "DONE.json"):
        if marker.is_file():
            try:
                found = read_json(marker).get("data_hash")
            except ValueError:
                found = None
            if found != want:
                raise BuildError(
                    f"{marker}: this folder holds data built from another data/tokenizer/shards config "
                    f"(data hash {found} != {want}); rebuild it with `python shards/build.py ... --rebuild` "
                    f"(or prepare_data(..., rebuild=True)), or set shards.dir to a new folder")


def clean(root: Path) -> None:
    """Delete what a build wrote into ``root`` (and nothing else): shards, parts, corpus, plan."""
    root = Path(root)
    with _build_lock(root):
        _clean(root)


def _clean(root: Path) -> None:
    doomed: set[Path] = set()
    try:  # the shards a finished build lists
        raw = read_json(root / MANIFEST_NAME)
        doomed |= {root / s["name"] for entry in raw.get("sets", {}).values() for s in entry.get("shards", [])}
    except (FileNotFoundError, ValueError, AttributeError):
        pass
    try:  # shards renamed by a finalize that did not get to write the manifest
        for name in sets.set_names(read_json(root / PLAN_NAME)["targets"]):
            doomed |= set(root.glob(f"{sets.file_stem(name)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
    for path in sorted(doomed):
        path.unlink(missing_ok=True)
    for folder in (root / PARTS_DIR, root / CORPUS_DIR):
        shutil.rmtree(folder, ignore_errors=True)
    for name in (MANIFEST_NAME, PLAN_NAME, TOKENIZER_NAME):
        (root / name).unlink(missing_ok=True)


def prepare(cfg: RunConfig, root: Path) -> dict[str, Any]:
    """Corpus -> sets -> tokenizer -> plan.json (idempotent: each finished step is kept). While
    another builder prepares, wait for its plan (written last) rather than for the build lock,
    which its slices hold next: so this builder joins them."""
    while (plan := _existing_plan(cfg, root)) is None:
        with _build_lock(root, wait=False) as got:
            if got:
                return _existing_plan(cfg, root) or _prepare(cfg, root)
        time.sleep(0.2)
    return plan


def _existing_plan(cfg: RunConfig, root: Path) -> dict[str, Any] | None:
    _check_same_build(root, data_hash(cfg))
    return read_json(root / PLAN_NAME) if (root / PLAN_NAME).is_file() else None


def _prepare(cfg: RunConfig, root: Path) -> dict[str, Any]:
    want = data_hash(cfg)
    corpus_dir = root / CORPUS_DIR
    corpus_dir.mkdir(exist_ok=True)
    names = sets.set_names(cfg.targets)
    done = corpus_dir / "DONE.json"
    if not done.is_file():
        info: dict[str, Any] = {}
        if cfg.uses_tokenizer:
            lines = LineReport()
            built = sets.build_text_sets(cfg, read_corpus(cfg, lines))
            for name in names:
                sets.write_text_set(corpus_dir, name, built[name])
            if cfg.data.corpus == "demo":
                from gtl_dist.data.demo import corpus_versions
                info["versions"] = corpus_versions(list(cfg.data.source_domains) + list(cfg.data.target_domains))
            if cfg.data.corpus in ("jsonl", "arxiv"):
                info["corpus_lines"] = lines.to_info()  # malformed lines skipped, by reason
        else:
            built = sets.build_markov_sets(cfg)
            for name in names:
                sets.write_markov_set(corpus_dir, name, built[name])
        domains = {name: [d.domain for d in built[name]] if isinstance(built[name], list) else built[name].domains
                   for name in names}
        info["documents"] = {name: len(domains[name]) for name in names}
        info["domain_documents"] = {name: dict(Counter(domains[name])) for name in names}
        atomic_write_json(done, {"data_hash": want, **info})
    info = read_json(done)
    info.pop("data_hash")

    if cfg.uses_tokenizer:
        tok_path = root / TOKENIZER_NAME
        if not tok_path.is_file():
            log.info("training the tokenizer (vocab %d, %s) on source/train", cfg.tokenizer.vocab_size,
                     cfg.tokenizer.model_type)
            train_tokenizer(sets.iter_text_set(corpus_dir, "source/train"), cfg.tokenizer, tok_path,
                            seed=cfg.data.split_seed)
        tok = Tokenizer(tok_path)
        vocab = {"vocab_size": tok.vocab_size, "mask_id": MASK_ID, "pad_id": PAD_ID, "bos_id": BOS_ID,
                 "eos_id": EOS_ID, "tokenizer_hash": tok.hash, "tokenizer_file": TOKENIZER_NAME}
        seq_len = cfg.shards.seq_len
    else:
        s = cfg.data.markov.num_states
        vocab = {"vocab_size": s + 1, "mask_id": s, "pad_id": None, "bos_id": None, "eos_id": None,
                 "tokenizer_hash": markov.chain_spec_hash(cfg.data.markov), "tokenizer_file": None}
        seq_len = cfg.data.markov.length

    plan_sets = {}
    for name in names:
        if cfg.uses_tokenizer:
            ranges = _text_units(sets.text_set_chars(corpus_dir, name), cfg.shards.unit_chars)
        else:
            n, per = info["documents"][name], cfg.shards.samples_per_shard
            ranges = [(a, min(a + per, n)) for a in range(0, n, per)]
        plan_sets[name] = {"documents": info["documents"][name], "units": ranges}
    plan = {"data_hash": want, "corpus": cfg.data.corpus, "seq_len": seq_len,
            "dtype": token_dtype(vocab["vocab_size"]).name, "samples_per_shard": cfg.shards.samples_per_shard,
            "split_seed": cfg.data.split_seed, "targets": cfg.targets,
            "target_fractions": cfg.data.target_fractions, "sets": plan_sets, "info": info, **vocab}
    if not cfg.uses_tokenizer:
        _check_fractions(plan, {f"{t}/train": info["documents"][f"{t}/train"] for t in cfg.targets}, root)
    atomic_write_json(root / PLAN_NAME, plan)
    return plan


def _text_units(chars: np.ndarray, unit_chars: int) -> list[tuple[int, int]]:
    """Consecutive document ranges of about ``unit_chars`` characters (at least one document)."""
    units, start, total = [], 0, 0
    for i, n in enumerate(chars.tolist()):
        total += n
        if total >= unit_chars:
            units.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(chars):
        units.append((start, len(chars)))
    return units


def plan_units(plan: dict[str, Any]) -> list[Unit]:
    units = []
    for set_name in sets.set_names(plan["targets"]):
        for k, (a, b) in enumerate(plan["sets"][set_name]["units"]):
            units.append(Unit(len(units), f"{sets.file_stem(set_name)}-u{k:05d}", set_name, a, b))
    return units


def load_plan(root: Path) -> dict[str, Any]:
    path = Path(root) / PLAN_NAME
    if not path.is_file():
        raise BuildError(f"{path}: not prepared yet; run `{build_command(root, '--prepare')}` first "
                         f"(or the build without --slice)")
    return read_json(path)


def plan_tokenizer(plan: dict[str, Any], root: Path) -> Tokenizer | None:
    """The tokenizer the plan's text units are encoded with (None for Markov data)."""
    if not plan["tokenizer_file"]:
        return None
    return Tokenizer(root / plan["tokenizer_file"], expected_hash=plan["tokenizer_hash"])


def part_key(unit_name: str, part: int) -> str:
    """Part ``part`` of a unit: its file's stem in parts/ and the key prefix of its samples."""
    return f"{unit_name}-{part:04d}"


# -- slices -----------------------------------------------------------------------------------

def unit_chunks(plan: dict[str, Any], root: Path, unit: Unit,
                tokenizer: Tokenizer | None) -> tuple[list[Chunk], int, dict[str, int]]:
    """The unit's chunks in their final, seeded random order, the tokens dropped, and the tokens of
    each domain before chunking (the tokenizer's ids of its documents, without BOS/EOS)."""
    corpus_dir = root / CORPUS_DIR
    seq_len = plan["seq_len"]
    chunks: list[Chunk] = []
    dropped, tokens = 0, {}
    if tokenizer is None:
        data = sets.read_markov_range(corpus_dir, unit.set_name, unit.start, unit.stop)
        chunks = [Chunk(row, dom, [str(unit.start + i)]) for i, (row, dom) in enumerate(zip(data.states, data.domains))]
        tokens = {dom: n * seq_len for dom, n in Counter(data.domains).items()}
    else:
        docs = sets.read_text_range(corpus_dir, unit.set_name, unit.start, unit.stop)
        ids = tokenizer.encode([d.text for d in docs])
        # Chunks never mix domains: pack each domain's documents of the unit separately.
        for domain in sorted({d.domain for d in docs}):
            keep = [i for i, d in enumerate(docs) if d.domain == domain]
            packed, lost = pack_documents([ids[i] for i in keep], [docs[i].doc_id for i in keep], domain,
                                          seq_len, plan["bos_id"], plan["eos_id"])
            chunks += packed
            dropped += lost
            tokens[domain] = sum(len(ids[i]) for i in keep)
    order = sets.seeded_rng(plan["split_seed"], "unit", unit.name).permutation(len(chunks))
    return [chunks[i] for i in order], dropped, tokens


def build_unit(plan: dict[str, Any], root: Path, unit: Unit, tokenizer: Tokenizer | None) -> dict[str, Any]:
    parts = root / PARTS_DIR
    marker = parts / f"{unit.name}.json"
    if marker.is_file():
        return read_json(marker)
    chunks, dropped, tokens = unit_chunks(plan, root, unit, tokenizer)
    per, dtype = plan["samples_per_shard"], np.dtype(plan["dtype"])
    shards = []
    for j, lo in enumerate(range(0, len(chunks), per)):
        part = parts / f"{part_key(unit.name, j)}.tar"
        if not part.is_file():  # a shard finished before an interruption is kept as it is
            write_shard(part, chunks[lo:lo + per], part_key(unit.name, j), dtype)
        shards.append({"part": part.name, "samples": len(chunks[lo:lo + per]),
                       "bytes": part.stat().st_size, "sha256": sha256_file(part)})
    domains: dict[str, int] = {}
    for c in chunks:
        domains[c.domain] = domains.get(c.domain, 0) + 1
    result = {"unit": unit.name, "set": unit.set_name, "documents": unit.stop - unit.start,
              "shards": shards, "domains": domains, "tokens_dropped": dropped, "tokens": tokens}
    atomic_write_json(marker, result)
    return result


def run_slice(root: str | Path, slice_index: int, num_slices: int) -> int:
    """Build slice ``slice_index`` of ``num_slices`` (a job-array task); returns its number of
    units, all done (here or by an overlapping builder) when it returns."""
    root = Path(root)
    if not 0 <= slice_index < num_slices:
        raise BuildError(f"--slice {slice_index} is outside 0..{num_slices - 1} (--num-slices {num_slices})")
    plan = load_plan(root)
    mine = [u for u in plan_units(plan) if u.index % num_slices == slice_index]
    with _build_lock(root, shared=True):
        if _finished(root, plan) is None:
            _build_claimed_units(plan, root, mine, f"shards slice {slice_index}/{num_slices}")
    return len(mine)


def _build_claimed_units(plan: dict[str, Any], root: Path, units: list[Unit], desc: str) -> None:
    """Build every unit no other builder holds, then wait for (or take over) the others."""
    (root / PARTS_DIR).mkdir(exist_ok=True)
    tokenizer = plan_tokenizer(plan, root)
    bar = Progress(sum(u.stop - u.start for u in units), desc, unit="doc")
    held = [u for u in units if not _build_claimed(plan, root, u, tokenizer, bar, wait=False)]
    for unit in held:
        log.info("%s: build unit %s is being built by another builder; waiting for it", root, unit.name)
        _build_claimed(plan, root, unit, tokenizer, bar, wait=True)
    bar.close()


def _build_claimed(plan: dict[str, Any], root: Path, unit: Unit, tokenizer: Tokenizer | None,
                   bar: Progress, wait: bool) -> bool:
    """Build ``unit`` holding its claim (a flock on parts/<unit>.lock); False, doing nothing, when
    another builder holds the claim and ``wait`` is False."""
    with flocked(root / PARTS_DIR / f"{unit.name}.lock", wait=wait) as claimed:
        if claimed:
            build_unit(plan, root, unit, tokenizer)
            bar.update(unit.stop - unit.start)
    return claimed


# -- finalize ---------------------------------------------------------------------------------

def _check_fractions(plan: dict[str, Any], totals: dict[str, int], root: Path) -> dict[str, dict[str, int]]:
    out = {}
    for set_name, total in totals.items():
        counts = {}
        for f in plan["target_fractions"]:
            counts[fraction_name(f)] = fraction_count(f, total)
            if counts[fraction_name(f)] == 0:
                raise ManifestError(
                    f"{root}: target '{set_name.split('/')[0]}' at fraction {f} keeps round({f} * {total}) = 0 "
                    f"of its N={total} training samples (n_T = 0: nothing to train on, nothing to hold out); "
                    f"raise {f} in data.target_fractions (to at least {1 / total if total else 1:.3g}), drop "
                    f"it, or add target data")
        out[set_name] = counts
    return out


def finalize(root: str | Path) -> Manifest:
    """Rename the parts into place and write manifest.json (last) once every unit is done; the
    manifest an overlapping builder already wrote is returned as it is."""
    root = Path(root)
    plan = load_plan(root)
    with _build_lock(root):
        return _finished(root, plan) or _finalize(root, plan)


def _finalize(root: Path, plan: dict[str, Any]) -> Manifest:
    units = plan_units(plan)
    missing = [u.name for u in units if not (root / PARTS_DIR / f"{u.name}.json").is_file()]
    if missing:
        raise BuildError(f"{root}: {len(missing)} build unit(s) not finished ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}); run the slices again "
                         f"({build_command(root, '--slice <i> --num-slices <n>')})")
    results = [read_json(root / PARTS_DIR / f"{u.name}.json") for u in units]
    entries: dict[str, ShardSet] = {name: ShardSet([], {}) for name in sets.set_names(plan["targets"])}
    dropped = 0
    tokens: dict[str, Counter] = {name: Counter() for name in entries}
    for unit, res in zip(units, results):
        entry = entries[unit.set_name]
        for d, n in res["domains"].items():
            entry.domains[d] = entry.domains.get(d, 0) + n
        dropped += res["tokens_dropped"]
        tokens[unit.set_name].update(res.get("tokens", {}))  # absent in units built before it was recorded
        for j, shard in enumerate(res["shards"]):
            final = f"{sets.file_stem(unit.set_name)}-{len(entry.shards):06d}.tar"
            entry.shards.append(ShardInfo(final, shard["samples"], shard["bytes"], shard["sha256"], unit.name, j))
            part = root / PARTS_DIR / shard["part"]
            if part.is_file():
                os.replace(part, root / final)
            elif not (root / final).is_file():
                raise BuildError(f"{part}: missing (neither the part nor {final} exists); delete "
                                 f"{part.with_suffix('.json')} and run the slices again")
    fractions = _check_fractions(plan, {f"{t}/train": entries[f"{t}/train"].num_samples for t in plan["targets"]},
                                 root)
    for name, counts in fractions.items():
        entries[name].fractions = counts
    for name, entry in entries.items():
        if entry.num_samples == 0:
            raise BuildError(f"{root}: set '{name}' has no samples (its documents are shorter than one "
                             f"chunk of {plan['seq_len']} tokens); lower shards.seq_len or add data")
    info = dict(plan["info"], tokens_dropped=dropped, tokens={k: dict(v) for k, v in tokens.items()})
    manifest = Manifest(seq_len=plan["seq_len"], vocab_size=plan["vocab_size"], mask_id=plan["mask_id"],
                        pad_id=plan["pad_id"], bos_id=plan["bos_id"], eos_id=plan["eos_id"],
                        tokenizer_hash=plan["tokenizer_hash"], data_hash=plan["data_hash"], dtype=plan["dtype"],
                        sets=entries, corpus=plan["corpus"], targets=list(plan["targets"]),
                        tokenizer_file=plan["tokenizer_file"], info=info, root=root)
    atomic_write_json(root / MANIFEST_NAME, manifest.to_dict())
    shutil.rmtree(root / PARTS_DIR, ignore_errors=True)
    return manifest


# -- repair -----------------------------------------------------------------------------------

def repair(manifest: Manifest) -> list[str]:
    """Verify every shard against the manifest (size, then sha256) and rebuild each damaged one
    (missing, truncated, corrupted) alone from its build unit; returns the names rebuilt.
    Verifying takes no lock (a read-only shards.dir verifies); rebuilding holds the build lock and
    checks again first, as an overlapping builder may have rebuilt the shards meanwhile."""
    root = manifest.root
    suspect = [shard for shard, _ in _damaged(manifest, [s for e in manifest.sets.values() for s in e.shards])]
    if not suspect:
        return []
    with _build_lock(root):
        damaged = _damaged(manifest, suspect)
        by_unit: dict[str, list[ShardInfo]] = {}
        for shard, problem in damaged:
            log.warning("%s: %s; rebuilding it from build unit %s", root / shard.name, problem, shard.unit)
            by_unit.setdefault(shard.unit, []).append(shard)
        if by_unit:
            plan = load_plan(root)
            units = {u.name: u for u in plan_units(plan)}
            tokenizer = plan_tokenizer(plan, root)
            for name, shards in by_unit.items():
                _rebuild_shards(plan, root, units[name], tokenizer, shards)
    return [shard.name for shard, _ in damaged]


def _damaged(manifest: Manifest, shards: list[ShardInfo]) -> list[tuple[ShardInfo, str]]:
    """The shards that fail verification, each with its problem."""
    root = manifest.root
    damaged = []
    for shard in shards:
        problem = shard_problem(root / shard.name, shard)
        if problem and shard.unit is None:
            raise BuildError(f"{root / shard.name}: {problem}; {manifest.path} predates per-shard build "
                             f"units, so the shard cannot be rebuilt alone: rebuild all with "
                             f"{build_command(root, '--rebuild')}")
        if problem:
            damaged.append((shard, problem))
    return damaged


def _rebuild_shards(plan: dict[str, Any], root: Path, unit: Unit, tokenizer: Tokenizer | None,
                    shards: list[ShardInfo]) -> None:
    chunks, _, _ = unit_chunks(plan, root, unit, tokenizer)
    per = plan["samples_per_shard"]
    for shard in shards:
        path = root / shard.name
        write_shard(path, chunks[shard.part * per:(shard.part + 1) * per], part_key(unit.name, shard.part),
                    np.dtype(plan["dtype"]))
        problem = shard_problem(path, shard)
        if problem:
            raise BuildError(f"{path}: rebuilt from build unit {unit.name}, but {problem} (the corpus or "
                             f"tokenizer in {root} changed since the build); rebuild all with "
                             f"{build_command(root, '--rebuild')}")
