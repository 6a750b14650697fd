"""From a config to a checked data directory: ``prepare_data`` builds it, ``load_run_manifest``
finds a built one."""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gtl_dist.config import ConfigError, RunConfig, check_split, holdout_count
from gtl_dist.data.build import clean, data_dir, data_hash, finalize, prepare, repair, run_slice
from gtl_dist.data.manifest import MANIFEST_NAME, Manifest, ManifestError, build_command, fraction_count
from gtl_dist.log import get_logger

log = get_logger("data")


def run_slices(root: Path, num_slices: int) -> None:
    """Every slice, each in its own process (in this process when there is one)."""
    if num_slices == 1:
        run_slice(root, 0, 1)
        return
    # spawn, not fork: the caller may hold threads (torch, a tokenizer) that fork would copy mid-state.
    with ProcessPoolExecutor(num_slices, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(run_slice, root, i, num_slices) for i in range(num_slices)]:
            future.result()


def describe(manifest: Manifest) -> str:
    lines = [f"{manifest.root}: seq_len {manifest.seq_len}, vocab {manifest.vocab_size} "
             f"(mask {manifest.mask_id}), {manifest.dtype}, tokenizer {manifest.tokenizer_hash[:12]}"]
    for name, entry in manifest.sets.items():
        fractions = ("  fractions " + ", ".join(f"{k}: {v}" for k, v in entry.fractions.items())
                     if entry.fractions else "")
        lines.append(f"  {name:<24} {len(entry.shards):>5} shards {entry.num_samples:>9} samples "
                     f"{entry.num_samples * manifest.seq_len:>11} tokens{fractions}")
    return "\n".join(lines)


@dataclass(frozen=True)
class FractionSize:
    """One target fraction of the built data under the config's protocol (docs/method.md §12)."""
    target: str
    fraction: float
    total: int  # N: the target's training sequences (fraction 1)
    n_t: int  # round(fraction * N)
    held_out: int  # the last held_out of the n_T select checkpoints; the rest are trained on

    @property
    def train(self) -> int:
        return self.n_t - self.held_out


def fraction_sizes(cfg: RunConfig, manifest: Manifest) -> list[FractionSize]:
    out = []
    for target in manifest.targets:
        total = manifest.get_set(f"{target}/train").num_samples
        for f in cfg.data.target_fractions:
            n = fraction_count(f, total)
            out.append(FractionSize(target, f, total, n, holdout_count(n, cfg.protocol)))
    return out


def _smallest_trainable(cfg: RunConfig) -> int:
    """The smallest n_T that leaves a training sequence after the held-out part."""
    n = 1
    while n - holdout_count(n, cfg.protocol) < 1:
        n += 1
    return n


def _ceil_significant(x: float, digits: int = 2) -> float:
    """``x`` rounded up to ``digits`` significant digits (0.0731 -> 0.074)."""
    scale = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(round(x / scale, 6)) * scale


def _no_training_error(cfg: RunConfig, manifest: Manifest, s: FractionSize) -> ConfigError:
    p, need = cfg.protocol, _smallest_trainable(cfg)
    raise_to = (f"raise {s.fraction} in data.target_fractions to at least "
                f"{_ceil_significant(need / s.total):g} (n_T >= {need}; then rebuild the data with "
                f"--rebuild)" if need <= s.total else f"add target data (even fraction 1 has only N = {s.total})")
    return ConfigError(
        f"{manifest.path}: target '{s.target}' at fraction {s.fraction} has n_T = round({s.fraction} * {s.total}) "
        f"= {s.n_t} training sequences and protocol.selection=holdout holds out {s.held_out} of them "
        f"(max(protocol.holdout_min={p.holdout_min}, round(protocol.holdout_fraction={p.holdout_fraction} "
        f"* {s.n_t}))), which leaves none to train on. Fix: {raise_to}, or lower protocol.holdout_min, "
        f"or set protocol.selection=budget")


def check_target_fractions(cfg: RunConfig, manifest: Manifest) -> list[FractionSize]:
    """Refuse a target fraction that leaves no training sequence after its held-out part: a
    ConfigError naming the target, fraction, n_T, the held-out count and the fix. Fewer training
    sequences than a global batch are allowed (the loader cycles them: the Markov benchmark trains
    on 16 sequences with batches of 128, as the paper does)."""
    sizes = fraction_sizes(cfg, manifest)
    for s in sizes:
        if s.train < 1:
            raise _no_training_error(cfg, manifest, s)
        check_split(s.n_t, cfg.protocol, f"target '{s.target}' at fraction {s.fraction} ({manifest.path})")
    return sizes


def prepare_data(cfg: RunConfig, run_dir: str | Path, *, rebuild: bool = False) -> Manifest:
    """Corpus -> split -> tokenizer -> shards -> manifest, in ``shards.dir`` or ``<run_dir>/data``.

    Idempotent: an up-to-date manifest (same data hash) is returned once every shard it lists is
    verified (size, sha256), a damaged shard first rebuilt alone from its build unit; an
    interrupted build resumes without redoing finished steps, units or shards. A folder built from another
    data/tokenizer/shards config is an error unless ``rebuild`` (which deletes that build first).
    A target fraction that leaves nothing to train on after its held-out part is an error
    (``check_target_fractions``), raised once the data is built.
    """
    root = data_dir(cfg, run_dir)
    if rebuild:
        log.info("rebuilding %s from scratch", root)
        clean(root)
    if (root / MANIFEST_NAME).is_file():
        manifest = Manifest.load(root)
        if manifest.data_hash == data_hash(cfg):
            rebuilt = repair(manifest)
            log.info("data up to date in %s (every shard verified%s)", root,
                     f"; rebuilt the damaged {', '.join(rebuilt)}" if rebuilt else "")
            check_target_fractions(cfg, manifest)
            return manifest
    prepare(cfg, root)  # refuses a folder that holds another configuration's build
    run_slices(root, cfg.shards.build_workers)
    manifest = finalize(root)
    log.info("built %s", describe(manifest))
    check_target_fractions(cfg, manifest)
    return manifest


def load_run_manifest(cfg: RunConfig, run_dir: str | Path) -> Manifest:
    """The manifest of the run's built data, checked against ``cfg``: what every stage that reads
    shards or the tokenizer starts from.

    Missing -> says to build the data first; built from other data/tokenizer/shards settings
    (``cfg.data_hash()`` differs) -> names both hashes and the fix. Both are ManifestError.
    """
    root = data_dir(cfg, run_dir)
    if not (root / MANIFEST_NAME).is_file():
        raise ManifestError(
            f"{root / MANIFEST_NAME}: no shard manifest; build the data first: "
            f"{build_command(root, run_dir=run_dir)} (or gtl_dist.data.prepare_data(cfg, run_dir))")
    manifest = Manifest.load(root)
    want = data_hash(cfg)
    if manifest.data_hash != want:
        raise ManifestError(
            f"{manifest.path}: the shards were built from data/tokenizer/shards settings with hash "
            f"{manifest.data_hash}, the current config has {want}; rebuild the data "
            f"({build_command(root, '--rebuild', run_dir=run_dir)}) or use the config the run was built with")
    return manifest
