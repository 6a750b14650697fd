"""The low-data protocol's arithmetic (docs/method.md §12): which of a method's n_T target
sequences a run trains on and which it validates on, and where each replicate's draw of them
starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from gtl_dist.config.rules import ConfigError

if TYPE_CHECKING:
    from gtl_dist.config.run import ProtocolConfig


@dataclass(frozen=True)
class Split:
    """One run's use of a replicate's window of n_T target sequences: it validates on the block
    of ``held`` sequences at offset ``held_at`` of the window (none when ``held`` is 0) and
    trains on the rest."""
    n: int
    held: int
    held_at: int

    @property
    def n_train(self) -> int:
        return self.n - self.held


def holdout_count(n_target: int, protocol: ProtocolConfig) -> int:
    """How many of a method's n_T target sequences ``selection: holdout`` holds out (0 under budget,
    and under kfold, whose export is refitted on all of them)."""
    if protocol.selection != "holdout":
        return 0
    return max(protocol.holdout_min, round(protocol.holdout_fraction * n_target))


def fold_bounds(n_target: int, folds: int, fold: int) -> tuple[int, int]:
    """The offsets [start, stop) of fold ``fold``'s block of the window: ``folds`` contiguous
    blocks whose sizes differ by at most one."""
    return fold * n_target // folds, (fold + 1) * n_target // folds


def run_split(n_target: int, protocol: ProtocolConfig, fold: Optional[int] = None) -> Split:
    """The split of one run: fold ``fold`` of a kfold stage holds out its block; any other run
    (holdout, budget, a kfold stage's refit with ``fold`` None) holds out the window's last
    holdout_count sequences."""
    if protocol.selection == "kfold" and fold is not None:
        start, stop = fold_bounds(n_target, protocol.folds, fold)
        return Split(n_target, stop - start, start)
    held = holdout_count(n_target, protocol)
    return Split(n_target, held, n_target - held)


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


def check_split(n_target: int, protocol: ProtocolConfig, where: str, fold: Optional[int] = None) -> Split:
    """The split of one run (:func:`run_split`), or a ConfigError that says why the protocol
    cannot work at ``where`` and what to change."""
    if protocol.selection == "kfold" and protocol.folds > n_target:
        raise ConfigError(
            f"protocol.folds={protocol.folds} splits the {n_target} target sequences of {where} into "
            f"{protocol.folds} folds, and every fold must hold out at least one; lower protocol.folds "
            f"to at most {n_target}, use a larger fraction, or set protocol.selection=holdout")
    split = run_split(n_target, protocol, fold)
    if protocol.selection == "holdout" and split.n_train < 1:
        raise ConfigError(
            f"protocol.holdout_fraction={protocol.holdout_fraction} with protocol.holdout_min="
            f"{protocol.holdout_min} holds out {split.held} of the {n_target} target sequences of {where} "
            f"and leaves none to train on; lower protocol.holdout_min, use a larger fraction, or "
            f"set protocol.selection=budget (fixed training budget, no selection)")
    return split
