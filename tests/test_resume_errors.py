"""Bad checkpoints: from another config or tokenizer (clear error), damaged or half-written
(falls back to the previous committed step and says so), all damaged (clear error).

One single-rank toy run is killed before committing its last step, leaving committed steps 2
and 4; each test works on a copy of it.
"""

from __future__ import annotations

import re
import shutil
import signal
from pathlib import Path

import pytest

from train_helpers import Ranks, committed, deepspeed_ops, toy_cmd, train_records  # noqa: F401

pytestmark = pytest.mark.resume

SETTINGS = ["train.denoiser.steps=6", "train.denoiser.save_every=2", "train.denoiser.val_every=3",
            "train.denoiser.log_every=1", "train.denoiser.global_batch=8", "train.denoiser.keep_last=5"]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, deepspeed_ops) -> Path:  # noqa: F811
    base = tmp_path_factory.mktemp("errors")
    run = base / "run"
    r = Ranks(toy_cmd(run, *SETTINGS), 1, base / "logs", {"GTL_FAULT_KILL_BEFORE_COMMIT": "6"})
    r.expect(-signal.SIGKILL)
    assert committed(run / "denoiser" / "ckpt") == [2, 4]
    return run


@pytest.fixture
def run(killed_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(killed_run, copy)
    return copy


def ckpt(run: Path, step: int) -> Path:
    return run / "denoiser" / "ckpt" / f"step-{step:08d}"


def test_checkpoint_from_another_config_is_refused(run, tmp_path):
    r = Ranks(toy_cmd(run, *SETTINGS, "train.denoiser.lr=0.5"), 1, tmp_path)
    r.expect(1)
    text = r.log_text()
    assert f"{ckpt(run, 4) / 'COMMIT.json'}: this checkpoint of stage denoiser was written with " \
           f"config hash" in text
    assert "but the current configuration hashes to" in text
    assert "Resume with the configuration the run was started with" in text
    assert committed(run / "denoiser" / "ckpt") == [2, 4]  # nothing was touched


def test_checkpoint_from_another_tokenizer_is_refused(run, tmp_path):
    r = Ranks(toy_cmd(run, *SETTINGS), 1, tmp_path, {"TOY_TOKENIZER_HASH": "another-tokenizer"})
    r.expect(1)
    text = r.log_text()
    assert "was trained on data with tokenizer hash toy-tokenizer, but the current manifest has " \
           "another-tokenizer" in text


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["corrupted", "half-written", "missing"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(run, tmp_path, damage):
    victim = ckpt(run, 4) / "mp_rank_00_model_states.pt"  # weights + optimiser (ZeRO-0)
    if damage == "corrupted":
        flip_byte(victim)
        problem = r"fails its sha256 check"
    elif damage == "half-written":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
        problem = r"has \d+ bytes, expected \d+"
    else:
        victim.unlink()
        problem = r"is missing"
    r = Ranks(toy_cmd(run, *SETTINGS), 1, tmp_path)
    r.expect(0)
    text = r.log_text()
    assert re.search(re.escape(f"{ckpt(run, 4)} is damaged ({victim.name} ") + problem, text)
    assert "falling back to the previous committed checkpoint" in text
    assert "from step-00000002 instead of the damaged step-00000004" in text
    assert "(step 2 of 6" in text
    assert sorted(train_records(run / "denoiser")) == list(range(1, 7))
    assert committed(run / "denoiser" / "ckpt")[-1] == 6


def test_every_checkpoint_damaged_is_an_error(run, tmp_path):
    for step in (2, 4):
        flip_byte(ckpt(run, step) / "shared_state.pt")
    r = Ranks(toy_cmd(run, *SETTINGS), 1, tmp_path)
    r.expect(1)
    text = r.log_text()
    assert "every committed checkpoint (step-00000004, step-00000002) is damaged" in text
    assert f"Delete {run / 'denoiser' / 'ckpt'} to retrain stage denoiser from scratch" in text
