"""The training loop's GPU fast path, checked on a CPU (docs/operations.md, "Training on GPUs").

- ``train.<stage>.compile``: the denoiser's forward and MDLM loss trace into ONE graph (token ids
  are checked on the host where batches are loaded, tests/test_data_loader.py), a compiled
  denoiser stage trains like the eager one through DeepSpeed, and the setting is refused where it
  cannot work.
- torch's fused AdamW, which the engine picks where the optimiser state lives on a GPU, goes
  through DeepSpeed at ZeRO 0-3, fp32 and bf16, and saves and resumes: torch's CPU fused AdamW
  takes the same DeepSpeed code path as the CUDA one.

The unit tests compile with the ``aot_eager`` backend: the same single graph, forward and
backward, run on eager kernels, so it compiles in seconds. The stage test uses the loop's own
backend (inductor), as a GPU run does; its compile takes about a minute on a CPU.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from gtl_dist.config import ConfigError, ModelConfig, load_config
from gtl_dist.diffusion import LogLinearSchedule, mask_tokens, mdlm_loss, mdlm_terms, sample_t
from gtl_dist.models import Denoiser, VocabSpec
from train_helpers import PYTHON, REPO, Ranks, deepspeed_ops, rank_env, train_records  # noqa: F401

VOCAB = VocabSpec(7, mask_id=6, pad_id=0)
SCHEDULE = LogLinearSchedule()
L = 16


def tiny_denoiser(dropout: float, time_conditioning: bool = False) -> Denoiser:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden=32, blocks=2, heads=2, cond_dim=16, dropout=dropout,
                      time_conditioning=time_conditioning)
    return Denoiser(cfg, VOCAB, L).train()


def clean_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB.mask_id, (8, L), generator=g), sample_t(8, g, t_min=1e-3)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_denoiser_forward_and_mdlm_loss_trace_into_one_graph(time_conditioning):
    net = tiny_denoiser(dropout=0.1, time_conditioning=time_conditioning)
    x0, t = clean_batch()
    z = mask_tokens(x0, SCHEDULE.move_chance(t), VOCAB.mask_id, torch.Generator().manual_seed(1))
    explained = torch._dynamo.explain(mdlm_terms)(net, x0, z, t, SCHEDULE, VOCAB)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_loss_matches_eager():
    net = tiny_denoiser(dropout=0.0)
    compiled = torch.compile(mdlm_terms, fullgraph=True, dynamic=False, backend="aot_eager")
    x0, t = clean_batch()
    eager_loss, eager_stats = mdlm_loss(net, x0, SCHEDULE, t, torch.Generator().manual_seed(1))
    loss, stats = mdlm_loss(net, x0, SCHEDULE, t, torch.Generator().manual_seed(1), terms=compiled)
    torch.testing.assert_close(loss, eager_loss)
    assert dict(stats) == pytest.approx(dict(eager_stats), rel=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["train.planner.compile=true"],
     r"train\.planner\.compile: stage planner has no compiled training step \(only denoiser, "
     r"ar2diff, vanilla, finetune, finetune_small, scratch_head have\); set "
     r"train\.planner\.compile=false"),
    (["train.denoiser.compile=true", "train.denoiser.zero_stage=3"],
     r"train\.denoiser\.compile: torch\.compile needs zero_stage 0, 1 or 2"),
])
def test_compile_is_refused_where_it_cannot_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", overrides)


@pytest.mark.distributed
def test_a_compiled_denoiser_stage_trains_like_the_eager_one(tmp_path, deepspeed_ops):  # noqa: F811
    """ZeRO-2: DeepSpeed's gradient hooks see the compiled graph's backward. Compiled once: no
    step, validation or checkpoint in between makes torch.compile recompile."""
    from gtl_dist.data import prepare_data
    config = REPO / "configs" / "tiny.yaml"
    settings = ["train.denoiser.steps=6", "train.denoiser.zero_stage=2", "train.denoiser.log_every=1",
                "train.denoiser.val_every=3", "train.denoiser.save_every=3"]
    losses = {}
    for mode, extra in (("eager", []), ("compiled", ["train.denoiser.compile=true"])):
        prepare_data(load_config(config, settings), tmp_path / mode)
        cmd = [PYTHON, "-m", "gtl_dist.train", "--config", str(config), "--run-dir", str(tmp_path / mode),
               "--stage", "denoiser"]
        for s in settings + extra:
            cmd += ["--set", s]
        ranks = Ranks(cmd, 1, tmp_path / "logs", {"TORCH_LOGS": "recompiles"}, tag=mode)
        ranks.expect(0, timeout=400)
        assert "Recompiling function" not in ranks.log_text()
        records = train_records(tmp_path / mode / "denoiser")
        losses[mode] = [records[step]["loss"] for step in sorted(records)]
        assert (tmp_path / mode / "denoiser" / "export" / "model.pt").is_file()
    assert len(losses["compiled"]) == 6
    # Fused kernels round differently; six steps later the losses still agree closely.
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)


FUSED_DRIVER = """
import json, tempfile, torch
from torch import nn
from gtl_dist.config import TrainConfig
from gtl_dist.train.dist import import_deepspeed, init_distributed
from gtl_dist.train.engine import BatchGeometry, deepspeed_config
deepspeed = import_deepspeed()
init_distributed()

def train(zero, precision, fused, steps, load=None, save=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    tc = TrainConfig(global_batch=4, zero_stage=zero, lr=1e-2)
    config = deepspeed_config(tc, BatchGeometry(4, 4, 1, 1), precision, fused=fused)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=config)
    if load:
        engine.load_checkpoint(load, tag="t")
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 8, generator=g).to(torch.bfloat16 if precision == "bf16" else torch.float32)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    if save:
        engine.save_checkpoint(save, tag="t")
    return engine.basic_optimizer.param_groups[0].get("fused"), loss.item()

out = []
for zero in (0, 1, 2, 3):
    for precision in ("fp32", "bf16"):
        folder = tempfile.mkdtemp()
        fused, loss = train(zero, precision, True, 3, save=folder)
        _, unfused_loss = train(zero, precision, False, 3)
        resumed, _ = train(zero, precision, True, 1, load=folder)
        out.append([zero, precision, fused, resumed, loss, unfused_loss])
print("RESULTS " + json.dumps(out), flush=True)
"""


@pytest.mark.distributed
def test_deepspeed_trains_and_resumes_with_torch_fused_adamw(tmp_path, deepspeed_ops):  # noqa: F811
    env = {k: v for k, v in rank_env(0, 1, 0).items()  # one process: no rendezvous variables
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([PYTHON, "-c", FUSED_DRIVER], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(lines[0][len("RESULTS "):])
    assert len(results) == 8
    for zero, precision, fused, resumed, loss, unfused_loss in results:
        assert fused is True and resumed is True, (zero, precision)
        assert loss == pytest.approx(unfused_loss, rel=1e-3), (zero, precision)
