"""Every job kind trains a tiny model through the CLI and its validation loss goes down.

Data: configs/tiny.yaml's Markov task with a *sticky* source chain (the preset's source chain is
uniform, which leaves a source-trained network nothing to learn) and a stickier target, built
once with prepare_data. The small heads (classifiers, ratio, planner) get more steps: the
time-dependent classifier in particular learns slowly on masked sequences.

Every bound on a trained network must hold under any x86 float rounding: it compares the best
validated loss with where the stage started, or it sits well inside the gap a trained network
opens from the network that learned nothing (each margin below names the gap measured at seed 0;
rounding moves a converged tiny network's validation by far less). No bound compares two
validations of a trained network with each other: once a small net has converged, those differ
by rounding alone.
Stages run as `python -m gtl_dist.train` processes, independent ones side by side, in the order
the pipeline needs their exports (WAVES). The counts stages have a closed form and no training
loop; they are not run here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gtl_dist.stages import PER_FRACTION, PER_TARGET, STAGES
from train_helpers import PYTHON, REPO, Ranks, deepspeed_ops, train_records  # noqa: F401

pytestmark = pytest.mark.distributed

TARGET, FRACTION = "sticky", 1.0
DATA = ["data.markov.source_diagonal=0.6", "data.markov.target_diagonals={sticky: 0.95}"]
# The reference LM's default size is for text; tiny like the other networks.
MODELS = ["models.reference_lm={hidden: 48, blocks: 1, heads: 2, cond_dim: 16, dropout: 0.0}"]
STEPS = {"denoiser": 80, "vanilla": 80, "finetune": 80, "finetune_small": 80, "scratch_head": 80,
         "ar_pretrain": 80, "ar2diff": 80, "classifier_ti": 160, "classifier_td": 160, "ratio": 160,
         "edit_ratio": 160, "adapter": 160, "planner": 160, "reference_lm": 80, "domain_classifier": 160}
# The second wave reads the first one's exports.
WAVES = (("denoiser", "vanilla", "scratch_head", "classifier_ti", "classifier_td", "ar_pretrain",
          "reference_lm", "domain_classifier"),
         ("finetune", "finetune_small", "planner", "ratio", "edit_ratio", "adapter", "ar2diff"))


def train_settings() -> list[str]:
    """The same for every stage, and passed to every run: a stage's inputs hash covers its
    upstream stages' settings, so all runs of one pipeline must share one configuration."""
    out = []
    for stage, steps in STEPS.items():
        tc = {"steps": steps, "val_every": steps // 4, "save_every": steps // 2,
              "log_every": steps // 4, "lr": 1e-2, "warmup_frac": 0.1, "val_batches": 4,
              "global_batch": 32,
              # as the paper's defaults: the per-target stages and the heads keep their best weights
              "select_best": stage not in ("denoiser", "ar_pretrain", "ar2diff")}
        out += [f"train.{stage}.{k}={str(v).lower()}" for k, v in tc.items()]
    return out


def cli(run_dir: Path, stage: str, *extra: str) -> list[str]:
    cmd = [PYTHON, "-m", "gtl_dist.train", "--config", str(REPO / "configs" / "tiny.yaml"),
           "--run-dir", str(run_dir), "--stage", stage]
    for s in DATA + MODELS + train_settings() + list(extra):
        cmd += ["--set", s]
    if STAGES[stage].scope == PER_FRACTION:
        cmd += ["--target", TARGET, "--fraction", str(FRACTION)]
    elif STAGES[stage].scope == PER_TARGET:
        cmd += ["--target", TARGET]
    return cmd


def stage_dir(run_dir: Path, stage: str) -> Path:
    if STAGES[stage].scope == PER_FRACTION:
        return run_dir / stage / TARGET / f"{FRACTION:g}"
    if STAGES[stage].scope == PER_TARGET:
        return run_dir / stage / TARGET
    return run_dir / stage


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, deepspeed_ops) -> Path:  # noqa: F811
    from gtl_dist.config import load_config
    from gtl_dist.data import prepare_data
    root = tmp_path_factory.mktemp("jobs") / "run"
    prepare_data(load_config(REPO / "configs" / "tiny.yaml", DATA), root)
    logs = root.parent / "logs"
    for wave in WAVES:
        ranks = [Ranks(cli(root, s), 1, logs, tag=s) for s in wave]
        for s, r in zip(wave, ranks):
            r.expect(0, timeout=400)
    return root


def val_curve(run_dir: Path, stage: str) -> list[dict]:
    """The stage's validation records in step order: every quarter of its steps, after step 0
    for a stage whose initial weights compete in checkpoint selection."""
    records = train_records(stage_dir(run_dir, stage), "val")
    quarter = STEPS[stage] // 4
    start = [0] if STAGES[stage].init_is_candidate else []
    assert sorted(records) == start + [quarter, 2 * quarter, 3 * quarter, 4 * quarter], stage
    return [records[s] for s in sorted(records)]


def starting_loss(stage: str, curve: list[dict]) -> tuple[str, float]:
    """(metric, value) that the stage's best validation must beat: where its validation starts.

    Output layers start at zero, so a network trained from scratch starts as the uniform
    predictor, exactly: masked-token cross-entropy log 4 over the chain's 4 states (the source
    denoiser reports it as ``nll``, the per-target stages validate by it as ``loss``), next-token
    loss log 5 (the mask token is in the vocabulary), domain and planner BCE log 2. A stage that
    starts from another stage's export validates that start at step 0. Two starts are not in the
    records, so a reference that the start cannot beat stands in: AR2Diff starts from the causal
    LM run bidirectionally, so it must beat the uniform predictor; the ratio net starts at zero,
    so it must explain part of its target's variance (a constant explains none of it, whatever
    the batch: its MSE is at least the batch variance, (n-1)/n of the reported std²)."""
    if STAGES[stage].init_is_candidate:
        return "loss", curve[0]["loss"]
    if stage == "ratio":
        return "ratio_mse", 0.9 * curve[-1]["target_std"] ** 2
    if stage in ("denoiser", "ar2diff"):
        return "nll", math.log(4)
    if stage in ("vanilla", "scratch_head"):
        return "loss", math.log(4)
    if stage in ("ar_pretrain", "reference_lm"):
        return "loss", math.log(5)
    return "loss", math.log(2)  # the classifiers (domain_classifier too) and the planner


@pytest.mark.parametrize("stage", list(STEPS))
def test_validation_loss_goes_down(run_dir, stage):
    """The best validation beats the start by 0.005: a stage that learned nothing cannot get
    there by rounding. The smallest gaps measured: the time-dependent classifier's BCE, 0.027
    below log 2 (it sees mostly masked sequences, where the domains overlap), and the source
    denoiser's NLL, 0.059 below log 4 after its 80 steps."""
    curve = val_curve(run_dir, stage)
    metric, start = starting_loss(stage, curve)
    best = min(c[metric] for c in curve if c["step"] > 0)
    assert best < start - 0.005, f"{stage}: {metric} {[round(c[metric], 4) for c in curve]}, start {start:.4f}"
    meta = json.loads((stage_dir(run_dir, stage) / "export" / "model.json").read_text())
    assert meta["stage"] == stage and meta["finished"] and meta["trained_steps"] == STEPS[stage]


def test_diffusion_stages_beat_the_uniform_predictor(run_dir):
    """A 4-state chain: a network that learned nothing has masked-token NLL log 4 (1.386). The
    last validation (the exported weights of the source stages) beats it by more than each
    margin; the gaps measured are in brackets."""
    for stage in ("denoiser", "ar2diff"):  # source chain: p(repeat) = 0.6 [0.059, 0.117]
        assert val_curve(run_dir, stage)[-1]["nll"] < math.log(4) - 0.03, stage
    for stage in ("vanilla", "finetune"):  # target chain: p(repeat) = 0.95 [0.64, 0.65]
        assert val_curve(run_dir, stage)[-1]["loss"] < math.log(4) - 0.3, stage
    assert val_curve(run_dir, "ar_pretrain")[-1]["loss"] < math.log(4) - 0.1  # [0.31]
    # The reference LM models the target chain (repeat with p = 0.95): next-token entropy is
    # H(0.95, 0.05/3 x 3) = 0.25 nats, against log 4 = 1.39 for a network that learned nothing
    # [it reaches 0.23 on the held-out sequences].
    assert val_curve(run_dir, "reference_lm")[-1]["loss"] < 0.6


def test_classifiers_separate_the_domains_and_report_overlap(run_dir):
    # The clean-sequence classifiers separate the chains well (accuracy 0.85 and 0.88 on 128
    # held-out sequences); the time-dependent one sees mostly masked sequences, where the
    # domains overlap, so it must beat chance in cross-entropy (it does by 0.027).
    assert val_curve(run_dir, "classifier_ti")[-1]["accuracy"] > 0.6
    assert val_curve(run_dir, "domain_classifier")[-1]["accuracy"] > 0.6
    assert val_curve(run_dir, "classifier_td")[-1]["bce"] < math.log(2) - 0.01
    for stage in ("classifier_ti", "classifier_td", "domain_classifier"):
        last = val_curve(run_dir, stage)[-1]
        assert 0.0 <= last["overlap/accuracy"] <= 1.0
        assert "overlap/ratio_target_std" in last


def test_finetune_starts_from_the_source_denoiser(run_dir):
    """Fine-tuning begins where the source denoiser ended: its step-0 validation scores the
    source itself on the target. A network that started from scratch would score the uniform
    predictor's log 4 there, exactly (its output layer starts at zero); the source denoiser,
    trained on another sticky chain, already does better (by 0.32 nats at seed 0). Comparing
    its first trained validation with vanilla's, trained as many steps from scratch, would be a
    race that either can win."""
    from gtl_dist.config import load_config
    from gtl_dist.models import VocabSpec, build_model
    start = val_curve(run_dir, "finetune")[0]
    assert start["step"] == 0 and start["loss"] < math.log(4) - 0.05, start
    source = torch.load(run_dir / "denoiser" / "export" / "model.pt", weights_only=True)
    cfg = load_config(REPO / "configs" / "tiny.yaml", DATA)
    model = build_model("denoiser", cfg, VocabSpec(**source["meta"]["vocab"]))
    model.load_state_dict(source["state_dict"])  # an export rebuilds without DeepSpeed


def test_exports_load_without_deepspeed(run_dir):
    from gtl_dist.exports import load_exported
    from gtl_dist.models import ARLM, Denoiser, EditRatioNet, Planner, RatioNet, SequenceClassifier
    from gtl_dist.models.adapter import GuideAdapter
    from gtl_dist.models.lora import LoraDenoiser
    kinds = {"denoiser": Denoiser, "ar_pretrain": ARLM, "ar2diff": Denoiser,
             "classifier_ti": SequenceClassifier, "classifier_td": SequenceClassifier,
             "ratio": RatioNet, "edit_ratio": EditRatioNet, "adapter": GuideAdapter,
             "planner": Planner, "vanilla": Denoiser, "finetune": Denoiser,
             "finetune_small": LoraDenoiser, "scratch_head": Denoiser, "reference_lm": ARLM,
             "domain_classifier": SequenceClassifier}
    assert set(kinds) == set(STEPS)
    for stage, cls in kinds.items():
        model = load_exported(stage_dir(run_dir, stage) / "export" / "model.pt")
        assert isinstance(model, cls) and not model.training
        assert model.export_meta["stage"] == stage
    # select_best stages export the best validation weights, the others the EMA or final ones
    meta = json.loads((stage_dir(run_dir, "vanilla") / "export" / "model.json").read_text())
    curve = val_curve(run_dir, "vanilla")
    assert meta["weights"] == "best"
    assert meta["val_loss"] == min(c["loss"] for c in curve)
    best = torch.load(stage_dir(run_dir, "vanilla") / "ckpt" / "best" / f"step-{meta['step']:08d}.pt",
                      weights_only=False)
    exported = torch.load(stage_dir(run_dir, "vanilla") / "export" / "model.pt", weights_only=True)
    assert best["step"] == meta["step"]
    assert all(torch.equal(v, best["state_dict"][k]) for k, v in exported["state_dict"].items())
    assert json.loads((run_dir / "denoiser" / "export" / "model.json").read_text())["weights"] == "ema"


def test_tensorboard_logs_train_val_and_system_metrics(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tb" / "denoiser"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/samples_per_s", "sys/rss_gb", "val/loss"):
        assert tag in tags, tag
    assert "config" in "".join(events.Tags()["tensors"])
    quarter = STEPS["denoiser"] // 4
    assert [e.step for e in events.Scalars("train/loss")] == [quarter, 2 * quarter, 3 * quarter, 4 * quarter]


def test_a_stage_that_training_only_hurts_exports_its_initial_weights(run_dir, tmp_path):
    """Low data can leave every trained step worse on the held-out split than the start. The
    ratio net starts as no guidance (the source exactly), so selection must be able to keep it:
    with a learning rate that wrecks the network, the export is step 0, an all-zero edit."""
    from gtl_dist.config import load_config
    from gtl_dist.exports import load_exported
    other = tmp_path / "run"
    other.mkdir()
    for shared in ("data", "denoiser"):  # same inputs: the same data and source denoiser
        (other / shared).symlink_to(run_dir / shared)
    wreck = ["train.edit_ratio.lr=5"]
    Ranks(cli(other, "edit_ratio", *wreck), 1, tmp_path / "logs", tag="wreck").expect(0, timeout=400)
    curve = train_records(stage_dir(other, "edit_ratio"), "val")
    # Every trained step is worse than the start; a diverged one validates as NaN, never better.
    assert not any(curve[s]["loss"] <= curve[0]["loss"] for s in curve if s > 0), curve
    model = load_exported(stage_dir(other, "edit_ratio") / "export" / "model.pt")
    assert model.export_meta["weights"] == "best" and model.export_meta["step"] == 0
    assert model.export_meta["val_loss"] == curve[0]["loss"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", DATA)
    z = torch.full((2, cfg.seq_len), cfg.data.markov.num_states)  # all masked
    assert torch.count_nonzero(model(z)) == 0


def test_finished_stage_is_not_retrained(run_dir, tmp_path):
    before = (run_dir / "denoiser" / "export" / "model.pt").stat().st_mtime_ns
    again = Ranks(cli(run_dir, "denoiser"), 1, tmp_path, tag="again")
    again.expect(0)
    assert "already finished" in again.log_text(0)
    assert (run_dir / "denoiser" / "export" / "model.pt").stat().st_mtime_ns == before


def test_reference_lm_is_a_causal_lm_of_the_target_evaluator_split(run_dir):
    """The evaluation's reference LM: sized by models.reference_lm, trained on <target>/evaluator
    only, giving next-token logits [B, L, V] that do not look ahead."""
    from gtl_dist.config import load_config
    from gtl_dist.exports import load_exported
    model = load_exported(stage_dir(run_dir, "reference_lm") / "export" / "model.pt")
    cfg = load_config(REPO / "configs" / "tiny.yaml", DATA + MODELS)
    assert model.cfg == cfg.models.reference_lm and model.cfg.hidden != cfg.models.denoiser.hidden
    assert model.export_meta["target"] == TARGET and model.export_meta["fraction"] is None
    x = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2], [3, 3, 3, 3, 3, 3, 3, 3]])
    with torch.no_grad():
        logits = model(x)
        changed = x.clone()
        changed[:, 5:] = (changed[:, 5:] + 1) % 4
        assert torch.equal(model(changed)[:, :5], logits[:, :5])  # causal
    assert logits.shape == (2, cfg.seq_len, cfg.data.markov.num_states + 1)
    # It learned the sticky chain: after a run of 3s, 3 again is by far the likeliest next token.
    assert logits[1, -1].softmax(-1)[3] > 0.8
