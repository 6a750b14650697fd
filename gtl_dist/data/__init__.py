"""The data layer: corpora, tokenizer, WebDataset shards with a manifest, and a resumable reader.

    prepare_data(cfg, run_dir) -> Manifest          build (or find) the run's shards
    load_run_manifest(cfg, run_dir) -> Manifest     a built run's manifest, checked against cfg
    Manifest.load(data_dir(cfg, run_dir))           the manifest alone (shards.dir aware), unchecked
    make_loader(manifest, "source/train", 64, ...)  stream batches of token ids
    data_hash(cfg)                                  what manifest.data_hash must equal for cfg

See gtl_dist/data/build.py for the build, gtl_dist/data/loader.py for the reader's contract, and
gtl_dist/data/markov.py for the synthetic chains and their exact math.
"""

from typing import Any

from gtl_dist.data.build import data_dir, data_hash
from gtl_dist.data.manifest import Manifest, ManifestError, ShardInfo, ShardSet
from gtl_dist.data.prepare import load_run_manifest, prepare_data

__all__ = ["Manifest", "ManifestError", "ShardInfo", "ShardSet", "ShardLoader", "data_dir", "data_hash",
           "load_run_manifest", "make_loader", "prepare_data", "read_samples"]


def __getattr__(name: str) -> Any:
    # The reader needs torch; the build (CLI, job-array tasks, spawned workers) does not, and
    # starts much faster without importing it.
    if name in ("ShardLoader", "make_loader", "read_samples"):
        from gtl_dist.data import loader
        return getattr(loader, name)
    raise AttributeError(f"module 'gtl_dist.data' has no attribute '{name}'")
