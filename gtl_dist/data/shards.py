"""One shard on disk: packing token streams into chunks, writing and reading WebDataset tar files.

A sample is one fixed-length chunk of token ids: ``<key>.npy`` (the ids, in the smallest unsigned
dtype that holds the vocabulary) and ``<key>.json`` (``{"domain": ..., "doc_ids": [...]}``, the
documents the chunk overlaps). Tar headers carry a fixed mtime and owner, so the same samples
always give the same bytes -- the build's output is comparable by sha256. Keys contain no dots
(WebDataset splits a member name at its first dot).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gtl_dist.io import atomic_path


class ShardError(ValueError):
    """A shard on disk does not match its manifest entry (missing, truncated, corrupted)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every id below ``vocab_size``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


@dataclass
class Chunk:
    tokens: np.ndarray  # [seq_len]
    domain: str
    doc_ids: list[str]


def pack_documents(token_lists: list[list[int]], doc_ids: list[str], domain: str, seq_len: int,
                   bos_id: int, eos_id: int) -> tuple[list[Chunk], int]:
    """Join documents as ``bos doc eos bos doc eos ...`` and cut into ``seq_len`` chunks.

    Returns the chunks and the number of trailing tokens dropped (the leftover partial chunk:
    padding it would teach the model a padding distribution that generation never needs).
    """
    lengths = np.array([len(t) + 2 for t in token_lists], dtype=np.int64)
    if lengths.size == 0:
        return [], 0
    stream = np.empty(int(lengths.sum()), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for start, toks in zip(starts, token_lists):
        stream[start] = bos_id
        stream[start + 1:start + 1 + len(toks)] = toks
        stream[start + 1 + len(toks)] = eos_id
    num = len(stream) // seq_len
    ends = starts + lengths
    chunks = []
    for k in range(num):
        lo, hi = k * seq_len, (k + 1) * seq_len
        # Documents overlapping [lo, hi): start before hi and end after lo.
        first = int(np.searchsorted(ends, lo, side="right"))
        last = int(np.searchsorted(starts, hi, side="left"))
        chunks.append(Chunk(stream[lo:hi].copy(), domain, doc_ids[first:last]))
    return chunks, len(stream) - num * seq_len


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uname = info.gname = "gtl_dist"
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str | Path, chunks: list[Chunk], key_prefix: str, dtype: np.dtype) -> None:
    """Write ``chunks`` as one tar under a temporary name; rename it to ``path`` when complete.

    The layout is WebDataset's (members ``<key>.npy``, ``<key>.json`` in key order, USTAR headers),
    written with the standard library so a build does not import webdataset and with it torch.
    """
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, chunk in enumerate(chunks):
                key = f"{key_prefix}-{i:06d}"
                meta = {"domain": chunk.domain, "doc_ids": chunk.doc_ids}
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                _add_member(tar, f"{key}.npy", _npy_bytes(chunk.tokens.astype(dtype)))


def read_shard(path: str | Path, seq_len: int, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """All samples of one shard (the first ``limit`` if given): ids ``[n, seq_len]`` and domains."""
    import webdataset as wds  # imports torch: only readers pay for it

    tokens, domains = [], []
    for sample in wds.tarfile_samples([{"url": str(path)}]):
        if limit is not None and len(tokens) >= limit:
            break
        try:
            ids = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
            meta = json.loads(sample["json"])
        except (KeyError, ValueError) as exc:
            raise ShardError(f"{path}: sample {sample.get('__key__')} is damaged ({exc}); "
                             f"rebuild the shards") from None
        if ids.shape != (seq_len,):
            raise ShardError(f"{path}: sample {sample['__key__']} has shape {ids.shape}, the manifest "
                             f"says seq_len={seq_len}")
        tokens.append(ids)
        domains.append(meta["domain"])
    if not tokens:
        return np.zeros((0, seq_len), dtype=np.int64), []
    return np.stack(tokens), domains

