"""Reading the sample shards the sampling stage writes (docs/architecture.md, "Sampling and evaluation").

One folder per (method, target, fraction) (RunPaths.samples), holding ``shard-0000.jsonl`` ...
with one record per sample: ``{"tokens": [ids...], "text": str or null, "seed": int, "index": int}``.
Records are checked as they are read so a damaged shard is named with its line, not discovered
as a wrong number in the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

SHARD_GLOB = "shard-*.jsonl"


def shard_files(directory: Path) -> list[Path]:
    directory = Path(directory)
    files = sorted(directory.glob(SHARD_GLOB))
    if not files:
        raise FileNotFoundError(f"{directory}: no sample shards ({SHARD_GLOB}); run the sample "
                                f"stage for this method, target and fraction first")
    return files


def read_shard(path: Path) -> list[dict]:
    records = []
    with open(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc}); delete the shard and re-run "
                                 f"its sample task") from None
            tokens = rec.get("tokens") if isinstance(rec, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise ValueError(f"{where}: 'tokens' must be a list of token ids")
            if not isinstance(rec.get("index"), int):
                raise ValueError(f"{where}: 'index' must be an integer sample index")
            if rec.get("text") is not None and not isinstance(rec["text"], str):
                raise ValueError(f"{where}: 'text' must be a string or null")
            records.append(rec)
    return records


def read_samples(directory: Path, expected: Optional[int] = None) -> list[dict]:
    """Every record of every shard in ``directory``, ordered by sample index.

    ``expected`` (sample.num_samples) catches a missing shard: the indices must be 0..expected-1.
    """
    records = [rec for path in shard_files(directory) for rec in read_shard(path)]
    records.sort(key=lambda r: r["index"])
    indices = [r["index"] for r in records]
    if len(set(indices)) != len(indices):
        raise ValueError(f"{directory}: sample indices repeat across shards; shards from two "
                         f"different sampling runs are mixed; delete the folder and re-sample")
    if expected is not None and indices != list(range(expected)):
        raise ValueError(f"{directory}: {len(records)} samples with indices "
                         f"{indices[:1]}..{indices[-1:]}, expected 0..{expected - 1} "
                         f"(sample.num_samples = {expected}); a shard is missing or stale")
    return records
