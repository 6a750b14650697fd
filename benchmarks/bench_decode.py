"""The decoding-speed study (docs/method.md §11): seconds per generated sequence against length,
for autoregressive decoding with a KV cache and for diffusion decoding, on one device.

Rows (``results/decode_speed.csv``: method,steps,n_ratio,seq_len,batch,device,seconds_per_seq,
network_evals):

    ar_cached       the static-KV-cache AR decoder (gtl_dist/sample/ar.py), one token per pass
    ar_cuda_graph   the same with each step replayed as a CUDA graph (CUDA only)
    diffusion       the unguided ancestral sampler with 10, 32 and L steps
    gtl_planner     the GTL planner sampler (L steps) with a sequence-level ratio net at
                    n_ratio 8 / 64 / 512 (one ratio-net row per candidate, the paper's cost)

``network_evals`` counts network passes per sequence (each row of a batched pass counts once;
for the planner: denoiser + planner + ratio-net rows). The AR model and the denoiser have the
same size and weights (AR2Diff switches only the attention mask); the weights are random,
which does not change what a pass costs.

Sizes: ``--size paper`` is the paper's model (hidden 512, 8 blocks, |V| 30,522, 59.8M
parameters; ratio net and planner 4.1M), the default on CUDA. ``--size small`` (hidden 256,
4 blocks, |V| 8,000; ratio net and planner hidden 64, 4 blocks) is the default on a CPU, where
the paper's model at L = 2,048 takes minutes per pass of an L-step sampler. A row whose
estimated time (its network passes times one timed pass) exceeds ``--budget-s`` is not run;
the output lists it as skipped with its estimate. On CUDA the model keeps fp32 weights and runs
its blocks under bf16 autocast, as the package does; timings synchronise the device.

    python benchmarks/bench_decode.py                      # CPU, small model, ~10 min on 2 cores
    python benchmarks/bench_decode.py --device cuda        # one GPU, paper size

The crossover printed per batch size is the shortest length from which 10-step diffusion is
faster than the fastest AR decoder at every longer measured length. Rows of other devices
already in ``--out`` are kept, so CPU and GPU results share one file; ``--plot`` draws
seconds per sequence against length from that file.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gtl_dist.config import ModelConfig, NoiseConfig  # noqa: E402
from gtl_dist.diffusion import NoiseSchedule  # noqa: E402
from gtl_dist.io import atomic_write_text  # noqa: E402
from gtl_dist.models import ARLM, Denoiser, Planner, RatioNet, VocabSpec  # noqa: E402
from gtl_dist.sample import PlannerSampler, unguided_sampler  # noqa: E402
from gtl_dist.sample.ar import sample_ar  # noqa: E402
from gtl_dist.train.metrics import profile_operators  # noqa: E402

COLUMNS = ("method", "steps", "n_ratio", "seq_len", "batch", "device", "seconds_per_seq", "network_evals")
SIZES = {  # (denoiser / AR, ratio net and planner, |V| without [MASK])
    "paper": (ModelConfig(hidden=512, blocks=8, heads=8, cond_dim=128, dropout=0.0),
              ModelConfig(hidden=96, blocks=8, heads=8, cond_dim=48, dropout=0.0), 30522),
    "small": (ModelConfig(hidden=256, blocks=4, heads=4, cond_dim=64, dropout=0.0),
              ModelConfig(hidden=64, blocks=4, heads=4, cond_dim=32, dropout=0.0), 8000),
    "tiny": (ModelConfig(hidden=32, blocks=1, heads=2, cond_dim=16, dropout=0.0),
             ModelConfig(hidden=16, blocks=1, heads=2, cond_dim=8, dropout=0.0), 64),
}


@dataclass
class Row:
    method: str
    steps: int
    n_ratio: int
    seq_len: int
    batch: int
    device: str
    seconds_per_seq: float
    network_evals: float


@dataclass
class Networks:
    ar: ARLM
    denoiser: Denoiser
    ratio: RatioNet
    planner: Planner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--size", choices=sorted(SIZES), help="model size (default: paper on CUDA, small on CPU)")
    ap.add_argument("--methods", nargs="+", choices=["ar", "diffusion", "gtl_planner"],
                    default=["ar", "diffusion", "gtl_planner"], help="which kinds of rows to run")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--diffusion-steps", nargs="+", default=["10", "32", "L"],
                    help="ancestral steps per row; L = the sequence length")
    ap.add_argument("--n-ratio", type=int, nargs="+", default=[8, 64, 512],
                    help="planner sampler rows (values above the vocabulary are left out)")
    ap.add_argument("--budget-s", type=float, default=30.0,
                    help="skip a row whose estimated time per batch exceeds this")
    ap.add_argument("--total-budget-s", type=float, default=1800.0,
                    help="stop starting rows once this much time has gone (rows left are listed)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per row; the best counts")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: steadier on a shared machine)")
    ap.add_argument("--profile", action="store_true",
                    help="also print where one cached AR token's time goes (torch.profiler)")
    ap.add_argument("--out", type=Path, default=Path("results/decode_speed.csv"))
    ap.add_argument("--plot", type=Path, default=None, help="also draw the file's rows to this PNG")
    ap.add_argument("--plot-only", action="store_true", help="only redraw --plot from --out; measure nothing")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if args.plot_only and not args.plot:
        ap.error("--plot-only needs --plot PNG")
    args.size = args.size or ("paper" if args.device.type == "cuda" else "small")
    bad = [s for s in args.diffusion_steps if s != "L" and not s.isdigit()]
    if bad:
        ap.error(f"--diffusion-steps: {bad} are neither step counts nor 'L'")
    return args


def build_networks(size: str, length: int, device: torch.device) -> Networks:
    big, small, vocab_size = SIZES[size]
    vocab = VocabSpec(size=vocab_size + 1, mask_id=vocab_size)
    torch.manual_seed(0)
    ar = ARLM(big, vocab, length)
    denoiser = Denoiser(big, vocab, length)
    denoiser.load_state_dict(ar.state_dict())  # AR2Diff: the same weights, another attention mask
    nets = [ar, denoiser, RatioNet(small, vocab, length), Planner(small, vocab, length)]
    for net in nets:
        with torch.no_grad():  # zero-initialised output layers would make every draw the same
            for p in net.parameters():
                p.normal_(0.0, 0.02)
    return Networks(*(net.to(device).eval() for net in nets))


def best_time(run: Callable[[], float], repeats: int, device: torch.device) -> tuple[float, float]:
    """(best wall seconds, network evals per sequence) over ``repeats`` runs after one warm-up."""
    run()
    best, evals = float("inf"), 0.0
    for _ in range(repeats):
        torch.get_device_module(device).synchronize(device)
        t0 = time.perf_counter()
        evals = run()
        torch.get_device_module(device).synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best, evals


def pass_seconds(net: Callable, rows: int, length: int, vocab_size: int, device: torch.device) -> float:
    """Seconds of one pass over ``rows`` sequences, timed on at most 4 rows and scaled (a pass's
    cost grows linearly in the rows once there are a few): only an estimate, kept cheap."""
    timed = min(rows, 4)
    z = torch.randint(0, vocab_size, (timed, length), device=device)
    with torch.no_grad():
        return best_time(lambda: net(z) is None or 0.0, 1, device)[0] * rows / timed


def ar_runner(nets: Networks, length: int, batch: int, device: torch.device, graph: bool) -> Callable[[], float]:
    prompt = torch.zeros(batch, 1, dtype=torch.long, device=device)

    def run() -> float:
        g = torch.Generator(device).manual_seed(0)
        _, stats = sample_ar(nets.ar, prompt, length - 1, generator=g, top_k=8, cuda_graph=graph)
        return float(stats.network_evals)
    return run


def sampler_runner(sampler, batch: int) -> Callable[[], float]:
    def run() -> float:
        out = sampler.sample(batch, torch.Generator().manual_seed(0), batch_size=batch)
        return sum(out.stats.per_sequence().values())
    return run


def plan_rows(args: argparse.Namespace, nets: Networks, length: int, batch: int):
    """(row template, estimated seconds, runner) for every row at one length and batch size."""
    device, schedule = args.device, NoiseSchedule.from_config(NoiseConfig())
    vocab_size = nets.denoiser.vocab.size - 1
    full_pass = pass_seconds(nets.denoiser, batch, length, vocab_size, device)
    token_pass = pass_seconds(nets.ar, batch, 1, vocab_size, device)
    common = dict(seq_len=length, batch=batch, device=device.type)
    ar_methods = [] if "ar" not in args.methods else \
        ["ar_cached"] + (["ar_cuda_graph"] if device.type == "cuda" else [])
    for method in ar_methods:
        yield (dict(method=method, steps=length - 1, n_ratio=0, **common), (length - 1) * token_pass,
               ar_runner(nets, length, batch, device, graph=method == "ar_cuda_graph"))
    diffusion_steps = args.diffusion_steps if "diffusion" in args.methods else []
    for steps in dict.fromkeys(length if spec == "L" else int(spec) for spec in diffusion_steps):
        sampler = unguided_sampler(nets.denoiser, schedule, top_k=8, steps=steps)
        yield (dict(method="diffusion", steps=steps, n_ratio=0, **common), min(steps, length) * full_pass,
               sampler_runner(sampler, batch))
    planner_n_ratio = args.n_ratio if "gtl_planner" in args.methods else []
    for n_ratio in (n for n in planner_n_ratio if n <= vocab_size):
        ratio_pass = pass_seconds(nets.ratio, min(batch * n_ratio, 4096), length, vocab_size, device)
        chunks = -(-batch * n_ratio // 4096)
        sampler = PlannerSampler(nets.denoiser, nets.ratio, nets.planner, n_ratio=n_ratio,
                                 ratio_batch_size=4096)
        yield (dict(method="gtl_planner", steps=length, n_ratio=n_ratio, **common),
               length * (full_pass + chunks * ratio_pass), sampler_runner(sampler, batch))


def measure(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    """Run every planned row, most telling first (AR and 10-step diffusion at every length, then
    the rest), within the per-row and total budgets."""
    nets = {length: build_networks(args.size, length, args.device) for length in args.lengths}
    plans = [plan for length in args.lengths for batch in args.batches
             for plan in plan_rows(args, nets[length], length, batch)]
    plans.sort(key=lambda plan: _priority(plan[0]))
    rows, skipped, started = [], [], time.perf_counter()
    for template, estimate, run in plans:
        label = (f"{template['method']} steps={template['steps']} n_ratio={template['n_ratio']} "
                 f"L={template['seq_len']} batch={template['batch']}")
        spent = time.perf_counter() - started
        if estimate > args.budget_s or spent + (1 + args.repeats) * estimate > args.total_budget_s:
            skipped.append(f"{label}: estimated {estimate:.1f} s per batch (budgets: {args.budget_s:g} s "
                           f"per row, {args.total_budget_s - spent:.0f} s left in total)")
            print(f"skip  {skipped[-1]}", flush=True)
            continue
        seconds, evals = best_time(run, args.repeats, args.device)
        rows.append(Row(**template, seconds_per_seq=seconds / template["batch"], network_evals=evals))
        print(f"{label:<52} {seconds / template['batch']:10.4f} s/seq  {evals:10.1f} evals/seq", flush=True)
    return rows, skipped


def _priority(template: dict) -> tuple:
    method_rank = 0 if template["method"].startswith("ar_") or template["steps"] == 10 else 1
    return method_rank, template["method"] == "gtl_planner", template["seq_len"], template["batch"]


def token_vs_forward(args: argparse.Namespace) -> tuple[float, float]:
    """(one cached AR token step, one single-token forward) in seconds, batch 1, mid-length cache."""
    length = max(args.lengths)
    nets = build_networks(args.size, length, args.device)
    x = torch.zeros(1, 1, dtype=torch.long, device=args.device)
    cache = nets.ar.new_cache(1, length)
    with torch.no_grad():
        nets.ar.forward_cached(torch.zeros(1, length // 2, dtype=torch.long, device=args.device), cache)
        position = torch.full((1,), length // 2, device=args.device)
        step = best_time(lambda: nets.ar.logits_at(x, cache, position) is None or 0.0, 20, args.device)[0]
        forward = best_time(lambda: nets.ar(x) is None or 0.0, 20, args.device)[0]
    return step, forward


def profile_decoding(args: argparse.Namespace, tokens: int = 64) -> str:
    """torch.profiler's table of ``tokens`` eager cached AR steps at batch 1: where a token's time
    goes (operator count and host time per token against device time)."""
    length = max(args.lengths)
    tokens = min(tokens, length - 1)
    nets = build_networks(args.size, length, args.device)
    run = ar_runner(nets, tokens + 1, 1, args.device, graph=False)
    run()  # warm-up
    table, averages = profile_operators(run, args.device, rows=15)
    ops = sum(e.count for e in averages if e.key.startswith("aten::"))
    return (f"profile of {tokens} cached AR tokens (eager, batch 1): {ops / tokens:.0f} aten operators "
            f"per token\n" + table)


def crossovers(rows: list[Row]) -> dict[int, int | None]:
    """Per batch: the shortest length from which 10-step diffusion beats the fastest AR row at
    every longer measured length (None: not reached)."""
    out = {}
    for batch in sorted({r.batch for r in rows}):
        speedups = []
        for length in sorted({r.seq_len for r in rows if r.batch == batch}):
            at = [r for r in rows if r.batch == batch and r.seq_len == length]
            ar = [r.seconds_per_seq for r in at if r.method.startswith("ar_")]
            diff = [r.seconds_per_seq for r in at if r.method == "diffusion" and r.steps == 10]
            if ar and diff:
                speedups.append((length, min(ar) / diff[0]))
        if not speedups:
            continue
        out[batch] = next((length for i, (length, _) in enumerate(speedups)
                           if all(s >= 1.0 for _, s in speedups[i:])), None)
    return out


def write_rows(path: Path, rows: list[Row]) -> None:
    """Merge ``rows`` into the CSV at ``path`` (a row measured again replaces its old value; rows
    of other devices, lengths or methods stay), atomically."""
    key_columns = COLUMNS[:6]
    merged: dict[tuple, dict] = {}
    if path.exists():
        with open(path, newline="") as f:
            merged = {tuple(r[c] for c in key_columns): r for r in csv.DictReader(f)}
    for row in rows:
        values = {c: _fmt(v) for c, v in asdict(row).items()}
        merged[tuple(values[c] for c in key_columns)] = values
    lines = [",".join(COLUMNS)] + [",".join(r[c] for c in COLUMNS) for r in merged.values()]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")


def _fmt(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def plot(csv_path: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    panels = sorted({(r["device"], int(r["batch"])) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (device, batch) in zip(axes[0], panels):
        mine = [r for r in rows if r["device"] == device and int(r["batch"]) == batch]
        for key in sorted({_series(r) for r in mine}):
            points = sorted((int(r["seq_len"]), float(r["seconds_per_seq"])) for r in mine if _series(r) == key)
            ax.plot(*zip(*points), marker="o", label=key)
        lengths = sorted({int(r["seq_len"]) for r in mine})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set(xlabel="sequence length", ylabel="seconds per sequence", title=f"{device}, batch {batch}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(png)


def _series(row: dict) -> str:
    if row["method"] == "diffusion":
        return f"diffusion {'L' if int(row['steps']) == int(row['seq_len']) else row['steps']} steps"
    if row["method"] == "gtl_planner":
        return f"gtl_planner n_ratio {row['n_ratio']}"
    return row["method"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plot_only:
        plot(args.out, args.plot)
        return
    torch.set_num_threads(args.threads)
    print(f"command: python benchmarks/bench_decode.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"device {args.device}, size {args.size}, {torch.get_num_threads()} CPU threads, "
          f"best of {args.repeats}, budget {args.budget_s:g} s per row", flush=True)
    rows, skipped = measure(args)
    write_rows(args.out, rows)
    if "ar" in args.methods:
        step, forward = token_vs_forward(args)
        print(f"\none cached AR token step / one single-token forward (batch 1, cache {max(args.lengths)}): "
              f"{step * 1e3:.2f} ms / {forward * 1e3:.2f} ms = {step / forward:.2f}x (target <= 1.5x on CPU)")
    if args.profile:
        print(profile_decoding(args))
    for batch, length in crossovers(rows).items():
        print(f"crossover, batch {batch}: 10-step diffusion is faster than AR "
              + (f"from L = {length} on" if length else f"nowhere up to L = {max(args.lengths)}"))
    print(f"{len(rows)} rows written to {args.out}; {len(skipped)} skipped over budget")
    if args.plot:
        plot(args.out, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
