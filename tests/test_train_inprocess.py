"""Several stages in ONE process, as the launcher's ``--cluster debug`` runs them.

DeepSpeed keeps the process groups it built in module globals; a stage that tore the group down
behind its back left the next ``deepspeed.initialize`` in the same process holding a dead group
("Group ... is not registered"). The driver below runs two different stages back to back (ZeRO-3,
then ZeRO-2 on another network) and then the first again, in one Python process, after a stage
that failed (its upstream export is missing), as a crashing task does in the debug launcher.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from train_helpers import PYTHON, REPO, deepspeed_ops, rank_env  # noqa: F401

pytestmark = pytest.mark.distributed

SETTINGS = [
    "data.markov.target_diagonals={sticky: 0.95}",
    "models.reference_lm={hidden: 32, blocks: 1, heads: 2, cond_dim: 16, dropout: 0.0}",
    "train.denoiser.steps=6", "train.denoiser.zero_stage=3", "train.denoiser.val_every=3",
    "train.denoiser.save_every=3",
    "train.reference_lm.steps=6", "train.reference_lm.zero_stage=2",
    "train.reference_lm.val_every=3", "train.reference_lm.save_every=3",
    "train.reference_lm.global_batch=16", "train.reference_lm.val_batches=2",
]

DRIVER = """
import json, os, sys
from gtl_dist.config import load_config
from gtl_dist.log import setup_logging
from gtl_dist.exports import load_exported
from gtl_dist.train import run_stage
from gtl_dist.exports import ExportError
setup_logging()  # a program of its own: importing gtl_dist configures no logging
cfg = load_config(sys.argv[1], json.loads(sys.argv[3]))
out = []
try:  # fails after the process group is up, as a crashing task does in the debug launcher
    run_stage(cfg, sys.argv[2], "finetune", target="sticky", fraction=1.0)
except ExportError as exc:
    out.append({"stage": "finetune", "status": "failed", "step": 0, "class": type(exc).__name__,
                "left_env": []})
for stage, target in (("denoiser", None), ("reference_lm", "sticky"), ("denoiser", None)):
    r = run_stage(cfg, sys.argv[2], stage, target=target)
    model = load_exported(r.export)
    left = sorted(k for k in ("RANK", "WORLD_SIZE", "MASTER_PORT") if k in os.environ)
    out.append({"stage": stage, "status": r.status, "step": r.step, "class": type(model).__name__,
                "left_env": left})
print("RESULTS " + json.dumps(out), flush=True)
"""


def run_driver(driver: str, run_dir, settings: list[str], *args: str):
    """Build tiny.yaml's data under ``settings``, run ``driver`` (with ``args`` after the config,
    run directory and settings) in one fresh process of one rank (its rendezvous left to the
    stages), and return the process and its RESULTS line, parsed."""
    from gtl_dist.config import load_config
    from gtl_dist.data import prepare_data
    config = REPO / "configs" / "tiny.yaml"
    prepare_data(load_config(config, settings), run_dir)
    env = {k: v for k, v in rank_env(0, 1, 0).items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([PYTHON, "-c", driver, str(config), str(run_dir), json.dumps(settings), *args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, json.loads(lines[0][len("RESULTS "):])


def test_two_stages_back_to_back_in_one_process(tmp_path, deepspeed_ops):  # noqa: F811
    run_dir = tmp_path / "run"
    proc, results = run_driver(DRIVER, run_dir, SETTINGS)
    assert [(r["stage"], r["status"], r["step"], r["class"]) for r in results] == [
        ("finetune", "failed", 0, "ExportError"), ("denoiser", "finished", 6, "Denoiser"),
        ("reference_lm", "finished", 6, "ARLM"), ("denoiser", "finished", 6, "Denoiser")]
    # Each stage's process group came and went; its rendezvous variables went with it.
    assert all(r["left_env"] == [] for r in results)
    assert "denoiser: already finished" in proc.stderr + proc.stdout
    assert (run_dir / "reference_lm" / "sticky" / "export" / "model.pt").is_file()


GRID_DRIVER = """
import json, sys
import torch
from gtl_dist.config import load_config
from gtl_dist.exports import load_exported, read_export
from gtl_dist.paths import RunPaths, grid_variant
from gtl_dist.train import run_stage
cfg, stage = load_config(sys.argv[1], json.loads(sys.argv[3])), sys.argv[4]
run_stage(cfg, sys.argv[2], "denoiser")
result = run_stage(cfg, sys.argv[2], stage, target="sticky", fraction=1.0)
paths = RunPaths(sys.argv[2])
kept = read_export(result.export)
runs = {grid_variant(*p): read_export(paths.export(stage, "sticky", 1.0, 0, grid_variant(*p)))
        for p in getattr(cfg.train, stage).grid()}
same = [v for v, r in runs.items()
        if all(torch.equal(r["state_dict"][k], v) for k, v in kept["state_dict"].items())]
norms = {v: sum(float(w.float().norm() ** 2) for w in r["state_dict"].values()) for v, r in runs.items()}
print("RESULTS " + json.dumps({"grid": kept["meta"]["lr_grid"], "same_as": same, "norms": norms,
                               "params": {v: r["meta"]["trainable_parameters"] for v, r in runs.items()},
                               "kept_model": kept["meta"].get("model_index"),
                               "kept_heads": hasattr(load_exported(result.export), "query"),
                               "val_loss": result.val_loss}), flush=True)
"""


def test_a_learning_rate_grid_keeps_the_run_with_the_lowest_held_out_loss(tmp_path, deepspeed_ops):  # noqa: F811
    settings = SETTINGS + ["train.vanilla.lr_grid=[1e-4, 3e-3]", "train.vanilla.steps=8",
                           "train.vanilla.val_every=4", "train.vanilla.save_every=4"]
    run_dir = tmp_path / "run"
    _, out = run_driver(GRID_DRIVER, run_dir, settings, "vanilla")
    # One run per learning rate, each with its own held-out loss; the stage's export is the run
    # whose loss is lowest, and its metadata lists the whole grid.
    assert [g["lr"] for g in out["grid"]] == [1e-4, 3e-3]
    best = min(out["grid"], key=lambda g: g["val_loss"])
    assert out["val_loss"] == best["val_loss"] and out["same_as"] == [f"lr-{best['lr']:g}"]
    for lr in (1e-4, 3e-3):
        assert (run_dir / "vanilla" / "sticky" / "1" / f"lr-{lr:g}" / "train_log.jsonl").is_file()


def test_a_weight_decay_grid_crosses_the_learning_rates_and_keeps_the_best_pair(tmp_path, deepspeed_ops):  # noqa: F811
    settings = SETTINGS + ["train.vanilla.lr_grid=[3e-3]", "train.vanilla.weight_decay_grid=[0, 30]",
                           "train.vanilla.steps=8", "train.vanilla.val_every=4", "train.vanilla.save_every=4"]
    run_dir = tmp_path / "run"
    _, out = run_driver(GRID_DRIVER, run_dir, settings, "vanilla")
    # One run per (learning rate, decay) pair in its own folder; the decay is applied (the heavily
    # decayed run's weights are smaller), and the kept run is the pair with the lowest held-out loss.
    assert [(g["lr"], g["weight_decay"]) for g in out["grid"]] == [(3e-3, 0), (3e-3, 30)]
    assert out["norms"]["lr-0.003-wd-30"] < out["norms"]["lr-0.003-wd-0"]
    best = min(out["grid"], key=lambda g: g["val_loss"])
    assert out["val_loss"] == best["val_loss"]
    assert out["same_as"] == [f"lr-0.003-wd-{best['weight_decay']:g}"]
    for variant in ("lr-0.003-wd-0", "lr-0.003-wd-30"):
        assert (run_dir / "vanilla" / "sticky" / "1" / variant / "train_log.jsonl").is_file()

def test_a_model_grid_trains_each_model_and_keeps_the_best_with_its_own_settings(tmp_path, deepspeed_ops):  # noqa: F811
    settings = SETTINGS + ["train.adapter.lr_grid=[3e-3]", "train.adapter.select_best=true",
                           "train.adapter.model_grid=[{attention: false}, {attention: true, heads: 2}]",
                           "train.adapter.steps=8", "train.adapter.val_every=4", "train.adapter.save_every=4"]
    run_dir = tmp_path / "run"
    _, out = run_driver(GRID_DRIVER, run_dir, settings, "adapter")
    # One run per model, each in its own folder with its own architecture (the heads' weights
    # counted); the kept one has the lowest held-out loss, and its export loads as that model.
    assert [(g["lr"], g["model"]) for g in out["grid"]] == [(3e-3, 0), (3e-3, 1)]
    assert out["params"]["lr-0.003-m-1"] > out["params"]["lr-0.003-m-0"]
    best = min(out["grid"], key=lambda g: g["val_loss"])
    assert out["val_loss"] == best["val_loss"] and out["kept_model"] == best["model"]
    assert f"lr-0.003-m-{best['model']}" in out["same_as"]
    assert out["kept_heads"] == (best["model"] == 1)


KFOLD_DRIVER = """
import json, sys
import torch
from gtl_dist.config import load_config
from gtl_dist.exports import read_export
from gtl_dist.paths import RunPaths
from gtl_dist.stages import run_variants
from gtl_dist.train import run_stage
from gtl_dist.train.metrics import read_val_curve
cfg, stage = load_config(sys.argv[1], json.loads(sys.argv[3])), sys.argv[4]
source = run_stage(cfg, sys.argv[2], "denoiser")
result = run_stage(cfg, sys.argv[2], stage, target="sticky", fraction=0.2)
again = run_stage(cfg, sys.argv[2], stage, target="sticky", fraction=0.2)
paths = RunPaths(sys.argv[2])
kept, refit = read_export(result.export), read_export(paths.export(stage, "sticky", 0.2, 0, "refit"))
variants = run_variants(cfg, stage, 0.2)
curves = {v: read_val_curve(paths.stage(stage, "sticky", 0.2, 0, v) / "train_log.jsonl") for v in variants}
train_steps = [r["step"] for r in map(json.loads, open(paths.stage(stage, "sticky", 0.2, 0, "refit") / "train_log.jsonl"))
               if r.get("kind") == "train"]
source_weights = read_export(source.export)["state_dict"]
print("RESULTS " + json.dumps({
    "variants": variants, "curves": {v: {str(s): l for s, l in c.items()} for v, c in curves.items()},
    "grid": kept["meta"]["lr_grid"], "step": kept["meta"]["step"], "val_loss": result.val_loss,
    "weights": kept["meta"]["weights"], "refit_steps": refit["meta"]["trained_steps"], "refit_train_steps": train_steps,
    "same_as_refit": all(torch.equal(refit["state_dict"][k], v) for k, v in kept["state_dict"].items()),
    "same_as_source": all(torch.equal(source_weights[k], v) for k, v in kept["state_dict"].items()),
    "again": [again.status, again.val_loss]}), flush=True)
"""


@pytest.mark.parametrize("lr_grid,source_wins", [("[1e-3, 3e-2]", False), ("[300.0]", True)])
def test_kfold_selection_averages_the_folds_and_refits_the_best_point_on_every_sequence(
        tmp_path, deepspeed_ops, lr_grid, source_wins):  # noqa: F811
    """docs/method.md §12, protocol.selection=kfold: every learning rate trains once per fold; the
    point and step whose held-out loss averaged over the folds is lowest win, and the export is a
    refit on all n_T stopped at that step. A learning rate that wrecks every step keeps step 0:
    the refit then trains nothing and exports the source itself."""
    settings = SETTINGS + ["protocol.selection=kfold", "protocol.folds=3", f"train.finetune.lr_grid={lr_grid}",
                           "train.finetune.select_best=true", "train.finetune.ema=0.0", "train.finetune.steps=6",
                           "train.finetune.val_every=2", "train.finetune.save_every=2", "train.finetune.log_every=1"]
    _, out = run_driver(KFOLD_DRIVER, tmp_path / "run", settings, "finetune")
    lrs = [g["lr"] for g in out["grid"]]
    assert out["variants"] == [f"lr-{lr:g}/fold-{f}" for lr in lrs for f in range(3)] + ["refit"]
    for g in out["grid"]:  # each point: the mean of its three folds' held-out curves, at its best step
        folds = [out["curves"][f"lr-{g['lr']:g}/fold-{f}"] for f in range(3)]
        assert all(list(c) == ["0", "2", "4", "6"] for c in folds)  # step 0: the source, a candidate
        mean = {s: sum(c[s] for c in folds) / 3 for s in folds[0]}
        best = min(mean, key=mean.get)
        assert g["step"] == int(best) and g["val_loss"] == pytest.approx(mean[best])
    best = min(out["grid"], key=lambda g: g["val_loss"])
    assert out["val_loss"] == pytest.approx(best["val_loss"]) and out["step"] == best["step"]
    assert out["weights"] == "refit" and out["same_as_refit"] and out["curves"]["refit"] == {}
    assert out["refit_steps"] == best["step"] and out["refit_train_steps"][-1:] == ([best["step"]] if best["step"] else [])
    assert (best["step"] == 0) == source_wins and out["same_as_source"] == source_wins
    assert out["again"] == ["finished", out["val_loss"]]
