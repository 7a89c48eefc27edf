"""The streamed path: any map-style Dataset, read through DataLoader worker processes.

The batch sampler hands the loader this rank's micro-batches of the same keyed global order the
in-memory path uses (global batch k of epoch m = positions [c_k, c_k + b_k) of the permutation keyed
on (seed, m), c_k the samples the epoch consumed before it), as lists of keys (index, epoch), for one
stage from any of its steps: a resume starts at its saved
(epoch, step) directly, without replaying the loader. Each sample is read with the global RNGs seeded
from (seed, epoch, index), so random transforms of the user's own dataset are a pure function of the
key too (and of nothing else: not the worker it lands on, not the world size); the launcher's own
keyed augmentation (crop, flip, rotation) is applied per sample in the worker.

The workers persist across epochs and batch stages: a new epoch or stage only re-iterates the same
loader with the sampler set to the new stage (the prefetched micro-batches of an abandoned iteration
are dropped).

The workers are forked from a fork server (one per rank, started with the rank's data), never from
the rank itself: a rank runs gloo's threads, and when one of them frees a finished collective it takes
the interpreter's thread-state lock without holding the GIL. A fork at that moment gives a child that
waits for that lock forever, in ``PyOS_AfterFork_Child`` before any of its own code runs (CPython
gh-112275; Python 3.11.7 has it). It was seen as a resumed run hanging at its first evaluation, one
kill-and-resume in six on a loaded 2-core host. The server is single-threaded, so what it forks is
clean. The dataset therefore reaches the workers pickled (:func:`unpicklable` is the launcher's check
before any worker starts); tensors travel in shared memory, not copied.
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import pickle
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate, get_worker_info

from launcher import env
from launcher.data import order


@contextlib.contextmanager
def keyed_rngs(seed: int):
    """The global torch, python and numpy RNGs seeded for one sample. In the main process (workers = 0)
    their states are put back afterwards, so reading data never moves the training RNG."""
    in_worker = get_worker_info() is not None
    saved = None if in_worker else (torch.get_rng_state(), random.getstate(), np.random.get_state())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class KeyedDataset(torch.utils.data.Dataset):
    """``base[index]`` read for the key (index, epoch), then the keyed augmentation (if any). With
    ``seeded`` (a user's dataset, whose own transforms may be random) the read sees RNGs seeded from the
    key; the launcher's datasets transform deterministically and skip that. Each worker computes an
    epoch's augmentation parameters for all samples once (vectorised) and looks them up per sample."""

    def __init__(self, base, seed: int, augment=None, seeded: bool = True):
        self.base, self.seed, self.augment, self.seeded = base, seed, augment, seeded
        self._epoch, self._params = None, None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, epoch = key
        try:
            if self.seeded:
                with keyed_rngs(order.sample_seed(self.seed, epoch, index)):
                    x, y = self.base[index]
            else:
                x, y = self.base[index]
        except Exception as exc:  # named by its sample, whatever the user's dataset raised
            raise SampleError(f"reading sample {index} (epoch {epoch}) raised {type(exc).__name__}: {exc}") from exc
        if self.augment is not None:
            if self._epoch != epoch:
                self._params = order.augment_params(self.seed, epoch, range(len(self.base)), self.augment)
                self._epoch = epoch
            x = order.apply_augment_one(torch.as_tensor(x), self._params[index], self.augment)
        return x, y


class SampleError(RuntimeError):
    """A dataset's ``[index]`` raised: which sample, and what it raised (one argument, so DataLoader can
    carry it from a worker process to the rank)."""


class DataWorkerLost(RuntimeError):
    """A data worker ended without a word while the rank waited for its batch (killed by a signal: the
    out-of-memory killer's SIGKILL above all). DataLoader says so as "exited unexpectedly", or, when the
    worker died half-way through sending, as a ConnectionResetError or EOFError that names no worker."""


def _lost_workers(it) -> str:
    """The PIDs of the loader's workers that are gone (DataLoader's own list; empty if it has none)."""
    gone = [str(w.pid) for w in getattr(it, "_workers", []) if not w.is_alive()]
    return f" (pid {', '.join(gone)})" if gone else ""


def worker_failure(exc: BaseException) -> str | None:
    """A data worker's failure in one line -- "data worker 2: reading sample 17 (epoch 0) raised
    ValueError: ..." -- from the exception DataLoader raises in the rank (its message holds the worker's
    whole traceback); None for any other exception."""
    if isinstance(exc, DataWorkerLost):
        return str(exc)
    text = str(exc)
    marker = "in DataLoader worker process "
    if marker not in text:
        return None
    worker = text.split(marker, 1)[1].split(".", 1)[0].strip()
    last = [line for line in text.splitlines() if line.strip()][-1]
    cause = last.split("SampleError: ", 1)[1] if "SampleError: " in last else last.strip()
    return f"data worker {worker}: {cause}"


class KeyedBatchSampler:
    """This rank's non-empty micro-batches, in order, for steps [first_step, the stage's end) of an epoch."""

    def __init__(self, n: int, seed: int, rank: int, world: int, reorder: order.Reorder | None = None):
        self.order, self.n, self.rank, self.world = order.GlobalBatchSampler(n, seed, reorder=reorder), n, rank, world
        self.epoch, self.first_step, self.stage = 0, 0, None

    def set(self, epoch: int, first_step: int, stage) -> None:
        self.epoch, self.first_step, self.stage = epoch, first_step, stage

    def __iter__(self):
        stage, micro = self.stage, self.stage.micro_batch
        perm = self.order.permutation(self.epoch)
        for step in range(self.first_step, order.stage_end(stage)):
            start = order.batch_start(stage, step)
            idx = perm[start:start + stage.batch]
            lo, hi = order.rank_bounds(len(idx), self.rank, self.world)
            for a, c in order.micro_batches(lo, hi, micro):
                if c > a:      # one .tolist(), not a tensor element per sample (~30x faster at 512 indices)
                    yield [(i, self.epoch) for i in idx[a:c].tolist()]

    def __len__(self) -> int:
        return sum(1 for _ in self)


class ShardSampler:
    """Batches of ``size`` consecutive indices over [lo, hi): what an evaluation pass reads, set anew for
    each pass so that one loader (and its worker processes) serves every pass of a run."""

    def __init__(self):
        self.lo, self.hi, self.size = 0, 0, 1

    def __iter__(self):
        for a in range(self.lo, self.hi, self.size):
            yield list(range(a, min(a + self.size, self.hi)))

    def __len__(self) -> int:
        return -(-(self.hi - self.lo) // self.size)


# what the fork server imports once, so that each worker it forks starts with them loaded
SERVER_PRELOAD = ["torch", "launcher.data.streamed"]


def worker_start(workers: int):
    """The multiprocessing context a loader of ``workers`` processes starts them from: the fork server
    (started here, so that its import of torch overlaps the rest of the rank's start-up), or None
    where no workers run (or no fork server exists: not Linux or macOS)."""
    if workers == 0 or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(SERVER_PRELOAD)
    from multiprocessing import forkserver
    forkserver.ensure_running()
    return context


def die_with_rank():
    """A DataLoader's worker_init_fn: the worker is killed the moment its rank dies (torch's own watchdog
    notices only seconds later, and a worker stuck in a user's ``__getitem__`` never)."""
    return functools.partial(_die_with, os.getpid())


def _die_with(rank: int, worker_id: int) -> None:
    """The worker's parent is the rank's fork server, which lives as long as any worker it forked does:
    the worker watches the rank itself."""
    env.exit_with(rank)


class _Discard:
    def write(self, data) -> int:
        return len(data)


class _Probe(pickle.Pickler):
    """Pickles everything but tensor and array contents (shared memory or plain bytes: always sendable),
    into nothing: what a worker's start would pickle, at the cost of walking the objects only."""

    def reducer_override(self, obj):
        if isinstance(obj, (torch.Tensor, np.ndarray)):
            return tuple, ()
        return NotImplemented


def unpicklable(datasets: dict) -> tuple[str, str] | None:
    """The first of the named ``datasets`` that cannot reach a worker process, with the error pickling
    it raises, or None. One pickler walks them all: its memo makes what they share (a validation
    subset's base is the training set) walked once."""
    probe = _Probe(_Discard(), protocol=pickle.HIGHEST_PROTOCOL)
    for name, dataset in datasets.items():
        try:
            probe.dump(dataset)
        except Exception as exc:  # noqa: BLE001 - whatever pickling a user's object raises is the answer
            return name, f"{type(exc).__name__}: {exc}"
    return None


class StreamedSplit:
    """A map-style dataset as a split: its length, and contiguous shards read through a loader whose
    worker processes live as long as the split (evaluation every epoch does not start new ones)."""

    def __init__(self, base, device: torch.device, dtype: torch.dtype, workers: int):
        self.base, self.device, self.dtype, self.workers = base, device, dtype, workers
        self._sampler, self._loader = ShardSampler(), None

    def __len__(self) -> int:
        return len(self.base)

    def to_device(self, x, y):
        x = x.to(self.device, non_blocking=True)
        return (x.to(self.dtype) if x.is_floating_point() else x), y.to(self.device, non_blocking=True)

    def shard(self, lo: int, hi: int, batch_size: int):
        """(a, b, x, y) over [lo, hi), ``batch_size`` samples at a time, in order."""
        if self._loader is None:
            self._loader = DataLoader(self.base, batch_sampler=self._sampler, num_workers=self.workers,
                                      pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
                                      multiprocessing_context=worker_start(self.workers),
                                      worker_init_fn=die_with_rank())
        self._sampler.lo, self._sampler.hi, self._sampler.size = lo, hi, batch_size
        a = lo
        for x, y in self._loader:
            yield a, a + len(y), *self.to_device(x, y)
            a += len(y)

    def close(self) -> None:
        """End the workers now. Dropping the only reference runs the loader's shutdown while its queues
        are alive; left to the garbage collector (the trainer's parts form cycles), the queues' feeder
        threads are finalised first, the workers never get their stop message, and each join times out
        after 5 s (a 3-epoch test run spent 30 of its 34 s there)."""
        self._loader = None

    @property
    def sample_shape(self) -> tuple:
        return tuple(torch.as_tensor(self.base[0][0]).shape)


class StreamedBatches:
    """The streamed counterpart of InMemoryBatches (same calls)."""

    def __init__(self, split: StreamedSplit, seed: int, augment, comm, seeded: bool = True, prefetch: int = 4,
                 reorder: order.Reorder | None = None):
        self.split = split
        self.sampler = KeyedBatchSampler(len(split), seed, comm.rank, comm.world, reorder)
        self.rank, self.world = comm.rank, comm.world
        workers = split.workers
        self.loader = DataLoader(KeyedDataset(split.base, seed, augment, seeded), batch_sampler=self.sampler,
                                 num_workers=workers, pin_memory=split.device.type == "cuda",
                                 persistent_workers=workers > 0, prefetch_factor=prefetch if workers else None,
                                 multiprocessing_context=worker_start(workers), worker_init_fn=die_with_rank())
        x0, y0 = default_collate([split.base[0]])
        self.empty = split.to_device(x0[:0], y0[:0])
        self._it = None
        # CUDA: the next step's micro-batches are copied to the device on a side stream while this step
        # computes (pinned memory, non_blocking), instead of on the compute stream just before use
        self.copy_stream = torch.cuda.Stream(split.device) if split.device.type == "cuda" else None
        self._held = self._ahead = None         # (epoch, step, size, micro-batches): this step's, the next's
        self._probe = None                      # the memory probe's samples, for this stage

    def start_epoch(self, epoch: int, first_step: int, stage) -> None:
        """The loader from (epoch, first_step) on, split as ``stage`` says (workers are kept)."""
        self.sampler.set(epoch, first_step, stage)
        self._it = iter(self.loader)
        self._held = self._ahead = None
        self._probe = None                    # a new stage probes anew (once)

    def step(self, epoch: int, step: int, stage) -> tuple[int, list]:
        """This rank's micro-batches of global batch (epoch, step). Asked again for the same step (redone
        from its first micro-batch after an out-of-memory error, with a smaller micro-batch), the samples
        already read are cut anew and the loader restarts after this step at the new split."""
        held = self._held
        if held is not None and held[:2] == (epoch, step):
            size, out = held[2], self._recut(held[3], step, stage)
            self.start_epoch(epoch, step + 1, stage)
        elif self._ahead is not None and self._ahead[:2] == (epoch, step):
            size, out = self._ahead[2], self._ahead[3]
            current = torch.cuda.current_stream(self.split.device)
            current.wait_stream(self.copy_stream)
            for x, y in out:                  # made on the side stream, used (and freed) on this one
                x.record_stream(current)
                y.record_stream(current)
        else:
            size, out = self._read(step, stage)
        self._held, self._ahead = (epoch, step, size, out), None
        if self.copy_stream is not None and step + 1 < order.stage_end(stage):
            with torch.cuda.stream(self.copy_stream):
                self._ahead = (epoch, step + 1, *self._read(step + 1, stage))
        return size, out

    def _bounds(self, step: int, stage) -> tuple[int, int, int]:
        """(global batch size, this rank's [lo, hi) of it) for step ``step`` of ``stage``."""
        size = min(stage.batch, len(self.split) - order.batch_start(stage, step))
        return (size, *order.rank_bounds(size, self.rank, self.world))

    def _read(self, step: int, stage) -> tuple[int, list]:
        size, lo, hi = self._bounds(step, stage)
        out = []
        for a, c in order.micro_batches(lo, hi, stage.micro_batch):
            out.append(self.split.to_device(*self._next()) if c > a else self.empty)
        return size, out

    def _next(self):
        try:
            return next(self._it)
        except (ConnectionError, EOFError) as exc:
            lost = exc
        except RuntimeError as exc:
            if "exited unexpectedly" not in str(exc) and "is killed by signal" not in str(exc):
                raise
            lost = exc
        raise DataWorkerLost(f"a data worker{_lost_workers(self._it)} ended without a word while loading this "
                             "rank's batch: killed by a signal? (SIGKILL is what the out-of-memory killer sends; "
                             "fewer data.workers need less memory)") from lost

    def _recut(self, read: list, step: int, stage) -> list:
        """The step's samples on this rank (``read``, in order) cut into ``stage``'s micro-batches."""
        x = torch.cat([x for x, _ in read])
        y = torch.cat([y for _, y in read])
        _, lo, hi = self._bounds(step, stage)
        return [(x[a - lo:c - lo], y[a - lo:c - lo]) if c > a else self.empty
                for a, c in order.micro_batches(lo, hi, stage.micro_batch)]

    def close(self) -> None:
        """End the workers now (see :meth:`StreamedSplit.close`)."""
        self._it = self._held = self._ahead = None
        self.loader = None

    def probe_batch(self, m: int):
        """``m`` samples for the memory probe: read once per stage for the largest size asked (the probe
        asks for several), then sliced."""
        if self._probe is None or len(self._probe[1]) < m:
            x, y = default_collate([self.split.base[i % len(self.split)] for i in range(m)])
            self._probe = self.split.to_device(x, y)
        return self._probe[0][:m], self._probe[1][:m]
