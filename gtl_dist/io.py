"""Atomic file writes and checksums.

Every artefact a later stage trusts (shards, manifests, checkpoints markers, exports, reports)
is written to a temporary name in the same directory, flushed to disk and renamed into place,
so a killed process never leaves a file that looks complete. The temporary files and folders
get the permissions the process umask gives (0o666 / 0o777 less the umask, as ``open`` and
``mkdir`` would), not ``tempfile``'s owner-only 0o600 / 0o700, so colleagues can read the outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fresh(parent: Path, prefix: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """A new, uniquely named path in ``parent``, made by ``create`` (which must fail if it exists).
    The kernel applies the umask to ``create``'s mode, so nothing reads or changes the umask."""
    path = parent / f"{prefix}{secrets.token_hex(8)}{suffix}"
    create(path)
    return path


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _new_dir(path: Path) -> None:
    os.mkdir(path, 0o777)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    The caller writes the file itself (e.g. ``torch.save(obj, tmp)``). On any exception the
    temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(path.parent, f".{path.name}.", ".tmp", _new_file)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; if the block succeeds it replaces
    ``path`` as a whole (the old folder is moved aside, then deleted), so ``path`` never holds a
    half-written set of files. On any exception the temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = _fresh(path.parent, f".{path.name}.new-", "", _new_dir)
    try:
        yield fresh
        stale = None
        if path.exists():
            stale = _fresh(path.parent, f".{path.name}.old-", "", _new_dir)
            os.replace(path, stale / path.name)
        os.replace(fresh, path)
        fsync_dir(path.parent)
        if stale is not None:
            shutil.rmtree(stale)
    finally:
        if fresh.exists():
            shutil.rmtree(fresh)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in the error if it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); the file is damaged, "
                         f"delete it and re-run the step that writes it") from None


def read_json_lines(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a line being written, or cut short by a kill, is skipped,
    and a log not started yet has none."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dict_hash(obj: Any) -> str:
    """Short stable hash of JSON-able data (key order does not count): config and input hashes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
