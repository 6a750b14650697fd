"""An H100-hour estimate of the arXiv preset (configs/arxiv.yaml), from one measured throughput.

    python benchmarks/arxiv_gpu_hours.py [--config configs/arxiv.yaml] [--set KEY=VALUE ...]
        [--tokens-per-s 258000] [--seeds 1]

The only measurement is the throughput of the current code on one H100, filed with the GPU fast
path issue before that work started: the 59.8M-parameter denoiser at L = 512, micro-batch 64, bf16
autocast, fused AdamW, eager, trained 258k tokens/s (127 ms a step; 10 % MFU). Every other cost is
scaled from it by FLOPs, so the estimate holds the same MFU everywhere:

- training a network of N parameters (B blocks, hidden H) costs 6N + 12·B·H·L FLOPs a token;
  a frozen network it reads (the source denoiser under finetune's start, edit_ratio's guide) a
  forward pass, 2N + 4·B·H·L;
- a task trains ``steps × global_batch × seq_len`` tokens; tasks come from the launcher's own plan
  (gtl_dist/cluster/dag.py), so the per-(target, fraction, seed) arrays are counted as they run;
- sampling runs one forward pass of the denoiser (and, for GTL, of its guide) over ``batch × L``
  tokens per step: ``sample.steps`` steps for the ancestral samplers, L steps (one position each)
  for the planner sampler, which also runs the planner. Inference at batch 16 runs below training's
  MFU, so this part is a lower bound.

The data build (CPU) and the evaluation are not counted. With --tokens-per-s 540000 (the same
model under torch.compile, 21 % MFU) the training rows halve.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from gtl_dist.cluster.dag import build_pipeline
from gtl_dist.config import load_config
from gtl_dist.data.tokenizer import MASK_ID, PAD_ID
from gtl_dist.log import setup_logging
from gtl_dist.models.heads import VocabSpec, build_model, count_parameters
from gtl_dist.methods import METHODS
from gtl_dist.stages import STAGES
from gtl_dist.train.metrics import flops_per_token

MEASURED_TOKENS_PER_S = 258_000  # the 59.8M denoiser, L = 512, one H100, eager (see above)


def stage_hours(cfg, models, flops_per_s: float) -> dict[str, tuple[int, float]]:
    """{stage: (tasks, hours)} for every training stage of the plan."""
    pipeline, L = build_pipeline(cfg), cfg.seq_len
    out = {}
    for group in pipeline.groups:
        if group.name not in STAGES:
            continue
        tc = getattr(cfg.train, group.name)
        per_token = flops_per_token(models[STAGES[group.name].role], L, train=True)
        if group.name == "edit_ratio":  # it reads the frozen source denoiser every step
            per_token += flops_per_token(models["denoiser"], L, train=False)
        tokens = tc.steps * tc.global_batch * L
        out[group.name] = (len(group.tasks), len(group.tasks) * tokens * per_token / flops_per_s / 3600)
    return out


def sampling_hours(cfg, models, flops_per_s: float) -> dict[str, tuple[int, float]]:
    """{method: (sample sets, hours)}: forward passes over every step of every sample set."""
    pipeline, s, L = build_pipeline(cfg), cfg.sample, cfg.seq_len
    sets: dict[str, set] = defaultdict(set)
    for task in pipeline.group("sample").tasks:
        sets[task.method].add((task.target, task.fraction, task.seed))
    out = {}
    for method, cells in sets.items():
        per_token = flops_per_token(models["denoiser"], L, train=False)
        steps = s.steps
        spec = METHODS[method]
        if spec.guided:
            per_token += flops_per_token(models[spec.guide], L, train=False)
            if spec.needs_planner(s):
                steps = L
                per_token += flops_per_token(models["planner"], L, train=False)
        flops = len(cells) * s.num_samples * steps * L * per_token
        out[method] = (len(cells), flops / flops_per_s / 3600)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/arxiv.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tokens-per-s", type=float, default=MEASURED_TOKENS_PER_S,
                        help="measured training tokens/s of the 59.8M denoiser at L=512 (default: %(default)s)")
    args = parser.parse_args()
    cfg = load_config(args.config, ["data.path=/data/arxiv.json", *args.set])
    vocab = VocabSpec(size=cfg.tokenizer.vocab_size, mask_id=MASK_ID, pad_id=PAD_ID)  # SentencePiece ids
    roles = {spec.role for spec in STAGES.values()}
    models = {role: build_model(role, cfg, vocab) for role in roles}
    flops_per_s = args.tokens_per_s * flops_per_token(models["denoiser"], cfg.seq_len, train=True)
    print(f"{args.config} {' '.join(args.set)}: denoiser {count_parameters(models['denoiser']) / 1e6:.1f}M "
          f"parameters, L = {cfg.seq_len}; {args.tokens_per_s / 1e3:.0f}k training tokens/s of the "
          f"denoiser = {flops_per_s / 1e12:.0f} TFLOP/s ({100 * flops_per_s / 989e12:.1f}% of 989 TFLOP/s)\n")
    print("| stage | tasks | H100-hours |\n|---|---|---|")
    total = 0.0
    for name, (tasks, hours) in {**stage_hours(cfg, models, flops_per_s),
                                 **{f"sample: {m}": v for m, v in sampling_hours(cfg, models, flops_per_s).items()}}.items():
        print(f"| {name} | {tasks} | {hours:.1f} |")
        total += hours
    print(f"| **total** | | **{total:.0f}** |")


if __name__ == "__main__":
    setup_logging()
    main()
