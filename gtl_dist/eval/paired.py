"""Paired comparisons over independent replicates (docs/method.md §12).

Replicate s of every method saw the same n_T target sequences (protocol.replicates: redraw) and
is scored on the same held-out data, so the question "is method A better than B" is asked of the
paired differences d_s = A_s − B_s, not of two separately averaged means: which sequences were
drawn moves both methods alike, and the pairing removes it. The interval is Student's t at 95 %
over the replicates (the differences' own spread, n − 1 degrees of freedom).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from gtl_dist.eval.results import ResultRow

# Student's t, 97.5 % quantile, by degrees of freedom (two-sided 95 % interval).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile(df: int) -> float:
    """The 97.5 % quantile of Student's t (the nearest tabulated df at or below ``df``)."""
    return T_975[max(k for k in T_975 if k <= df)] if df <= 120 else 1.960


def t_interval(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, sample std, lower, upper) of a 95 % t-interval for the mean of ``values``."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def verdict(lower: float, upper: float) -> str:
    """How the reference fares against the other method on a lower-is-better difference
    (other − reference): "wins" when the whole interval is above 0, "loses" when below."""
    if math.isnan(lower):
        return "n/a"
    return "wins" if lower > 0 else "loses" if upper < 0 else "ties"


def paired_rows(per_seed: Mapping[tuple[str, Optional[float]], Mapping[int, Mapping[str, float]]],
                target: str, metrics: Sequence[str], fractions: Sequence[float],
                reference: str = "gtl") -> list[ResultRow]:
    """One row per (method, fraction, metric): the mean paired difference method − reference over
    the replicates both have, with its std, 95 % interval and the verdict in the notes.

    ``per_seed[(method, fraction)]`` maps seed -> metric values; a method that does not depend on
    the fraction (the source) is stored under fraction None and paired with every fraction."""
    rows = []
    for (method, fraction), seeds in per_seed.items():
        if method == reference:
            continue
        for f in [fraction] if fraction is not None else fractions:
            mine = per_seed.get((reference, f))
            if mine is None:
                continue
            common = sorted(set(seeds) & set(mine))
            for metric in metrics:
                if not common or metric not in seeds[common[0]] or metric not in mine[common[0]]:
                    continue
                diffs = [seeds[s][metric] - mine[s][metric] for s in common]
                mean, sd, lo, hi = t_interval(diffs)
                rows.append(ResultRow(method, target, f, f"paired_diff[{metric}]", mean,
                                      None if math.isnan(sd) else sd, len(diffs),
                                      f"{method} − {reference} over replicates {','.join(map(str, common))}; "
                                      f"{reference} {verdict(lo, hi)}", ci_low=lo, ci_high=hi))
    return rows
