"""The shard reader: coverage, equal batch counts, exact resume across ranks x workers, fractions,
determinism, bad input, and workers that survive preemption signals; splits with fewer shards (or
samples) than readers, read by sample, and finite passes that read every sample exactly once."""

import dataclasses
import json
import os
import signal
import time
from collections import Counter
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch

from gtl_dist.data import Manifest, ManifestError, ShardInfo, ShardSet, make_loader, read_samples
from gtl_dist.data import loader as loader_module
from gtl_dist.data.loader import ConsumerStream
from gtl_dist.data.shards import Chunk, ShardError, write_shard
from gtl_dist.data.tokenizer import TokenizerMismatch
from gtl_dist.io import atomic_write_json, sha256_file

SEQ = 4


def build(root, sets, fractions=None):
    """Shards whose samples name themselves: tokens = [set#, shard, index, 7]."""
    root.mkdir(parents=True, exist_ok=True)
    entries = {}
    for s, (name, counts) in enumerate(sets.items()):
        shards = []
        for j, n in enumerate(counts):
            fname = f"{name.replace('/', '-')}-{j:06d}.tar"
            chunks = [Chunk(np.array([s, j, i, 7]), name.split("/")[0], [f"d{i}"]) for i in range(n)]
            write_shard(root / fname, chunks, fname[:-4], np.dtype(np.uint16))
            shards.append(ShardInfo(fname, n, (root / fname).stat().st_size, sha256_file(root / fname)))
        entries[name] = ShardSet(shards, {name.split("/")[0]: sum(counts)},
                                 (fractions or {}).get(name))
    m = Manifest(seq_len=SEQ, vocab_size=1000, mask_id=999, pad_id=None, bos_id=None, eos_id=None,
                 tokenizer_hash="ab" * 32, data_hash="1234", dtype="uint16", sets=entries, corpus="test",
                 targets=["tgt"], root=root)
    atomic_write_json(root / "manifest.json", m.to_dict())
    return Manifest.load(root)


def ids(batch):
    return [tuple(row[:3]) for row in batch["tokens"].tolist()]


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.fixture
def uneven(tmp_path):
    return build(tmp_path / "d", {"source/train": [7, 5, 9, 3, 6, 2], "source/test": [4, 4]})


def test_batches_are_long_tensors_of_the_manifest_shape(uneven):
    batch = take(make_loader(uneven, "source/train", 4), 1)[0]
    assert set(batch) == {"tokens", "domain"} and batch["tokens"].dtype.is_floating_point is False
    assert tuple(batch["tokens"].shape) == (4, SEQ) and str(batch["tokens"].dtype) == "torch.int64"
    assert batch["domain"] == ["source"] * 4


def test_one_reader_sees_every_sample_once_per_epoch(uneven):
    loader = make_loader(uneven, "source/train", 4, seed=3)  # 32 samples -> 8 batches per epoch
    assert loader.batches_per_epoch == 8
    batches = take(loader, 16)
    first = [s for b in batches[:8] for s in ids(b)]
    second = [s for b in batches[8:] for s in ids(b)]
    everything = {(0, j, i) for j, n in enumerate([7, 5, 9, 3, 6, 2]) for i in range(n)}
    assert len(first) == len(set(first)) == 32 and set(first) == set(second) == everything
    assert first != second  # epoch 1 is a new permutation of shards and samples
    assert loader.epoch == 2


def test_consumers_partition_each_pass():
    shards = [(f"s{j}", 0, n) for j, n in enumerate([7, 5, 9, 3, 6, 2])]
    for epoch in (0, 1, 5):
        mine = [ConsumerStream(shards, c, 4, seed=1, shuffle=True, seq_len=SEQ).pass_pieces(epoch)[0]
                for c in range(4)]
        flat = sorted(int(j) for m in mine for j in m)
        assert flat == list(range(6))


@pytest.mark.parametrize("readers", [1, 2, 3, 7, 64])
def test_readers_by_sample_partition_each_pass(readers):
    """Striding: over the passes back to back, reader c takes positions c, c + C, ...; so each pass
    is dealt out exactly once, even to more readers than it has samples."""
    counts = [3, 2]
    shards = [(f"s{j}", 0, n) for j, n in enumerate(counts)]
    for epoch in range(readers + 2):
        taken = Counter()
        for c in range(readers):
            stream = ConsumerStream(shards, c, readers, seed=1, shuffle=True, seq_len=SEQ, by_sample=True)
            for j, first, size in zip(*stream.pass_pieces(epoch)):
                positions = range(first, first + size * readers, readers)
                assert len(positions) == size and all(p < counts[j] for p in positions)
                taken.update((int(j), p) for p in positions)
        assert taken == Counter({(j, i): 1 for j, n in enumerate(counts) for i in range(n)})


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_gets_the_same_number_of_batches(tmp_path, workers):
    m = build(tmp_path / "d", {"source/train": [10, 3, 7, 1, 12, 5]})  # 38 samples, very uneven
    # Training: the same epoch length everywhere, and streams never run dry, even on the rank
    # holding the 1-sample shard.
    for rank in range(3):
        loader = make_loader(m, "source/train", 4, rank=rank, world_size=3, num_workers=workers)
        assert loader.batches_per_epoch == 38 // 12
        assert len(take(loader, 9)) == 9
    # A finite pass: every sample once, ranks a batch apart at most (13, 13 and 12 samples).
    seen, counts = Counter(), []
    for rank in range(3):
        loader = make_loader(m, "source/train", 4, rank=rank, world_size=3, num_workers=workers, infinite=False)
        batches = list(loader)
        assert len(batches) == loader.batches_per_epoch
        counts.append(len(batches))
        seen.update(s for b in batches for s in ids(b))
    assert max(counts) - min(counts) <= 1
    assert seen == Counter({(0, j, i): 1 for j, n in enumerate([10, 3, 7, 1, 12, 5]) for i in range(n)})


@pytest.mark.resume
def test_exact_resume_across_two_ranks_and_two_workers(uneven):
    n_before, n_after = 5, 8  # 32 samples / (2 ranks x 3) = 5 batches per epoch: resume crosses epochs
    for rank in range(2):
        def loader():
            return make_loader(uneven, "source/train", 3, rank=rank, world_size=2, num_workers=2, seed=11)

        straight = take(loader(), n_before + n_after)
        first = loader()
        it = iter(first)
        for _ in range(n_before):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))
        assert state["batches_consumed"] == n_before and state["epoch"] == 1 and state["batch_in_epoch"] == 0
        resumed = loader()
        resumed.load_state_dict(state)
        after = take(resumed, n_after)
        for a, b in zip(after, straight[n_before:]):
            assert ids(a) == ids(b) and a["domain"] == b["domain"]
        assert resumed.state_dict()["batches_consumed"] == n_before + n_after


def test_resume_in_main_process_and_mid_epoch(uneven):
    straight = take(make_loader(uneven, "source/train", 5, seed=2), 9)
    first = make_loader(uneven, "source/train", 5, seed=2)
    take(first, 4)
    resumed = make_loader(uneven, "source/train", 5, seed=2)
    resumed.load_state_dict(first.state_dict())
    assert [ids(b) for b in take(resumed, 5)] == [ids(b) for b in straight[4:]]
    # Iterating again continues the same endless stream (training keeps one loader).
    again = make_loader(uneven, "source/train", 5, seed=2)
    assert [ids(b) for b in take(again, 4) + take(again, 5)] == [ids(b) for b in straight]


def test_shuffle_is_deterministic_per_seed(uneven):
    def order(seed, workers=0):
        return [ids(b) for b in take(make_loader(uneven, "source/train", 4, seed=seed, num_workers=workers), 8)]

    assert order(5) == order(5)
    assert order(5) != order(6)
    assert sorted(sum(order(5, workers=2), [])) == sorted(sum(order(5), []))  # same epoch contents


def test_validation_pass_is_fixed_and_in_manifest_order(uneven):
    loader = make_loader(uneven, "source/test", 3, shuffle=False, infinite=False)
    first, second = list(loader), list(loader)
    assert [ids(b) for b in first] == [ids(b) for b in second]
    # Every sample, the last batch short (8 = 3 + 3 + 2).
    assert [len(b["domain"]) for b in first] == [3, 3, 2] and loader.batches_per_epoch == 3
    assert [s for b in first for s in ids(b)] == [(1, 0, i) for i in range(4)] + [(1, 1, i) for i in range(4)]
    # A cursor loaded into a finite loader resumes that pass once.
    loader.load_state_dict({**loader.state_dict(), "batches_consumed": 1})
    assert [ids(b) for b in loader] == [ids(b) for b in first[1:]]


def test_fractions_read_only_their_nested_prefix(tmp_path):
    m = build(tmp_path / "d", {"tgt/train": [10, 10, 10]}, {"tgt/train": {"1": 30, "0.5": 15, "0.1": 3}})
    assert m.num_samples("tgt/train", 0.5) == 15 and m.num_shards("tgt/train", 0.5) == 2
    seen = {}
    for f in (1.0, 0.5, 0.1):
        loader = make_loader(m, "tgt/train", 1, fraction=f, infinite=False)
        seen[f] = {s for b in loader for s in ids(b)}
    assert seen[0.5] == {(0, 0, i) for i in range(10)} | {(0, 1, i) for i in range(5)}
    assert seen[0.1] < seen[0.5] < seen[1.0] and len(seen[0.1]) == 3
    with pytest.raises(ManifestError, match=r"target 'tgt' at fraction 0\.01 keeps round\(0\.01 \* 30\) = 0 of its N=30"):
        make_loader(m, "tgt/train", 1, fraction=0.01)


def test_a_held_out_part_is_disjoint_from_training_and_completes_the_fraction(tmp_path):
    """docs/method.md §12: a method at fraction f trains on the first n_T - k of its n_T target
    sequences and validates on the last k; together they are exactly the fraction's prefix."""
    from gtl_dist.data import read_samples
    m = build(tmp_path / "d", {"tgt/train": [10, 10, 10]}, {"tgt/train": {"1": 30, "0.5": 15}})
    train = {s for b in make_loader(m, "tgt/train", 1, fraction=0.5, drop_last=4, infinite=False)
             for s in ids(b)}
    held = {tuple(row[:3]) for row in read_samples(m, "tgt/train", 11, 15).tolist()}
    prefix = {s for b in make_loader(m, "tgt/train", 1, fraction=0.5, infinite=False) for s in ids(b)}
    assert len(train) == 11 and len(held) == 4 and not train & held and train | held == prefix
    assert held == {(0, 1, i) for i in range(1, 5)}  # across the shard boundary at sample 10
    assert read_samples(m, "tgt/train", 8, 12).shape == (4, SEQ)
    with pytest.raises(ManifestError, match="holding out 15 of 15 samples leaves none"):
        make_loader(m, "tgt/train", 1, fraction=0.5, drop_last=15)
    with pytest.raises(ManifestError, match="outside its 30 samples"):
        read_samples(m, "tgt/train", 25, 56)


def test_replicate_windows_are_disjoint_blocks_that_wrap_with_their_held_out_part(tmp_path):
    """docs/method.md §12, protocol.replicates=redraw: replicate s reads samples s·n .. (s+1)·n − 1
    of the target training set, cyclically; its held-out part is the window's last k samples."""
    from gtl_dist.config import ProtocolConfig, replicate_start, replicates_disjoint
    from gtl_dist.data import read_samples
    m = build(tmp_path / "d", {"tgt/train": [10, 10, 10]}, {"tgt/train": {"1": 30, "0.4": 12}})
    redraw, shared = ProtocolConfig(), ProtocolConfig(replicates="shared")
    windows = []
    for replicate in range(3):
        start = replicate_start(30, 12, replicate, redraw)
        train = {s for b in make_loader(m, "tgt/train", 1, fraction=0.4, drop_last=3, start=start,
                                        infinite=False) for s in ids(b)}
        held = {tuple(row[:3]) for row in
                read_samples(m, "tgt/train", (start + 9) % 30, (start + 9) % 30 + 3).tolist()}
        assert len(train) == 9 and len(held) == 3 and not train & held
        windows.append(train | held)
    assert [replicate_start(30, 12, r, redraw) for r in range(3)] == [0, 12, 24]
    assert not windows[0] & windows[1]
    # The third window wraps: samples 24..29, then 0..5 (which the first replicate also read).
    assert windows[2] & windows[0] == {(0, 0, i) for i in range(6)}
    assert replicates_disjoint(30, 12, [0, 1], redraw) and not replicates_disjoint(30, 12, [0, 1, 2], redraw)
    assert replicate_start(30, 12, 2, shared) == 0 and not replicates_disjoint(30, 12, [0, 1], shared)


def test_kfold_folds_partition_a_wrapping_window_and_each_trains_on_the_rest(tmp_path):
    """docs/method.md §12, protocol.selection=kfold: fold f of a replicate's window holds out the
    f-th of k contiguous blocks (sizes within one of each other) and trains on the rest of the
    window; the blocks together are the window, and the refit (no fold) trains on all of it."""
    from gtl_dist.config import ConfigError, ProtocolConfig, check_split, replicate_start
    from gtl_dist.data import read_samples
    m = build(tmp_path / "d", {"tgt/train": [10, 10, 10]}, {"tgt/train": {"1": 30, "0.4": 12}})
    protocol = ProtocolConfig(selection="kfold", folds=5)
    start = replicate_start(30, 12, 2, protocol)  # samples 24..29, then 0..5
    window = {(0, i // 10, i % 10) for i in [*range(24, 30), *range(6)]}
    blocks = []
    for fold in range(5):
        split = check_split(12, protocol, "test", fold)
        train = {s for b in make_loader(m, "tgt/train", 1, fraction=0.4, drop_last=split.held, start=start,
                                        held_at=split.held_at, infinite=False) for s in ids(b)}
        first = (start + split.held_at) % 30
        held = {tuple(row[:3]) for row in read_samples(m, "tgt/train", first, first + split.held).tolist()}
        assert split.held in (2, 3) and not train & held and train | held == window
        blocks.append(held)
    assert set().union(*blocks) == window and sum(map(len, blocks)) == 12
    refit = check_split(12, protocol, "test")
    assert (refit.held, refit.n_train) == (0, 12)
    with pytest.raises(ConfigError, match=r"protocol.folds=13 splits the 12 target sequences of here"):
        check_split(12, ProtocolConfig(selection="kfold", folds=13), "here", 0)


def test_load_state_refuses_a_cursor_from_another_stream(uneven):
    state = make_loader(uneven, "source/train", 4, world_size=2, num_workers=1, seed=1).state_dict()
    for changes, field in (({"world_size": 3}, "world_size"), ({"num_workers": 0}, "num_workers"),
                           ({"seed": 2}, "seed"), ({"batch_size": 2}, "batch_size")):
        kw = {"world_size": 2, "num_workers": 1, "seed": 1, "batch_size": 4, **changes}
        batch_size = kw.pop("batch_size")
        other = make_loader(uneven, "source/train", batch_size, **kw)
        with pytest.raises(ValueError, match=f"saved with {field}=.*this loader has {field}="):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="saved with set='source/train'.*has set='source/test'"):
        make_loader(uneven, "source/test", 4, world_size=2, num_workers=1, seed=1).load_state_dict(state)


def test_bad_input_fails_when_the_loader_is_made(uneven, tmp_path):
    with pytest.raises(TokenizerMismatch, match="tokenizer hash abababababab… does not match the expected 0000"):
        make_loader(uneven, "source/train", 4, expected_tokenizer_hash="0" * 64)
    make_loader(uneven, "source/train", 4, expected_tokenizer_hash="ab" * 32)  # the right one is fine
    with pytest.raises(ManifestError, match="no set 'physics/train'; it has source/train, source/test"):
        make_loader(uneven, "physics/train", 4)
    with pytest.raises(ManifestError, match=r"source/test\]: a pass over its 8 sample\(s\) leaves 1 of 9 ranks "
                                            r"without a sample.*at most 8 rank\(s\).*data\.test_fraction"):
        make_loader(uneven, "source/test", 1, rank=0, world_size=9, shuffle=False, infinite=False)

    victim = uneven.root / uneven.sets["source/train"].shards[2].name
    data = bytearray(victim.read_bytes())
    data[600] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{victim}: sha256 .* does not match"):
        make_loader(uneven, "source/train", 4)
    victim.write_bytes(bytes(data[:1000]))
    with pytest.raises(ShardError, match=f"{victim}: 1000 bytes, the manifest says"):
        make_loader(uneven, "source/train", 4)
    victim.unlink()
    with pytest.raises(ShardError, match=f"{victim}: shard listed in the manifest is missing"):
        make_loader(uneven, "source/train", 4)


def test_ids_outside_the_vocabulary_or_masks_are_refused_as_batches_are_read(uneven):
    """The one id check of a training or validation batch: on the host, before any device sees
    it (the networks and losses do not read ids back). Every sample holds id 7."""
    where = rf"{uneven.path} \[source/train\]"
    smaller = dataclasses.replace(uneven, vocab_size=7)
    with pytest.raises(ValueError, match=where + r": token id 7 is outside the model's vocabulary "
                                                 r"\[0, 7\); the data and the model were built"):
        take(make_loader(smaller, "source/train", 4), 1)
    with pytest.raises(ValueError, match=where + r": token id 7 is outside"):
        read_samples(smaller, "source/train", 0, 3)
    masked = dataclasses.replace(uneven, mask_id=7)
    with pytest.raises(ValueError, match=where + r": clean data contains the \[MASK\] id 7"):
        take(make_loader(masked, "source/train", 4, shuffle=False, infinite=False), 1)
    assert len(take(make_loader(uneven, "source/train", 4), 8)) == 8


def test_bad_manifests_are_named(uneven, tmp_path):
    with pytest.raises(ManifestError, match="no manifest.*python shards/build.py"):
        Manifest.load(tmp_path / "empty")
    path = uneven.root / "manifest.json"
    raw = json.loads(path.read_text())
    path.write_text(path.read_text()[:200])
    with pytest.raises(ManifestError, match="manifest.json: not valid JSON"):
        Manifest.load(uneven.root)
    path.write_text(json.dumps({**raw, "format_version": 0}))
    with pytest.raises(ManifestError, match="format version 0, this gtl_dist reads version 1"):
        Manifest.load(path)
    path.write_text(json.dumps({k: v for k, v in raw.items() if k != "mask_id"}))
    with pytest.raises(ManifestError, match="key 'mask_id' is missing"):
        Manifest.load(path)


def test_workers_survive_preemption_signals(uneven):
    loader = make_loader(uneven, "source/train", 2, num_workers=1)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    it = iter(loader)
    next(it)
    workers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert workers
    for p in workers:
        os.kill(p.pid, signal.SIGUSR2)
        os.kill(p.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
    assert len([next(it) for _ in range(20)]) == 20  # and keeps delivering batches


def test_a_training_stream_cycles_a_set_smaller_than_one_batch(uneven):
    """20 target sequences in a half-batch of 128 (docs/method.md: the target is cycled): each batch
    runs through whole shuffled passes, every sample appears ~B/N times, and resume stays exact."""
    n = uneven.num_samples("source/test")
    batch = 2 * n + 3
    loader = make_loader(uneven, "source/test", batch, seed=3)
    it = iter(loader)
    first = next(it)["tokens"]
    assert first.shape[0] == batch
    rows, counts = torch.unique(first, dim=0, return_counts=True)
    assert len(rows) == n and counts.min() >= 2  # every sample, at least twice
    state = loader.state_dict()
    expected = [next(it)["tokens"] for _ in range(3)]
    resumed = make_loader(uneven, "source/test", batch, seed=3)
    resumed.load_state_dict(state)
    got = iter(resumed)
    for want in expected:
        assert torch.equal(next(got)["tokens"], want)


# -- Splits with fewer shards than readers ---------------------------------------------------------

FIVE = [3, 2]  # a split of 5 sequences in 2 shards (the 2-shard validation split of a 3-rank run)
POSITIONS = [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1)]  # its samples in stored order


@pytest.fixture
def five(tmp_path):
    return build(tmp_path / "five", {"tgt/train": FIVE})


def worker_batches(loader, monkeypatch):
    """{logical worker: its batches} of one rank's loader, each DataLoader worker simulated in this
    process (no real processes): what ``loader`` would iterate from its cursor."""
    out = {}
    for w in range(max(1, loader.num_workers)):
        info = SimpleNamespace(id=w) if loader.num_workers else None
        monkeypatch.setattr(loader_module, "get_worker_info", lambda: info)
        out[w] = list(loader._batches())
    return out


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 0), (3, 0), (1, 7), (3, 2), (4, 16)])
def test_a_finite_pass_reads_every_sample_once_whatever_the_readers(five, monkeypatch, world_size, workers,
                                                                   shuffle):
    """R = 1, 2, 3, 7, 6 and 64 readers (ranks x workers) over 5 sequences: the union over the
    readers is the split, each sample once; without shuffle reader c takes samples c, c + R, ...;
    and each rank's batches are 0, 1, ... with no gap, as the DataLoader's round-robin needs."""
    readers = world_size * max(1, workers)
    seen = Counter()
    for rank in range(world_size):
        loader = make_loader(five, "tgt/train", 1, rank=rank, world_size=world_size, num_workers=workers,
                             seed=3, shuffle=shuffle, infinite=False)
        per_worker = worker_batches(loader, monkeypatch)
        assert sorted(b["index"] for bs in per_worker.values() for b in bs) == list(range(loader.batches_per_epoch))
        for w, batches in per_worker.items():
            mine = [s for b in batches for s in ids(b)]
            seen.update(mine)
            if not shuffle:
                reader = loader_module.consumer_index(rank, w, world_size, max(1, workers), True)
                assert mine == POSITIONS[reader::readers]
    assert seen == Counter(POSITIONS)


def test_real_workers_deliver_a_finite_pass_in_order_and_resume_it(uneven):
    """2 shards for 3 workers (refused before): workers of 3, 3 and 2 samples, batches in order."""
    loader = make_loader(uneven, "source/test", 2, num_workers=3, shuffle=False, infinite=False)
    batches = list(loader)  # the loader checks that batch k arrives k-th
    assert len(batches) == loader.batches_per_epoch == 5
    assert sorted(s for b in batches for s in ids(b)) == [(1, j, i) for j in range(2) for i in range(4)]
    loader.load_state_dict({**loader.state_dict(), "batches_consumed": 2})
    assert [ids(b) for b in loader] == [ids(b) for b in batches[2:]]


def test_training_with_fewer_shards_than_readers_strides_and_logs_once(five, caplog):
    """3 ranks over 2 shards: each rank's first batch of 5 is its share of passes 0-2, so together
    they hold every sample exactly 3 times; only rank 0 logs the fallback, and only then."""
    with caplog.at_level("INFO", logger="gtl_dist"):
        seen = Counter()
        for rank in range(3):
            loader = make_loader(five, "tgt/train", 5, rank=rank, world_size=3, seed=2)
            assert loader.by_sample and loader.batches_per_epoch == 1
            seen.update(s for b in take(loader, 2) for s in ids(b))
        assert seen == Counter({s: 6 for s in POSITIONS})
        fallback = [r.getMessage() for r in caplog.records if "read by sample" in r.getMessage()]
        assert len(fallback) == 1 and "2 shard(s) for world_size 3 x 1 worker(s) = 3 readers" in fallback[0]
        assert "shards.samples_per_shard" in fallback[0]
        caplog.clear()
        assert not make_loader(five, "tgt/train", 5, world_size=2, infinite=True).by_sample  # 2 shards, 2 readers
        assert not [r for r in caplog.records if "read by sample" in r.getMessage()]


def test_a_set_with_fewer_samples_than_readers_still_trains(five, monkeypatch):
    """64 readers (4 ranks x 16 workers, simulated) over 5 samples: every reader's stream yields,
    and their first batches of 5, 320 positions of the stream of passes, hold each sample 64 times."""
    seen = Counter()
    for rank in range(4):
        loader = make_loader(five, "tgt/train", 5, rank=rank, world_size=4, num_workers=16, seed=1)
        assert loader.batches_per_epoch == 1
        for w in range(16):
            monkeypatch.setattr(loader_module, "get_worker_info", lambda: SimpleNamespace(id=w))
            batch = next(iter(loader._batches()))
            assert batch["index"] == w and len(batch["domain"]) == 5
            seen.update(ids(batch))
    assert seen == Counter({s: 64 for s in POSITIONS})


@pytest.mark.resume
def test_exact_resume_of_a_strided_training_stream_across_ranks_and_workers(five):
    n_before, n_after = 3, 4
    for rank in range(2):
        def loader():
            return make_loader(five, "tgt/train", 2, rank=rank, world_size=2, num_workers=2, seed=4)

        straight = take(loader(), n_before + n_after)
        first = loader()
        assert first.by_sample
        take(first, n_before)
        resumed = loader()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        after = take(resumed, n_after)
        assert [(ids(a), a["domain"]) for a in after] == [(ids(b), b["domain"]) for b in straight[n_before:]]
