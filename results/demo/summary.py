"""The README's text tables, regenerated from the demo reports' CSVs.

    python results/demo/summary.py        # writes results/demo/summary.md

Reads results/demo/<study>/results.csv for each published study of STUDIES (the report of its
configs, published there; a study not yet published is left out) and prints, per study, target
and fraction:
- every method's masked cross-entropy on the target's test text (mean ± std over replicates) and
  its gain over the unguided source with a 95 % t-interval over replicates (from the per-replicate
  values in the row's notes; gtl's is the paired source − gtl row itself);
- which methods gtl beats, ties with and loses to on the report's paired 95 % intervals (method −
  gtl per replicate, lower is better: above 0 a gtl win, below 0 a loss, across 0 a tie), for the
  masked cross-entropy and for the domain score's distance to held-out target text;
- the sample instruments beside their references: MAUVE (with the held-out ceiling), the domain
  distance, generative perplexity (where the reference LM can rank) and distinct-2.
"""

from __future__ import annotations

import csv
from pathlib import Path

from gtl_dist.eval.paired import t_interval, verdict
from gtl_dist.eval.results import seed_values
from gtl_dist.io import atomic_write_text

HERE = Path(__file__).resolve().parent

METHODS = (("gtl", "**gtl** (adapter)"), ("gtl_edit", "gtl_edit (edit-ratio net)"),
           ("source", "source, unguided"), ("vanilla", "vanilla (target only)"),
           ("finetune", "finetune (all parameters)"), ("finetune_small", "finetune_small (LoRA)"),
           ("scratch_head", "scratch_head (no source)"))
STUDIES = {"study": "configs/demo.yaml",
           "rank8": "configs/demo.yaml + configs/demo_rank8.yaml: gtl's adapter at rank 8, "
                    "finetune_small at rank 2, every learning-rate grid widened to 3e-2"}
HELDOUT = "heldout_target"
PAIRED = (("masked_ce", "masked cross-entropy"), ("domain_distance", "domain distance"))
INSTRUMENTS = (("mauve", "MAUVE (higher is better)"), ("domain_distance", "domain distance (lower is better)"),
               ("gen_ppl", "generative perplexity"), ("distinct_2", "distinct-2 (closest to held-out text)"))


def read_rows(study: str = "study") -> list[dict]:
    with open(HERE / study / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def methods(rows: list[dict]) -> list[tuple[str, str]]:
    """The (method, label) pairs of METHODS that the report scored."""
    scored = {r["method"] for r in rows}
    return [(m, label) for m, label in METHODS if m in scored]


def cells(rows: list[dict]) -> list[tuple[str, str]]:
    """(target, fraction) of every cell gtl was scored in, in the report's target order, largest
    fraction first."""
    order = {t: i for i, t in enumerate(dict.fromkeys(r["target"] for r in rows))}
    found = {(r["target"], r["fraction"]) for r in rows if r["method"] == "gtl" and r["metric"] == "masked_ce"}
    return sorted(found, key=lambda c: (order[c[0]], -float(c[1])))


def row(rows: list[dict], method: str, cell: tuple[str, str], metric: str) -> dict | None:
    """A method's row in a cell; rows without a fraction (the source, held-out text) serve every
    fraction. A metric named by its family (``mauve``) matches its featuriser-tagged name."""
    target, fraction = cell
    for r in rows:
        if (r["method"], r["target"]) == (method, target) and r["fraction"] in (fraction, "") \
                and (r["metric"] == metric or r["metric"].startswith(metric + "[")):
            return r
    return None


def by_seed(r: dict | None) -> dict[str, float]:
    """A row's per-replicate values keyed by seed, from its notes ("seeds 0,1,2: a, b, c")."""
    return seed_values(r["notes"]) if r else {}


def per_replicate(r: dict) -> list[float]:
    """The per-replicate values a row's notes list, in the notes' seed order."""
    return list(by_seed(r).values())


def mean_std(r: dict | None) -> str:
    if r is None or r["value"] in ("", "nan"):
        return "—"
    std = float(r["std"]) if r["std"] else 0.0
    return f"{float(r['value']):.3f}" if std < 5e-4 else f"{float(r['value']):.3f} ± {std:.3f}"


def gain(rows: list[dict], method: str, cell: tuple[str, str]) -> str:
    """The method's ce_gain over the source: mean [95 % interval]."""
    if method == "gtl":
        paired = row(rows, "source", cell, "paired_diff[masked_ce]")
        if paired is None:
            return "—"
        mean, low, high = (float(paired[k]) for k in ("value", "ci_low", "ci_high"))
    else:
        r = row(rows, method, cell, "ce_gain")
        values = per_replicate(r) if r is not None else []
        if len(values) < 2:
            return "—"
        mean, _, low, high = t_interval(values)
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def ce_table(rows: list[dict]) -> list[str]:
    cols = cells(rows)
    head = [f"{t} {float(f):.0%}" for t, f in cols]
    lines = ["| method | " + " | ".join(f"{h} CE | {h} gain" for h in head) + " |",
             "|---" * (2 * len(cols) + 1) + "|"]
    for method, label in methods(rows):
        parts = [f"{mean_std(row(rows, method, c, 'masked_ce'))} | "
                 f"{gain(rows, method, c) if method != 'source' else '0'}" for c in cols]
        lines.append(f"| {label} | " + " | ".join(parts) + " |")
    return lines


def verdict_table(rows: list[dict], metric: str) -> list[str]:
    lines = ["| target, fraction | replicates | gtl wins against | ties with | loses to |", "|---|---|---|---|---|"]
    for target, fraction in cells(rows):
        found: dict[str, list[str]] = {"wins": [], "ties": [], "loses": []}
        reps = ""
        for r in rows:
            if (r["target"], r["fraction"], r["metric"]) != (target, fraction, f"paired_diff[{metric}]"):
                continue
            mean, low, high = (float(r[k]) for k in ("value", "ci_low", "ci_high"))
            reps, kind = r["n"], verdict(low, high)
            found.setdefault(kind, []).append(f"{r['method']} ({mean:+.3f} [{low:+.3f}, {high:+.3f}])")
        lines.append(f"| {target}, {float(fraction):.0%} | {reps} | "
                     + " | ".join(", ".join(found[k]) or "—" for k in ("wins", "ties", "loses")) + " |")
    return lines


def instrument_table(rows: list[dict], metric: str) -> list[str]:
    cols = cells(rows)
    lines = ["| method | " + " | ".join(f"{t} {float(f):.0%}" for t, f in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, label in (*methods(rows), (HELDOUT, "held-out target text (reference)")):
        lines.append(f"| {label} | " + " | ".join(mean_std(row(rows, method, c, metric)) for c in cols) + " |")
    return lines


def across_studies(base: list[dict], rows: list[dict]) -> list[str]:
    """Each method's masked cross-entropy in an overlay study minus the same method's in study/,
    per replicate (the same seeds draw the same target sequences): mean [95 % t-interval]; below 0
    the overlay is better."""
    cols = cells(rows)
    lines = ["| method | " + " | ".join(f"{t} {float(f):.0%}" for t, f in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, label in methods(rows):
        parts = []
        for c in cols:
            new, old = (by_seed(row(r, method, c, "masked_ce")) for r in (rows, base))
            diffs = [new[seed] - old[seed] for seed in new if seed in old]
            mean, _, low, high = t_interval(diffs) if len(diffs) > 1 else (None,) * 4
            parts.append("—" if mean is None else f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"| {label} | " + " | ".join(parts) + " |")
    return lines


def study_tables(rows: list[dict]) -> list[str]:
    parts = ["### Masked cross-entropy on the targets' test text (nats per masked token, mean ± std over "
             "replicates) and the gain over the unguided source (mean [95 % t-interval])", "", *ce_table(rows)]
    for metric, label in PAIRED:
        parts += ["", f"### Paired differences, {label} (method − gtl, 95 % t-interval over replicates)", "",
                  *verdict_table(rows, metric)]
    for metric, label in INSTRUMENTS:
        parts += ["", f"### Samples: {label}, mean ± std over replicates", "", *instrument_table(rows, metric)]
    return parts


def main() -> None:
    studies = [s for s in STUDIES if (HERE / s / "results.csv").exists()]
    parts = ["# Text study: summary tables", "",
             "Written by `python results/demo/summary.py` from "
             + ", ".join(f"`{s}/results.csv`" for s in studies) + "."]
    for study in studies:
        rows = read_rows(study)
        parts += ["", f"## {study}/ ({STUDIES[study]})", "", *study_tables(rows)]
        if study != "study" and "study" in studies:
            parts += ["", f"### Masked cross-entropy, {study}/ − study/ per replicate (the same draws; "
                      "mean [95 % t-interval], below 0: better here)", "", *across_studies(read_rows(), rows)]
    atomic_write_text(HERE / "summary.md", "\n".join(parts) + "\n")
    print(HERE / "summary.md")


if __name__ == "__main__":
    main()
