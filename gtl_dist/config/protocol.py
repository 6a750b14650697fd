"""The low-data protocol's arithmetic (docs/method.md §12): how many of a method's n_T target
sequences are held out, and where each replicate's draw of them starts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gtl_dist.config.rules import ConfigError

if TYPE_CHECKING:
    from gtl_dist.config.run import ProtocolConfig


def holdout_count(n_target: int, protocol: ProtocolConfig) -> int:
    """How many of a method's n_T target sequences it holds out for selection (0 under budget)."""
    if protocol.selection != "holdout":
        return 0
    return max(protocol.holdout_min, round(protocol.holdout_fraction * n_target))


def replicate_start(n_total: int, n_target: int, replicate: int, protocol: ProtocolConfig) -> int:
    """The first of replicate ``replicate``'s n_T samples in a target training set of ``n_total``
    (the rest follow it, wrapping at the end): block ``replicate`` under ``redraw``, the shared
    prefix under ``shared`` (protocol.replicates)."""
    return (replicate * n_target) % n_total if protocol.replicates == "redraw" else 0


def replicates_disjoint(n_total: int, n_target: int, replicates: list[int], protocol: ProtocolConfig) -> bool:
    """Whether the replicates' draws of n_T samples share no sample (always true of one replicate)."""
    if len(replicates) < 2:
        return True
    return protocol.replicates == "redraw" and (max(replicates) + 1) * n_target <= n_total


def check_holdout(n_target: int, protocol: ProtocolConfig, where: str) -> tuple[int, int]:
    """(training, held-out) sequence counts of one target fraction, or a ConfigError that says
    why the protocol cannot work there and what to change."""
    held = holdout_count(n_target, protocol)
    if protocol.selection == "holdout" and n_target - held < 1:
        raise ConfigError(
            f"protocol.holdout_fraction={protocol.holdout_fraction} with protocol.holdout_min="
            f"{protocol.holdout_min} holds out {held} of the {n_target} target sequences of {where} "
            f"and leaves none to train on; lower protocol.holdout_min, use a larger fraction, or "
            f"set protocol.selection=budget (fixed training budget, no selection)")
    return n_target - held, held
