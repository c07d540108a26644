"""Background readers for the loader: a thread pool that reads chunks ahead in plan order (the default), or a
torch DataLoader of worker processes over the same chunk descriptors.

Threads by default: a mapped read never takes the GIL during the fill pass, so threads run side by side (h5py
reads hold h5py's lock, but their pass still overlaps the next read); outputs land directly in reused or pinned
memory, and nothing is pickled or copied between processes. Processes (``worker_type="process"``) return
chunks in order whatever their number, persistent workers follow `set_epoch` without restarting, outputs are
allocated in shared memory, and each worker opens the files itself (a forked worker never inherits an open HDF5
handle) — the choice for readers whose per-row work is Python-heavy. Either way the rows and their order are
the same.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from .plan import Chunk
from .reader import ChunkReader


class ThreadReaders:
    """`num_workers` threads, each with its own `ChunkReader` (made by `make_reader`), reading chunks ahead."""

    def __init__(self, num_workers: int, ahead: int, make_reader: Callable[[], ChunkReader]):
        self.num_workers = num_workers
        self.ahead = ahead
        self.make_reader = make_reader
        self._executor = None
        self._readers: list[ChunkReader] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    def reader(self) -> ChunkReader:
        """The calling thread's reader."""
        r = getattr(self._local, "reader", None)
        if r is None:
            r = self._local.reader = self.make_reader()
            with self._lock:
                self._readers.append(r)
        return r

    def chunks(self, placed, read: Callable[[ChunkReader, Chunk, object], dict]):
        """`read(reader, chunk, place)` for each (chunk, place) of `placed`, in order, `ahead` chunks ahead of
        the consumer."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="fastspec-loader")
        ahead = max(1, self.ahead)
        pending: deque = deque()
        it = iter(placed)

        def submit(c, place):
            pending.append(self._executor.submit(lambda: read(self.reader(), c, place)))

        try:
            for c, place in it:
                submit(c, place)
                if len(pending) >= ahead:
                    break
            while pending:
                item = pending.popleft().result()
                for c, place in it:
                    submit(c, place)
                    break
                yield item
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        for r in self._readers:
            r.close()
        self._readers = []
        self._local = threading.local()


def _worker_init(_):
    # Each worker is one reader: keep it off the compute cores' thread pools.
    torch.set_num_threads(1)


class _ItemSampler(torch.utils.data.Sampler):
    def __init__(self, owner):
        self.owner = owner

    def __iter__(self):
        return iter(self.owner.sampler_items)

    def __len__(self):
        return len(self.owner.sampler_items)


class ProcessReaders:
    """A DataLoader of worker processes whose sampler yields the current plan's chunk descriptors."""

    def __init__(self, reader: ChunkReader, num_workers: int, prefetch: int, pin_memory: bool,
                 persistent_workers: bool):
        self.sampler_items: list[Chunk] = []
        self.dl = torch.utils.data.DataLoader(
            reader,
            batch_size=None,
            sampler=_ItemSampler(self),
            num_workers=num_workers,
            prefetch_factor=max(1, prefetch),
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            worker_init_fn=_worker_init,
            # A private generator: creating worker iterators must not consume the global torch RNG,
            # or exact resume would depend on how many iterators were made.
            generator=torch.Generator().manual_seed(0),
            collate_fn=None,
        )

    def chunks(self, plan: list[Chunk]):
        """The chunks of `plan`, read by the workers, in order."""
        self.sampler_items = plan
        return iter(self.dl)
