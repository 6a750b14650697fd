"""What guidance adds to one sampling step's network call, in one run: the source denoiser alone,
the source with gtl's adapter composed in (``AdaptedDenoiser``), and the source plus gtl_edit's
edit-ratio network (a second network).

    python benchmarks/bench_guide_step.py [--preset demo|arxiv|markov] [--device cpu|cuda]
                                          [--batch 32] [--repeats 7] [--set KEY=VALUE ...]

The networks are built at the preset's sizes (configs/<preset>.yaml: denoiser, adapter,
edit-ratio network, vocabulary, sequence length) with random weights; the adapter's output map is
filled in (a zero adapter costs the same). Each way runs one inference forward on a batch of
half-masked sequences; printed: median milliseconds over --repeats (interleaved, after a warm-up)
and each way's time as a multiple of the source alone. Target (issue 23): the adapter's step at
most 1.2x the unguided step; it adds no network call (tests/test_adapter.py checks the count).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gtl_dist.config import load_config  # noqa: E402
from gtl_dist.models import VocabSpec, build_model  # noqa: E402
from gtl_dist.models.adapter import AdaptedDenoiser  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESET_SETTINGS = {"arxiv": ["data.path=/unused"], "demo": [], "markov": []}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESET_SETTINGS), default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config override on top of the preset, e.g. --set models.adapter.heads=4")
    return parser.parse_args(argv)


def networks(args: argparse.Namespace, device: torch.device) -> tuple[dict, VocabSpec, int]:
    cfg = load_config(REPO / "configs" / f"{args.preset}.yaml", PRESET_SETTINGS[args.preset] + args.overrides)
    if cfg.data.corpus == "markov":
        vocab = VocabSpec(size=cfg.data.markov.num_states + 1, mask_id=cfg.data.markov.num_states)
    else:
        vocab = VocabSpec(size=cfg.tokenizer.vocab_size, mask_id=4, pad_id=0)
    torch.manual_seed(0)
    source = build_model("denoiser", cfg, vocab).to(device).eval()
    adapter = build_model("adapter", cfg, vocab).to(device).eval()
    torch.nn.init.normal_(adapter.up.weight, std=0.02)
    edit = build_model("edit_ratio", cfg, vocab).to(device).eval()
    ways = {"source alone": source,
            "source + adapter (gtl)": AdaptedDenoiser(source, adapter, 1.0).eval(),
            "source + edit-ratio net (gtl_edit)": lambda z: source(z) + edit(z)}
    return ways, vocab, cfg.seq_len


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    ways, vocab, seq_len = networks(args, device)
    g = torch.Generator().manual_seed(1)
    z = torch.randint(0, vocab.size, (args.batch, seq_len), generator=g)
    z = torch.where(torch.rand(z.shape, generator=g) < 0.5, torch.full_like(z, vocab.mask_id), z)
    z = torch.where(z == vocab.mask_id, z, z.clamp(max=vocab.size - 1)).to(device)
    times: dict[str, list[float]] = {name: [] for name in ways}
    with torch.inference_mode():
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, net in ways.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                net(z)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["source alone"][1:])
    print(f"preset {args.preset}, device {device}, batch {args.batch} x {seq_len} tokens, |V| {vocab.size}, "
          f"median of {args.repeats}")
    for name, t in times.items():
        ms = statistics.median(t[1:]) * 1e3
        print(f"  {name:36s} {ms:9.2f} ms  {ms / (base * 1e3):5.2f}x")


if __name__ == "__main__":
    main()
