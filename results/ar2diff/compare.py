#!/usr/bin/env python
"""AR2Diff against a from-scratch MDLM denoiser at equal total training steps.

Two runs of the pipeline (launchers/submit.py), one run directory each, built from the same base
config and the same --set overrides; they differ only in how the frozen source denoiser is made:

  route ar2diff   ar_pretrain for S_ar steps (a causal LM), then ar2diff for S_diff steps (the
                  same network, initialised from the AR export, trained with the MDLM loss)
  route scratch   the MDLM denoiser from random initialisation for S_ar + S_diff steps

with S_ar = round(--total-steps * --ar-share) and S_diff = --total-steps - S_ar. Both routes use
models.denoiser and the optimisation recipe of train.denoiser (batch, learning rate, warm-up,
EMA, validation interval, ...): the harness copies every train.denoiser setting but `steps` onto
train.ar_pretrain and train.ar2diff and passes every --set to both runs, so the two run configs
differ in pipeline.ar2diff alone. Each run keeps the config's target fractions (so both routes read
the data a plain run of the same config builds, and route scratch's denoiser is that run's), trains
GTL at each and samples `gtl` and the unguided `source` denoiser; the evaluation scores them against
held-out target text, and the CSV reports GTL at --fraction, which must be one of them.

Outputs in --out (every file written atomically):
  ar2diff.csv     route,total_steps,val_nelbo,gen_ppl,mauve_unguided,mauve_gtl_5pct (one row per
                  route; val_nelbo is the source stage's last validation NELBO; the last column is
                  GTL's MAUVE at --fraction, whatever --fraction is: the README names it)
  val_nelbo.png   validation NELBO against total training steps, both routes (route ar2diff's
                  diffusion curve starts at S_ar, where its AR pretraining ends)
  README.md       the command, the protocol and the numbers

    python results/ar2diff/compare.py --total-steps 5000                  # configs/demo.yaml
    python results/ar2diff/compare.py --config configs/demo.yaml --total-steps 5000 \\
        --ar-share 0.5 --fraction 0.05 --set pipeline.seeds=[0]

Rerunning the same command resumes: the launcher skips every finished task and resumes a cut-off
one from its last checkpoint, so a second invocation after a complete one only rewrites the
outputs. A run directory made with other settings (e.g. another --total-steps) is refused by the
launcher, naming the keys that differ: pass another --run-root, or --update-config to retrain
only what the change affects.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from gtl_dist.cluster.dag import build_pipeline
from gtl_dist.cluster.progress import train_log_path
from gtl_dist.cluster.tasks import marker_valid
from gtl_dist.config import ConfigError, RunConfig, load_config, parse_override
from gtl_dist.eval.results import ResultRow, read_results_csv
from gtl_dist.io import atomic_path, atomic_write_text, read_json_lines
from gtl_dist.paths import RunPaths
from gtl_dist.stages import Task

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launchers" / "submit.py"
CSV_COLUMNS = ("route", "total_steps", "val_nelbo", "gen_ppl", "mauve_unguided", "mauve_gtl_5pct")
METHODS = ("gtl", "source")
# The launcher's line when a run directory holds every task of the config already.
ALL_DONE = "nothing to submit: every task is done"
# Settings the harness owns; a --set of these would break the equal-steps protocol.
OWNED = {
    "train.denoiser.steps": "--total-steps",
    "train.ar_pretrain": "--total-steps/--ar-share (the other settings follow train.denoiser)",
    "train.ar2diff": "--total-steps/--ar-share (the other settings follow train.denoiser)",
    "pipeline.ar2diff": "nothing: the harness runs both routes",
    "sample.methods": "nothing: the harness samples gtl and source",
}


class CompareError(RuntimeError):
    """A problem with the arguments, a run or its outputs; the message names the file or key and
    the fix."""


@dataclass(frozen=True)
class Route:
    name: str          # the CSV's route column and the run directory's name
    ar2diff: bool      # pipeline.ar2diff
    title: str


ROUTES = (Route("ar2diff", True, "AR pretraining -> AR2Diff"),
          Route("scratch", False, "MDLM denoiser from scratch"))


@dataclass
class Outcome:
    route: Route
    run_dir: Path
    command: list[str]
    reused: bool = False
    curve: list[tuple[int, float]] = field(default_factory=list)  # (total step, val NELBO)
    ar_val: Optional[tuple[int, float]] = None  # route ar2diff: AR's last (step, next-token NLL)
    metrics: dict[str, ResultRow] = field(default_factory=dict)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="results/ar2diff/compare.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=None, metavar="YAML",
                   help="base config; repeat to layer overlays, later wins (default: configs/demo.yaml)")
    p.add_argument("--total-steps", type=int, required=True, metavar="N",
                   help="training steps of each route's source denoiser, AR pretraining included")
    p.add_argument("--ar-share", type=float, default=0.5, metavar="F",
                   help="fraction of --total-steps route ar2diff spends on AR pretraining (default 0.5)")
    p.add_argument("--fraction", type=float, default=0.05, metavar="F",
                   help="the target fraction whose GTL MAUVE goes into the CSV: one of the config's "
                        "data.target_fractions (default 0.05)")
    p.add_argument("--target", default=None,
                   help="the target domain whose metrics go into the CSV (default: the config's first)")
    p.add_argument("--out", default="results/ar2diff", metavar="DIR",
                   help="where ar2diff.csv, val_nelbo.png and README.md go (default: results/ar2diff)")
    p.add_argument("--run-root", default=None, metavar="DIR",
                   help="parent of the two run directories DIR/ar2diff and DIR/scratch "
                        "(default: runs/ar2diff-<config name>)")
    p.add_argument("--cluster", choices=["local", "debug", "slurm"], default="local",
                   help="launchers/submit.py --cluster (default local; slurm adds --wait)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config override passed to both runs (repeatable), e.g. --set pipeline.seeds=[0]; "
                        "train.denoiser.* settings apply to every stage of both routes")
    p.add_argument("--update-config", action="store_true",
                   help="pass --update-config to the launcher: let existing run directories adopt "
                        "changed settings, retraining only what they affect")
    p.add_argument("--submit-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for launchers/submit.py in both runs, e.g. "
                        "--submit-arg=--nodes=2 (repeatable)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Configs and commands
# ----------------------------------------------------------------------------------------------

def split_steps(total: int, ar_share: float) -> tuple[int, int]:
    """(S_ar, S_diff) with S_ar + S_diff = total, both at least one step."""
    if not 0.0 < ar_share < 1.0:
        raise CompareError(f"--ar-share {ar_share}: must lie strictly between 0 and 1")
    s_ar = int(round(total * ar_share))
    if s_ar < 1 or total - s_ar < 1:
        raise CompareError(f"--total-steps {total} with --ar-share {ar_share} gives {s_ar} AR and "
                           f"{total - s_ar} diffusion steps; both need at least one: raise --total-steps")
    return s_ar, total - s_ar


def yaml_value(value: object) -> str:
    """``value`` as a one-line YAML scalar or flow list that --set reads back unchanged
    (1e-06 -> 1.0e-06, which YAML 1.1 reads as a float)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9)
    return text.removesuffix("\n...\n").strip()


def check_overrides(overrides: Sequence[str]) -> None:
    for text in overrides:
        try:
            key = ".".join(parse_override(text)[0])
        except ConfigError as exc:
            raise CompareError(str(exc)) from None
        for owned, use in OWNED.items():
            if key == owned or key.startswith(owned + ".") or owned.startswith(key + "."):
                raise CompareError(f"--set {text}: the harness sets {owned} itself; use {use} "
                                   f"(and --set train.denoiser.<key> for the optimisation recipe of all stages)")


def harness_overrides(base: RunConfig, s_ar: int, s_diff: int) -> list[str]:
    """The --set list of both routes but pipeline.ar2diff: the steps, the methods,
    and train.denoiser's recipe on the AR stages (only the settings that differ are written)."""
    total = s_ar + s_diff
    sets = [f"train.denoiser.steps={total}"]
    recipe = asdict(base.train.denoiser)
    for stage, steps in (("ar_pretrain", s_ar), ("ar2diff", s_diff)):
        current = asdict(getattr(base.train, stage))
        sets.append(f"train.{stage}.steps={steps}")
        sets += [f"train.{stage}.{key}={yaml_value(value)}" for key, value in recipe.items()
                 if key != "steps" and current[key] != value]
    sets.append(f"sample.methods=[{', '.join(METHODS)}]")
    return sets


def default_config() -> list[str]:
    path = Path("configs/demo.yaml")
    return [str(path if path.is_file() else REPO / path)]


def route_command(args: argparse.Namespace, configs: list[str], sets: list[str], route: Route,
                  run_dir: Path) -> list[str]:
    submit = os.path.relpath(SUBMIT)  # as the user would type it, when run from the repository
    cmd = [sys.executable, submit if not submit.startswith("..") else str(SUBMIT)]
    for c in configs:
        cmd += ["--config", c]
    for s in [*args.overrides, *sets, f"pipeline.ar2diff={'true' if route.ar2diff else 'false'}"]:
        cmd += ["--set", s]
    cmd += ["--cluster", args.cluster, "--run-dir", str(run_dir)]
    if args.cluster == "slurm":
        cmd.append("--wait")  # the results are read when the launcher returns
    if args.update_config:
        cmd.append("--update-config")
    return cmd + list(args.submit_arg)


# ----------------------------------------------------------------------------------------------
# Running the launcher
# ----------------------------------------------------------------------------------------------

def run_route(outcome: Outcome) -> None:
    """Run the launcher, streaming its output with the route's name in front; raise on failure."""
    name = outcome.route.name
    shown = shlex.join(["python", *outcome.command[1:]])
    print(f"[{name}] $ {shown}", flush=True)
    proc = subprocess.Popen(outcome.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"[{name}] {line}", end="", flush=True)
            if line.strip() == ALL_DONE:
                outcome.reused = True
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # we were interrupted: stop the launcher so its lock is released
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if rc == 0:
        return
    hint = {2: "a configuration or preflight problem (see its error above); a run directory made by "
               "other settings is refused: pass another --run-root, or --update-config",
            3: f"another launcher holds {outcome.run_dir}: wait for it to end, then rerun this command"
            }.get(rc, "a task failed (see above and python launchers/status.py --run-dir "
                      f"{outcome.run_dir}); fix it and rerun this command: finished tasks are reused")
    raise CompareError(f"route {name}: launchers/submit.py exited {rc}: {hint}")


# ----------------------------------------------------------------------------------------------
# Reading a finished run
# ----------------------------------------------------------------------------------------------

def read_run(outcome: Outcome, s_ar: int, target: str, fraction: float) -> None:
    paths = RunPaths(outcome.run_dir)
    if not paths.config_yaml.is_file():
        raise CompareError(f"{paths.config_yaml}: missing; route {outcome.route.name} has not run: "
                           f"rerun this command")
    cfg = load_config(paths.config_yaml)
    pipeline = build_pipeline(cfg)
    stage = pipeline.source_stage
    for task in (Task(stage), Task("eval")):
        if not marker_valid(pipeline, paths, task):
            raise CompareError(f"{task.marker(paths)}: task {task.key} of route {outcome.route.name} is not "
                               f"done for the run's config: rerun this command to finish it")
    offset = s_ar if outcome.route.ar2diff else 0
    outcome.curve = val_curve(paths, Task(stage), offset)
    if outcome.route.ar2diff:  # for the README only
        try:
            outcome.ar_val = val_curve(paths, Task("ar_pretrain"), 0)[-1]
        except CompareError:
            outcome.ar_val = None
    outcome.metrics = pick_metrics(paths.eval / "results.csv", target, fraction)


def val_curve(paths: RunPaths, task: Task, offset: int) -> list[tuple[int, float]]:
    """(offset + step, validation loss) of a stage's "val" records, one per step (the last)."""
    by_step = {int(r["step"]): float(r["loss"]) for r in read_json_lines(train_log_path(paths, task))
               if r.get("kind") == "val" and "loss" in r and "step" in r}
    if not by_step:
        raise CompareError(f"{train_log_path(paths, task)}: no validation records (\"kind\": \"val\"); "
                           f"the {task.kind} stage never validated: set train.denoiser.val_every to at most "
                           f"the stage's steps (and check that the log exists) and rerun")
    return [(offset + step, loss) for step, loss in sorted(by_step.items())]


def pick_metrics(path: Path, target: str, fraction: float) -> dict[str, ResultRow]:
    """gen_ppl and MAUVE of the unguided source samples, MAUVE of gtl at ``fraction``, for
    ``target``, from a run's results.csv."""
    try:
        rows = read_results_csv(path)
    except FileNotFoundError:
        raise CompareError(f"{path}: missing; the evaluation has not run: rerun this command") from None
    except ValueError as exc:
        raise CompareError(f"{exc}; delete it and rerun this command to evaluate again") from None
    mauve = sorted({r.metric for r in rows if r.metric.startswith("mauve[")})
    if len(mauve) != 1:
        raise CompareError(f"{path}: expected one MAUVE metric (mauve[<featuriser>]), found "
                           f"{mauve or 'none'}; is this a text run with eval.mauve_featurizer set?")

    def one(method: str, metric: str, frac: Optional[float]) -> ResultRow:
        found = [r for r in rows if r.method == method and r.target == target and r.metric == metric
                 and (r.fraction is None if frac is None else
                      r.fraction is not None and math.isclose(r.fraction, frac))]
        if len(found) != 1:
            have = sorted({(r.method, r.target, r.fraction) for r in rows if r.metric == metric})
            raise CompareError(f"{path}: {len(found)} rows for method={method} target={target} "
                               f"fraction={frac} metric={metric} (rows with that metric: {have}); "
                               f"pass --target one of the config's targets, or rerun so that the "
                               f"evaluation covers it"
                               + (" (the evaluation drops gen_ppl where its reference LM is weak: see "
                                  "the report's notes and eval.gen_ppl_max_vocab_share)"
                                  if metric == "gen_ppl" else ""))
        return found[0]

    return {"gen_ppl": one("source", "gen_ppl", None),
            "mauve_unguided": one("source", mauve[0], None),
            "mauve_gtl_5pct": one("gtl", mauve[0], fraction)}


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------

def csv_text(outcomes: Sequence[Outcome], total: int) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for o in outcomes:
        writer.writerow([o.route.name, total, repr(o.curve[-1][1]),
                         *(repr(o.metrics[k].value) for k in CSV_COLUMNS[3:])])
    return buf.getvalue()


def write_plot(path: Path, outcomes: Sequence[Outcome], s_ar: int, total: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for o, style in zip(outcomes, ("o-", "s-")):
        xs, ys = zip(*o.curve)
        ax.plot(xs, ys, style, markersize=3, label=f"{o.route.name}: {o.route.title}")
    ax.axvline(s_ar, color="grey", linestyle="--", linewidth=1)
    ax.annotate("AR pretraining ends", (s_ar, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                textcoords="offset points", fontsize=8, color="grey")
    ax.set_xlim(0, total * 1.02)
    ax.set_xlabel("total training steps (AR pretraining + diffusion)")
    ax.set_ylabel("validation NELBO (nats / token)")
    ax.set_title("Source denoiser: AR2Diff vs from scratch at equal steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _num(row: ResultRow) -> str:
    return f"{row.value:.4g}" + (f" ± {row.std:.2g}" if row.std is not None else "")


def readme_text(args: argparse.Namespace, argv: Sequence[str], outcomes: Sequence[Outcome], s_ar: int,
                s_diff: int, target: str, base: RunConfig, mauve_metric: str, seconds: float) -> str:
    total = s_ar + s_diff
    tc = base.train.denoiser
    frac = f"{args.fraction:g}"
    command = shlex.join(["python", "results/ar2diff/compare.py", *argv])
    seeds = base.pipeline.seeds
    lines = [
        "# AR2Diff against a from-scratch MDLM denoiser at equal total steps",
        "",
        f"Written by `results/ar2diff/compare.py` on {time.strftime('%Y-%m-%d %H:%M')} "
        f"(this invocation took {seconds / 60:.1f} min, less than the runs did where it reused finished tasks):",
        "",
        f"    {command}",
        "",
        "The two pipeline runs (rerunning the command above resumes them, reusing every finished task):",
        "",
    ]
    for o in outcomes:
        lines.append(f"- `{o.route.name}` ({o.route.title}), `{o.run_dir}`:")
        lines += ["", f"      {shlex.join(['python', *o.command[1:]])}", ""]
    lines += [
        "## Protocol",
        "",
        f"- Base config `{' + '.join(args.config)}` (name `{base.name}`), the same for both routes"
        + (f", with `--set {' '.join(args.overrides)}`" if args.overrides else "") + ".",
        f"- Equal total training steps: {total}. Route `ar2diff`: `ar_pretrain` (a causal LM on the source "
        f"text, next-token loss) for S_ar = {s_ar} steps (--ar-share {args.ar_share:g}), then `ar2diff` "
        f"(the same network initialised from the AR export, run bidirectionally with the MDLM loss) for "
        f"S_diff = {s_diff} steps. Route `scratch`: the MDLM `denoiser` from random initialisation for "
        f"{total} steps.",
        f"- Same network (`models.denoiser`: hidden {base.models.denoiser.hidden}, {base.models.denoiser.blocks} "
        f"blocks), same data (the source's train split) and the same optimisation recipe: every "
        f"`train.denoiser` setting but `steps` is copied onto `train.ar_pretrain` and `train.ar2diff` "
        f"(global batch {tc.global_batch}, lr {tc.lr:g}, warm-up {tc.warmup_frac:g} of each stage's steps, "
        f"cosine decay to {tc.min_lr:g}, EMA {tc.ema:g}, validation every {tc.val_every} steps on "
        f"{tc.val_batches} batch(es)). Each stage has its own warm-up and cosine schedule, so route "
        f"`ar2diff` warms up twice; that is part of what is compared. The two run configs differ in "
        f"`pipeline.ar2diff` only.",
        f"- GTL: both routes train the edit-ratio network at each of the config's target fractions "
        f"(this CSV reports {frac}; `protocol.selection: {base.protocol.selection}`) on top of "
        f"their own source denoiser and sample `gtl` and the unguided `source` "
        f"({base.sample.num_samples} samples per set, pipeline seeds {', '.join(map(str, seeds))}). The "
        f"numbers are results.csv's values (means over the pipeline seeds) ± its std column (over the "
        f"pipeline seeds, or with a single seed, for MAUVE, over its {base.eval.mauve_seeds} clustering seeds).",
        "",
        "## Quantities",
        "",
        "- `val_nelbo`: the last validation loss of the source stage (`ar2diff` or `denoiser`, "
        "\"kind\": \"val\" records of its `train_log.jsonl`, key `loss`): the MDLM NELBO in nats per "
        "token, a Monte Carlo estimate (one diffusion time per sequence, antithetic) on the first "
        f"{tc.val_batches} batch(es) of the source's test split, scored with the EMA weights when "
        "EMA is on. Both routes validate with the same seed, batch size and world size, so they "
        "score the same sequences with the same diffusion times and masks. The plot places `ar2diff`'s curve at S_ar + its own step. The AR stage's "
        "validation loss is a next-token NLL, not a NELBO, and is not plotted"
        + (f" (its last value, at step {outcomes[0].ar_val[0]}: {outcomes[0].ar_val[1]:.4g} nats/token)."
           if outcomes[0].ar_val else "."),
        f"- `gen_ppl`: generative perplexity of the unguided `source` samples under the evaluator's "
        f"reference LM of target `{target}` (a causal LM fitted to that target's held-out text).",
        f"- `mauve_unguided`: `{mauve_metric}` of the unguided `source` samples against held-out "
        f"`{target}` text.",
        f"- `mauve_gtl_5pct`: `{mauve_metric}` of `gtl` at target fraction **{frac}** against held-out "
        f"`{target}` text (the column keeps its name whatever the fraction is).",
        "",
        "## Numbers",
        "",
        "| route | total steps | val NELBO (last) | gen. perplexity (source) | MAUVE (source) | "
        f"MAUVE (gtl @ {frac}) |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        m = o.metrics
        lines.append(f"| `{o.route.name}` | {total} | {o.curve[-1][1]:.4g} | {_num(m['gen_ppl'])} | "
                     f"{_num(m['mauve_unguided'])} | {_num(m['mauve_gtl_5pct'])} |")
    lines += [
        "",
        "Validation NELBO over total steps (`val_nelbo.png`):",
        "",
        "| total step | " + " | ".join(f"`{o.route.name}`" for o in outcomes) + " |",
        "|---|" + "---|" * len(outcomes),
    ]
    curves = [dict(o.curve) for o in outcomes]
    for step in sorted(set().union(*curves)):
        lines.append(f"| {step} | " + " | ".join(f"{c[step]:.4g}" if step in c else "" for c in curves) + " |")
    lines += ["", "Files: `ar2diff.csv` (the numbers above), `val_nelbo.png`. The full reports are the runs' "
              "`eval/report.md`.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        return compare(args, argv)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    started = time.monotonic()
    args.config = args.config or default_config()
    s_ar, s_diff = split_steps(args.total_steps, args.ar_share)
    check_overrides(args.overrides)
    try:
        base = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise CompareError(f"{exc}") from None
    target = args.target or base.targets[0]
    if target not in base.targets:
        raise CompareError(f"--target {target}: not a target of the config; its targets are "
                           f"{', '.join(base.targets)}")
    if not any(math.isclose(args.fraction, f) for f in base.data.target_fractions):
        raise CompareError(f"--fraction {args.fraction:g}: not one of the config's data.target_fractions "
                           f"({', '.join(f'{f:g}' for f in base.data.target_fractions)}); pick one of them, "
                           f"or add it with --set data.target_fractions=[...]")
    sets = harness_overrides(base, s_ar, s_diff)
    run_root = Path(args.run_root or f"runs/ar2diff-{base.name}")
    outcomes = []
    for route in ROUTES:
        run_dir = run_root / route.name
        cmd = route_command(args, args.config, sets, route, run_dir)
        try:  # refuse a bad combination before either route starts
            load_config(args.config, [*args.overrides, *sets, f"pipeline.ar2diff={str(route.ar2diff).lower()}"])
        except ConfigError as exc:
            raise CompareError(f"route {route.name}: {exc}") from None
        outcomes.append(Outcome(route, run_dir, cmd))
    print(f"AR2Diff vs scratch: {args.total_steps} total steps (AR {s_ar} + diffusion {s_diff}), "
          f"fraction {args.fraction:g}, target {target}; runs under {run_root}", flush=True)

    for o in outcomes:
        run_route(o)
    for o in outcomes:
        read_run(o, s_ar, target, args.fraction)
    mauve_metric = outcomes[0].metrics["mauve_unguided"].metric
    if any(o.metrics["mauve_unguided"].metric != mauve_metric for o in outcomes):
        raise CompareError(f"the routes' evaluations used different MAUVE featurisers "
                           f"({', '.join(o.metrics['mauve_unguided'].metric for o in outcomes)}); set "
                           f"eval.mauve_featurizer explicitly with --set --update-config and rerun")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ar2diff.csv", csv_text(outcomes, args.total_steps))
    write_plot(out / "val_nelbo.png", outcomes, s_ar, args.total_steps)
    atomic_write_text(out / "README.md", readme_text(args, argv, outcomes, s_ar, s_diff, target, base,
                                                     mauve_metric, time.monotonic() - started))
    for o in outcomes:
        print(f"route {o.route.name}: " + ("reused the finished run (every task done)" if o.reused
                                           else "ran to the end") + f"; val NELBO {o.curve[-1][1]:.4g}")
    print(f"wrote {out / 'ar2diff.csv'}, {out / 'val_nelbo.png'}, {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    # A SIGTERM ends the script through the finally blocks, which stop the running launcher (its
    # local jobs go on, and a rerun waits for them; see launchers/submit.py).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
