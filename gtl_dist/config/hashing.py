"""What a config hash covers: the named sections of the config, less the settings that say how
shards are built or a stage runs rather than what they compute."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from gtl_dist.io import dict_hash

# Settings that change how shards are built or where they go, but not a byte of what they hold
# (the build is independent of its worker count): excluded from every hash.
BUILD_ONLY_KEYS = ("shards.build_workers", "shards.dir")
# Settings that say how a training stage runs, not what it computes (torch.compile runs the same
# network and loss): excluded from every hash too, and free to change between submissions of a
# run (gtl_dist/cluster/run_dir.py), so switching one neither retrains a stage nor orphans its
# checkpoints. A "*" part stands for any one name: every stage.
EXECUTION_ONLY_KEYS = ("train.*.compile",)
# Settings added after run directories existed, hashed only when set, with the value that means
# unset (besides None, an absent key): unset they change nothing a stage computes, so the tasks of
# an earlier run directory keep their hashes and stay done.
UNSET_UNHASHED_KEYS = {"train.*.weight_decay_grid": None, "train.*.model_grid": None,
                       "models.adapter.offset": False, "models.adapter.heads": 1, "protocol.folds": 5}


def _get_path(d: Any, keys: list[str]) -> Any:
    for k in keys:
        d = d[k]
    return d


def _drop_path(d: dict[str, Any], keys: list[str], unset: Any = ...) -> None:
    """Remove the dotted path ``keys`` from ``d`` (where ``unset`` is given, only where its value
    is None or ``unset``); a "*" part stands for every entry there."""
    head, *rest = keys
    if not rest:
        if unset is ... or d[head] is None or d[head] == unset:
            del d[head]
        return
    for sub in (d.values() if head == "*" else [d[head]]):
        _drop_path(sub, rest, unset)


def _matching(key: str, patterns: Iterable[str]) -> Optional[str]:
    """The first of ``patterns`` (dotted, "*" for any one name) that the dotted ``key`` matches."""
    parts = key.split(".")
    return next((pattern for pattern in patterns if len(parts) == len(pattern.split("."))
                 and all(p in ("*", k) for k, p in zip(parts, pattern.split(".")))), None)


def is_unset(key: str, value: Any) -> bool:
    """Whether ``value`` is the UNSET_UNHASHED_KEYS ``key``'s unset value: None (absent), or the
    value the table gives it."""
    return value is None or value == UNSET_UNHASHED_KEYS[_matching(key, UNSET_UNHASHED_KEYS)]


def execution_only(key: str) -> bool:
    """Whether the dotted ``key`` is one of EXECUTION_ONLY_KEYS."""
    return _matching(key, EXECUTION_ONLY_KEYS) is not None


def unset_unhashed(key: str) -> bool:
    """Whether the dotted ``key`` is one of UNSET_UNHASHED_KEYS (absent, None and its unset value
    mean the same)."""
    return _matching(key, UNSET_UNHASHED_KEYS) is not None


def sections_hash(config: dict[str, Any], paths: tuple[str, ...]) -> str:
    """Hash of the dotted ``paths`` of the plain ``config`` (changed in place: BUILD_ONLY_KEYS and
    EXECUTION_ONLY_KEYS are dropped from it first, and UNSET_UNHASHED_KEYS where unset)."""
    for key in BUILD_ONLY_KEYS + EXECUTION_ONLY_KEYS:
        _drop_path(config, key.split("."))
    for key, unset in UNSET_UNHASHED_KEYS.items():
        _drop_path(config, key.split("."), unset)
    return dict_hash({p: _get_path(config, p.split(".")) for p in paths})
