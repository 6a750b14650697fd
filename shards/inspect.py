"""Inspect a built data directory before spending cluster time on it: the sets, per domain the
documents, tokens (before chunking) and sequences of the train/test split, the target fractions,
the corpus lines skipped as malformed, a sha256 check of every shard and a few decoded samples.

    python shards/inspect.py runs/demo/data
    python shards/inspect.py runs/demo/data --shard-set numpy/train --samples 5 --no-verify
    python shards/inspect.py runs/mine/data --config runs/mine/config.yaml

With --config, each target fraction's n_T is also split into training and held-out sequences as
the config's protocol splits it, and a fraction that leaves none to train on is flagged.
Exits with status 1 if a shard is missing or does not match its recorded size and sha256, or if
(with --config) a fraction leaves no training sequence.
"""

import os
import sys

# This file is named like the standard library's `inspect`, which dataclasses, torch and others
# import: drop this folder from the import path before importing anything that would find it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402

from gtl_dist.config import ConfigError, load_config  # noqa: E402
from gtl_dist.data.corpus import skip_summary  # noqa: E402
from gtl_dist.data.manifest import Manifest, ManifestError, verify_shard  # noqa: E402
from gtl_dist.data.prepare import describe, fraction_sizes  # noqa: E402
from gtl_dist.data.shards import ShardError, read_shard  # noqa: E402
from gtl_dist.data.tokenizer import Tokenizer  # noqa: E402
from gtl_dist.log import Progress, setup_logging  # noqa: E402


SHOWN_INFO = ("documents", "domain_documents", "tokens", "tokens_dropped", "corpus_lines")


def domain_table(manifest: Manifest) -> list[str]:
    """Per domain and set: documents, tokens before chunking, sequences ("-": not recorded)."""
    docs, tokens = manifest.info.get("domain_documents", {}), manifest.info.get("tokens", {})
    found = dict.fromkeys(d for e in manifest.sets.values() for d in e.domains)
    domains = [d for d in found if d not in manifest.targets] + [d for d in manifest.targets if d in found]
    lines = [f"per domain (documents -> tokens before chunking -> sequences of {manifest.seq_len} tokens):",
             f"  {'domain':<16} {'set':<24} {'documents':>10} {'tokens':>12} {'sequences':>10}"]
    for domain in domains:
        for name, entry in manifest.sets.items():
            if domain in entry.domains:
                n_docs, n_tok = docs.get(name, {}).get(domain, "-"), tokens.get(name, {}).get(domain, "-")
                overlap = "  (overlap)" if name == "source/train" and domain in manifest.targets else ""
                lines.append(f"  {domain:<16} {name:<24} {n_docs:>10} {n_tok:>12} "
                             f"{entry.domains[domain]:>10}{overlap}")
    if "tokens_dropped" in manifest.info:
        lines.append(f"  tokens dropped (the last partial chunk of each build unit and domain): "
                     f"{manifest.info['tokens_dropped']}")
    return lines


def fraction_lines(manifest: Manifest, cfg) -> list[str]:
    """Each target fraction's n_T (and, with a config, its training and held-out parts)."""
    lines = ["target fractions (nested prefixes of <target>/train, in sequences"
             + ("; --config splits each n_T as its protocol does):" if cfg is None else "):")]
    if cfg is None:
        for target in manifest.targets:
            fractions = sorted((manifest.sets[f"{target}/train"].fractions or {}).items(), key=lambda kv: -float(kv[0]))
            lines.append(f"  {target:<16} " + ", ".join(f"{k} -> n_T {v}" for k, v in fractions))
        return lines
    for s in fraction_sizes(cfg, manifest):
        flag = (f"  NO TRAINING SEQUENCE: the protocol holds out {s.held_out} of {s.n_t}; raise the fraction "
                f"or lower protocol.holdout_min" if s.train < 1 else "")
        lines.append(f"  {s.target:<16} {s.fraction:>6g}  n_T {s.n_t:>8} = {max(s.train, 0):>8} train + "
                     f"{min(s.held_out, s.n_t):>6} held out (protocol.selection={cfg.protocol.selection}){flag}")
    return lines


def info_lines(manifest: Manifest) -> list[str]:
    lines = []
    if "domain_documents" not in manifest.info and "documents" in manifest.info:  # an older build
        lines.append("documents per set: " + ", ".join(f"{k} {v}" for k, v in manifest.info["documents"].items()))
    if "corpus_lines" in manifest.info:
        lines_info = manifest.info["corpus_lines"]
        lines.append(f"corpus lines of {lines_info['file']}: {skip_summary(lines_info)}")
    for key, value in manifest.info.items():
        if key not in SHOWN_INFO:
            lines.append(f"  {key}: {value}")
    return lines


def _load_config(args):
    if not args.config:
        return None
    return load_config(args.config, args.overrides)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python shards/inspect.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="folder with manifest.json (e.g. runs/<run>/data)")
    parser.add_argument("--shard-set", dest="set_name", metavar="SET",
                        help="only this set of shards, e.g. source/train (default: all)")
    parser.add_argument("--samples", type=int, default=2, help="decoded samples to print per set (default 2)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check")
    parser.add_argument("--config", action="append", metavar="YAML",
                        help="the run's config (repeatable): split each fraction into training and "
                             "held-out sequences as its protocol does")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of --config, as for launchers/submit.py, e.g. --set "
                             "protocol.holdout_min=1 (repeatable)")
    args = parser.parse_args(argv)
    if args.overrides and not args.config:
        parser.error("--set goes with --config")
    try:
        cfg = _load_config(args)
        manifest = Manifest.load(args.data_dir)
        names = [args.set_name] if args.set_name else list(manifest.sets)
        for name in names:
            manifest.get_set(name)
    except (ManifestError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(manifest))
    print(f"data hash {manifest.data_hash}, tokenizer hash {manifest.tokenizer_hash}, corpus {manifest.corpus}")
    if cfg is not None and cfg.data_hash() != manifest.data_hash:
        print(f"note: --config has data hash {cfg.data_hash()}, not this build's: the fractions below use "
              f"its protocol on this build's sequences")
    print("\n".join(domain_table(manifest) + fraction_lines(manifest, cfg) + info_lines(manifest)))
    status = 0
    if cfg is not None and any(s.train < 1 for s in fraction_sizes(cfg, manifest)):
        status = 1
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
        status = 1 if bad else status
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
