"""No step waits for the device unless its control flow needs a value (docs/architecture.md,
"Decoding" and "Training"): the host reads of each training step and each sampler step, counted
on a CPU at tiny size by call site (tests/host_reads.py), are exactly the ones listed here with
the reason each must stay. A read that comes back (an ``.item()`` in the loop, a boolean mask in
a sampler, an id check in a forward pass) adds a call site or a count, and the test fails.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest
import torch

from gtl_dist.config import AdapterConfig, LoraConfig, ModelConfig
from gtl_dist.diffusion import LogLinearSchedule
from gtl_dist.models import ARLM, Denoiser, EditRatioNet, Planner, RatioNet, VocabSpec
from gtl_dist.models.adapter import AdaptedDenoiser, GuideAdapter
from gtl_dist.models.lora import LoraDenoiser
from gtl_dist.sample import AncestralSampler, PlannerSampler, unguided_sampler
from gtl_dist.sample.ar import sample_ar
from host_reads import HostReads
from train_helpers import PYTHON, REPO, deepspeed_ops, rank_env  # noqa: F401

VOCAB = VocabSpec(10, mask_id=9)
L = 8
CFG = ModelConfig(hidden=32, blocks=1, heads=2, cond_dim=16, dropout=0.0)


def randomized(net: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def nets() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    denoiser = randomized(Denoiser(CFG, VOCAB, L))
    adapter = randomized(GuideAdapter(AdapterConfig(rank=4), VOCAB, L, CFG.hidden))
    return {"denoiser": denoiser, "edit": randomized(EditRatioNet(CFG, VOCAB, L)),
            "ratio": randomized(RatioNet(CFG, VOCAB, L)), "planner": randomized(Planner(CFG, VOCAB, L)),
            "ar": randomized(ARLM(CFG, VOCAB, 16)), "adapted": AdaptedDenoiser(denoiser, adapter, 1.5).eval(),
            "lora": randomized(LoraDenoiser(CFG, VOCAB, L, LoraConfig(rank=2)))}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- samplers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("denoiser, guide, mode", [
    ("denoiser", "edit", "sample"), ("denoiser", "ratio", "argmax"), ("denoiser", None, "sample"),
    ("denoiser", "edit", "uniform"), ("adapted", None, "sample"), ("adapted", None, "uniform"),
    ("lora", "edit", "sample")])
def test_planner_sampler_steps_read_nothing(nets, denoiser, guide, mode):
    """L steps, and the only read is the samples' copy back to the host, whichever denoiser
    (plain, with its guide adapter composed in, a LoRA fine-tune) and guide it samples with.
    Uniform positions without a planner is the first-hitting sampler (build_sampler)."""
    planner = None if mode == "uniform" else nets["planner"]
    sampler = PlannerSampler(nets[denoiser], nets[guide] if guide else None, planner,
                             gamma=2.0 if guide else 0.0, n_ratio=5, top_k=3, planner_mode=mode)
    with HostReads() as reads:
        out = sampler.sample_batch(3, gen())
    assert out.stats.steps == L
    assert reads.sites == Counter({"gtl_dist/sample/planner_sampler.py:sample_batch": 1})


@pytest.mark.parametrize("denoiser, guide", [("denoiser", "edit"), ("denoiser", "ratio"), ("denoiser", None),
                                             ("adapted", None)])
def test_ancestral_sampler_steps_read_only_what_their_control_flow_needs(nets, denoiser, guide):
    """Per step: which sequences changed (whether, and on which, the networks run; from step 1
    on) and the positions still masked (their number varies); when a guided sampler's networks
    run, the masked positions its ratio net scores. Then the end: any [MASK] left, and the copy
    back. Rows are indexed, never masked (a boolean mask would read it again)."""
    steps = 32
    sampler = (AncestralSampler(nets[denoiser], nets[guide], LogLinearSchedule(), n_ratio=5, top_k=3,
                                steps=steps) if guide else
               unguided_sampler(nets[denoiser], LogLinearSchedule(), top_k=3, steps=steps))
    with HostReads() as reads:
        out = sampler.sample_batch(3, gen())
    expected = Counter({"gtl_dist/sample/ancestral.py:_update": steps - 1,
                        "gtl_dist/sample/ancestral.py:sample_batch": steps + 1,
                        "gtl_dist/sample/ancestral.py:_fill_greedily": 1})
    if guide:  # every network run, the one before the first step included
        expected["gtl_dist/sample/ancestral.py:proposals"] = out.stats.denoiser.calls
    # Some steps ran no network, some ran it on a few of the sequences.
    assert out.stats.cached_steps > 0 and out.stats.denoiser.rows < 3 * out.stats.denoiser.calls
    assert reads.sites == expected


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=0.0), dict(top_k=3)])
def test_ar_decoding_steps_read_nothing(nets, kwargs):
    """The reads of sample_ar are the prompt's id check alone, however many tokens it draws."""
    prompt = torch.randint(0, 9, (2, 3), generator=gen(1))
    counts = []
    for num_tokens in (2, 12):
        with HostReads() as reads:
            sample_ar(nets["ar"], prompt, num_tokens, generator=gen(), **kwargs)
        counts.append(reads.sites)
    assert counts[0] == counts[1] == Counter({"gtl_dist/models/dit.py:check_token_ids": 1})


# -- training ---------------------------------------------------------------------------------

# Runs a tiny denoiser stage (DeepSpeed, ZeRO 0, fp32, 2 micro-batches per step) with every
# train_step counted, and prints each step's reads and whether it was logged.
DRIVER = """
import json, sys
sys.path.insert(0, "tests")
from host_reads import HostReads
from gtl_dist.config import load_config
from gtl_dist.data import prepare_data
from gtl_dist.train import loop, run_stage
cfg = load_config(sys.argv[1], json.loads(sys.argv[3]))
prepare_data(cfg, sys.argv[2])
steps, step = [], loop.train_step
def counted(recipe, ctx, state):
    with HostReads() as reads:
        out = step(recipe, ctx, state)
    steps.append({"logged": out.values is not None, "sites": reads.sites,
                  "parameters": len(list(state.model.parameters()))})
    return out
loop.train_step = counted
run_stage(cfg, sys.argv[2], "denoiser")
print("STEPS " + json.dumps(steps), flush=True)
"""
SETTINGS = ["train.denoiser.steps=5", "train.denoiser.micro_batch=32", "train.denoiser.log_every=2",
            "train.denoiser.val_every=5", "train.denoiser.save_every=5", "train.denoiser.ema=0.9"]

def every_step(parameters: int) -> Counter:
    """The reads of every step, and why each may stay. None of them waits for a GPU."""
    return Counter({
        # the data fingerprint: crc32 of each micro-batch, on the host before the batch moves
        "gtl_dist/train/state.py:fingerprint": 2 * 2,
        # the token-id check of each micro-batch, on the host as the loader reads it
        "gtl_dist/models/dit.py:check_token_ids": 2,
        # the preemption flags and the fingerprint, all-reduced on the host (gloo) so that every
        # rank stops after the same step: control flow
        "gtl_dist/train/dist.py:all_reduce": 1,
        # CPU only: torch's single-tensor AdamW reads each parameter's step count; on GPUs the
        # engine runs the fused AdamW, whose step counts stay on the device
        "torch/optim/optimizer.py:_get_value": parameters,
    })


# A logged step also reads what it logs: the summed loss and statistics (the step's one device
# read), their all-reduce, and the gradient norm, which DeepSpeed does not keep at ZeRO 0 in fp32.
LOGGED = Counter({"gtl_dist/train/loop.py:read": 1, "gtl_dist/train/dist.py:all_reduce": 1,
                  "gtl_dist/train/loop.py:train_step": 1})


@pytest.mark.distributed
def test_training_steps_read_the_device_only_when_they_log(tmp_path, deepspeed_ops):  # noqa: F811
    env = {k: v for k, v in rank_env(0, 1, 0).items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([PYTHON, "-c", DRIVER, str(REPO / "configs" / "tiny.yaml"), str(tmp_path / "run"),
                           json.dumps(SETTINGS)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("STEPS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    steps = json.loads(lines[0][len("STEPS "):])
    assert [s["logged"] for s in steps] == [False, True, False, True, True]
    for number, s in enumerate(steps, 1):
        expected = every_step(s["parameters"]) + (LOGGED if s["logged"] else Counter())
        assert Counter(s["sites"]) == expected, number
