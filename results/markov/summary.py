"""The README's Markov tables, regenerated from the published reports' CSVs.

    python results/markov/summary.py        # writes results/markov/summary.md

Reads results/markov/<run>/results.csv for each published run of RUNS (written by the evaluation
stage) and prints,
per pair and n_T: each method's masked cross-entropy (mean ± std over replicates), and which
methods gtl beats, ties with and loses to on the paired 95 % intervals of the report (method − gtl
per replicate: an interval above 0 is a gtl win, below 0 a loss, across 0 a tie), for masked
cross-entropy and for the exact-sampler error. n_T is the fraction times the target pool of
configs/markov.yaml (data.markov.num_target).
"""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from gtl_dist.eval.paired import t_interval
from gtl_dist.eval.results import seed_values
from gtl_dist.io import atomic_write_text

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Published run -> what its cells' labels start with (runs whose pairs differ from the others').
RUNS = {"sticky_high": "", "sticky": "", "perturbed_high": "", "perturbed_mid": "", "perturbed": "",
        "decay": "decay grid, ", "sticky_high_attention": "attention heads, ",
        "perturbed_high_attention": "attention heads, ", "sticky_high_attention_r16": "attention heads rank 16, ",
        "perturbed_high_attention_r16": "attention heads rank 16, ",
        "sticky_capacity": "capacity grid, ", "perturbed_capacity": "capacity grid, ",
        "perturbed_kfold": "k-fold selection, "}
# A run -> the run whose replicates drew the same target sequences under another protocol: the
# summary gives each method's per-replicate change between the two.
SAME_DRAWS = {"perturbed_kfold": "perturbed"}
ROWS = (("gtl", "**gtl** (adapter)"), ("gtl_edit", "gtl_edit (edit-ratio net)"),
        ("source", "source, unguided"), ("vanilla", "vanilla (target only)"),
        ("finetune", "finetune (all parameters)"), ("finetune_small", "finetune_small (LoRA)"),
        ("scratch_head", "scratch_head (no source)"), ("counts", "counts (transition counts)"),
        ("counts_source", "counts + source prior"), ("exact target chain", "exact target chain (floor)"))
LEARNED = {"gtl", "gtl_edit", "vanilla", "finetune", "finetune_small", "scratch_head"}
METRICS = (("masked_ce", "masked cross-entropy"), ("transition_mean_abs_err", "exact-sampler error"))


def published() -> list[str]:
    """The runs of RUNS whose report is in results/markov/ (a run not yet published is left out)."""
    return [run for run in RUNS if (HERE / run / "results.csv").exists()]


def read_rows() -> list[dict]:
    rows = []
    for run in published():
        with open(HERE / run / "results.csv", newline="") as f:
            rows += [{**r, "run": run} for r in csv.DictReader(f)]
    return rows


def target_pool() -> int:
    cfg = yaml.safe_load((REPO / "configs" / "markov.yaml").read_text())
    return int(cfg["data"]["markov"]["num_target"])


def cells(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(run, target, fraction) of every cell gtl was scored in, largest n_T first per target; a
    labelled run's cells (pairs of their own) after the others'."""
    found = {(r["run"], r["target"], r["fraction"]) for r in rows
             if r["method"] == "gtl" and r["metric"] == "masked_ce"}
    order = {t: i for i, t in enumerate(dict.fromkeys(r["target"] for r in rows))}
    return sorted(found, key=lambda c: (RUNS[c[0]], order[c[1]], -float(c[2])))


def value(rows: list[dict], method: str, cell: tuple[str, str, str], metric: str) -> dict | None:
    """A method's row in a cell; a run's unfractioned rows (its source, the exact chains) serve
    every cell of that run."""
    run, target, fraction = cell
    for r in rows:
        if (r["run"], r["method"], r["target"], r["metric"]) == (run, method, target, metric) \
                and r["fraction"] in (fraction, ""):
            return r
    return None


def fmt(row: dict | None) -> str:
    if row is None:
        return "—"
    mean = float(row["value"])
    std = float(row["std"]) if row["std"] else None
    if std is not None and std < 5e-4:  # one value for every replicate (the unguided source)
        std = None
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def ce_table(rows: list[dict], pool: int, cols: list[tuple[str, str, str]]) -> list[str]:
    """Masked cross-entropy of every method in the cells ``cols`` (one pair), n_T as the columns."""
    head = [f"n_T = {round(float(f) * pool)}" for _, _, f in cols]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    best = {}
    for cell in cols:
        learned = [(float(r["value"]), m) for m in LEARNED
                   if (r := value(rows, m, cell, "masked_ce")) is not None]
        best[cell] = min(learned)[1]
    for method, label in ROWS:
        cells_text = []
        for cell in cols:
            text = fmt(value(rows, method, cell, "masked_ce"))
            cells_text.append(f"**{text}**" if best[cell] == method else text)
        lines.append(f"| {label} | " + " | ".join(cells_text) + " |")
    return lines


def ce_tables(rows: list[dict], pool: int) -> list[str]:
    """One masked cross-entropy table per pair (a labelled run's pairs apart from the others')."""
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for cell in cells(rows):
        groups.setdefault(f"{RUNS[cell[0]]}{cell[1]}", []).append(cell)
    parts: list[str] = []
    for name, cols in groups.items():
        parts += ["", f"### {name}", "", *ce_table(rows, pool, cols)]
    return parts


def verdict_table(rows: list[dict], pool: int, metric: str) -> list[str]:
    lines = ["| pair, n_T | replicates | gtl wins against | ties with | loses to |", "|---|---|---|---|---|"]
    for run, t, f in cells(rows):
        verdicts: dict[str, list[str]] = {"wins": [], "ties": [], "loses": []}
        reps = ""
        for r in rows:
            if (r["run"], r["target"], r["fraction"], r["metric"]) != (run, t, f, f"paired_diff[{metric}]"):
                continue
            low, high, mean = float(r["ci_low"]), float(r["ci_high"]), float(r["value"])
            reps = r["n"]
            kind = "wins" if low > 0 else "loses" if high < 0 else "ties"
            text = (f"{r['method']} ({mean:+.3f})" if kind != "ties"
                    else f"{r['method']} ({mean:+.3f} [{low:+.3f}, {high:+.3f}])")
            verdicts[kind].append(text)
        lines.append(f"| {RUNS[run]}{t}, {round(float(f) * pool)} | {reps} | "
                     + " | ".join(", ".join(verdicts[k]) or "—" for k in ("wins", "ties", "loses")) + " |")
    return lines


def across_runs(rows: list[dict], pool: int, run: str, base: str) -> list[str]:
    """Each method's masked cross-entropy in ``run`` minus the same method's in ``base``, per
    replicate over the seeds both ran (the same seeds draw the same target sequences): mean [95 %
    t-interval]; below 0 ``run``'s protocol did better."""
    cols = [c for c in cells(rows) if c[0] == run]
    lines = ["| method | " + " | ".join(f"{t} {round(float(f) * pool)}" for _, t, f in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for method, label in ROWS:
        if method not in LEARNED | {"counts", "counts_source"}:
            continue
        parts = []
        for _, t, f in cols:
            new, old = (seed_values(r["notes"]) if (r := value(rows, method, (name, t, f), "masked_ce")) else {}
                        for name in (run, base))
            diffs = [new[s] - old[s] for s in new if s in old]
            mean, _, low, high = t_interval(diffs) if len(diffs) > 1 else (None,) * 4
            parts.append("—" if mean is None else f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] ({len(diffs)})")
        if any(p != "—" for p in parts):
            lines.append(f"| {label} | " + " | ".join(parts) + " |")
    return lines


def main() -> None:
    rows, pool = read_rows(), target_pool()
    parts = ["# Markov study: summary tables",
             "", "Written by `python results/markov/summary.py` from "
             + ", ".join(f"`{run}/results.csv`" for run in published()) + ".", "",
             "## Masked cross-entropy (nats per masked token, mean ± std over replicates; bold: the "
             "lowest learned method)", *ce_tables(rows, pool)]
    for metric, label in METRICS:
        parts += ["", f"## Paired differences, {label} (method − gtl, 95 % t-interval over "
                  "replicates; ties shown with their interval)", "", *verdict_table(rows, pool, metric)]
    for run, base in SAME_DRAWS.items():
        if run in published() and base in published():
            parts += ["", f"## `{run}` against `{base}`, the same draws (masked cross-entropy, {run} − {base} "
                      "per replicate, mean [95 % t-interval] (replicates); below 0: better in "
                      f"{run})", "", *across_runs(rows, pool, run, base)]
    out = HERE / "summary.md"
    atomic_write_text(out, "\n".join(parts) + "\n")
    print(out)


if __name__ == "__main__":
    main()
