"""``manifest.json``: what a data directory holds, written last by the build and checked by readers.

It records the sequence length, the vocabulary and its special ids (null where a corpus has no
such token), the tokenizer hash, the data hash (``cfg.data_hash()``),
the token dtype and, per set, every shard's sample count, size, sha256 and the build unit that
wrote it (so the build can rebuild one damaged shard alone). Target training sets
also record the sample count of each target fraction: fraction f is the PREFIX of the first
round(f * N) samples in shard order, so smaller fractions are subsets of larger ones.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from gtl_dist.data.sets import SPLITS
from gtl_dist.data.shards import ShardError
from gtl_dist.data.tokenizer import TokenizerMismatch
from gtl_dist.io import read_json, sha256_file
from gtl_dist.paths import RunPaths

FORMAT = "gtl_dist.shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest that is missing, damaged, from another format version, or asked for something it lacks."""


def build_command(root: str | os.PathLike, *flags: str, run_dir: str | os.PathLike | None = None) -> str:
    """The ``shards/build.py`` command that builds the data in ``root`` (re-running it verifies
    every shard and rebuilds only the damaged ones). A caller that names ``run_dir`` has a config of
    its own, so that stays a placeholder; otherwise a run directory whose ``data/`` is ``root`` and
    that holds the run's config.yaml (as launchers/submit.py writes it) fills in both."""
    config = "<config>"
    if run_dir is None:
        run = RunPaths(Path(root).parent)
        if run.data == Path(root) and run.config_yaml.is_file():
            config, run_dir = run.config_yaml, run.root
    return " ".join(["python shards/build.py --config", str(config), "--run-dir", str(run_dir or "<run_dir>"),
                     *flags])


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest's folder
    samples: int
    bytes: int
    sha256: str
    # The build unit that wrote it and its position there (what rebuilds this shard alone);
    # None in manifests written before they were recorded.
    unit: Optional[str] = None
    part: Optional[int] = None


@dataclass
class ShardSet:
    shards: list[ShardInfo]
    domains: dict[str, int]  # samples per domain
    # Target training sets only: fraction name ("1", "0.3", ...) -> number of leading samples.
    fractions: Optional[dict[str, int]] = None

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)


def fraction_count(fraction: float, total: int) -> int:
    return round(fraction * total)


@dataclass
class Manifest:
    seq_len: int
    vocab_size: int
    mask_id: int
    pad_id: Optional[int]
    bos_id: Optional[int]
    eos_id: Optional[int]
    tokenizer_hash: str
    data_hash: str
    dtype: str
    sets: dict[str, ShardSet]
    corpus: str = ""
    targets: list[str] = field(default_factory=list)
    # Tokenizer file next to the manifest (None for Markov data, whose ids are chain states).
    tokenizer_file: Optional[str] = None
    # Provenance: documents per set (and per set and domain), tokens per set and domain before
    # chunking, tokens dropped, corpus lines skipped as malformed (by reason), corpus versions.
    info: dict[str, Any] = field(default_factory=dict)
    root: Path = field(default=Path("."), compare=False)  # the folder that holds the manifest

    # -- loading and saving -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        """Load and validate ``manifest.json`` (or the folder that holds it)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest (the data was never built, or its build did not "
                                f"finish); build it with: {build_command(path.parent)}")
        try:
            raw = read_json(path)
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
        return cls.from_dict(raw, path)

    @classmethod
    def from_dict(cls, raw: Any, path: Path) -> "Manifest":
        def bad(msg: str) -> ManifestError:
            return ManifestError(f"{path}: {msg}; rebuild the data: {build_command(path.parent, '--rebuild')}")

        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise bad(f"not a {FORMAT} manifest")
        if raw.get("format_version") != FORMAT_VERSION:
            raise bad(f"format version {raw.get('format_version')!r}, this gtl_dist reads version "
                      f"{FORMAT_VERSION}")
        required = {"seq_len": int, "vocab_size": int, "mask_id": int, "tokenizer_hash": str,
                    "data_hash": str, "dtype": str, "sets": dict}
        for key, tp in required.items():
            if not isinstance(raw.get(key), tp):
                raise bad(f"key '{key}' is missing or not a {tp.__name__}")
        for key in ("pad_id", "bos_id", "eos_id"):
            if raw.get(key) is not None and not isinstance(raw[key], int):
                raise bad(f"key '{key}' must be an integer or null")
        sets = {}
        # JSON keys are stored sorted; present the sets in build order (source first, then targets).
        order = {name: i for i, name in enumerate(
            f"{n}/{split}" for n in ["source"] + list(raw.get("targets", [])) for split in SPLITS)}
        for name, entry in sorted(raw["sets"].items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
            try:
                shards = [ShardInfo(**s) for s in entry["shards"]]
                sets[name] = ShardSet(shards, dict(entry["domains"]), entry.get("fractions"))
            except (KeyError, TypeError) as exc:
                raise bad(f"set '{name}' is malformed ({exc})") from None
        fields = {k: raw.get(k) for k in ("seq_len", "vocab_size", "mask_id", "pad_id", "bos_id", "eos_id",
                                         "tokenizer_hash", "data_hash", "dtype", "tokenizer_file")}
        return cls(**fields, sets=sets, corpus=raw.get("corpus", ""), targets=list(raw.get("targets", [])),
                   info=dict(raw.get("info", {})), root=path.parent)

    def to_dict(self) -> dict[str, Any]:
        out = {"format": FORMAT, "format_version": FORMAT_VERSION}
        out.update({k: v for k, v in asdict(self).items() if k != "root"})
        return out

    # -- queries -------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def tokenizer_path(self) -> Optional[Path]:
        return self.root / self.tokenizer_file if self.tokenizer_file else None

    def get_set(self, set_name: str) -> ShardSet:
        if set_name not in self.sets:
            raise ManifestError(f"{self.path}: no set '{set_name}'; it has {', '.join(self.sets)}")
        return self.sets[set_name]

    def num_samples(self, set_name: str, fraction: float | None = None) -> int:
        """Samples in a set, or in a target-fraction prefix of a target training set."""
        entry = self.get_set(set_name)
        if fraction is None:
            return entry.num_samples
        if not set_name.endswith("/train") or set_name.startswith("source/"):
            raise ManifestError(f"{self.path}: fraction={fraction} applies to target training sets "
                                f"only, not '{set_name}'")
        if not 0.0 < fraction <= 1.0:
            raise ManifestError(f"fraction {fraction} is outside (0, 1]")
        total = entry.num_samples
        count = fraction_count(fraction, total)
        if count == 0:
            target = set_name.split("/")[0]
            raise ManifestError(f"{self.path}: target '{target}' at fraction {fraction} keeps "
                                f"round({fraction} * {total}) = 0 of its N={total} training samples; "
                                f"use a larger fraction or more target data")
        return count

    def shard_files(self, set_name: str, fraction: float | None = None, drop_last: int = 0,
                    start: int = 0, held_at: int | None = None) -> list[tuple[Path, int, int]]:
        """(path, samples to skip, samples to read) per piece of shard: the set, or the window of
        a target fraction's count of samples that begins at sample ``start`` (a replicate's draw,
        gtl_dist/config/protocol.py ``replicate_start``; read cyclically, so it may wrap to the
        set's first shard), less the block of ``drop_last`` samples at offset ``held_at`` of the
        window (a held-out part, docs/method.md §12; by default its last samples)."""
        count = self.num_samples(set_name, fraction)
        held_at = count - drop_last if held_at is None else held_at
        if count - drop_last < 1:
            raise ManifestError(f"{self.path} [{set_name}]: holding out {drop_last} of "
                                f"{count} samples leaves none to read")
        if not 0 <= held_at <= count - drop_last:
            raise ManifestError(f"{self.path} [{set_name}]: a held-out block of {drop_last} samples at "
                                f"offset {held_at} falls outside the window of {count}")
        shards = self.get_set(set_name).shards
        total = sum(s.samples for s in shards)
        if not 0 <= start < total:
            raise ManifestError(f"{self.path} [{set_name}]: a window starting at sample {start} is "
                                f"outside its {total} samples")
        spans = [(start, held_at), ((start + held_at + drop_last) % total, count - held_at - drop_last)]
        return [piece for first, length in spans if length > 0 for piece in self._pieces(shards, first, length)]

    def _pieces(self, shards: list, start: int, length: int) -> list[tuple[Path, int, int]]:
        """The pieces of ``length`` samples from sample ``start`` on, wrapping once at the end."""
        out, remaining = [], length
        for lap in range(2):  # from `start` to the end, then from the beginning
            first = 0
            for shard in shards:
                lo = max(start - first, 0) if lap == 0 else 0
                take = min(shard.samples - lo, remaining)
                if take > 0:
                    out.append((self.root / shard.name, lo, take))
                    remaining -= take
                first += shard.samples
                if remaining <= 0:
                    return out
        return out

    def num_shards(self, set_name: str, fraction: float | None = None, drop_last: int = 0) -> int:
        """Shards a reader of this set (and fraction) splits over ranks x workers."""
        return len(self.shard_files(set_name, fraction, drop_last))

    def check_tokenizer(self, expected_hash: str | None) -> None:
        if expected_hash is not None and expected_hash != self.tokenizer_hash:
            raise TokenizerMismatch(
                f"{self.path}: tokenizer hash {self.tokenizer_hash[:12]}… does not match the expected "
                f"{expected_hash[:12]}… (these shards were built with another tokenizer than the model "
                f"or checkpoint that reads them; rebuild the data or point to the matching run)")

    def verify(self, set_names: list[str] | None = None) -> None:
        """Check that every shard of the named sets (default all) exists with its recorded sha256."""
        for name in set_names if set_names is not None else list(self.sets):
            for shard in self.get_set(name).shards:
                verify_shard(self.root / shard.name, shard)


_VERIFIED: dict[tuple, str] = {}


def verify_shard(path: Path, shard: ShardInfo) -> None:
    """Raise a ShardError naming what is wrong with the shard and the command that rebuilds it."""
    problem = shard_problem(path, shard)
    if problem:
        raise ShardError(f"{path}: {problem}; rebuild the data (a re-run of the build rebuilds only the "
                         f"damaged shards): {build_command(path.parent)}")


def shard_problem(path: Path, shard: ShardInfo) -> Optional[str]:
    """What is wrong with the shard at ``path`` (missing, truncated or replaced, corrupted), or None.
    Size first, then sha256 (cached per process by inode, size and mtime, so ranks re-check cheaply)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "shard listed in the manifest is missing"
    if st.st_size != shard.bytes:
        return f"{st.st_size} bytes, the manifest says {shard.bytes} (truncated or replaced)"
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    digest = _VERIFIED.get(key) or sha256_file(path)
    if digest != shard.sha256:
        return f"sha256 {digest[:12]}… does not match the manifest's {shard.sha256[:12]}… (corrupted)"
    _VERIFIED[key] = digest
    return None
