"""Inspect a built data directory: the manifest, a sha256 check of every shard, a few decoded samples.

    python shards/inspect.py runs/demo/data
    python shards/inspect.py runs/demo/data --set numpy/train --samples 5 --no-verify

Exits with status 1 if a shard is missing or does not match its recorded size and sha256.
"""

import os
import sys

# This file is named like the standard library's `inspect`, which dataclasses, torch and others
# import: drop this folder from the import path before importing anything that would find it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402

from gtl_dist.data.manifest import Manifest, ManifestError, verify_shard  # noqa: E402
from gtl_dist.data.prepare import describe  # noqa: E402
from gtl_dist.data.shards import ShardError, read_shard  # noqa: E402
from gtl_dist.data.tokenizer import Tokenizer  # noqa: E402
from gtl_dist.log import Progress, setup_logging  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python shards/inspect.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="folder with manifest.json (e.g. runs/<run>/data)")
    parser.add_argument("--set", dest="set_name", help="only this set, e.g. source/train (default: all)")
    parser.add_argument("--samples", type=int, default=2, help="decoded samples to print per set (default 2)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check")
    args = parser.parse_args(argv)
    try:
        manifest = Manifest.load(args.data_dir)
        names = [args.set_name] if args.set_name else list(manifest.sets)
        for name in names:
            manifest.get_set(name)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(manifest))
    print(f"data hash {manifest.data_hash}, tokenizer hash {manifest.tokenizer_hash}, corpus {manifest.corpus}")
    for key, value in manifest.info.items():
        print(f"  {key}: {value}")
    status = 0
    if not args.no_verify:
        shards = [s for name in names for s in manifest.sets[name].shards]
        bar = Progress(len(shards), "sha256", unit="shard")
        bad = []
        for shard in shards:
            try:
                verify_shard(manifest.root / shard.name, shard)
            except ShardError as exc:
                bad.append(str(exc))
            bar.update()
        bar.close()
        print(f"sha256: {len(shards) - len(bad)}/{len(shards)} shards OK")
        for line in bad:
            print(f"  BAD {line}")
        status = 1 if bad else 0
    tokenizer = Tokenizer(manifest.tokenizer_path, manifest.tokenizer_hash) if manifest.tokenizer_path else None
    for name in names:
        entry = manifest.sets[name]
        if args.samples <= 0 or not entry.shards:
            continue
        path = manifest.root / entry.shards[0].name
        try:
            tokens, domains = read_shard(path, manifest.seq_len, limit=args.samples)
        except (ShardError, OSError, ValueError) as exc:
            print(f"[{name}] cannot read {path.name}: {exc}")
            continue
        for i, (ids, domain) in enumerate(zip(tokens, domains)):
            text = tokenizer.decode(ids) if tokenizer else " ".join(map(str, ids.tolist()))
            print(f"[{name} #{i} {domain}] {text[:400]}")
    return status


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
