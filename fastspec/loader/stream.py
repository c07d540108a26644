"""`SpectraLoader`: the epoch plan read by background readers into reused memory and cut into batches of
(y, w, z, index) tensors for training and encoding (DESIGN §2, Data).

The pieces, each in its own module: the plan (`plan`: which rows, in which order, on which rank), the reading of
one chunk (`reader`, through a memory map (`mapped`) or h5py, then the fused pass of `fill`), the memory the
rows land in (`memory`), the background readers (`workers`) and the copy to the GPU (`prefetch`). Here they
are put together: a few consecutive chunks of a shard share one allocation (a slab), each written right after
the previous one, so a batch that spans two chunks is a view, not a copy.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .memory import BufferPool
from .plan import Chunk, EpochPlan, file_infos
from .prefetch import cuda_prefetch
from .reader import ChunkReader
from .workers import ProcessReaders, ThreadReaders

# Consecutive chunks of a shard share one output allocation until it holds SLAB_ROWS rows: a batch spanning a
# slab boundary is copied, one inside is a view. The default chunk (8 blocks of 256 rows) fills a slab alone, so
# a slab costs one chunk's memory; small chunks (few blocks, short blocks) still mostly give views.
SLAB_ROWS = 256


class Batch(NamedTuple):
    """One batch: flux `y` (n, L), weights `w` = ivar·~mask (n, L), redshift `z` (n,), and `index` (n,):
    the global row id (file offset + row) of every spectrum, for `SpectraLoader.locate`."""

    y: torch.Tensor
    w: torch.Tensor
    z: torch.Tensor
    index: torch.Tensor


class SpectraLoader:
    """Iterate batches of spectra from one or many fastspec spectra files.

    Parameters
    ----------
    paths : file paths (all of one instrument).
    batch_size : the global batch (all ranks together); must be divisible by `shards`.
    block_rows : rows per contiguous read.
    shuffle_blocks : blocks whose rows are shuffled together in memory (the shuffle buffer).
    shuffle : shuffle blocks and rows (training) or read in file order (validation, encoding).
    seed : with `set_epoch`, fixes the order.
    rank, world_size : this process's place in DDP; it yields only its own rows (batch_size / world_size).
    shards : data shards (default world_size); fixes the order independently of world_size.
    num_workers : background readers (threads or processes, see `worker_type`).
    prefetch : chunks each reader keeps ready; None (default): 2 per reader when `device` is CUDA, else one chunk
        in all — a CPU model consumes rows 10-100x slower than the readers fill them, and every chunk ahead
        holds block_rows · shuffle_blocks · L · 8 bytes (64 MB for SDSS at the defaults).
    pin_memory : pin host batches (default: when `device` is CUDA).
    device : move batches there (CUDA: next batch copied on a side stream while the current one is used).
    drop_last : drop the incomplete last batch (training; every rank then runs the same number of steps).
    rows : per-file row selection: None (all rows) or a list with, per file, None or a boolean array of the
        file's length or an array of row indices (e.g. the training or validation split, bad rows removed).
    persistent_workers : keep worker processes between epochs (``worker_type="process"``).
    worker_type : "thread" (default) or "process" background readers (see `fastspec.loader.workers`).
    memory_map : read uncompressed fastspec files through a memory map (the default; see `fastspec.loader.mapped`);
        False reads every file with h5py (e.g. on a file system where mapping is slow or unsupported).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike] | str | os.PathLike,
        batch_size: int,
        block_rows: int = 256,
        shuffle_blocks: int = 8,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shards: int | None = None,
        num_workers: int = 2,
        prefetch: int | None = None,
        pin_memory: bool | None = None,
        device: str | torch.device | None = None,
        drop_last: bool = True,
        rows: Sequence[np.ndarray | None] | None = None,
        persistent_workers: bool = True,
        worker_type: str = "thread",
        memory_map: bool = True,
    ):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise ValueError("SpectraLoader needs at least one file")
        EpochPlan.check(batch_size, block_rows, shuffle_blocks, rank, world_size, shards)  # before opening files
        self.num_workers = int(num_workers)
        self.device = torch.device(device) if device is not None else None
        on_cuda = self.device is not None and self.device.type == "cuda"
        if prefetch is not None and int(prefetch) < 1:
            raise ValueError(f"prefetch must be at least 1 chunk per reader, got {prefetch!r}")
        # chunks read ahead of the consumer, all readers together
        if prefetch is None:
            self.ahead = 2 * max(1, self.num_workers) if on_cuda else 1
        else:
            self.ahead = max(1, self.num_workers) * int(prefetch)
        self.pin_memory = on_cuda if pin_memory is None else bool(pin_memory and torch.cuda.is_available())
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        if worker_type not in ("thread", "process"):
            raise ValueError(f"worker_type must be 'thread' or 'process', got {worker_type!r}")
        self.worker_type = worker_type
        self.memory_map = bool(memory_map)
        self.epoch = 0

        self.files = file_infos(self.paths)
        self.instrument = self.files[0].instrument
        self.plan = EpochPlan(self.files, batch_size, block_rows, shuffle_blocks, shuffle, seed, rank, world_size,
                              shards, drop_last, rows)
        self.batch_size, self.shard_batch, self.my_shards = self.plan.batch_size, self.plan.shard_batch, \
            self.plan.my_shards
        self.selection, self.n_rows = self.plan.selection, self.plan.n_rows
        self._pool = BufferPool()
        self._reader = self._new_reader()
        self._threads = ThreadReaders(self.num_workers, self.ahead, self._new_reader)
        self._processes = None

    def _new_reader(self) -> ChunkReader:
        return ChunkReader(self.files, self.selection, self._alloc, self.memory_map)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows (as DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        return self.plan.batches_per_epoch(self.epoch if epoch is None else epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def locate(self, index: int) -> tuple[str, int]:
        """(path, row) of a global row id from `Batch.index`."""
        return self.plan.locate(index)

    def _alloc(self, shape, dtype):
        if self.pin_memory:
            return torch.empty(shape, dtype=dtype, pin_memory=True)  # CUDA's caching host allocator reuses it
        return self._pool.empty(shape, dtype)

    def _slabs(self, plan: list[Chunk]):
        """Output views per chunk: consecutive chunks of a shard share one allocation of about `SLAB_ROWS`
        rows, each writing its rows right after the previous one's, so a batch that spans two of them is a
        view of the slab, not a copy (`_host_batches` joins adjacent views)."""
        groups: dict = {}  # (shard, slab number) -> its chunks
        current: dict = {}  # shard -> [slab number, rows in it]
        slab_of = []
        for c in plan:
            cur = current.setdefault(c.shard, [0, 0])
            if cur[1] >= SLAB_ROWS:
                cur[:] = [cur[0] + 1, 0]
            cur[1] += c.n_out
            key = (c.shard, cur[0])
            groups.setdefault(key, []).append(c)
            slab_of.append(key)
        L = self.files[0].L
        slabs: dict = {}
        for c, key in zip(plan, slab_of):
            if key not in slabs:  # allocated in plan order, when its first chunk is read
                rows = sum(g.n_out for g in groups[key])
                slab = (self._alloc((rows, L), torch.float32), self._alloc((rows, L), torch.float32),
                        self._alloc((rows,), torch.float32), self._alloc((rows,), torch.int64))
                slabs[key] = [slab, 0]
            slab, row0 = slabs[key]
            slabs[key][1] = row0 + c.n_out
            if slabs[key][1] == len(slab[2]):
                del slabs[key]  # the views keep it alive as long as they are used
            yield c, (slab, row0)

    def _read_into(self, reader: ChunkReader, chunk: Chunk, place) -> dict:
        slab, row0 = place
        item = reader.read(chunk, tuple(t[row0 : row0 + chunk.n_out] for t in slab))
        item["slab"] = (slab, row0)
        return item

    def _chunks(self, plan: list[Chunk]):
        if self.num_workers == 0:
            for c, place in self._slabs(plan):
                yield self._read_into(self._reader, c, place)
        elif self.worker_type == "thread":
            yield from self._threads.chunks(self._slabs(plan), self._read_into)
        else:
            if self._processes is None or not self.persistent_workers:
                self._processes = ProcessReaders(self._reader, self.num_workers,
                                                 -(-self.ahead // self.num_workers), self.pin_memory,
                                                 self.persistent_workers)
            yield from self._processes.chunks(plan)

    def iterate(self, epoch: int | None = None, skip_batches: int = 0):
        """Batches of `epoch` (default: the one set by `set_epoch`), starting after `skip_batches`."""
        epoch = self.epoch if epoch is None else int(epoch)
        n_batches = self.batches_per_epoch(epoch)
        plan = self.plan.chunks(epoch, skip_batches)
        batches = self._host_batches(plan, n_batches - min(skip_batches, n_batches))
        if self.device is not None and self.device.type == "cuda":
            yield from cuda_prefetch(batches, self.device)
        elif self.device is not None:
            for b in batches:
                b = Batch(*(t.to(self.device) for t in b))
                yield b
                b = None
        else:
            yield from batches

    def __iter__(self):
        return self.iterate()

    def _host_batches(self, plan: list[Chunk], n_batches: int):
        buffers: dict[int, list[dict]] = {s: [] for s in self.my_shards}
        have = dict.fromkeys(self.my_shards, 0)
        chunks = self._chunks(plan)
        exhausted = False
        for _ in range(n_batches):
            while not exhausted and min(have.values()) < self.shard_batch:
                try:
                    item = next(chunks)
                except StopIteration:
                    exhausted = True
                    break
                s = int(item["shard"])
                last = buffers[s][-1] if buffers[s] else None
                if last is not None and _adjacent(last, item):
                    buffers[s][-1] = _join(last, item)
                else:
                    buffers[s].append(item)
                have[s] += len(item["z"])
                last = item = None  # only `buffers` holds chunks: a finished chunk is then freed in time
            parts = [self._take(buffers[s], have, s) for s in self.my_shards]
            parts = [p for p in parts if len(p[2])]
            if not parts:
                return
            batch = Batch(*parts[0]) if len(parts) == 1 else Batch(*self._cat(parts))
            parts = None  # views of a chunk: holding them while the next chunk is read would keep it alive
            yield batch
            batch = None
        chunks.close()

    def _take(self, buf: list[dict], have: dict, s: int):
        """The next shard_batch rows of shard s's stream (views where they lie in one chunk)."""
        want = self.shard_batch
        parts = []
        while want and buf:
            item = buf[0]
            n = len(item["z"])
            k = min(want, n)
            parts.append([item[key][:k] for key in ("y", "w", "z", "index")])
            if k == n:
                buf.pop(0)
            else:
                buf[0] = {"shard": s, **{key: item[key][k:] for key in ("y", "w", "z", "index")}}
                if "slab" in item:
                    buf[0]["slab"] = (item["slab"][0], item["slab"][1] + k)
            want -= k
            have[s] -= k
        if not parts:
            L = self.files[0].L
            return (torch.zeros(0, L), torch.zeros(0, L), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
        if len(parts) == 1:
            return parts[0]
        return self._cat(parts)

    def _cat(self, parts):
        """Concatenate per-field into pooled (or pinned) memory: fresh memory would page-fault."""
        out = []
        for ts in zip(*parts):
            shape = (sum(t.shape[0] for t in ts), *ts[0].shape[1:])
            out.append(torch.cat(ts, out=self._alloc(shape, ts[0].dtype)))
        return out

    def close(self):
        self._processes = None
        self._threads.close()
        self._reader.close()
        self._pool.clear()


def _adjacent(a: dict, b: dict) -> bool:
    """Whether chunk output b starts where a ends in the same slab."""
    return "slab" in a and "slab" in b and a["slab"][0] is b["slab"][0] and \
        a["slab"][1] + len(a["z"]) == b["slab"][1]


def _join(a: dict, b: dict) -> dict:
    slab, row0 = a["slab"]
    n = len(a["z"]) + len(b["z"])
    return {"shard": a["shard"], "slab": (slab, row0),
            **{key: t[row0 : row0 + n] for key, t in zip(("y", "w", "z", "index"), slab)}}

