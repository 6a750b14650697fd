"""The MDLM loss head two ways, in one run: through the SUBS log-probability tensor
(``subs_log_probs``, what the samplers read) and fused (``subs_token_log_probs``, what training
reads since issue 13).

    python benchmarks/bench_loss_head.py [--device cpu|cuda] [--batch 8] [--seq-len 512]
                                         [--vocab 30522] [--hidden 512] [--repeats 5]

Each way runs the fp32 output projection of hidden states h [B, L, H] to V logits, the
masked-token cross-entropy (half the positions masked, as at t = 0.5) with the greedy-accuracy
statistic, and the backward pass to h and the projection's weight: the part of a training step
that works on [B, L, V] tensors. The defaults are the paper-size denoiser's vocabulary, width and
length at micro-batch 8 (the GPU suite runs micro-batch 64, the training micro-batch).

Printed per way: median milliseconds per forward + backward over --repeats (interleaved, after
one warm-up), peak memory above the inputs (CUDA: max_memory_allocated; CPU: the peak RSS of a
fresh process that runs the way once), and whether the two ways' losses and gradients are
bit-for-bit equal (they must be: exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gtl_dist.models.heads import subs_log_probs, subs_token_log_probs  # noqa: E402

WAYS = ("SUBS log-prob tensor", "fused")


def inputs(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask_id = args.vocab - 1
    x0 = torch.randint(0, mask_id, (args.batch, args.seq_len), generator=g)
    masked = torch.rand(x0.shape, generator=g) < 0.5
    return {"h": torch.randn(args.batch, args.seq_len, args.hidden, generator=g).to(device).requires_grad_(),
            "weight": (0.02 * torch.randn(args.vocab, args.hidden, generator=g)).to(device).requires_grad_(),
            "x0": x0.to(device), "z": torch.where(masked, mask_id, x0).to(device)}


def loss_of(way: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean masked-token NLL (and the accuracy statistic, computed and dropped) the given way."""
    mask_id = t["weight"].shape[0] - 1
    logits = F.linear(t["h"], t["weight"])
    if way == WAYS[0]:
        logp = subs_log_probs(logits, t["z"], mask_id)
        log_p_true, greedy = logp.gather(-1, t["x0"].unsqueeze(-1)).squeeze(-1), logp.detach().argmax(-1)
    else:
        log_p_true, greedy = subs_token_log_probs(logits, t["x0"], mask_id)
    scored = t["z"] == mask_id
    (greedy == t["x0"]).logical_and(scored).sum()
    return torch.where(scored, -log_p_true, torch.zeros_like(log_p_true)).sum() / scored.sum()


def step(way: str, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = loss_of(way, t)
    grads = torch.autograd.grad(loss, [t["h"], t["weight"]])
    return loss.detach(), list(grads)


def peak_memory_gib(way: str, args: argparse.Namespace, device: torch.device) -> float:
    """Peak memory one forward + backward adds to its inputs."""
    if device.type == "cuda":
        t = inputs(args, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(way, t)
        return (torch.cuda.max_memory_allocated() - before) / 2**30
    argv = [sys.executable, __file__, "--rss-of", way] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in ("batch", "seq_len", "vocab", "hidden")]
    return float(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip())


def rss_of(way: str, args: argparse.Namespace) -> None:
    """In a fresh process: print the peak RSS one CPU step adds, in GiB. From /proc's VmHWM, which
    starts afresh at exec; getrusage's ru_maxrss would start at the parent's peak."""
    def high_water_kib() -> int:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0])

    step(way, inputs(argparse.Namespace(**{**vars(args), "batch": 1, "seq_len": 8}), torch.device("cpu")))
    t = inputs(args, torch.device("cpu"))  # after a small step: thread pools, the allocator's arenas
    before = high_water_kib()
    step(way, t)
    print((high_water_kib() - before) / 2**20)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rss-of", choices=WAYS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    return args


def main() -> int:
    args = parse_args()
    if args.rss_of:
        rss_of(args.rss_of, args)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as training sets it

    t = inputs(args, device)
    results = {way: step(way, t) for way in WAYS}  # also the warm-up
    (loss_a, grads_a), (loss_b, grads_b) = results.values()
    identical = torch.equal(loss_a, loss_b) and all(map(torch.equal, grads_a, grads_b))
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way in WAYS:
            torch.get_device_module(device).synchronize(device)
            start = time.perf_counter()
            step(way, t)
            torch.get_device_module(device).synchronize(device)
            times[way].append(1e3 * (time.perf_counter() - start))

    elements = args.batch * args.seq_len * args.vocab
    print(f"loss head on {device}: B {args.batch}, L {args.seq_len}, |V| {args.vocab}, hidden {args.hidden}; "
          f"one fp32 [B, L, V] tensor = {4 * elements / 2**30:.2f} GiB; median of {args.repeats}")
    print(f"{'way':<22}{'ms fwd+bwd':>12}{'peak GiB':>10}")
    stats = {way: (statistics.median(times[way]), peak_memory_gib(way, args, device)) for way in WAYS}
    for way, (ms, gib) in stats.items():
        print(f"{way:<22}{ms:>12.1f}{gib:>10.2f}")
    (ms_a, gib_a), (ms_b, gib_b) = stats.values()
    print(f"fused / SUBS tensor: time {ms_b / ms_a:.2f}x, peak memory {gib_b / gib_a:.2f}x")
    print(f"losses and gradients bit-for-bit equal: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
