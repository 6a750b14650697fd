"""What a config hash covers: the named sections of the config, less the settings that say how
shards are built or a stage runs rather than what they compute."""

from __future__ import annotations

from typing import Any

from gtl_dist.io import dict_hash

# Settings that change how shards are built or where they go, but not a byte of what they hold
# (the build is independent of its worker count): excluded from every hash.
BUILD_ONLY_KEYS = ("shards.build_workers", "shards.dir")
# Settings that say how a training stage runs, not what it computes (torch.compile runs the same
# network and loss): excluded from every hash too, and free to change between submissions of a
# run (gtl_dist/cluster/run_dir.py), so switching one neither retrains a stage nor orphans its
# checkpoints. A "*" part stands for any one name: every stage.
EXECUTION_ONLY_KEYS = ("train.*.compile",)
# Settings added after run directories existed, hashed only when set (unset: None, or False for a
# switch): unset they change nothing a stage computes, so the tasks of an earlier run directory
# keep their hashes and stay done.
UNSET_UNHASHED_KEYS = ("train.*.weight_decay_grid", "models.adapter.offset")


def _get_path(d: Any, keys: list[str]) -> Any:
    for k in keys:
        d = d[k]
    return d


def _drop_path(d: dict[str, Any], keys: list[str], only_unset: bool = False) -> None:
    """Remove the dotted path ``keys`` from ``d`` (with ``only_unset``, only where its value is
    None or False); a "*" part stands for every entry there."""
    head, *rest = keys
    if not rest:
        if not only_unset or is_unset(d[head]):
            del d[head]
        return
    for sub in (d.values() if head == "*" else [d[head]]):
        _drop_path(sub, rest, only_unset)


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    parts = key.split(".")
    return any(len(parts) == len(pattern) and all(p in ("*", k) for k, p in zip(parts, pattern))
               for pattern in (k.split(".") for k in patterns))


def is_unset(value: Any) -> bool:
    """Whether an UNSET_UNHASHED_KEYS value is unset: None (absent), or False for a switch."""
    return value is None or value is False


def execution_only(key: str) -> bool:
    """Whether the dotted ``key`` is one of EXECUTION_ONLY_KEYS."""
    return _matches(key, EXECUTION_ONLY_KEYS)


def unset_unhashed(key: str) -> bool:
    """Whether the dotted ``key`` is one of UNSET_UNHASHED_KEYS (absent, None and False mean the same)."""
    return _matches(key, UNSET_UNHASHED_KEYS)


def sections_hash(config: dict[str, Any], paths: tuple[str, ...]) -> str:
    """Hash of the dotted ``paths`` of the plain ``config`` (changed in place: BUILD_ONLY_KEYS and
    EXECUTION_ONLY_KEYS are dropped from it first, and UNSET_UNHASHED_KEYS where unset)."""
    for key in BUILD_ONLY_KEYS + EXECUTION_ONLY_KEYS:
        _drop_path(config, key.split("."))
    for key in UNSET_UNHASHED_KEYS:
        _drop_path(config, key.split("."), only_unset=True)
    return dict_hash({p: _get_path(config, p.split(".")) for p in paths})
