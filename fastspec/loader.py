"""Streaming loader: spectra files → batches of (y, w, z) tensors for training (DESIGN §2, Data).

How an epoch is laid out, and why:

* Rows are read in contiguous **blocks** of `block_rows` rows of one file (never row-by-row random access):
  contiguous reads run at disk / page-cache speed.
* The blocks of all files are permuted with a generator seeded by (seed, epoch) and dealt round-robin to
  `shards` **data shards** (default: one per DDP rank). Each rank owns `shards / world_size` of them, so ranks
  read disjoint rows.
* Each shard's blocks are grouped into **chunks** of `shuffle_blocks` blocks; a chunk's rows are shuffled in
  memory (the shuffle buffer) with a generator seeded by (seed, epoch, shard, chunk).
* A batch of `batch_size` rows (the *global* batch) takes `batch_size / shards` consecutive rows of every
  shard's row stream. The rows of global batch t therefore depend only on (files, selection, seed, epoch,
  shards, batch_size, block_rows, shuffle_blocks) — not on world_size and not on num_workers. That is what
  makes exact resume possible and lets a 2-rank DDP run see exactly the batches of a 1-process run with
  ``shards=2`` (tests/test_ddp.py).

Workers are a torch DataLoader over chunks (``batch_size=None``): each item is a self-describing chunk
descriptor, so the DataLoader returns chunks in order whatever the number of workers, persistent workers
follow `set_epoch` without being restarted, and files are opened lazily inside the worker that reads them
(a forked worker never inherits an open HDF5 handle). The DataLoader also pins chunk memory in a background
thread; slices of a pinned chunk are pinned too, and on CUDA the next batch is copied on a side stream while
the current one is used.

Resuming mid-epoch (`skip_batches`) is cheap: whole chunks before the resume point are never read.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .h5format import SpectraFormatError, open_spectra

_MASK64 = (1 << 64) - 1


class Batch(NamedTuple):
    """One batch: flux `y` (n, L), weights `w` = ivar·~mask (n, L), redshift `z` (n,), and `index` (n,):
    the global row id (file offset + row) of every spectrum, for `SpectraLoader.locate`."""

    y: torch.Tensor
    w: torch.Tensor
    z: torch.Tensor
    index: torch.Tensor


def stable_fraction(object_id: np.ndarray, salt: str = "fastspec-val") -> np.ndarray:
    """A number in [0, 1) per object_id from blake2b of its 8 little-endian bytes (integer ids) or of the
    id string (MMU files may store strings): stable across runs, machines and Python versions (unlike
    hash()), so a spectrum stays on its side of the validation split whatever files it comes in."""
    ids = np.asarray(object_id)
    key = salt.encode()
    if ids.dtype.kind in "iub":
        raw = [int(v).to_bytes(8, "little") for v in ids.astype(np.uint64).tolist()]
    else:
        raw = [v if isinstance(v, bytes) else str(v).encode() for v in ids.tolist()]
    out = np.empty(len(raw), dtype=np.float64)
    for i, b in enumerate(raw):
        h = hashlib.blake2b(b, digest_size=8, key=key).digest()
        out[i] = int.from_bytes(h, "little") / 2.0**64
    return out


def validation_mask(object_id: np.ndarray, fraction: float, salt: str = "fastspec-val") -> np.ndarray:
    """True for the rows whose object_id hashes into the validation fraction."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return np.zeros(len(object_id), dtype=bool)
    return stable_fraction(object_id, salt) < fraction


def _seed(*parts: int) -> int:
    # One 64-bit seed from several integers, independent of Python's hash randomisation.
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & _MASK64


@dataclass
class _FileInfo:
    path: str
    n: int
    L: int
    instrument: str
    offset: int  # global index of the file's row 0


@dataclass(frozen=True)
class _Chunk:
    """What a worker reads: blocks (file, start, stop), how to shuffle them, and rows to drop at the front."""

    shard: int
    number: int
    blocks: tuple  # ((file_idx, start, stop), ...)
    perm_seed: int
    shuffle: bool
    skip: int


class _ChunkReader(torch.utils.data.Dataset):
    """Reads one chunk per item. Lives in the worker; opens files on first use there."""

    def __init__(self, files: list[_FileInfo], selection: list[np.ndarray | None]):
        self.files = files
        self.selection = selection
        self._open: dict = {}

    def __getstate__(self):
        # Never ship an open HDF5 handle to a worker: each worker opens its own.
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def _file(self, i: int):
        f = self._open.get(i)
        if f is None:
            f = self._open[i] = open_spectra(self.files[i].path)
        return f

    def close(self):
        for f in self._open.values():
            f.close()
        self._open = {}

    def __getitem__(self, chunk: _Chunk) -> dict:
        ys, ws, zs, idx = [], [], [], []
        for fi, start, stop in chunk.blocks:
            info = self.files[fi]
            b = self._file(fi).read(start, stop)
            sel = self.selection[fi]
            rows = np.arange(start, stop)
            if sel is not None:
                keep = sel[start:stop]
                rows = rows[keep]
                flux, ivar, mask, z = b.flux[keep], b.ivar[keep], b.mask[keep], b.z[keep]
            else:
                flux, ivar, mask, z = b.flux, b.ivar, b.mask, b.z
            w = np.where(mask | ~(ivar > 0), np.float32(0), ivar)
            good = w > 0
            bad = good & ~(np.isfinite(flux) & np.isfinite(w))
            if bad.any():
                r, c = np.argwhere(bad)[0]
                field = "spectrum_flux" if not np.isfinite(flux[r, c]) else "spectrum_ivar"
                raise SpectraFormatError(
                    f"{info.path}: row {int(rows[r])}, field {field}: non-finite value at pixel {int(c)} with "
                    "nonzero weight (run `fastspec validate`, or train with --exclude-bad)"
                )
            # Masked pixels may hold NaN flux; zero them so NaN·0 never reaches the loss.
            ys.append(np.where(good, flux, np.float32(0)))
            ws.append(w)
            zs.append(z.astype(np.float32))
            idx.append(rows.astype(np.int64) + info.offset)
        y = np.concatenate(ys) if ys else np.zeros((0, self.files[0].L), np.float32)
        w = np.concatenate(ws) if ws else np.zeros((0, self.files[0].L), np.float32)
        z = np.concatenate(zs) if zs else np.zeros(0, np.float32)
        index = np.concatenate(idx) if idx else np.zeros(0, np.int64)
        if chunk.shuffle and len(z) > 1:
            perm = np.random.default_rng(chunk.perm_seed).permutation(len(z))
            if chunk.skip:
                perm = perm[chunk.skip :]
            y, w, z, index = y[perm], w[perm], z[perm], index[perm]
        elif chunk.skip:
            y, w, z, index = y[chunk.skip :], w[chunk.skip :], z[chunk.skip :], index[chunk.skip :]
        return {
            "shard": chunk.shard,
            "y": torch.from_numpy(np.ascontiguousarray(y)),
            "w": torch.from_numpy(np.ascontiguousarray(w)),
            "z": torch.from_numpy(np.ascontiguousarray(z)),
            "index": torch.from_numpy(np.ascontiguousarray(index)),
        }


def _worker_init(_):
    # Each worker is one reader: keep it off the compute cores' thread pools.
    torch.set_num_threads(1)


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
    num_workers, prefetch : background reader processes and chunks each keeps ready.
    pin_memory : pin host batches (default: when `device` is CUDA).
    device : move batches there (CUDA: next batch copied on a side stream while the current one is used).
    drop_last : drop the incomplete last batch (training; every rank then runs the same number of steps).
    rows : per-file row selection: None (all rows) or a list with, per file, None or a boolean array of the
        file's length or an array of row indices (e.g. the training or validation split, bad rows removed).
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
        prefetch: int = 2,
        pin_memory: bool | None = None,
        device: str | torch.device | None = None,
        drop_last: bool = True,
        rows: Sequence[np.ndarray | None] | None = None,
        persistent_workers: bool = True,
    ):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise ValueError("SpectraLoader needs at least one file")
        self.shards = int(shards or world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if self.shards % world_size:
            raise ValueError(f"shards ({self.shards}) must be a multiple of world_size ({world_size})")
        if batch_size < 1 or batch_size % self.shards:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of shards ({self.shards})")
        if block_rows < 1 or shuffle_blocks < 1:
            raise ValueError("block_rows and shuffle_blocks must be positive")
        self.batch_size = int(batch_size)
        self.shard_batch = self.batch_size // self.shards
        self.block_rows = int(block_rows)
        self.shuffle_blocks = int(shuffle_blocks)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.my_shards = list(range(self.rank, self.shards, self.world_size))
        self.num_workers = int(num_workers)
        self.prefetch = int(prefetch)
        self.device = torch.device(device) if device is not None else None
        on_cuda = self.device is not None and self.device.type == "cuda"
        self.pin_memory = on_cuda if pin_memory is None else bool(pin_memory and torch.cuda.is_available())
        self.drop_last = bool(drop_last)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.epoch = 0

        self.files: list[_FileInfo] = []
        offset = 0
        for p in self.paths:
            # Metadata only; the reading process opens the file again itself.
            with open_spectra(p) as f:
                info = _FileInfo(p, len(f), f.instrument.L, f.instrument.name, offset)
            if self.files and info.instrument != self.files[0].instrument:
                raise SpectraFormatError(
                    f"{p}: instrument {info.instrument!r} differs from {self.files[0].path} "
                    f"({self.files[0].instrument!r}); one run reads one instrument"
                )
            self.files.append(info)
            offset += info.n
        self.instrument = self.files[0].instrument
        self.selection = self._normalise_rows(rows)
        self._blocks = self._make_blocks()
        self.n_rows = int(sum(b[3] for b in self._blocks))
        self._reader = _ChunkReader(self.files, self.selection)
        self._dataloader = None

    # ---- plan -------------------------------------------------------------------------------------------

    def _normalise_rows(self, rows) -> list[np.ndarray | None]:
        if rows is None:
            return [None] * len(self.files)
        if len(rows) != len(self.files):
            raise ValueError(f"rows: expected one selection per file ({len(self.files)}), got {len(rows)}")
        out = []
        for info, r in zip(self.files, rows):
            if r is None:
                out.append(None)
                continue
            r = np.asarray(r)
            if r.dtype == bool:
                if r.shape != (info.n,):
                    raise ValueError(f"{info.path}: row mask has shape {r.shape}, file has {info.n} rows")
                out.append(r.copy())
            else:
                m = np.zeros(info.n, dtype=bool)
                if r.size and (r.min() < 0 or r.max() >= info.n):
                    raise ValueError(f"{info.path}: row index out of range [0, {info.n})")
                m[r.astype(np.int64)] = True
                out.append(m)
        return out

    def _make_blocks(self) -> list[tuple[int, int, int, int]]:
        """(file, start, stop, selected rows) for every block holding at least one selected row."""
        blocks = []
        for fi, info in enumerate(self.files):
            sel = self.selection[fi]
            for start in range(0, info.n, self.block_rows):
                stop = min(start + self.block_rows, info.n)
                k = stop - start if sel is None else int(sel[start:stop].sum())
                if k:
                    blocks.append((fi, start, stop, k))
        return blocks

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows (as DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def _shard_blocks(self, epoch: int) -> list[list[tuple[int, int, int, int]]]:
        order = np.arange(len(self._blocks))
        if self.shuffle:
            order = np.random.default_rng(_seed(self.seed, epoch, 1)).permutation(len(self._blocks))
        return [[self._blocks[i] for i in order[s :: self.shards]] for s in range(self.shards)]

    def _shard_rows(self, epoch: int) -> list[int]:
        return [sum(b[3] for b in blocks) for blocks in self._shard_blocks(epoch)]

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        rows = self._shard_rows(self.epoch if epoch is None else epoch)
        if self.drop_last:
            return min(r // self.shard_batch for r in rows)
        return max(-(-r // self.shard_batch) for r in rows)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def _plan(self, epoch: int, skip_batches: int) -> list[_Chunk]:
        """Chunks this rank reads, round-robin over its shards so every shard's stream advances together."""
        per_shard = []
        n_batches = self.batches_per_epoch(epoch)
        for s, blocks in enumerate(self._shard_blocks(epoch)):
            if s not in self.my_shards:
                continue
            skip_rows = min(skip_batches, n_batches) * self.shard_batch
            need = n_batches * self.shard_batch  # rows of this shard the epoch uses
            chunks = []
            pos = 0
            for c in range(0, len(blocks), self.shuffle_blocks):
                group = blocks[c : c + self.shuffle_blocks]
                n = sum(b[3] for b in group)
                if pos >= need:
                    break  # dropped by drop_last: not read
                if pos + n > skip_rows:
                    chunks.append(
                        _Chunk(
                            shard=s,
                            number=c // self.shuffle_blocks,
                            blocks=tuple((b[0], b[1], b[2]) for b in group),
                            perm_seed=_seed(self.seed, epoch, s, c),
                            shuffle=self.shuffle,
                            skip=max(0, skip_rows - pos),
                        )
                    )
                pos += n
            per_shard.append(chunks)
        plan = []
        for k in range(max((len(c) for c in per_shard), default=0)):
            plan.extend(c[k] for c in per_shard if k < len(c))
        return plan

    def locate(self, index: int) -> tuple[str, int]:
        """(path, row) of a global row id from `Batch.index`."""
        index = int(index)
        for info in self.files:
            if info.offset <= index < info.offset + info.n:
                return info.path, index - info.offset
        raise IndexError(f"row id {index} is beyond the {sum(f.n for f in self.files)} rows of the files")

    # ---- iteration --------------------------------------------------------------------------------------

    def _chunks(self, plan: list[_Chunk]):
        if self.num_workers == 0:
            for c in plan:
                yield self._reader[c]
            return
        if self._dataloader is None or not self.persistent_workers:
            self._dataloader = _ListDataLoader(self, self._reader)
        self._dataloader.sampler_items = plan
        yield from self._dataloader

    def iterate(self, epoch: int | None = None, skip_batches: int = 0):
        """Batches of `epoch` (default: the one set by `set_epoch`), starting after `skip_batches`."""
        epoch = self.epoch if epoch is None else int(epoch)
        n_batches = self.batches_per_epoch(epoch)
        plan = self._plan(epoch, skip_batches)
        batches = self._host_batches(plan, n_batches - min(skip_batches, n_batches))
        if self.device is not None and self.device.type == "cuda":
            yield from _cuda_prefetch(batches, self.device)
        elif self.device is not None:
            for b in batches:
                yield Batch(*(t.to(self.device) for t in b))
        else:
            yield from batches

    def __iter__(self):
        return self.iterate()

    def _host_batches(self, plan: list[_Chunk], n_batches: int):
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
                buffers[s].append(item)
                have[s] += len(item["z"])
            parts = [self._take(buffers[s], have, s) for s in self.my_shards]
            parts = [p for p in parts if len(p[2])]
            if not parts:
                return
            if len(parts) == 1:
                yield Batch(*parts[0])
            else:
                cat = [torch.cat(ts) for ts in zip(*parts)]
                if self.pin_memory:
                    cat = [t.pin_memory() for t in cat]
                yield Batch(*cat)
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
            want -= k
            have[s] -= k
        if not parts:
            L = self.files[0].L
            return (torch.zeros(0, L), torch.zeros(0, L), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
        if len(parts) == 1:
            return parts[0]
        cat = [torch.cat(ts) for ts in zip(*parts)]
        if self.pin_memory:
            cat = [t.pin_memory() for t in cat]
        return cat

    def close(self):
        self._dataloader = None
        self._reader.close()


class _ItemSampler(torch.utils.data.Sampler):
    def __init__(self, owner):
        self.owner = owner

    def __iter__(self):
        return iter(self.owner.sampler_items)

    def __len__(self):
        return len(self.owner.sampler_items)


class _ListDataLoader:
    """A DataLoader whose sampler yields the current plan's chunk descriptors (set before each epoch)."""

    def __init__(self, loader: SpectraLoader, reader: _ChunkReader):
        self.sampler_items: list[_Chunk] = []
        self.dl = torch.utils.data.DataLoader(
            reader,
            batch_size=None,
            sampler=_ItemSampler(self),
            num_workers=loader.num_workers,
            prefetch_factor=max(1, loader.prefetch),
            pin_memory=loader.pin_memory,
            persistent_workers=loader.persistent_workers,
            worker_init_fn=_worker_init,
            # A private generator: creating worker iterators must not consume the global torch RNG,
            # or exact resume would depend on how many iterators were made.
            generator=torch.Generator().manual_seed(0),
            collate_fn=None,
        )

    def __iter__(self):
        return iter(self.dl)


def _cuda_prefetch(batches, device):
    """Copy batch t+1 to the device on a side stream while batch t is in use."""
    stream = torch.cuda.Stream(device=device)
    it = iter(batches)

    def load():
        try:
            b = next(it)
        except StopIteration:
            return None
        with torch.cuda.stream(stream):
            return Batch(*(t.to(device, non_blocking=True) for t in b))

    nxt = load()
    while nxt is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
        cur = nxt
        for t in cur:
            t.record_stream(torch.cuda.current_stream(device))
        nxt = load()
        yield cur
