"""Result rows: one number per (method, target, fraction, metric), and results.csv.

Every metric of every evaluation becomes a :class:`ResultRow`; the report, the plots and
TensorBoard are all drawn from the same list, and ``results.csv`` is that list on disk (numbers
written with Python's shortest round-tripping repr, so reading the file gives the rows back).
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

from gtl_dist.eval.mauve import MauveResult
from gtl_dist.io import atomic_write_text

CSV_COLUMNS = ("method", "target", "fraction", "metric", "value", "std", "n", "ci_low", "ci_high", "notes")


@dataclass(frozen=True)
class ResultRow:
    method: str            # gtl | source | vanilla | finetune, or a reference such as "target_chain"
    target: str
    # Target-data fraction the method was trained with; None where the method does not depend
    # on it (the source model, sampled once and scored against each target).
    fraction: Optional[float]
    metric: str            # e.g. "transition_mean_abs_err", "mauve[tfidf-svd]"
    value: float
    std: Optional[float] = None  # spread over seeds where the metric is repeated
    n: Optional[int] = None      # samples scored (replicates, for a paired difference)
    notes: str = ""              # featuriser, seeds, caveats
    ci_low: Optional[float] = None   # a 95 % interval, where the row has one (paired differences)
    ci_high: Optional[float] = None


def _fraction(fraction: Optional[float]) -> Optional[float]:
    return None if fraction is None else float(fraction)


def rows_from_metrics(method: str, target: str, fraction: Optional[float],
                      metrics: Mapping[str, float], n: Optional[int] = None,
                      notes: str = "") -> list[ResultRow]:
    """One row per entry of a metric dict (as returned by the metric modules)."""
    return [ResultRow(method, target, _fraction(fraction), name, float(value), None, n, notes)
            for name, value in metrics.items()]


def seed_rows(method: str, target: str, fraction: Optional[float],
              per_seed: Mapping[int, Mapping[str, float]], n: Optional[int] = None,
              notes: str = "") -> list[ResultRow]:
    """One row per metric over replicates (pipeline.seeds): the mean, the sample std (None for a
    single seed) and, in the notes, every seed's value."""
    seeds = sorted(per_seed)
    rows = []
    for metric in per_seed[seeds[0]]:
        values = [float(per_seed[s][metric]) for s in seeds]
        mean = sum(values) / len(values)
        std = None
        if len(values) > 1:
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        detail = "" if len(seeds) == 1 else (f"seeds {','.join(map(str, seeds))}: "
                                             + ", ".join(f"{v:.4g}" for v in values))
        rows.append(ResultRow(method, target, _fraction(fraction), metric, mean, std, n,
                              "; ".join(x for x in (detail, notes) if x)))
    return rows


def mauve_row(method: str, target: str, fraction: Optional[float], result: MauveResult,
              notes: str = "") -> ResultRow:
    detail = (f"{len(result.per_seed)} seeds, {result.num_buckets} clusters, length-matched "
              f"references")
    return ResultRow(method, target, _fraction(fraction), result.metric, result.mean, result.std,
                     result.n, f"{detail}; {notes}" if notes else detail)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def results_csv_text(rows: Iterable[ResultRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([_cell(getattr(r, c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def write_results_csv(path: str | os.PathLike, rows: Iterable[ResultRow]) -> Path:
    path = Path(path)
    atomic_write_text(path, results_csv_text(rows))
    return path


def seed_values(notes: str) -> dict[str, float]:
    """Seed -> value, from the notes of a row :func:`seed_rows` wrote ("seeds 0,1,2: a, b, c");
    empty for a row of one seed or none."""
    match = re.search(r"seeds ([\d,]+): ([^;]+)", notes)
    return dict(zip(match.group(1).split(","), map(float, match.group(2).split(", ")))) if match else {}


def read_results_csv(path: str | os.PathLike) -> list[ResultRow]:
    path = Path(path)
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != CSV_COLUMNS:
            raise ValueError(f"{path}: header is {header}, expected {','.join(CSV_COLUMNS)}; "
                             f"not a results.csv written by gtl_dist.eval")
        rows = []
        for line_no, cells in enumerate(reader, start=2):
            if len(cells) != len(CSV_COLUMNS):
                raise ValueError(f"{path}:{line_no}: {len(cells)} columns, expected {len(CSV_COLUMNS)}")
            rec = dict(zip(CSV_COLUMNS, cells))
            try:
                rows.append(ResultRow(rec["method"], rec["target"],
                                      float(rec["fraction"]) if rec["fraction"] else None,
                                      rec["metric"], float(rec["value"]),
                                      float(rec["std"]) if rec["std"] else None,
                                      int(rec["n"]) if rec["n"] else None, rec["notes"],
                                      float(rec["ci_low"]) if rec["ci_low"] else None,
                                      float(rec["ci_high"]) if rec["ci_high"] else None))
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: {exc}") from None
    return rows

