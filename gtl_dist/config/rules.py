"""The config's error and the rule helpers every section's ``check`` is written with."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration problem, with the file and key it comes from."""


def require(ok: bool, key: str, msg: str) -> None:
    """A rule of a section: ``key`` (relative to the section) and what is wrong, with the fix."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def require_at_least(section: Any, minimum: int, *keys: str) -> None:
    for key in keys:
        require(getattr(section, key) >= minimum, key, f"must be at least {minimum}")


def require_in(value: float, lo: float, hi: float, key: str, closed: str = "()") -> None:
    """``value`` in the interval from ``lo`` to ``hi``, ``closed`` saying which ends belong."""
    above = value >= lo if closed[0] == "[" else value > lo
    below = value <= hi if closed[1] == "]" else value < hi
    require(above and below, key, f"{value} is outside {closed[0]}{lo:g}, {hi:g}{closed[1]}")
