"""Streaming the shards to training and evaluation, with exact resume.

Who reads what. An epoch permutes the split's shards with a seed shared by every rank
(``seed``, epoch); rank r takes every world_size-th shard of that order, and its loader worker w
every num_workers-th of those. Each shard is therefore read by exactly one (rank, worker) per epoch,
and each sample is seen exactly once per epoch across all ranks. How many shards a (rank, worker)
gets does not depend on the epoch's order, so a worker that gets none (more workers than shards)
never gets one: it yields nothing and ends, and the other workers go on. A rank that gets none
(fewer shards than ranks) is an error for an infinite stream (it would wait forever while the
others train); a finite stream just yields no batch on it. Inside a worker, samples pass through a
seeded shuffle buffer (``shuffle_buffer`` samples, 0 = off) that is drained at the end of the
epoch, and are grouped into batches; a worker's batches run on from one epoch into the next, so
only the very end of a finite stream has a short batch.

Uneven counts. Shards go whole to ranks, so ranks get different numbers of samples per epoch.
With ``epochs=None`` (training) the stream never ends and no rank runs out. With a finite
``epochs`` (evaluation) the ranks yield different numbers of batches, ``loader.batches_per_rank()``
says how many each will yield (all shards readable): evaluation must not run a collective per batch;
sum metrics locally and reduce once at the end (or pad to ``max(batches_per_rank())``).

Exact resume. Every batch carries the producing worker's position after it: epoch, shard cursor,
offset in the shard, the keys of the samples in its shuffle buffer and its RNG state. The loader
keeps the latest position of each worker and which worker is next in PyTorch's round-robin
(DataLoader serves workers in turn, skipping exhausted ones). ``state_dict()`` is that, as JSON;
after ``load_state_dict()`` each worker reopens its current shard, refills its buffer from the
saved keys (re-reading at most the shards those keys live in) and the worker that was next is
started as worker 0. Cost of a restore: reading a few shards per worker, no replay of the epoch.

Integrity. ``build_loader`` checks, cheaply, the manifest, the tokenizer's sha256 against it and
that every shard exists with the recorded size. Each shard's sha256 is verified when it is loaded
(a worker reads the whole shard into memory, hashes it, then parses it with WebDataset's tar
reader), before any of its samples is used. A shard that fails (missing, truncated, checksum,
unreadable tar) stops the stream with an error naming it, or with ``on_corrupt_shard="skip"`` is
logged, counted (``loader.skipped``) and skipped.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import logging
import math
import multiprocessing
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from pretrain.data.manifest import (
    MANIFEST_NAME,
    PREPARE_HINT,
    check_tokenizer,
    load_manifest,
    manifest_sha256,
    missing_or_resized_shards,
    split_shards,
)
from pretrain.data.remote import read_bytes, remote_sizes, shard_location
from pretrain.data.shards import npy_array
from pretrain.engine.worker_guard import init_loader_worker, loader_children

log = logging.getLogger(__name__)

STATE_VERSION = 1
CORRUPT_POLICIES = ("error", "skip")


class CorruptShardError(ValueError):
    """A shard is missing, truncated, fails its checksum or is not a readable tar of our samples."""


# Reading one shard ---------------------------------------------------------------------------

def read_shard(path: str | Path, entry: Optional[dict], seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """All (input_ids, doc_ids) of a shard, in order; checked against its manifest ``entry`` (None: no check)."""
    path = str(path)  # a local path or a URL (pretrain.data.remote)
    fix = f"re-copy the file or {PREPARE_HINT}; or stream with on_corrupt_shard=skip (data.on_corrupt_shard) to skip it"
    try:
        payload = read_bytes(path)
    except OSError as exc:
        raise CorruptShardError(f"shard {path} cannot be read ({exc.strerror or exc}): {fix}") from None
    if entry is not None:
        actual = hashlib.sha256(payload).hexdigest()
        if actual != entry["sha256"]:
            raise CorruptShardError(
                f"shard {path} fails its checksum ({len(payload)} bytes, sha256 {actual[:12]}…; manifest: "
                f"{entry['bytes']} bytes, {entry['sha256'][:12]}…): the file is corrupt or truncated; {fix}"
            )
    samples = []
    try:
        files = tar_file_expander([{"url": str(path), "stream": io.BytesIO(payload)}])
        for sample in group_by_keys(files):
            input_ids = npy_array(sample["input_ids.npy"], seq_len)
            doc_ids = npy_array(sample["doc_ids.npy"], seq_len)
            if input_ids.shape != (seq_len,) or doc_ids.shape != (seq_len,):
                raise ValueError(f"sample {sample['__key__']} has shapes {input_ids.shape}/{doc_ids.shape}, expected ({seq_len},)")
            samples.append((input_ids.astype(np.int32, copy=False), doc_ids.astype(np.int32, copy=False)))
    except (tarfile.TarError, ValueError, KeyError, EOFError, OSError) as exc:
        raise CorruptShardError(f"shard {path} is not a readable shard of this dataset ({type(exc).__name__}: {exc}): {fix}") from None
    if entry is not None and len(samples) != entry["samples"]:
        raise CorruptShardError(f"shard {path} holds {len(samples)} samples, the manifest says {entry['samples']}: {fix}")
    return samples


def iter_samples(
    data_dir: str | Path, split: str, *, on_corrupt_shard: str = "error", skipped: Optional[list] = None, shards_url: Optional[str] = None
) -> Iterator[np.ndarray]:
    """Every sample's input_ids (np.int32 [seq_len]) of a split, in shard order, in this process.

    With on_corrupt_shard="skip", each skipped shard is logged and, if ``skipped`` is a list, appended
    to it as {"shard", "samples", "error"} (the loader's ``skipped`` entries without the epoch)."""
    if on_corrupt_shard not in CORRUPT_POLICIES:
        raise ValueError(f"on_corrupt_shard must be one of {CORRUPT_POLICIES}, got {on_corrupt_shard!r}")
    manifest = _open_dataset(data_dir, shards_url)
    for entry in split_shards(data_dir, manifest, split):
        try:
            samples = read_shard(shard_location(str(data_dir), shards_url, entry["name"]), entry, manifest["seq_len"])
        except CorruptShardError as exc:
            if on_corrupt_shard != "skip":
                raise
            log.warning("skipping %d samples: %s", entry["samples"], exc)
            if skipped is not None:
                skipped.append({"shard": entry["name"], "samples": entry["samples"], "error": str(exc)})
            continue
        for input_ids, _ in samples:
            yield input_ids


def _open_dataset(data_dir: str | Path, shards_url: Optional[str] = None) -> dict:
    manifest = load_manifest(data_dir)
    check_tokenizer(data_dir, manifest)
    if shards_url:
        # the shards there must come from the same prepare as the local manifest
        remote = shard_location(str(data_dir), shards_url, MANIFEST_NAME)
        try:
            same = read_bytes(remote) == (Path(data_dir) / MANIFEST_NAME).read_bytes()
        except OSError as exc:
            raise FileNotFoundError(f"cannot read {remote} ({exc}): data.shards_url must name a copy of the data dir {data_dir}") from None
        if not same:
            raise ValueError(f"{remote} differs from {Path(data_dir) / MANIFEST_NAME}: the shards at data.shards_url come from another prepare; copy that data dir's manifest.json and tokenizer.model here, or upload this one")
    return manifest


# What every worker knows -------------------------------------------------------------------

@dataclass(frozen=True)
class StreamSpec:
    data_dir: str
    split: str
    shards: tuple  # manifest entries of the split
    seq_len: int
    batch_size: int
    rank: int
    world_size: int
    num_workers: int  # DataLoader worker processes (0 = read in the main process)
    seed: int
    epochs: Optional[int]
    shuffle_buffer: int
    on_corrupt_shard: str
    manifest_sha256: str
    shards_url: Optional[str] = None  # read shards from there instead of data_dir (pretrain.data.remote)

    def location(self, entry: dict) -> str:
        return shard_location(self.data_dir, self.shards_url, entry["name"])

    @property
    def streams(self) -> int:
        """Independent sample streams per rank: one per worker process, or one in-process."""
        return max(1, self.num_workers)

    @property
    def shard_starts(self) -> list[int]:
        """Index (within the split) of each shard's first sample: a sample's key is start + offset."""
        starts, total = [], 0
        for entry in self.shards:
            starts.append(total)
            total += entry["samples"]
        return starts

    def worker_shards(self, epoch: int, worker: int, rank: Optional[int] = None) -> list[int]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()
        rank = self.rank if rank is None else rank
        return order[rank :: self.world_size][worker :: self.streams]


# One worker's stream -------------------------------------------------------------------------

class _WorkerStream:
    """The batches of one logical worker, with its position (``snapshot()``) after each."""

    def __init__(self, spec: StreamSpec, worker: int, state: Optional[dict]):
        self.spec = spec
        self.worker = worker
        state = state or {}
        self.epoch = state.get("epoch", 0)
        self.cursor = state.get("cursor", 0)  # index into this worker's shard list of the epoch
        self.offset = state.get("offset", 0)  # samples of that shard already pushed into the buffer
        self.buffer_keys = list(state.get("buffer", []))
        self.rng_state = state.get("rng")
        self.samples_out = state.get("samples", 0)
        self.skipped = list(state.get("skipped", []))
        self.done = state.get("done", False)
        self.starts = spec.shard_starts
        self.rng: Optional[np.random.Generator] = None
        self.buffer: list[tuple[int, np.ndarray, np.ndarray]] = []

    def snapshot(self) -> dict:
        return {
            "worker": self.worker,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "offset": self.offset,
            "buffer": [key for key, _, _ in self.buffer],
            "rng": self.rng.bit_generator.state if self.rng is not None else None,
            "samples": self.samples_out,
            "skipped": list(self.skipped),
            "done": self.done,
        }

    def items(self) -> Iterator[dict]:
        spec = self.spec
        pending: list[tuple[int, np.ndarray, np.ndarray]] = []
        try:
            while spec.epochs is None or self.epoch < spec.epochs:
                shards = spec.worker_shards(self.epoch, self.worker)
                if not shards and spec.epochs is None:
                    break  # no shard in any epoch: end now rather than loop over empty epochs forever
                self._start_epoch()
                read_any = False
                while self.cursor < len(shards):
                    shard = shards[self.cursor]
                    if self.offset < spec.shards[shard]["samples"]:
                        samples = self._load(shard)
                        read_any = read_any or bool(samples)
                        for offset in range(self.offset, len(samples)):
                            self.offset = offset + 1
                            for out in self._push((self.starts[shard] + offset, *samples[offset])):
                                pending.append(out)
                                if len(pending) == spec.batch_size:
                                    yield self._batch(pending)
                                    pending = []
                    self.cursor, self.offset = self.cursor + 1, 0
                while self.buffer:
                    pending.append(self._pop())
                    if len(pending) == spec.batch_size:
                        yield self._batch(pending)
                        pending = []
                if spec.epochs is None and not read_any and self.skipped:
                    self._check_some_shard_readable()
                self.epoch, self.cursor, self.offset, self.rng = self.epoch + 1, 0, 0, None
        except CorruptShardError as exc:
            # Handed to the main process as data: an exception raised in a DataLoader worker
            # would reach the user wrapped in a worker traceback.
            yield {"_error": str(exc), "_state": self.snapshot()}
            return
        self.done = True
        yield self._batch(pending) if pending else {"_state": self.snapshot()}

    def _check_some_shard_readable(self) -> None:
        """After an epoch in which every shard this worker got was skipped: with no readable shard
        in the whole split, an infinite stream would re-read the same broken files forever."""
        known_bad = {e["shard"] for e in self.skipped}
        for entry in self.spec.shards:
            if entry["name"] in known_bad:
                continue
            try:
                read_shard(self.spec.location(entry), entry, self.spec.seq_len)
                return  # a later epoch will hand this worker a readable shard
            except CorruptShardError:
                known_bad.add(entry["name"])
        raise CorruptShardError(
            f"all {len(self.spec.shards)} shard(s) of split {self.spec.split!r} in {self.spec.data_dir} are unreadable "
            f"(e.g. {self.skipped[-1]['error']}): nothing is left to stream; {PREPARE_HINT}"
        )

    def _start_epoch(self) -> None:
        if self.rng is not None:
            return
        spec = self.spec
        self.rng = np.random.default_rng([spec.seed, self.epoch, spec.rank, spec.world_size, self.worker, spec.streams])
        if self.rng_state is not None:
            self.rng.bit_generator.state = self.rng_state
            self.rng_state = None
        if self.buffer_keys:
            self.buffer = self._refill(self.buffer_keys)
            self.buffer_keys = []

    def _refill(self, keys: list[int]) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Samples of a restored shuffle buffer, read back from the shards they came from."""
        loaded: dict[int, list] = {}
        out = []
        for key in keys:
            shard = bisect.bisect_right(self.starts, key) - 1
            if shard not in loaded:
                loaded[shard] = self._load(shard, count_skip=False)
            out.append((key, *loaded[shard][key - self.starts[shard]]))
        return out

    def _load(self, shard: int, count_skip: bool = True) -> list:
        entry = self.spec.shards[shard]
        try:
            return read_shard(self.spec.location(entry), entry, self.spec.seq_len)
        except CorruptShardError as exc:
            if self.spec.on_corrupt_shard != "skip" or not count_skip:
                raise
            log.warning("rank %d worker %d, epoch %d: skipping %d samples: %s", self.spec.rank, self.worker, self.epoch, entry["samples"], exc)
            self.skipped.append({"epoch": self.epoch, "shard": entry["name"], "samples": entry["samples"], "error": str(exc)})
            return []

    def _push(self, item):
        if self.spec.shuffle_buffer == 0:
            yield item
            return
        self.buffer.append(item)
        if len(self.buffer) >= self.spec.shuffle_buffer:
            yield self._pop()

    def _pop(self):
        pick = int(self.rng.integers(len(self.buffer)))
        self.buffer[pick], self.buffer[-1] = self.buffer[-1], self.buffer[pick]
        return self.buffer.pop()

    def _batch(self, pending: list) -> dict:
        self.samples_out += len(pending)
        return {
            "input_ids": torch.from_numpy(np.stack([ids for _, ids, _ in pending]).astype(np.int64)),
            "doc_ids": torch.from_numpy(np.stack([docs for _, _, docs in pending]).astype(np.int64)),
            "_state": self.snapshot(),
        }


class _ShardDataset(IterableDataset):
    """What DataLoader workers run: physical worker p plays logical worker (p + rotation) % n."""

    def __init__(self, spec: StreamSpec, states: list[Optional[dict]], rotation: int):
        super().__init__()
        self.spec = spec
        self.states = states
        self.rotation = rotation

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotation) % self.spec.streams
        state = self.states[worker]
        if state is not None and state["done"]:
            return iter(())
        return _WorkerStream(self.spec, worker, state).items()


def worker_start_context():
    """How DataLoader workers start: forked from a forkserver, never from this process.

    By the time a loader is iterated, a training process runs threads (gloo, DeepSpeed, tqdm's
    monitor); a fork() of a process with threads can deadlock the child on a lock another thread
    held (seen: a worker stuck inside fork() at the start of a ZeRO-3 run, the job hung). The
    forkserver is a fresh single-threaded process that imports this module once; each worker is
    then a cheap fork of it.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "pretrain.engine.worker_guard"])
    return context


# The loader ----------------------------------------------------------------------------------

class ResumableLoader:
    """Iterable of ``{"input_ids": LongTensor[B, L], "doc_ids": LongTensor[B, L]}`` with exact resume.

    Iterating again after a ``break`` (or in a new process after ``load_state_dict``) continues
    with exactly the batch the interrupted iteration would have produced next.
    """

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self._states: list[Optional[dict]] = [None] * spec.streams
        self._next_worker = 0
        self.batches_served = 0

    def __iter__(self) -> Iterator[dict]:
        spec = self.spec
        dataset = _ShardDataset(spec, list(self._states), self._next_worker)
        if spec.num_workers == 0:
            items = iter(dataset)
        else:
            with loader_children():  # deaf to SLURM's / torchrun's signals, dying with this process
                # The workers' base seed comes from a private generator, not the global RNG: a resumed
                # run, whose first batch starts a new iterator, then draws the random numbers of the
                # uninterrupted run (learned targets' negatives, dropout). The data do not depend on it.
                items = iter(DataLoader(dataset, batch_size=None, num_workers=spec.num_workers,
                                        multiprocessing_context=worker_start_context(), worker_init_fn=init_loader_worker,
                                        generator=torch.Generator().manual_seed(spec.seed)))
        for item in items:
            state = item.pop("_state")
            self._states[state["worker"]] = state
            self._next_worker = (state["worker"] + 1) % spec.streams
            if "_error" in item:
                raise CorruptShardError(item["_error"])
            if "input_ids" in item:
                self.batches_served += 1
                yield item

    # Progress and integrity -------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch every worker of this rank has reached (the slowest running one's)."""
        # A finished worker no longer counts: a shardless one ends in epoch 0 of an infinite stream.
        running = [s["epoch"] if s else 0 for s in self._states if not (s and s["done"])]
        return min(running) if running else max(s["epoch"] for s in self._states if s)

    @property
    def skipped(self) -> dict:
        entries = [e for s in self._states if s for e in s["skipped"]]
        return {"shards": len(entries), "samples": sum(e["samples"] for e in entries), "entries": entries}

    def batches_per_rank(self) -> list[int]:
        """Batches each rank yields over a finite stream (shards all readable)."""
        if self.spec.epochs is None:
            raise TypeError("an infinite loader (epochs=None) has no length; pass epochs=N for a finite pass")
        spec = self.spec
        counts = []
        for rank in range(spec.world_size):
            total = 0
            for worker in range(spec.streams):
                samples = sum(spec.shards[s]["samples"] for e in range(spec.epochs) for s in spec.worker_shards(e, worker, rank))
                total += math.ceil(samples / spec.batch_size)
            counts.append(total)
        return counts

    def __len__(self) -> int:
        return self.batches_per_rank()[self.spec.rank]

    # Resume ------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        s = self.spec
        return {
            "split": s.split, "rank": s.rank, "world_size": s.world_size, "num_workers": s.num_workers,
            "batch_size": s.batch_size, "seed": s.seed, "epochs": s.epochs, "shuffle_buffer": s.shuffle_buffer,
            "manifest_sha256": s.manifest_sha256,
        }

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, **self._identity(), "next_worker": self._next_worker, "batches": self.batches_served, "workers": [dict(s) if s else None for s in self._states]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a loader state of version {STATE_VERSION}: {str(state)[:80]!r}")
        expected = self._identity()
        different = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if different:
            details = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in different.items())
            raise ValueError(f"the loader state was saved with other data settings ({details}): resume with the same data dir, world size and loader settings")
        if len(state["workers"]) != self.spec.streams:
            raise ValueError(f"the loader state has {len(state['workers'])} worker positions, expected {self.spec.streams}")
        self._states = [dict(s) if s else None for s in state["workers"]]
        self._next_worker = int(state["next_worker"])
        self.batches_served = int(state["batches"])


def build_loader(
    data_dir: str | Path,
    split: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    epochs: Optional[int] = None,
    shuffle_buffer: int = 0,
    on_corrupt_shard: str = "error",
    shards_url: Optional[str] = None,
) -> ResumableLoader:
    """The rank's loader over ``<data_dir>/<split>``, or over those shards at ``shards_url`` (see the
    module docstring for the semantics, pretrain.data.remote for URLs)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if num_workers < 0 or shuffle_buffer < 0:
        raise ValueError(f"num_workers ({num_workers}) and shuffle_buffer ({shuffle_buffer}) must be >= 0")
    if epochs is not None and epochs <= 0:
        raise ValueError(f"epochs must be None (infinite) or positive, got {epochs}")
    if on_corrupt_shard not in CORRUPT_POLICIES:
        raise ValueError(f"on_corrupt_shard must be one of {CORRUPT_POLICIES}, got {on_corrupt_shard!r}")
    manifest = _open_dataset(data_dir, shards_url)
    shards = split_shards(data_dir, manifest, split)
    if epochs is None and len(shards) < world_size:
        # Every rank refuses (not only the shardless ones), so no rank is left waiting in a collective.
        raise ValueError(
            f"split {split!r} of {data_dir} has {len(shards)} shard(s) for world_size={world_size} ranks: ranks "
            f"{len(shards)}..{world_size - 1} would get no data and wait forever (shards go whole to ranks); rerun "
            "`pretrain prepare` with a smaller data.samples_per_shard so that the split has at least one shard per rank, "
            "or use fewer processes"
        )
    problems = missing_or_resized_shards(data_dir, shards, remote_sizes(shards_url, [e["name"] for e in shards]) if shards_url else None)
    if problems:
        listing = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        if on_corrupt_shard == "error":
            raise CorruptShardError(f"{listing}: {PREPARE_HINT}, or stream with on_corrupt_shard=skip to skip such shards")
        if len(problems) == len(shards):
            raise CorruptShardError(f"every shard of {data_dir}/{split} is missing or resized ({listing}): {PREPARE_HINT}")
        log.warning("%d shard(s) of %s/%s will be skipped: %s", len(problems), data_dir, split, listing)
    spec = StreamSpec(
        data_dir=str(data_dir), split=split, shards=tuple(shards), seq_len=manifest["seq_len"], batch_size=batch_size,
        rank=rank, world_size=world_size, num_workers=num_workers, seed=seed, epochs=epochs,
        shuffle_buffer=shuffle_buffer, on_corrupt_shard=on_corrupt_shard, manifest_sha256=manifest_sha256(data_dir),
        shards_url=shards_url,
    )
    return ResumableLoader(spec)
