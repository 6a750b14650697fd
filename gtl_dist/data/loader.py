"""Streaming shards to a training loop: split by rank and worker, shuffled by (seed, epoch), resumable.

Passes. Pass (epoch) e of a set puts its shards in an order drawn from (seed, e) and each shard's
samples in an order drawn from (seed, e, shard); without shuffle both are the stored order.

Who reads what. With R ranks and W DataLoader workers per rank (W' = max(1, W)) there are
C = R * W' *consumers* (readers). A consumer's stream is its share of passes 0, 1, 2, ... back to
back, and it cuts the stream into batches of ``batch_size``. The share is cut one of two ways
(docs/architecture.md, "Data contracts"):

- by shard, for a training stream over at least C shards: consumer c = rank * W' + w reads
  shards c, c + C, c + 2C, ... of each pass, whole;
- by sample, for a training stream over fewer shards and for every finite pass: the passes, back
  to back, are one endless sequence of samples and consumer c = w * R + rank takes its positions
  c, c + C, c + 2C, ... (a rank, all its workers together, the positions rank, rank + R, ...).
  Every consumer reads every shard and keeps its samples of it; shares differ by one sample at
  most, and a set with fewer samples than consumers still reaches every consumer of a training
  stream, over several passes.

Equal batch counts (training). An epoch is a fixed number of batches, identical on every rank:
``batches_per_epoch = total_samples // (R * batch_size)``. Consumers with fewer samples simply run
into their next pass earlier, so no rank ever waits in a collective for another that ran dry. An
endless (training) stream over a set smaller than one batch per rank cycles it: its batches span
several passes.

Finite passes (validation, evaluation). A finite pass is the first N positions of the sequence (N
samples in the set): every sample exactly once, whatever R and W. Each consumer's last batch may be
short and ranks may differ by one batch; every rank must get a sample, so a pass needs N >= R.

Exact resume. Rank batch k comes from logical worker k mod W' (its (k // W')-th batch): the
DataLoader hands out worker batches round-robin, and a resumed loader rotates the workers so that
worker 0 serves batch k0. (In a finite pass a rank's workers with the larger shares come first, so
its batches stay 0, 1, ... without gaps when the short workers run out.) The only state is k,
counted in the main process as batches are consumed (not as workers prefetch them), and the same on
every rank. From k every worker seeks its stream by arithmetic on the manifest's sample counts and
reads only the shard it resumes in.

Token ids. Every batch (and every :func:`read_samples` window) is checked against the manifest's
vocabulary here, on the host, before it goes to a device (``gtl_dist.models.check_token_ids``):
ids outside [0, vocab_size) and the [MASK] id are refused naming the manifest and the set. The
networks and the losses do not check ids again, so no training step reads a batch back.
"""

from __future__ import annotations

import atexit
import signal
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gtl_dist.compat import dataloader_workers, shut_down_dataloader_workers
from gtl_dist.data.manifest import Manifest, ManifestError, verify_shard
from gtl_dist.data.shards import read_shard
from gtl_dist.log import get_logger
from gtl_dist.models.dit import check_token_ids

log = get_logger("data.loader")

STATE_VERSION = 1
# Fields of the cursor that define the stream; a cursor from a loader that differs in any of them
# would silently yield other batches, so loading it is refused.
_STREAM_FIELDS = ("set", "fraction", "drop_last", "held_at", "start", "world_size", "num_workers", "seed", "batch_size", "shuffle",
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
    _worker_processes[:] = [w for w in _worker_processes if w.is_alive()] + dataloader_workers(iterator)


def _kill_workers(workers: list[Any]) -> None:
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join()


def _stop_workers(iterator: Any) -> None:
    shut_down_dataloader_workers(iterator)
    _kill_workers(dataloader_workers(iterator))


def consumer_index(rank: int, worker: int, world_size: int, workers: int, by_sample: bool) -> int:
    """The consumer that (rank, logical worker) is, in the numbering of the module docstring."""
    return worker * world_size + rank if by_sample else rank * workers + worker


class ConsumerStream:
    """The sample stream of one consumer (see the module docstring): endless, or ``passes`` passes.

    Its position is (epoch, slot, offset): the pass, the piece of that pass's :meth:`pass_pieces`
    and the sample within the piece. The position always points at a sample, or at the end.
    """

    def __init__(self, shards: list[tuple[str, int, int]], consumer: int, num_consumers: int, seed: int,
                 shuffle: bool, seq_len: int, *, by_sample: bool = False, passes: Optional[int] = None):
        self.paths = [p for p, _, _ in shards]
        self.skips = [skip for _, skip, _ in shards]
        self.counts = np.array([n for _, _, n in shards], dtype=np.int64)
        self.consumer, self.num_consumers = consumer, num_consumers
        self.seed, self.shuffle, self.seq_len = seed, shuffle, seq_len
        self.step = num_consumers if by_sample else 1  # distance between two samples it takes of a shard
        self.passes = passes
        self._raw: Optional[tuple[int, np.ndarray, list[str]]] = None  # shard, rows, domains as stored
        self._view: Optional[tuple[int, int, np.ndarray, list[str]]] = None  # epoch, shard, in pass order
        self._pass: Optional[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = None
        self.seek(0)

    @property
    def exhausted(self) -> bool:
        return self.epoch == self.passes

    def pass_pieces(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pieces this consumer reads in pass ``epoch``, in reading order: their shards, the
        first sample each takes (in the pass's order of the shard's samples) and how many it
        takes, every ``step``-th."""
        if self._pass is None or self._pass[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.paths)) if self.shuffle
                     else np.arange(len(self.paths)))
            if self.step == 1:
                mine = order[self.consumer::self.num_consumers]
                pieces = (mine, np.zeros_like(mine), self.counts[mine])
            else:
                sizes = self.counts[order]
                starts = epoch * self.counts.sum() + np.cumsum(sizes) - sizes  # in the endless sequence
                firsts = (self.consumer - starts) % self.step
                pieces = (order, firsts, (sizes - firsts + self.step - 1) // self.step)
            self._pass = (epoch, pieces)
        return self._pass[1]

    def seek(self, sample: int) -> None:
        """Jump to the ``sample``-th sample of the stream (or its end) without reading any shard."""
        self.epoch, self.slot = 0, 0
        while not self.exhausted and sample >= (size := int(self.pass_pieces(self.epoch)[2].sum())):
            sample -= size
            self.epoch += 1
        self.offset = sample
        self._settle()

    def _settle(self) -> None:
        """Carry the position past the pieces that its offset has run through, empty ones included."""
        while not self.exhausted:
            sizes = self.pass_pieces(self.epoch)[2]
            if self.offset < sizes[self.slot]:
                return
            self.offset -= int(sizes[self.slot])
            self.slot += 1
            if self.slot == len(sizes):
                self.epoch, self.slot = self.epoch + 1, 0

    def _shard(self, epoch: int, index: int) -> tuple[np.ndarray, list[str]]:
        """The shard's samples in this pass's order (one shard is held at a time)."""
        if self._raw is None or self._raw[0] != index:
            skip = self.skips[index]
            tokens, domains = read_shard(self.paths[index], self.seq_len, limit=skip + int(self.counts[index]))
            if len(tokens) != skip + self.counts[index]:
                raise ManifestError(f"{self.paths[index]}: holds {len(tokens)} samples, the manifest "
                                    f"promises at least {skip + self.counts[index]}; rebuild the data")
            tokens, domains = tokens[skip:], domains[skip:]
            self._raw = (index, tokens, domains)
        if self._view is None or self._view[:2] != (epoch, index):
            _, tokens, domains = self._raw
            order = (np.random.default_rng([self.seed, epoch, 1, index]).permutation(len(tokens))
                     if self.shuffle else np.arange(len(tokens)))
            self._view = (epoch, index, tokens[order], [domains[i] for i in order])
        return self._view[2], self._view[3]

    def take(self, n: int) -> tuple[np.ndarray, list[str]]:
        """The next ``n`` samples, fewer only where a finite stream ends (call it before the end)."""
        rows, domains = [], []
        while n > 0 and not self.exhausted:
            shards, firsts, sizes = self.pass_pieces(self.epoch)
            tokens, doms = self._shard(self.epoch, int(shards[self.slot]))
            count = min(n, int(sizes[self.slot]) - self.offset)
            first = int(firsts[self.slot]) + self.offset * self.step
            picked = slice(first, first + count * self.step, self.step)
            rows.append(tokens[picked])
            domains += doms[picked]
            n -= count
            self.offset += count
            self._settle()
        return np.concatenate(rows), domains


class _RankBatches(IterableDataset):
    """Batches k = start, start + 1, ... of one rank, tagged with k (all of them, or up to the end
    of a finite pass).

    In DataLoader worker i (of W), it yields the batches k = start + i + j * W; the main process
    receives them round-robin, i.e. in order of k.
    """

    def __init__(self, shards, seq_len, batch_size, rank, world_size, num_workers, seed, shuffle,
                 by_sample: bool, passes: Optional[int], start: int):
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.seed, self.shuffle, self.by_sample, self.passes = seed, shuffle, by_sample, passes
        self.start = start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        first = self.start + (info.id if info is not None else 0)
        consumer = consumer_index(self.rank, first % self.workers, self.world_size, self.workers, self.by_sample)
        stream = ConsumerStream(self.shards, consumer, self.world_size * self.workers, self.seed, self.shuffle,
                                self.seq_len, by_sample=self.by_sample, passes=self.passes)
        stream.seek((first // self.workers) * self.batch_size)
        k = first
        while not stream.exhausted:
            tokens, domains = stream.take(self.batch_size)
            # Ids travel in their compact stored dtype (less to copy between processes) and are
            # widened to int64 in the main process.
            yield {"tokens": torch.from_numpy(tokens), "domain": domains, "index": k}
            k += self.workers


class ShardLoader:
    """Iterable of ``{"tokens": LongTensor[batch_size, seq_len], "domain": list[str]}`` batches.

    ``infinite=True``: one endless stream; iterating again continues where the last iteration
    stopped (training). ``infinite=False``: every ``iter()`` is one pass of ``batches_per_epoch``
    batches from the start, which over all ranks holds every sample exactly once -- the same batches
    each time with ``shuffle=False`` (validation, evaluation) -- unless a cursor was loaded just
    before, which resumes that pass. Its last batches may be short.
    """

    def __init__(self, manifest: Manifest, set_name: str, batch_size: int, *, fraction: float | None = None,
                 drop_last: int = 0, start: int = 0, held_at: int | None = None, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle: bool = True,
                 infinite: bool = True, expected_tokenizer_hash: str | None = None):
        where = f"{manifest.path} [{set_name}]"
        manifest.check_tokenizer(expected_tokenizer_hash)
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0 or seed < 0:
            raise ValueError(f"{where}: need batch_size >= 1, world_size >= 1, 0 <= rank < world_size, "
                             f"num_workers >= 0 and seed >= 0; got batch_size={batch_size}, rank={rank}, "
                             f"world_size={world_size}, num_workers={num_workers}, seed={seed}")
        files = manifest.shard_files(set_name, fraction, drop_last, start, held_at)
        workers = max(1, num_workers)
        consumers = world_size * workers
        total = sum(n for _, _, n in files)
        # A finite pass is dealt out by sample, so that it reads every sample once; a training
        # stream is split by shard while there are shards enough to go round.
        self.by_sample = not infinite or len(files) < consumers
        if infinite:
            # A training stream cycles a set smaller than one batch (e.g. 20 target sequences in
            # a half-batch of 128): the stream runs through its passes back to back, so a batch
            # holds every sample about batch_size / total times, each pass freshly shuffled.
            self.batches_per_epoch = max(1, total // (world_size * batch_size))
            if self.by_sample and rank == 0:
                log.info("%s: %d shard(s) for world_size %d x %d worker(s) = %d readers, so it is read by "
                         "sample: every reader reads every shard and keeps one sample in %d (at least %d "
                         "shards, e.g. a smaller shards.samples_per_shard, would split it by shard)",
                         where, len(files), world_size, workers, consumers, consumers, consumers)
        else:
            self.batches_per_epoch = pass_batches(where, total, rank, world_size, workers, batch_size)
        self.manifest, self.set_name, self.fraction, self.drop_last = manifest, set_name, fraction, drop_last
        self.where = where
        self.start, self.held_at = start, held_at
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle, self.infinite = num_workers, seed, shuffle, infinite
        self.shards = [(str(p), skip, n) for p, skip, n in files]
        # Every shard reaches every rank sooner or later, except when split by shard without shuffle.
        readable = (range(len(files)) if shuffle or self.by_sample else
                    sorted({j for w in range(workers)
                            for j in range(consumer_index(rank, w, world_size, workers, False), len(files),
                                           consumers)}))
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
        dataset = self._batches()
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
                check_token_ids(batch["tokens"], self.manifest.vocab_size, self.where,
                                mask_id=self.manifest.mask_id)
                yield batch
        finally:
            if self.num_workers:
                _stop_workers(batches)

    def _batches(self) -> _RankBatches:
        """This rank's batches from the cursor on (what each DataLoader worker iterates)."""
        return _RankBatches(self.shards, self.manifest.seq_len, self.batch_size, self.rank, self.world_size,
                            self.num_workers, self.seed, self.shuffle, self.by_sample,
                            None if self.infinite else 1, self._position)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable cursor; identical on every rank (each rank consumed the same count)."""
        return {"version": STATE_VERSION, "set": self.set_name, "fraction": self.fraction,
                "drop_last": self.drop_last, "held_at": self.held_at, "start": self.start, "world_size": self.world_size, "num_workers": self.num_workers, "seed": self.seed,
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


def pass_batches(where: str, total: int, rank: int, world_size: int, workers: int, batch_size: int) -> int:
    """This rank's batches in a finite pass over ``total`` samples: each of its consumers' shares
    cut into batches, the last one short."""
    if total < world_size:
        # Validation averages a loss over every rank's batches, so a rank without one cannot take part.
        raise ManifestError(
            f"{where}: a pass over its {total} sample(s) leaves {world_size - total} of {world_size} ranks "
            f"without a sample, and every rank of a validation or evaluation pass needs one; run it on at "
            f"most {total} rank(s), or give the set more samples (a test set grows with data.test_fraction)")
    shares = [len(range(consumer_index(rank, w, world_size, workers, True), total, world_size * workers))
              for w in range(workers)]
    return sum(-(-n // batch_size) for n in shares)


def make_loader(manifest: Manifest, set_name: str, batch_size: int, *, fraction: float | None = None,
                drop_last: int = 0, start: int = 0, held_at: int | None = None, rank: int = 0,
                world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle: bool = True,
                infinite: bool = True, expected_tokenizer_hash: str | None = None) -> ShardLoader:
    """A :class:`ShardLoader` over ``set_name`` ("source/train", "physics/test", ...).

    ``fraction`` selects a target fraction's count of samples from sample ``start`` on (a
    replicate's window, read cyclically; the prefix when 0) and ``drop_last`` leaves out as many
    of its samples, from offset ``held_at`` of the window (by default its last ones: the held-out
    part, :func:`read_samples`); rank and world size are explicit
    (not read from the environment). Fails at once on a tokenizer mismatch, a corrupted shard, a
    fraction with no samples, or a finite pass with fewer samples than ranks.
    """
    return ShardLoader(manifest, set_name, batch_size, fraction=fraction, drop_last=drop_last, start=start,
                       held_at=held_at, rank=rank,
                       world_size=world_size, num_workers=num_workers, seed=seed, shuffle=shuffle,
                       infinite=infinite, expected_tokenizer_hash=expected_tokenizer_hash)


def read_samples(manifest: Manifest, set_name: str, start: int, stop: int,
                 expected_tokenizer_hash: str | None = None) -> torch.Tensor:
    """Samples ``start`` .. ``stop - 1`` of a set, in shard order, as LongTensor [stop - start, L]:
    a small held-out part read whole (every rank reads all of it and takes its own rows). Indices
    at or past the set's size wrap to its beginning (a replicate's window, ShardLoader ``start``)."""
    manifest.check_tokenizer(expected_tokenizer_hash)
    total = manifest.num_samples(set_name)
    if not (0 <= start < total and start < stop <= start + total):
        raise ManifestError(f"{manifest.path} [{set_name}]: samples {start}..{stop - 1} are outside "
                            f"its {total} samples (a window may wrap once, at most {total} long)")
    if stop > total:
        return torch.cat([read_samples(manifest, set_name, start, total),
                          read_samples(manifest, set_name, 0, stop - total)])
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
    samples = torch.from_numpy(np.concatenate(rows)).long()
    check_token_ids(samples, manifest.vocab_size, f"{manifest.path} [{set_name}]",
                    mask_id=manifest.mask_id)
    return samples
