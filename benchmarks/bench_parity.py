"""CPU-vs-device token parity of the samplers under one seed.

The diffusion samplers draw their uniforms from a CPU generator and the AR decoder here too, so
the same seed gives the same tokens on every device up to rounding: a token differs only where
bf16 autocast on the GPU moves a draw across a boundary of its inverse CDF. For each sampler the
script prints the fraction of tokens equal to the CPU's (1.0000 = identical), and for the AR
decoder also the CUDA-graph step against the eager one, which must be exactly equal.

    python benchmarks/bench_parity.py --device cuda     # seconds
    python benchmarks/bench_parity.py --device cpu      # runs the same code on the CPU (1.0000)

Networks are small and random (|V| 9 + [MASK], L 32), guided by a random sequence-level ratio
net; ``--min-parity`` makes the exit status fail below a threshold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gtl_dist.config import ModelConfig  # noqa: E402
from gtl_dist.diffusion import LogLinearSchedule  # noqa: E402
from gtl_dist.models import ARLM, Denoiser, Planner, RatioNet, VocabSpec  # noqa: E402
from gtl_dist.sample import PlannerSampler, exact_guided_sampler, unguided_sampler  # noqa: E402
from gtl_dist.sample.ar import sample_ar  # noqa: E402

VOCAB = VocabSpec(size=10, mask_id=9)
LENGTH = 32
CFG = ModelConfig(hidden=64, blocks=2, heads=4, cond_dim=32, dropout=0.0)


def random_networks() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    nets = {"denoiser": Denoiser(CFG, VOCAB, LENGTH), "ratio": RatioNet(CFG, VOCAB, LENGTH),
            "planner": Planner(CFG, VOCAB, LENGTH), "ar": ARLM(CFG, VOCAB, LENGTH)}
    with torch.no_grad():
        for net in nets.values():
            for p in net.parameters():
                p.normal_(0.0, 0.2)
    return {name: net.eval() for name, net in nets.items()}


def draw_all(nets: dict[str, torch.nn.Module], num: int, cuda_graph: bool = False) -> dict[str, torch.Tensor]:
    """Tokens of every sampler from seed 0, on the networks' device (CPU generators throughout)."""
    schedule = LogLinearSchedule()
    samplers = {
        "planner (GTL, n_ratio 9)": PlannerSampler(nets["denoiser"], nets["ratio"], nets["planner"], n_ratio=9),
        "ancestral (exact guidance)": exact_guided_sampler(nets["denoiser"], nets["ratio"], schedule, steps=32),
        "ancestral (unguided)": unguided_sampler(nets["denoiser"], schedule, steps=32),
    }
    out = {name: s.sample(num, torch.Generator().manual_seed(0), batch_size=num).tokens
           for name, s in samplers.items()}
    prompt = torch.zeros(num, 1, dtype=torch.long, device=next(nets["ar"].parameters()).device)
    out["AR decoder"] = sample_ar(nets["ar"], prompt, LENGTH - 1, generator=torch.Generator().manual_seed(0),
                                  cuda_graph=cuda_graph)[0].cpu()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--min-parity", type=float, default=0.0, help="fail (exit 1) below this parity")
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    return args


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    reference = draw_all(random_networks(), args.sequences)
    on_device = {name: net.to(device) for name, net in random_networks().items()}
    tested = draw_all(on_device, args.sequences)
    worst = 1.0
    print(f"{args.sequences} sequences of length {LENGTH}, |V| {VOCAB.size}, seed 0: cpu vs {device}")
    for name, tokens in reference.items():
        parity = (tokens == tested[name]).double().mean().item()
        worst = min(worst, parity)
        print(f"  {name:<28} token parity {parity:.4f}")
    if device.type == "cuda":
        graphed = draw_all(on_device, args.sequences, cuda_graph=True)["AR decoder"]
        exact = torch.equal(graphed, tested["AR decoder"])
        print(f"  AR decoder, CUDA graph vs eager on {device}: {'identical' if exact else 'DIFFERENT'}")
        worst = min(worst, float(exact))
    return 0 if worst >= args.min_parity else 1


if __name__ == "__main__":
    sys.exit(main())
