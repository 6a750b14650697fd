"""Overlapping builders of one data folder (gtl_dist/data/build.py): every build unit is claimed
and built once, a claim of a dead builder is taken over, and both builders end with the same
verified manifest."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gtl_dist.config import load_config
from gtl_dist.data import build, prepare_data
from gtl_dist.data.build import PARTS_DIR, finalize, load_plan, plan_units, prepare, run_slice

HOLD = ("import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


def _cfg(configs_dir):
    return load_config(configs_dir / "tiny.yaml", ["shards.build_workers=1"])


def test_two_builders_of_one_folder_build_each_unit_once(tmp_path, configs_dir, monkeypatch):
    writers: dict[str, list[str]] = {}  # shard part -> the threads that wrote it
    write_shard = build.write_shard

    def slow_write(path, *args, **kwargs):
        writers.setdefault(Path(path).name, []).append(threading.current_thread().name)
        time.sleep(0.05)  # long enough for the two builders to overlap
        return write_shard(path, *args, **kwargs)

    monkeypatch.setattr(build, "write_shard", slow_write)
    cfg = _cfg(configs_dir)
    with ThreadPoolExecutor(2) as pool:
        first, second = [f.result() for f in [pool.submit(prepare_data, cfg, tmp_path) for _ in range(2)]]
    assert first == second
    first.verify()
    assert sum(len(e.shards) for e in first.sets.values()) == len(writers)
    assert Counter(len(w) for w in writers.values()) == {1: len(writers)}  # each part written once
    assert len({w[0] for w in writers.values()}) == 2  # and both builders built some
    assert not (first.root / PARTS_DIR).exists()


def test_a_unit_claimed_by_a_builder_that_dies_is_waited_for_then_built_here(tmp_path, configs_dir):
    root = tmp_path / "data"
    prepare(_cfg(configs_dir), root)
    units = plan_units(load_plan(root))
    claim = root / PARTS_DIR / f"{units[0].name}.lock"
    claim.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(claim)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        slice_ = threading.Thread(target=run_slice, args=(root, 0, 1))
        slice_.start()
        markers = [root / PARTS_DIR / f"{u.name}.json" for u in units]
        deadline = time.monotonic() + 120
        while not all(m.is_file() for m in markers[1:]) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert all(m.is_file() for m in markers[1:])  # every other unit built meanwhile
        assert slice_.is_alive() and not markers[0].exists()  # the claimed one waited for
    finally:
        holder.kill()  # dies holding the claim: the kernel releases it
        holder.wait()
    slice_.join(timeout=120)
    assert not slice_.is_alive() and markers[0].is_file()
    finalize(root).verify()
