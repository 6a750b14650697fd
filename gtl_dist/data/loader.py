"""Streaming shards to a training loop: split by rank and worker, shuffled by (seed, epoch), resumable.

Who reads what. With R ranks and W DataLoader workers per rank (W' = max(1, W)) there are
C = R * W' *consumers*; consumer c = rank * W' + w. In pass (epoch) e the shards are put in a
permutation drawn from (seed, e) and consumer c reads shards c, c + C, c + 2C, ... of it, each
shard's samples in a permutation drawn from (seed, e, shard). A consumer's stream is its passes
0, 1, 2, ... back to back, and it cuts the stream into batches of ``batch_size``.

Equal batch counts. An epoch is a fixed number of batches, identical on every rank:
``batches_per_epoch = total_samples // (R * batch_size)``. Consumers with fewer samples simply run
into their next pass earlier, so no rank ever waits in a collective for another that ran dry. An
endless (training) stream over a set smaller than one batch per rank cycles it: its batches span
several passes.

Exact resume. Rank batch k comes from logical worker k mod W' (its (k // W')-th batch): the
DataLoader hands out worker batches round-robin, and a resumed loader rotates the workers so that
worker 0 serves batch k0. The only state is k, counted in the main process as batches are
consumed (not as workers prefetch them), and the same on every rank. From k every worker seeks its
stream by arithmetic on the manifest's sample counts and reads only the shard it resumes in.
"""

from __future__ import annotations

import atexit
import signal
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gtl_dist.data.manifest import Manifest, ManifestError, verify_shard
from gtl_dist.data.shards import read_shard

STATE_VERSION = 1
# Fields of the cursor that define the stream; a cursor from a loader that differs in any of them
# would silently yield other batches, so loading it is refused.
_STREAM_FIELDS = ("set", "fraction", "drop_last", "world_size", "num_workers", "seed", "batch_size", "shuffle",
                  "data_hash")


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SLURM signals every process of a job step (docs/operations.md);
    the training loop decides when to stop, so a worker must not die of SIGUSR2 or SIGTERM."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# Workers that ignore SIGTERM outlive torch's own fallback (``terminate()``) and multiprocessing's
# exit hook (SIGTERM, then join): a worker still alive there would hang the interpreter. So every
# worker process is tracked and, when its iterator is done or the interpreter exits, asked to stop
# the normal way and killed if it did not.
_worker_processes: list[Any] = []
_exit_hook_registered = False


def _track_workers(iterator: Any) -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        # Registered after multiprocessing's own exit hook (imported by now), so it runs before it.
        atexit.register(_kill_workers, _worker_processes)
        _exit_hook_registered = True
    _worker_processes[:] = [w for w in _worker_processes if w.is_alive()] + list(iterator._workers)


def _kill_workers(workers: list[Any]) -> None:
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join()


def _stop_workers(iterator: Any) -> None:
    iterator._shutdown_workers()  # done event + sentinel; a no-op once the interpreter is exiting
    _kill_workers(iterator._workers)


class ConsumerStream:
    """The endless sample stream of one consumer (see the module docstring)."""

    def __init__(self, shards: list[tuple[str, int]], consumer: int, num_consumers: int, seed: int,
                 shuffle: bool, seq_len: int):
        self.paths = [p for p, _ in shards]
        self.counts = np.array([n for _, n in shards], dtype=np.int64)
        self.consumer, self.num_consumers = consumer, num_consumers
        self.seed, self.shuffle, self.seq_len = seed, shuffle, seq_len
        self.epoch, self.slot, self.offset = 0, 0, 0  # position: pass, shard within the pass, sample
        self._raw: Optional[tuple[int, np.ndarray, list[str]]] = None  # shard, rows, domains as stored
        self._view: Optional[tuple[int, int, np.ndarray, list[str]]] = None  # epoch, shard, in pass order
        self._pass: Optional[tuple[int, np.ndarray]] = None

    def pass_shards(self, epoch: int) -> np.ndarray:
        if self._pass is None or self._pass[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.paths)) if self.shuffle
                     else np.arange(len(self.paths)))
            self._pass = (epoch, order[self.consumer::self.num_consumers])
        return self._pass[1]

    def seek(self, sample: int) -> None:
        """Jump to the ``sample``-th sample of the stream without reading any shard."""
        epoch = 0
        while True:
            mine = self.pass_shards(epoch)
            size = int(self.counts[mine].sum())
            if sample < size:
                break
            sample -= size
            epoch += 1
        slot = 0
        while sample >= self.counts[mine[slot]]:
            sample -= int(self.counts[mine[slot]])
            slot += 1
        self.epoch, self.slot, self.offset = epoch, slot, sample

    def _shard(self, epoch: int, index: int) -> tuple[np.ndarray, list[str]]:
        """The shard's samples in this pass's order (one shard is held at a time)."""
        if self._raw is None or self._raw[0] != index:
            tokens, domains = read_shard(self.paths[index], self.seq_len, limit=int(self.counts[index]))
            if len(tokens) != self.counts[index]:
                raise ManifestError(f"{self.paths[index]}: holds {len(tokens)} samples, the manifest "
                                    f"promises at least {self.counts[index]}; rebuild the data")
            self._raw = (index, tokens, domains)
        if self._view is None or self._view[:2] != (epoch, index):
            _, tokens, domains = self._raw
            order = (np.random.default_rng([self.seed, epoch, 1, index]).permutation(len(tokens))
                     if self.shuffle else np.arange(len(tokens)))
            self._view = (epoch, index, tokens[order], [domains[i] for i in order])
        return self._view[2], self._view[3]

    def take(self, n: int) -> tuple[np.ndarray, list[str]]:
        rows, domains = [], []
        while n > 0:
            mine = self.pass_shards(self.epoch)
            tokens, doms = self._shard(self.epoch, int(mine[self.slot]))
            rows.append(tokens[self.offset:self.offset + n])
            domains += doms[self.offset:self.offset + n]
            picked = rows[-1]
            n -= len(picked)
            self.offset += len(picked)
            if self.offset == len(tokens):
                self.offset, self.slot = 0, self.slot + 1
                if self.slot == len(mine):
                    self.epoch, self.slot = self.epoch + 1, 0
        return np.concatenate(rows), domains


class _RankBatches(IterableDataset):
    """Batches k = start, start + 1, ... (below ``stop``) of one rank, tagged with k.

    In DataLoader worker i (of W), it yields the batches k = start + i + j * W; the main process
    receives them round-robin, i.e. in order of k.
    """

    def __init__(self, shards, seq_len, batch_size, rank, world_size, num_workers, seed, shuffle,
                 start: int, stop: Optional[int]):
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.seed, self.shuffle, self.start, self.stop = seed, shuffle, start, stop

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        first = self.start + (info.id if info is not None else 0)
        logical = first % self.workers
        stream = ConsumerStream(self.shards, self.rank * self.workers + logical,
                                self.world_size * self.workers, self.seed, self.shuffle, self.seq_len)
        stream.seek((first // self.workers) * self.batch_size)
        k = first
        while self.stop is None or k < self.stop:
            tokens, domains = stream.take(self.batch_size)
            # Ids travel in their compact stored dtype (less to copy between processes) and are
            # widened to int64 in the main process.
            yield {"tokens": torch.from_numpy(tokens), "domain": domains, "index": k}
            k += self.workers


class ShardLoader:
    """Iterable of ``{"tokens": LongTensor[batch_size, seq_len], "domain": list[str]}`` batches.

    ``infinite=True``: one endless stream; iterating again continues where the last iteration
    stopped (training). ``infinite=False``: every ``iter()`` is one pass of ``batches_per_epoch``
    batches from the start -- the same batches each time with ``shuffle=False`` (validation) -- unless
    a cursor was loaded just before, which resumes that pass. A trailing partial batch is dropped.
    """

    def __init__(self, manifest: Manifest, set_name: str, batch_size: int, *, fraction: float | None = None,
                 drop_last: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, infinite: bool = True, expected_tokenizer_hash: str | None = None):
        where = f"{manifest.path} [{set_name}]"
        manifest.check_tokenizer(expected_tokenizer_hash)
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0 or seed < 0:
            raise ValueError(f"{where}: need batch_size >= 1, world_size >= 1, 0 <= rank < world_size, "
                             f"num_workers >= 0 and seed >= 0; got batch_size={batch_size}, rank={rank}, "
                             f"world_size={world_size}, num_workers={num_workers}, seed={seed}")
        files = manifest.shard_files(set_name, fraction, drop_last)
        consumers = world_size * max(1, num_workers)
        if len(files) < consumers:
            raise ManifestError(
                f"{where}: {len(files)} shard(s) for world_size {world_size} x {max(1, num_workers)} "
                f"worker(s) = {consumers} readers; every reader needs a shard. Use num_workers <= "
                f"{max(len(files) // world_size, 0)} (0 reads in the main process), fewer ranks, or rebuild with "
                f"a smaller shards.samples_per_shard")
        total = sum(n for _, n in files)
        self.batches_per_epoch = total // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            if not infinite:
                raise ManifestError(f"{where}: {total} samples cannot fill one batch of {batch_size} on each "
                                    f"of {world_size} rank(s); lower the batch size")
            # A training stream cycles a set smaller than one batch (e.g. 20 target sequences in
            # a half-batch of 128): the stream runs through its passes back to back, so a batch
            # holds every sample about batch_size / total times, each pass freshly shuffled.
            self.batches_per_epoch = 1
        self.manifest, self.set_name, self.fraction, self.drop_last = manifest, set_name, fraction, drop_last
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle, self.infinite = num_workers, seed, shuffle, infinite
        self.shards = [(str(p), n) for p, n in files]
        # With shuffle every shard reaches every rank sooner or later; without, only its own.
        readable = (range(len(files)) if shuffle else
                    sorted({j for w in range(max(1, num_workers))
                            for j in range(rank * max(1, num_workers) + w, len(files), consumers)}))
        entries = {manifest.root / s.name: s for s in manifest.get_set(set_name).shards}
        for j in readable:
            verify_shard(files[j][0], entries[files[j][0]])
        self._position = 0
        self._resumed = False

    @property
    def epoch(self) -> int:
        return self._position // self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.infinite and not self._resumed:
            self._position = 0
        self._resumed = False
        stop = None if self.infinite else self.batches_per_epoch
        dataset = _RankBatches(self.shards, self.manifest.seq_len, self.batch_size, self.rank, self.world_size,
                               self.num_workers, self.seed, self.shuffle, self._position, stop)
        if self.num_workers == 0:
            batches: Any = iter(dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                      worker_init_fn=ignore_preemption_signals))
            _track_workers(batches)
        try:
            for batch in batches:
                k = batch.pop("index")
                if k != self._position:  # the round-robin contract the cursor relies on is broken
                    raise RuntimeError(f"data loader yielded batch {k} where {self._position} was due")
                self._position += 1
                batch["tokens"] = batch["tokens"].long()
                yield batch
        finally:
            if self.num_workers:
                _stop_workers(batches)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable cursor; identical on every rank (each rank consumed the same count)."""
        return {"version": STATE_VERSION, "set": self.set_name, "fraction": self.fraction,
                "drop_last": self.drop_last, "world_size": self.world_size, "num_workers": self.num_workers, "seed": self.seed,
                "batch_size": self.batch_size, "shuffle": self.shuffle, "data_hash": self.manifest.data_hash,
                "batches_consumed": self._position, "epoch": self.epoch,
                "batch_in_epoch": self._position % self.batches_per_epoch,
                "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved cursor (call before iterating)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self.state_dict()
        for key in _STREAM_FIELDS:
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"data loader state was saved with {key}={state.get(key)!r} but this loader has "
                    f"{key}={mine[key]!r}; an exact resume needs the same {key}. Keep it, or start the "
                    f"data stream afresh (e.g. with a new seed) instead of loading this state")
        position = int(state["batches_consumed"])
        if position < 0 or (not self.infinite and position > self.batches_per_epoch):
            raise ValueError(f"data loader state: batches_consumed={position} is outside this loader's "
                             f"pass of {self.batches_per_epoch} batches")
        self._position = position
        self._resumed = True


def make_loader(manifest: Manifest, set_name: str, batch_size: int, *, fraction: float | None = None,
                drop_last: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                shuffle: bool = True, infinite: bool = True,
                expected_tokenizer_hash: str | None = None) -> ShardLoader:
    """A :class:`ShardLoader` over ``set_name`` ("source/train", "physics/test", ...).

    ``fraction`` selects the nested prefix of a target training set and ``drop_last`` leaves out
    its last samples (the held-out part, :func:`read_samples`); rank and world size are explicit
    (not read from the environment). Fails at once on a tokenizer mismatch, a corrupted shard, too
    few shards for ``world_size x num_workers`` readers, or a fraction with no samples.
    """
    return ShardLoader(manifest, set_name, batch_size, fraction=fraction, drop_last=drop_last, rank=rank,
                       world_size=world_size, num_workers=num_workers, seed=seed, shuffle=shuffle,
                       infinite=infinite, expected_tokenizer_hash=expected_tokenizer_hash)


def read_samples(manifest: Manifest, set_name: str, start: int, stop: int,
                 expected_tokenizer_hash: str | None = None) -> torch.Tensor:
    """Samples ``start`` .. ``stop - 1`` of a set, in shard order, as LongTensor [stop - start, L]:
    a small held-out part read whole (every rank reads all of it and takes its own rows)."""
    manifest.check_tokenizer(expected_tokenizer_hash)
    total = manifest.num_samples(set_name)
    if not 0 <= start < stop <= total:
        raise ManifestError(f"{manifest.path} [{set_name}]: samples {start}..{stop - 1} are outside "
                            f"its {total} samples")
    entries = manifest.get_set(set_name).shards
    rows, first = [], 0
    for shard in entries:
        last = first + shard.samples
        if last > start and first < stop:
            path = manifest.root / shard.name
            verify_shard(path, shard)
            tokens, _ = read_shard(path, manifest.seq_len, limit=min(stop, last) - first)
            rows.append(tokens[max(start - first, 0):])
        first = last
    return torch.from_numpy(np.concatenate(rows)).long()

