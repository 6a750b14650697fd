"""The run directory's identity.

A run directory belongs to one configuration: ``config.yaml`` (the resolved config) and
``config.json`` (its hash) are written the first time, and a later submission with a different
configuration is refused, naming the keys that differ. Only the ``cluster`` section (partition,
time limits, ...) and the execution-only keys (``config.EXECUTION_ONLY_KEYS``, e.g.
``train.<stage>.compile``) may change between submissions: they say where or how jobs run, not
what they compute.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from gtl_dist.cluster.options import LaunchError
from gtl_dist.config import RunConfig, config_from_dict, execution_only, is_unset, unset_unhashed
from gtl_dist.io import atomic_write_json, atomic_write_text
from gtl_dist.paths import RunPaths

# Sections a re-submission may change.
MUTABLE_SECTIONS = ("cluster",)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every differing key outside the mutable sections and the
    execution-only keys (an unset UNSET_UNHASHED_KEYS key equals an absent one)."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in MUTABLE_SECTIONS or execution_only(key):
            continue
        if unset_unhashed(key) and is_unset(key, a.get(key)) and is_unset(key, b.get(key)):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return diffs


def check_writable(run_dir: Path) -> None:
    """Refuse a run directory this process cannot create or write, before anything is queued:
    the nearest folder of ``run_dir`` that exists must be a writable folder."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LaunchError(f"--run-dir {run_dir}: {existing} is a file, so no run directory can be made "
                          f"below it; choose another --run-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LaunchError(f"--run-dir {run_dir}: {existing} cannot be written by this user (permission "
                          f"or a read-only filesystem); choose a --run-dir you can write, e.g. under your "
                          f"home or your cluster's shared scratch")


def prepare_run_dir(cfg: RunConfig, run_dir: str | Path, update: bool = False,
                    write: bool = True) -> RunPaths:
    """Create the run directory for ``cfg``, or check that it was made by the same config.

    ``update=True`` lets the run directory adopt a changed config instead (e.g. another γ): the
    completion markers' input hashes then decide what is stale, so only the tasks whose inputs
    changed run again. ``write=False`` only checks (submit.py --plan, --dry-run).
    """
    paths = RunPaths(run_dir)
    if paths.config_yaml.is_file():
        saved = yaml.safe_load(paths.config_yaml.read_text())
        diffs = config_differences(saved, cfg.to_dict())
        if diffs and update:
            print("updating the run's config; changed keys (run dir -> now):\n  " + "\n  ".join(diffs))
        elif diffs:
            shown = "\n  ".join(diffs[:20]) + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
            raise ValueError(
                f"{paths.config_yaml}: this run directory was made by a different config; "
                f"differing keys (run dir -> now):\n  {shown}\n"
                f"Use a new --run-dir for the new config, resubmit with the run's own config "
                f"(--config {paths.config_yaml}), or pass --update-config to rerun only what the "
                f"changes affect.")
        else:
            saved_cfg = config_from_dict(saved, str(paths.config_yaml), strict=False)
            if saved_cfg == cfg:  # else only mutable keys changed: record the new values
                return paths
    if not write:
        return paths
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.config_yaml, cfg.to_yaml())
    atomic_write_json(paths.config_json, {"hash": cfg.hash(), "name": cfg.name})
    return paths
