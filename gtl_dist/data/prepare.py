"""From a config to a checked data directory: ``prepare_data`` builds it, ``load_run_manifest``
finds a built one."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from gtl_dist.config import RunConfig
from gtl_dist.data.build import clean, data_dir, data_hash, finalize, prepare, repair, run_slice
from gtl_dist.data.manifest import MANIFEST_NAME, Manifest, ManifestError, build_command
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


def prepare_data(cfg: RunConfig, run_dir: str | Path, *, rebuild: bool = False) -> Manifest:
    """Corpus -> split -> tokenizer -> shards -> manifest, in ``shards.dir`` or ``<run_dir>/data``.

    Idempotent: an up-to-date manifest (same data hash) is returned once every shard it lists is
    verified (size, sha256), a damaged shard first rebuilt alone from its build unit; an
    interrupted build resumes without redoing finished steps, units or shards. A folder built from another
    data/tokenizer/shards config is an error unless ``rebuild`` (which deletes that build first).
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
            return manifest
    prepare(cfg, root)  # refuses a folder that holds another configuration's build
    run_slices(root, cfg.shards.build_workers)
    manifest = finalize(root)
    log.info("built %s", describe(manifest))
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
