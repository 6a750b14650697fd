"""The run report: results.csv, report.md, plots and TensorBoard, all from one list of rows.

    runs/<run>/eval/results.csv                  every ResultRow
    runs/<run>/eval/report.md                    per target, per metric: methods x fractions
    runs/<run>/eval/plots/<metric>.png           score vs target-data fraction, one line per method
    runs/<run>/eval/plots/transitions-<t>.png    Markov: true P and Q, and P̂ per method and fraction
    runs/<run>/tb/eval/                          the same numbers as scalars, the tables as text

Files are written to a temporary name and renamed (gtl_dist/io.py); the TensorBoard folder is
written beside the old one and swapped in, so a re-run replaces rather than duplicates events.
"""

from __future__ import annotations

import datetime
import math
import re
import shlex
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the headless backend)
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from gtl_dist.config import RunConfig  # noqa: E402
from gtl_dist.eval.markov import transition_error  # noqa: E402
from gtl_dist.eval.paper import paper_rows  # noqa: E402
from gtl_dist.eval.results import ResultRow, write_results_csv  # noqa: E402
from gtl_dist.io import atomic_dir, atomic_path, atomic_write_text  # noqa: E402
from gtl_dist.methods import METHODS  # noqa: E402
from gtl_dist.paths import RunPaths  # noqa: E402

if TYPE_CHECKING:
    from gtl_dist.eval.selection import HeldOutCurve


@dataclass
class MarkovMatrices:
    """One target's chains and the sampled P̂ per (method, fraction), for the heatmaps."""
    source: np.ndarray
    target: np.ndarray
    estimated: dict[tuple[str, float], np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportFiles:
    results_csv: Path
    report_md: Path
    plots: tuple[Path, ...]
    tensorboard: Optional[Path]


def write_report(rows: Sequence[ResultRow], paths: RunPaths, cfg: Optional[RunConfig] = None, *,
                 command: Optional[str] = None, date: Optional[str] = None,
                 markov: Optional[Mapping[str, MarkovMatrices]] = None,
                 findings: Optional[Sequence[str]] = None,
                 examples: Optional[Mapping[str, Sequence[str]]] = None,
                 cost: str = "", notes: Sequence[str] = (), tensorboard: bool = True,
                 curves: Optional[Mapping[str, Mapping[float, Mapping[str, "HeldOutCurve"]]]] = None) -> ReportFiles:
    """Write every report artefact for ``rows``; the paper's numbers are added where ``cfg``
    reproduces the paper's set-up. ``command`` defaults to this process's command line.
    ``findings`` (problems the evaluation found, in words) head the report under "Checks";
    ``examples`` (decoded samples per sample set) go to samples.md and TensorBoard as text;
    ``cost`` (gtl_dist/eval/cost.py's section) ends the report; ``notes`` (lines about the run's
    set-up a reader must know, e.g. data overlap) go into the header; ``curves`` (selection.py's
    held-out curves per target, fraction and method) are plotted per target."""
    rows = list(rows)
    if not rows:
        raise ValueError("write_report: no result rows (did the sample shards score nothing?)")
    paper = paper_rows(cfg) if cfg is not None else []
    command = command if command is not None else shlex.join(sys.argv)
    date = date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    results_csv = write_results_csv(paths.eval / "results.csv", rows)
    label = column_labeller(cfg)
    tables = {target: render_target(rows, paper, target, label) for target in _ordered(r.target for r in rows)}
    report_md = paths.eval / "report.md"
    atomic_write_text(report_md, render_header(cfg, command, date, notes) + render_checks(findings)
                      + "\n".join(tables.values()) + cost)
    plots = [plot_metric(rows, paper, metric, paths.eval / "plots", label)
             for metric in _ordered(r.metric for r in rows) if not metric.startswith(UNPLOTTED)]
    for target, mats in (markov or {}).items():
        plots.append(plot_transitions(mats, target, paths.eval / "plots", label))
    for target, per_fraction in (curves or {}).items():
        plots.append(plot_heldout_curves(per_fraction, target, paths.eval / "plots", label))
    if examples:
        atomic_write_text(paths.eval / SAMPLES_MD, render_examples(examples))
    tb_dir = write_tensorboard(rows, tables, paths.tb("eval"), examples) if tensorboard else None
    return ReportFiles(results_csv, report_md, tuple(plots), tb_dir)


SAMPLES_MD = "samples.md"
# What a published report folder holds (publish_report); nothing else may be replaced by one.
PUBLISHED = ("report.md", "results.csv", SAMPLES_MD, "plots")


def publish_problem(dest: Path) -> Optional[str]:
    """Why ``--publish dest`` would lose files, or None: publishing replaces the folder as a
    whole, so it must be absent, empty, or a published report (nothing but PUBLISHED)."""
    if not dest.exists():
        return None
    others = sorted(p.name for p in dest.iterdir() if p.name not in PUBLISHED) if dest.is_dir() else [dest.name]
    if not others:
        return None
    shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
    return (f"--publish {dest}: it holds {shown}, which is not part of a published report, and publishing "
            f"replaces the folder as a whole; publish into a new folder (e.g. {dest / 'main'}) or one that "
            f"holds only a report ({', '.join(PUBLISHED)})")


def publish_report(eval_dir: Path, dest: Path) -> Path:
    """Copy a finished report (report.md, results.csv, plots/) to ``dest`` as a whole (see
    :func:`publish_problem` for the folders it may replace)."""
    with atomic_dir(dest) as fresh:
        for name in ("report.md", "results.csv", SAMPLES_MD):
            if name == SAMPLES_MD and not (eval_dir / name).is_file():
                continue  # Markov runs have no decoded samples
            shutil.copy2(eval_dir / name, fresh / name)
        if (eval_dir / "plots").is_dir():
            shutil.copytree(eval_dir / "plots", fresh / "plots")
    return Path(dest)


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------

def _ordered(items: Iterable[str]) -> list[str]:
    """First-seen order without duplicates (rows arrive in the pipeline's order)."""
    return list(dict.fromkeys(items))


def _method_order(methods: Iterable[str]) -> list[str]:
    """The pipeline's methods first, then any other rows (references, ladder steps) as they came."""
    methods = _ordered(methods)
    return [m for m in METHODS if m in methods] + [m for m in methods if m not in METHODS]


def fraction_label(fraction: Optional[float]) -> str:
    return "all fractions" if fraction is None else f"{fraction * 100:g}%"


def column_labeller(cfg: Optional[RunConfig]) -> Callable[[Optional[float]], str]:
    """Column headings: the number of target sequences n_T for a Markov run (known from the
    config), else the fraction."""
    if cfg is None or cfg.data.corpus != "markov":
        return fraction_label
    n_train = cfg.data.markov.num_target - round(cfg.data.overlap * cfg.data.markov.num_target)
    return lambda f: fraction_label(f) if f is None else f"n_T = {round(f * n_train)}"


# Metrics with no plot of their own (what selection kept; the report's tables show them).
UNPLOTTED = ("kept_", "out_of_budget", "prior_strength", "heldout_ce")


def format_value(value: float, std: Optional[float] = None, ci: Optional[tuple[float, float]] = None) -> str:
    if math.isnan(value):
        return "nan"
    if ci is not None and ci[0] is not None:
        return f"{value:+.3g} [{ci[0]:+.3g}, {ci[1]:+.3g}]"
    text = f"{value:.4g}"
    return f"{text} ± {std:.2g}" if std is not None and not math.isnan(std) else text


def metric_family(metric: str) -> str:
    """The metric without its featuriser tag, e.g. mauve[tfidf-svd] -> mauve.

    The paper's MAUVE is shown next to ours although the featurisers differ (labelled as such).
    """
    return metric.split("[", 1)[0]


def render_header(cfg: Optional[RunConfig], command: str, date: str, notes: Sequence[str] = ()) -> str:
    lines = [f"# Evaluation report: {cfg.name if cfg is not None else 'run'}", ""]
    if cfg is not None:
        s = cfg.sample
        gammas = ", ".join(f"{m}: γ = {METHODS[m].gamma(s):g}" for m in s.methods if METHODS[m].guided)
        lines.append(f"- config hash: `{cfg.hash()}` (data: {cfg.data.corpus}, GTL sampler: {s.sampler}"
                     f"{', ' + gammas if gammas else ''}, top-K = {s.top_k}, {s.steps} steps "
                     f"({cfg.noise.schedule} schedule) for the ancestral samplers, {s.num_samples} "
                     f"samples per method and seed)")
        lines.append(f"- protocol: {protocol_text(cfg)}")
        lines.append(f"- {seeds_text(cfg)}")
    lines += [f"- {note}" for note in notes]
    lines += [f"- command: `{command}`", f"- date: {date}",
              "- columns are target-data fractions; cells are the mean ± std over seeds where a metric "
              "is repeated; rows marked (paper) are the paper's published numbers", ""]
    return "\n".join(lines) + "\n"



def quoted(texts: Sequence[str]) -> str:
    """Decoded samples as markdown quotes, one paragraph each."""
    return "\n\n".join(f"> {t}" for t in texts)


def render_examples(examples: Mapping[str, Sequence[str]]) -> str:
    """A few decoded samples per sample set, as quoted paragraphs."""
    parts = ["# Decoded samples\n\nThe first samples of each set (seed 0), as the tokenizer decodes them.\n"]
    for label, texts in examples.items():
        parts.append(f"## {label}\n\n{quoted(texts)}\n")
    return "\n".join(parts)


def render_checks(findings: Optional[Sequence[str]]) -> str:
    """The evaluation's own checks; None when it ran none."""
    if findings is None:
        return ""
    if not findings:
        return "## Checks\n\nAll passed: no two sample sets are identical, and every calibration check passed.\n\n"
    return "## Checks\n\n" + "".join(f"- **{finding}**\n" for finding in findings) + "\n"


# Which way each metric family is better; "reference" metrics are best closest to the held-out
# target text's own value (row heldout_target), not at an extreme.
_DIRECTION = {
    "mauve": "higher is better", "domain_pct_target": "higher is more target-like",
    "domain_source_prob": "lower is more target-like",
    "gen_ppl": "lower is better, but a collapsed sampler repeating common words scores low too: read it with distinct-n",
    "transition_mean_abs_err": "lower is better", "transition_max_abs_err": "lower is better",
    "nll_target_per_seq": "lower is better", "nll_target_per_token": "lower is better",
    "nll_source_per_seq": "higher is further from the source", "nll_source_per_token": "higher is further from the source",
    "ladder_mean_abs_err": "lower is better",
    "masked_ce": "lower is better: nats per masked token on held-out target sequences, identical masks",
    "paired_diff": "method − gtl, mean over replicates [95 % interval]; above 0: gtl is better",
    "kept_lr": "learning rate held-out selection kept, mean over replicates",
    "kept_weight_decay": "weight decay held-out selection kept (train.<stage>.weight_decay_grid), mean over replicates",
    "kept_model": "entry of train.<stage>.model_grid held-out selection kept (its index), mean over replicates",
    "kept_step": "step held-out selection kept, mean over replicates",
    "out_of_budget": "share of replicates whose kept step was their last: they ran out of steps",
    "prior_strength": "prior strength held-out selection kept, mean over replicates",
    "heldout_ce": "the method's own held-out sequences (its selection data, not the test set): [kept] at "
                  "the kept step, [last] at the kept learning rate's last validation; plots/heldout_curves-*",
    "edit_slope": "1 is calibrated", "edit_corr": "higher is better",
    "ce_gain": "higher is better: nats per masked token the method saves over the source's masked_ce",
    "domain_distance": "lower is better: |domain_source_prob of the set − that of held-out target text|",
    "reference_lm_ppl": "the reference LM's own perplexity on held-out target text; far below |V| or "
                        "gen_ppl is dropped",
}
_REFERENCE = ("distinct_", "unigram_entropy", "repetition_")


def metric_direction(metric: str) -> str:
    family = metric_family(metric)
    if family.startswith(_REFERENCE):
        return "closest to the held-out target text (heldout_target) is best"
    return _DIRECTION.get(family, "")


def seeds_text(cfg: RunConfig) -> str:
    """What a seed redraws and what all seeds share (protocol.replicates)."""
    seeds = cfg.pipeline.seeds
    shared = f"the source denoiser{' and planner' if 'planner' in cfg.sample.sampler else ''}"
    if cfg.protocol.replicates == "redraw":
        drawn = ("each seed is a replicate that draws its own n_T target sequences (disjoint from the "
                 "other replicates' draws), and trains every per-target network and draws every "
                 f"sample set once; the source data and {shared} are shared by all replicates")
    else:
        drawn = ("every per-target network and every sample set is drawn once per seed; the data "
                 f"(the same n_T target sequences for every seed) and {shared} are shared by all seeds")
    return f"seeds: {len(seeds)} ({', '.join(map(str, seeds))}); {drawn}"


def protocol_text(cfg: RunConfig) -> str:
    """The low-data protocol in words (docs/method.md §12)."""
    p = cfg.protocol
    if p.selection == "holdout":
        rule = (f"every per-target network trains on its own n_T target sequences less a held-out part "
                f"(max({p.holdout_min}, round({p.holdout_fraction:g} · n_T)) of them), which alone decides "
                f"its early stopping and checkpoint (scored over {p.holdout_views} masked views per "
                f"sequence)")
    elif p.selection == "kfold":
        rule = (f"every per-target network chooses its learning rate (and grid point) and its number of "
                f"steps by {p.folds}-fold cross-validation over its own n_T target sequences (each fold "
                f"trains on the rest and is scored over {p.holdout_views} masked views per held-out "
                f"sequence; the lowest fold-averaged loss wins), then is refitted on all n_T for that many steps")
    else:
        rule = ("every per-target network trains on all of its n_T target sequences for its fixed number "
                "of steps and keeps its final (or EMA) weights: no validation, no selection")
    return (f"{rule}; γ is fixed in the config, not tuned; the targets' held-out test sets serve this "
            f"evaluation only")


def paper_matches(paper_metric: str, metric: str) -> bool:
    """Whether a paper number belongs beside ``metric``: the same metric, or MAUVE beside MAUVE
    (the featurisers differ; the label says so)."""
    return paper_metric == metric or metric_family(paper_metric) == metric_family(metric) == "mauve"


def render_table(rows: Sequence[ResultRow], paper: Sequence[ResultRow], target: str, metric: str,
                 column: Callable[[Optional[float]], str] = fraction_label) -> str:
    """A markdown table: rows = methods (then the paper's), columns = fractions (large first).

    A row without a fraction (the source model) fills every column.
    """
    mine = [r for r in rows if r.target == target and r.metric == metric]
    theirs = [r for r in paper if r.target == target and paper_matches(r.metric, metric)]
    fractions = sorted({r.fraction for r in mine if r.fraction is not None}, reverse=True) or [None]
    cells: dict[tuple[str, Optional[float]], str] = {}
    for r in sorted(mine, key=lambda r: r.fraction is not None):
        for f in fractions if r.fraction is None else [r.fraction]:
            ci = (r.ci_low, r.ci_high) if r.ci_low is not None else None
            verdict = r.notes.rsplit("; ", 1)[-1] if ci else ""
            cells[(r.method, f)] = format_value(r.value, r.std, ci) + (f" ({verdict})" if verdict else "")
    labels = {m: m for m in _method_order(r.method for r in mine)}
    for r in theirs:
        if r.fraction in fractions:
            label = f"{r.method} (paper{', ' + r.metric if r.metric != metric else ''})"
            labels.setdefault(label, label)
            cells[(label, r.fraction)] = format_value(r.value, r.std)
    lines = ["| method | " + " | ".join(column(f) for f in fractions) + " |",
             "|---" * (len(fractions) + 1) + "|"]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(cells.get((label, f), "–") for f in fractions) + " |")
    notes = defaultdict(list)
    for r in mine:
        if r.ci_low is not None:  # a paired difference: its cell says it all
            continue
        # Per-seed values stay in results.csv; the table shows their mean ± std.
        note = "; ".join(part for part in r.notes.split("; ") if part and not part.startswith("seeds "))
        if note:
            notes[note].append(f"{r.method} @ {column(r.fraction)}")
    for note, where in notes.items():
        lines.append(f"\n- {', '.join(where)}: {note}")
    return "\n".join(lines) + "\n"


def render_target(rows: Sequence[ResultRow], paper: Sequence[ResultRow], target: str,
                  label: Callable[[Optional[float]], str] = fraction_label) -> str:
    metrics = _ordered(r.metric for r in rows if r.target == target)
    parts = [f"## Target: {target}\n"]
    for metric in metrics:
        direction = metric_direction(metric)
        heading = f"{metric} ({direction})" if direction else metric
        parts.append(f"### {heading}\n\n{render_table(rows, paper, target, metric, label)}")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

def plot_file_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("_") + ".png"


def _save(fig: "plt.Figure", path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_metric(rows: Sequence[ResultRow], paper: Sequence[ResultRow], metric: str,
                out_dir: Path, label: Callable[[Optional[float]], str] = fraction_label) -> Path:
    """Score vs target-data fraction, one line per method, one panel per target."""
    targets = _ordered(r.target for r in rows if r.metric == metric)
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        mine = [r for r in rows if r.metric == metric and r.target == target]
        theirs = [r for r in paper if r.target == target and paper_matches(r.metric, metric)]
        for i, method in enumerate(_method_order(r.method for r in mine)):
            for r in mine:
                if r.method == method and r.fraction is None:  # independent of the fraction
                    ax.axhline(r.value, ls=":", color=f"C{i}", label=method)
            pts = sorted((r.fraction, r.value, r.std or 0.0) for r in mine
                         if r.method == method and r.fraction is not None)
            if pts:
                x, y, err = map(np.asarray, zip(*pts))
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=f"C{i}", label=method)
            ref = sorted((r.fraction, r.value) for r in theirs if r.method == method)
            if ref:
                rx, ry = zip(*ref)
                ax.plot(rx, ry, ls="--", marker="o", mfc="none", color=f"C{i}", label=f"{method} (paper)")
        fractions = [r.fraction for r in mine if r.fraction is not None]
        if fractions and max(fractions) / min(fractions) >= 10:
            ax.set_xscale("log")
        if fractions:
            ticks = sorted(set(fractions))
            ax.set_xticks(ticks, [label(f) for f in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("target-data fraction")
        ax.set_ylabel(metric)
        ax.set_title(target)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out_dir / plot_file_name(metric))


def plot_heldout_curves(curves: Mapping[float, Mapping[str, "HeldOutCurve"]], target: str, out_dir: Path,
                        label: Callable[[Optional[float]], str] = fraction_label) -> Path:
    """Held-out loss against step, one panel per fraction, one line per method (mean over
    replicates of the kept learning rate's run), its mean kept step marked: where selection
    stopped, and whether the loss turned up after it (memorisation) or was still falling."""
    fractions = sorted(curves, reverse=True)
    fig, axes = plt.subplots(1, len(fractions), figsize=(5.5 * len(fractions), 4), squeeze=False)
    for ax, fraction in zip(axes[0], fractions):
        for i, method in enumerate(_method_order(curves[fraction])):
            c = curves[fraction][method]
            ax.plot(c.steps, c.mean_loss, color=f"C{i}", label=f"{method} ({c.replicates} rep.)")
            ax.plot([c.kept_step], [np.interp(c.kept_step, c.steps, c.mean_loss)], marker="o", color=f"C{i}")
        ax.set_xlabel("step (dot: mean kept step)")
        ax.set_ylabel("held-out masked CE (own held-out sequences)")
        ax.set_title(f"{target}, {label(fraction)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out_dir / f"heldout_curves-{plot_file_name(target)}")


def plot_transitions(mats: MarkovMatrices, target: str, out_dir: Path,
                     label: Callable[[Optional[float]], str] = fraction_label) -> Path:
    """Heatmaps: true source P and target Q on top, then P̂ for each method (rows) and fraction.

    A fraction-independent P̂ (key (method, None), the source model) takes the first column.
    """
    methods = _method_order(m for m, _ in mats.estimated)
    fractions = sorted({f for _, f in mats.estimated if f is not None}, reverse=True) or [None]
    cols = max(2, len(fractions))
    fig, axes = plt.subplots(1 + len(methods), cols, figsize=(2.8 * cols, 2.8 * (1 + len(methods))),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    _heatmap(axes[0, 0], mats.source, "true P (source)")
    _heatmap(axes[0, 1], mats.target, f"true Q ({target})")
    for i, method in enumerate(methods, start=1):
        for j, fraction in enumerate(fractions):
            p_hat = mats.estimated.get((method, fraction))
            if p_hat is None and j == 0:
                p_hat, fraction = mats.estimated.get((method, None)), None
            if p_hat is not None:
                mean_err, _ = transition_error(p_hat, mats.target)
                _heatmap(axes[i, j], p_hat,
                         f"{method} {label(fraction)}\nmean|P̂−Q| = {mean_err:.3f}")
    fig.tight_layout()
    return _save(fig, out_dir / f"transitions-{plot_file_name(target)}")


def _heatmap(ax: "plt.Axes", matrix: np.ndarray, title: str) -> None:
    matrix = np.asarray(matrix, dtype=np.float64)
    ax.axis("on")
    ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    if matrix.shape[0] <= 8:
        for (a, b), v in np.ndenumerate(matrix):
            ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if v < 0.5 else "black")


# ----------------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------------

def tb_step(fraction: float) -> int:
    """TensorBoard steps are integers: the fraction in basis points (100% -> 10000, 1% -> 100)."""
    return int(round(fraction * 10_000))


def _tb_steps(row: ResultRow, rows: Sequence[ResultRow]) -> list[int]:
    """A fraction-independent row is drawn at every fraction of its target, so it reads as a
    flat reference line next to the methods that depend on the fraction."""
    if row.fraction is not None:
        return [tb_step(row.fraction)]
    fractions = {r.fraction for r in rows if r.target == row.target and r.fraction is not None}
    return sorted(tb_step(f) for f in fractions) or [0]


def write_tensorboard(rows: Sequence[ResultRow], tables: Mapping[str, str], tb_dir: Path,
                      examples: Optional[Mapping[str, Sequence[str]]] = None) -> Path:
    """Scalars ``<target>/<metric>/<method>`` at step = fraction in basis points, each target's
    tables and the decoded samples as markdown text. Written to a fresh folder that replaces
    ``tb_dir``."""
    from torch.utils.tensorboard import SummaryWriter  # torch only where TensorBoard is written

    with atomic_dir(tb_dir) as fresh:
        writer = SummaryWriter(log_dir=str(fresh))
        for r in rows:
            if not math.isnan(r.value):
                for step in _tb_steps(r, rows):
                    writer.add_scalar(f"{r.target}/{r.metric}/{r.method}", r.value, step)
        for target, table in tables.items():
            writer.add_text(f"report/{target}", table, 0)
        for label, texts in (examples or {}).items():
            writer.add_text(f"samples/{label}", quoted(texts), 0)
        writer.close()
    return Path(tb_dir)
