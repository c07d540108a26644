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

Reading a chunk is one fused pass per HDF5 chunk of rows: a numba kernel that computes the weights, zeroes flux
where the weight is 0 (masked NaN never reaches the loss), checks weighted pixels are finite and scatters each
row to its shuffled place in the output. Uncompressed fastspec files (what `SpectraWriter` writes) are read
through a memory map (`_MappedFile`): the pass reads the page cache directly, with no h5py call and no copy into
a buffer, so it costs less than a plain h5py read of the same rows. Other files (compressed, big-endian, MMU)
go through h5py: low-level reads into a reused buffer, then the same pass. Outputs come from a pool of reused
memory (or pinned memory when the batches go to CUDA): fresh memory page-faults on first touch, which cost more
than the whole pass. A few consecutive chunks of a shard share one allocation, each written right after the
previous one, so a batch that spans two chunks is a view, not a copy.

Workers are threads by default (``worker_type="thread"``): a pool reads chunks ahead in plan order. A mapped
read never takes the GIL during the pass, so threads run side by side (h5py reads hold h5py's lock, but their
pass still overlaps the next read); outputs land directly in reused or pinned memory, and nothing is pickled or
copied between processes. ``worker_type="process"`` runs a torch DataLoader over self-describing chunk
descriptors instead (``batch_size=None``): it returns chunks in order whatever the number of workers,
persistent workers follow `set_epoch` without restarting, outputs are allocated in shared memory, and each
worker opens the files itself (a forked worker never inherits an open HDF5 handle) — the choice for readers
whose per-row work is Python-heavy. Either way the rows and their order are the same.

Resuming mid-epoch (`skip_batches`) is cheap: whole chunks before the resume point are never read.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import sys
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import h5py
import numpy as np
import torch

from .h5format import SpectraFile, SpectraFormatError, open_spectra

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
    chunk_rows: int = 0  # rows per HDF5 chunk of spectrum_flux (0: contiguous or unknown)


@dataclass(frozen=True)
class _Chunk:
    """What a worker reads: blocks (file, start, stop), how to shuffle them, and rows to drop at the front."""

    shard: int
    number: int
    blocks: tuple  # ((file_idx, start, stop), ...)
    perm_seed: int
    shuffle: bool
    skip: int
    n_out: int = -1  # rows it delivers (after skip); -1: unknown


class _ChunkReader(torch.utils.data.Dataset):
    """Reads one chunk per item. Lives in the worker; opens files on first use there."""

    def __init__(self, files: list[_FileInfo], selection: list[np.ndarray | None], alloc=None,
                 memory_map: bool = True):
        self.files = files
        self.selection = selection
        self.alloc = alloc or (lambda shape, dtype: torch.empty(shape, dtype=dtype))
        self.memory_map = memory_map
        self._open: dict = {}

    def __getstate__(self):
        # Never ship an open HDF5 handle to a worker: each worker opens its own.
        state = self.__dict__.copy()
        state["_open"] = {}
        state.pop("_ds", None)
        state.pop("_buf", None)
        state.pop("_maps", None)
        state["alloc"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.alloc = lambda shape, dtype: torch.empty(shape, dtype=dtype)

    def _file(self, i: int):
        f = self._open.get(i)
        if f is None:
            f = self._open[i] = open_spectra(self.files[i].path)
        return f

    def close(self):
        self.__dict__.pop("_ds", None)
        for m in self.__dict__.pop("_maps", {}).values():
            if m is not None:
                m.close()
        for f in self._open.values():
            f.close()
        self._open = {}

    def __getitem__(self, chunk: _Chunk) -> dict:
        return self.read(chunk)

    def read(self, chunk: _Chunk, out: tuple | None = None) -> dict:
        """The chunk's rows as a dict of tensors; into `out` (y, w, z, index of exactly its rows) if given."""
        # Where each selected row of the chunk goes: out[dest[k]] = k-th selected row in block order, i.e. the
        # chunk's rows permuted (perm[j] is the source of output j), the first `skip` outputs dropped.
        n_sel = [int(self.selection[fi][a:b].sum()) if self.selection[fi] is not None else b - a
                 for fi, a, b in chunk.blocks]
        n = sum(n_sel)
        if chunk.shuffle and n > 1:
            perm = np.random.default_rng(chunk.perm_seed).permutation(n)
            dest = np.empty(n, np.int64)
            dest[perm] = np.arange(n)
        else:
            dest = np.arange(n, dtype=np.int64)
        dest -= chunk.skip
        n_out = max(0, n - chunk.skip)
        L = self.files[chunk.blocks[0][0]].L if chunk.blocks else self.files[0].L
        if out is not None:
            y, w, z, index = out
            assert len(z) == n_out, (len(z), n_out)
        else:
            alloc = self.alloc
            if torch.utils.data.get_worker_info() is not None:
                alloc = _shared_empty
            y, w = alloc((n_out, L), torch.float32), alloc((n_out, L), torch.float32)
            z, index = alloc((n_out,), torch.float32), alloc((n_out,), torch.int64)
        y_np, w_np, z_np, index_np = y.numpy(), w.numpy(), z.numpy(), index.numpy()
        k0 = 0
        for (fi, start, stop), k in zip(chunk.blocks, n_sel):
            sel = self.selection[fi]
            block_dest = np.full(stop - start, -1, np.int64)
            if sel is None:
                block_dest[:] = dest[k0 : k0 + k]
            else:
                block_dest[sel[start:stop]] = dest[k0 : k0 + k]
            k0 += k
            self._read_block(fi, start, stop, block_dest, y_np, w_np, z_np, index_np)
        return {"shard": chunk.shard, "y": y, "w": w, "z": z, "index": index}

    def _read_block(self, fi, start, stop, dest, y, w, z, index):
        """Rows [start, stop) of file fi into the output rows `dest` (−1: not wanted), weights computed."""
        info = self.files[fi]
        f = self._file(fi)
        keep = dest >= 0
        if not keep.any():
            return
        lo = start + int(np.argmax(keep))  # read only the span holding wanted rows (resume skips)
        hi = start + len(keep) - int(np.argmax(keep[::-1]))
        d = dest[lo - start : hi - start]
        row0 = lo + info.offset
        mapped = self._mapped(fi, f) if isinstance(f, SpectraFile) else None
        if mapped is not None:
            # straight from the page cache: no HDF5 call, no copy into a buffer, and the GIL is free for the
            # whole pass, so reader threads run side by side
            if mapped.cold:
                mapped.will_need(lo, hi)
            faults = _major_faults()
            a = lo
            while a < hi:
                b = mapped.segment_end(a, hi)
                part = d[a - lo : b - lo]
                if (part >= 0).any():
                    flux, ivar, mask, zz = mapped.rows(a, b)
                    self._check(info, a, _fill(flux, ivar, mask, zz, part, row0 + a - lo, y, w, z, index))
                a = b
            # read-ahead advice costs ~10% of the pass even when every page is cached: give it only while the
            # passes wait for the disk (major page faults in this thread), for a few blocks after each wait
            # (advised blocks themselves wait less)
            if faults is None or _major_faults() > faults:
                mapped.cold = _COLD_BLOCKS
            else:
                mapped.cold = max(0, mapped.cold - 1)
            return
        if isinstance(f, SpectraFile):
            m = hi - lo
            flux, ivar, mask, zz = (buf[:m] for buf in self._buffers(f, m))
            chunk_rows = info.chunk_rows or m
            a = lo
            while a < hi:
                # reads follow the HDF5 chunk grid (each chunk decoded once, straight into the buffer);
                # h5py's low-level read: read_direct builds its selections in Python, 40% slower here
                b = min((a // chunk_rows + 1) * chunk_rows, hi)
                if (d[a - lo : b - lo] >= 0).any():
                    for (dsid, fspace), buf in zip(self._datasets(fi, f), (flux, ivar, mask, zz)):
                        part = buf[a - lo : b - lo]
                        fspace.select_hyperslab((a,) + (0,) * (buf.ndim - 1), part.shape)
                        dsid.read(h5py.h5s.create_simple(part.shape), fspace, part)
                a = b
        else:
            batch = f.read(lo, hi)
            flux, ivar, mask, zz = batch.flux, batch.ivar, batch.mask, batch.z
            for row, msg in sorted(getattr(batch, "problems", {}).items()):
                if d[row - lo] >= 0:  # e.g. an MMU row off the instrument grid (training excludes these)
                    raise SpectraFormatError(f"{info.path}: row {row}: {msg}")
        # one fused pass per block: h5py holds the GIL while it reads, so a reader thread hands the GIL over
        # once per block and the (GIL-free) pass of one thread overlaps the reads of another
        self._check(info, lo, _fill(flux, ivar, mask, zz, d, row0, y, w, z, index))

    @staticmethod
    def _check(info: _FileInfo, first_row: int, bad: tuple[int, int, int]) -> None:
        bad_row, bad_col, bad_field = bad
        if bad_row >= 0:
            field = "spectrum_flux" if bad_field == 0 else "spectrum_ivar"
            raise SpectraFormatError(
                f"{info.path}: row {first_row + bad_row}, field {field}: non-finite value at pixel {bad_col} "
                "with nonzero weight (run `fastspec validate`, or train with --exclude-bad)"
            )

    def _mapped(self, fi: int, f: SpectraFile) -> _MappedFile | None:
        cache = self.__dict__.setdefault("_maps", {})
        if fi not in cache:
            cache[fi] = _MappedFile.open(f) if self.memory_map else None
        return cache[fi]

    def _datasets(self, fi: int, f):
        cache = self.__dict__.setdefault("_ds", {})
        if fi not in cache:  # h5py's name lookup costs more than a small read
            cache[fi] = tuple((f.h5[k].id, f.h5[k].id.get_space())
                              for k in ("spectrum_flux", "spectrum_ivar", "spectrum_mask", "Z"))
        return cache[fi]

    def _buffers(self, f, rows: int):
        L = f.instrument.L
        buf = getattr(self, "_buf", None)
        if buf is None or buf[0].shape[0] < rows or buf[0].shape[1] != L:
            buf = self._buf = (np.empty((rows, L), np.float32), np.empty((rows, L), np.float32),
                               np.empty((rows, L), np.bool_), np.empty(rows, np.float64))
        return buf


class _MappedFile:
    """The uncompressed columns of a fastspec file read in place through a read-only memory map.

    A contiguous h5py read copies every byte from the page cache into a buffer (under h5py's lock, which
    holds the GIL) before the fused pass reads it again; mapped, the pass reads the page cache directly, so a
    spectrum costs one pass instead of a copy and a pass, and reader threads run side by side. Only layouts
    whose bytes are exactly what the pass expects qualify (native little-endian float32 flux and ivar, 1-byte
    mask, float32/float64 Z; chunked by whole rows or contiguous; no filters; every chunk allocated; plain
    POSIX file driver, no user block); any other file goes through h5py reads. HDF5 places chunks at any
    byte offset, so the pass loads with alignment 1 (free on x86-64 and AArch64). A file must not be
    truncated while mapped (SIGBUS); fastspec's writers never change a file in place, they rename a new one.
    """

    COLUMNS = ("spectrum_flux", "spectrum_ivar", "spectrum_mask", "Z")
    DTYPES = ((np.dtype("<f4"),), (np.dtype("<f4"),), (np.dtype("|b1"), np.dtype("|u1"), np.dtype("|i1")),
              (np.dtype("<f4"), np.dtype("<f8")))

    def __init__(self, path: str, n: int, columns: list[tuple[np.dtype, int, int, np.ndarray]]):
        with open(path, "rb") as fh:  # the map keeps its own descriptor
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._base = np.frombuffer(self._mm, dtype=np.uint8)
        self.cold = _COLD_BLOCKS  # blocks still to give read-ahead advice (see _ChunkReader._read_block)
        # per column: (dtype, values per row, rows per chunk, byte offset of each chunk)
        self.columns = columns
        self.sizes = [dt.itemsize * k for dt, k, _, _ in columns]  # bytes per row
        self.n = n
        self._chunks: list[dict] = [{} for _ in columns]  # chunk number -> view

    @classmethod
    def open(cls, f: SpectraFile) -> _MappedFile | None:
        if sys.byteorder != "little" or not hasattr(mmap, "mmap"):
            return None
        h5 = f.h5
        try:
            if h5.id.get_access_plist().get_driver() != h5py.h5fd.SEC2 or h5.id.get_create_plist().get_userblock():
                return None
            size = os.path.getsize(f.path)
            columns = []
            for name, dtypes in zip(cls.COLUMNS, cls.DTYPES):
                col = cls._column(h5[name], dtypes, size)
                if col is None:
                    return None
                columns.append(col)
            if len({len(h5[name]) for name in cls.COLUMNS}) != 1:
                return None
            return cls(f.path, len(h5["Z"]), columns)
        except (OSError, ValueError, TypeError, AttributeError, KeyError, RuntimeError):
            return None  # anything unexpected: h5py reads are always correct

    @staticmethod
    def _column(ds: h5py.Dataset, dtypes, file_size: int):
        if ds.dtype not in dtypes or ds.ndim not in (1, 2) or ds.external:
            return None
        dcpl = ds.id.get_create_plist()
        if dcpl.get_nfilters():
            return None
        n = ds.shape[0]
        row_items = int(np.prod(ds.shape[1:], dtype=np.int64))
        row_bytes = row_items * ds.dtype.itemsize
        layout = dcpl.get_layout()
        if layout == h5py.h5d.CONTIGUOUS:
            offset = ds.id.get_offset()
            if offset is None and n:
                return None
            chunk_rows, offsets = max(n, 1), np.array([offset or 0], np.int64)
        elif layout == h5py.h5d.CHUNKED:
            if tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):
                return None
            chunk_rows = ds.chunks[0]
            n_chunks = -(-n // chunk_rows)
            offsets = np.full(n_chunks, -1, np.int64)
            stored = []
            if hasattr(ds.id, "chunk_iter"):
                ds.id.chunk_iter(stored.append)
            else:
                stored = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
            for info in stored:
                c = info.chunk_offset[0] // chunk_rows
                if info.filter_mask or info.size != chunk_rows * row_bytes or not 0 <= c < n_chunks:
                    return None
                offsets[c] = info.byte_offset
            if (offsets < 0).any():
                return None  # a chunk never written (fill value): h5py knows what to return
        else:
            return None
        if n and int(offsets.max()) + chunk_rows * row_bytes > file_size:
            return None
        return ds.dtype, row_items, chunk_rows, offsets

    def segment_end(self, a: int, hi: int) -> int:
        """The end of the run of rows from `a` (< hi) that lies in one chunk of every column."""
        return min(hi, *(((a // cr) + 1) * cr for _, _, cr, _ in self.columns))

    def rows(self, a: int, b: int):
        """Read-only views of rows [a, b) (within one chunk of every column): flux, ivar, mask (as bytes),
        Z (as an aligned float64 copy)."""
        out = []
        for (dtype, k, cr, offsets), size, cache in zip(self.columns, self.sizes, self._chunks):
            c = a // cr
            v = cache.get(c)
            if v is None:  # once per chunk and reader: the views cost more Python time than a small pass
                rows = min(cr, self.n - c * cr)
                v = self._base[int(offsets[c]) : int(offsets[c]) + rows * size].view(dtype)
                if k == 1:
                    v = np.require(v, np.float64, "CA")
                else:
                    v = v.reshape(rows, k).view(np.uint8 if dtype.itemsize == 1 else dtype)
                cache[c] = v
            out.append(v[a - c * cr : b - c * cr])
        return out

    def will_need(self, a: int, b: int) -> None:
        """Ask the kernel to read rows [a, b) ahead (a cold file then streams like large reads, not 4 KiB
        page faults). Chunks that follow each other in the file go in one call."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        ranges = []
        for (_, _, cr, offsets), size in zip(self.columns, self.sizes):
            for c in range(a // cr, (b - 1) // cr + 1):
                lo = int(offsets[c]) + (max(a, c * cr) - c * cr) * size
                hi = int(offsets[c]) + (min(b, (c + 1) * cr) - c * cr) * size
                if ranges and ranges[-1][1] == lo:
                    ranges[-1][1] = hi
                else:
                    ranges.append([lo, hi])
        for lo, hi in ranges:
            page = lo - lo % mmap.PAGESIZE
            try:
                self._mm.madvise(mmap.MADV_WILLNEED, page, hi - page)
            except (OSError, ValueError):
                return

    def close(self) -> None:
        self._chunks = []
        self._base = None
        try:
            self._mm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the map closes with it


_COLD_BLOCKS = 8


def _major_faults() -> int | None:
    """Major page faults (waits for the disk) of the calling thread so far; None where unknown."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_THREAD).ru_majflt
    except (ImportError, AttributeError, OSError):
        return None


def _shared_empty(shape, dtype) -> torch.Tensor:
    """An output tensor in shared memory (process workers): handing it to the main process sends a handle
    instead of copying the data."""
    numel = int(np.prod(shape)) if shape else 1
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    try:
        storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    except (AttributeError, RuntimeError, TypeError):  # older torch
        return torch.empty(shape, dtype=dtype).share_memory_()


class _BufferPool:
    """Output memory that is reused once every tensor viewing it is gone.

    Freshly allocated memory costs a page fault per 4 KiB on first touch — measured here as 9× the cost of the
    fused pass itself, which would make the loader far slower than a raw read. Buffers are anonymous mmaps
    (transparent huge pages where the kernel allows), handed out as numpy arrays; a weakref finalizer puts a
    buffer back when its array (and with it every tensor and batch view of it) is collected.
    """

    def __init__(self, keep: int = 8):
        self.keep = keep
        self.free: dict[int, list] = {}
        self.lock = threading.Lock()

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        count = int(np.prod(shape)) if shape else 1
        size = max(count * np_dtype.itemsize, 1)
        size = -(-size // (1 << 21)) << 21 if size >= (1 << 20) else size  # whole huge pages
        buf = None
        with self.lock:
            # best fit within 25%: chunk sizes vary a little with the row selection
            fits = [k for k, v in self.free.items() if v and size <= k <= size + size // 4]
            if fits:
                buf = self.free[min(fits)].pop()
                size = len(buf)
        if buf is None:
            buf = mmap.mmap(-1, size)
            if size >= (1 << 21) and hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    buf.madvise(mmap.MADV_HUGEPAGE)
                except OSError:
                    pass
        arr = np.frombuffer(buf, dtype=np_dtype, count=count).reshape(shape)
        weakref.finalize(arr, self._release, size, buf)
        return torch.from_numpy(arr)

    def _release(self, size: int, buf) -> None:
        with self.lock:
            stack = self.free.setdefault(size, [])
            if len(stack) < self.keep:
                stack.append(buf)

    def clear(self) -> None:
        with self.lock:
            self.free.clear()


_FILL = None
_FILL_LOCK = threading.Lock()
_UNALIGNED = None  # numba intrinsic; a global, not a closure cell, so numba's on-disk cache can key on fill


def _fill(flux, ivar, mask, zz, dest, row0, y, w, z, index):
    """One pass: w = ivar where unmasked and ivar > 0 (else 0), y = flux where w > 0 (else 0, so masked NaN
    never reaches the loss), written with z and the global row id (row0 + i) to rows `dest` of the outputs
    (dest < 0: row not wanted); returns the first (row, pixel, field) where a weighted pixel is not finite,
    or (−1, −1, −1)."""
    global _FILL
    if _FILL is None:
        with _FILL_LOCK:
            if _FILL is None:
                _FILL = _compile_fill()
    # the mask as bytes (a mapped file's mask is not guaranteed to hold only 0 and 1); Z as an aligned copy
    return _FILL(flux, ivar, mask.view(np.uint8), np.require(zz, np.float64, "CA"), dest, row0, y, w, z,
                 index)


def _compile_fill():
    import numba
    from numba import types
    from numba.core.imputils import impl_ret_borrowed
    from numba.extending import intrinsic

    @intrinsic
    def unaligned(typingctx, arr):
        # the same array typed as unaligned, so its loads are emitted with alignment 1: a memory-mapped HDF5
        # chunk may start at any byte
        if not isinstance(arr, types.Array):
            return None
        ret = types.Array(arr.dtype, arr.ndim, arr.layout, readonly=not arr.mutable, aligned=False)

        def codegen(context, builder, signature, args):
            return impl_ret_borrowed(context, builder, ret, args[0])

        return ret(arr), codegen

    global _UNALIGNED
    _UNALIGNED = unaligned

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def fill(flux, ivar, mask, zz, dest, row0, y, w, z, index):
        n, L = flux.shape
        fbits = _UNALIGNED(flux.view(np.uint32))
        ibits = _UNALIGNED(ivar.view(np.uint32))
        flux = _UNALIGNED(flux)
        ivar = _UNALIGNED(ivar)
        for i in range(n):
            d = dest[i]
            if d < 0:
                continue
            z[d] = zz[i]
            index[d] = row0 + i
            bad = 0
            # branch-free so LLVM vectorises it; non-finite = all exponent bits set
            for l in range(L):
                iv = ivar[i, l]
                good = mask[i, l] == 0 and iv > 0
                w[d, l] = iv if good else np.float32(0)
                y[d, l] = flux[i, l] if good else np.float32(0)
                nonfinite = ((fbits[i, l] & 0x7F800000) == 0x7F800000) or ((ibits[i, l] & 0x7F800000) == 0x7F800000)
                bad |= good and nonfinite
            if bad:
                for l in range(L):
                    if mask[i, l] == 0 and ivar[i, l] > 0:
                        if not np.isfinite(flux[i, l]):
                            return i, l, 0
                        if not np.isfinite(ivar[i, l]):
                            return i, l, 1
        return -1, -1, -1

    return fill


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
    num_workers, prefetch : background readers (threads or processes, see `worker_type`) and chunks each keeps ready.
    pin_memory : pin host batches (default: when `device` is CUDA).
    device : move batches there (CUDA: next batch copied on a side stream while the current one is used).
    drop_last : drop the incomplete last batch (training; every rank then runs the same number of steps).
    rows : per-file row selection: None (all rows) or a list with, per file, None or a boolean array of the
        file's length or an array of row indices (e.g. the training or validation split, bad rows removed).
    persistent_workers : keep worker processes between epochs (``worker_type="process"``).
    worker_type : "thread" (default) or "process" background readers (see the module docstring).
    memory_map : read uncompressed fastspec files through a memory map (the default; see `_MappedFile`);
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
        prefetch: int = 2,
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
        if worker_type not in ("thread", "process"):
            raise ValueError(f"worker_type must be 'thread' or 'process', got {worker_type!r}")
        self.worker_type = worker_type
        self.memory_map = bool(memory_map)
        self.epoch = 0

        self.files: list[_FileInfo] = []
        offset = 0
        for p in self.paths:
            # Metadata only; the reading process opens the file again itself.
            with open_spectra(p) as f:
                chunks = f.h5["spectrum_flux"].chunks if isinstance(f, SpectraFile) else None
                info = _FileInfo(p, len(f), f.instrument.L, f.instrument.name, offset,
                                 int(chunks[0]) if chunks else 0)
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
        self._pool = _BufferPool()
        self._reader = _ChunkReader(self.files, self.selection, self._alloc, self.memory_map)
        self._dataloader = None
        self._executor = None
        self._thread_readers: list[_ChunkReader] = []
        self._local = threading.local()
        self._lock = threading.Lock()

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
            rows = self.block_rows
            if info.chunk_rows and rows >= info.chunk_rows:
                # whole HDF5 chunks per block: a chunk split between two blocks would be decoded twice
                rows = round(rows / info.chunk_rows) * info.chunk_rows
            for start in range(0, info.n, rows):
                stop = min(start + rows, info.n)
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
                            n_out=n - max(0, skip_rows - pos),
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

    def _alloc(self, shape, dtype):
        if self.pin_memory:
            return torch.empty(shape, dtype=dtype, pin_memory=True)  # CUDA's caching host allocator reuses it
        return self._pool.empty(shape, dtype)

    def _thread_reader(self) -> _ChunkReader:
        r = getattr(self._local, "reader", None)
        if r is None:
            r = self._local.reader = _ChunkReader(self.files, self.selection, self._alloc, self.memory_map)
            with self._lock:
                self._thread_readers.append(r)
        return r

    def _slabs(self, plan: list[_Chunk]):
        """Output views per chunk: `_SLAB_CHUNKS` consecutive chunks of a shard share one allocation, each
        writing its rows right after the previous one's, so a batch that spans two of them is a view of the
        slab, not a copy (`_host_batches` joins adjacent views)."""
        groups: dict = {}
        for c in plan:
            groups.setdefault((c.shard, c.number // _SLAB_CHUNKS), []).append(c)
        L = self.files[0].L
        slabs: dict = {}
        for c in plan:
            key = (c.shard, c.number // _SLAB_CHUNKS)
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

    def _read_into(self, reader: _ChunkReader, chunk: _Chunk, place) -> dict:
        slab, row0 = place
        item = reader.read(chunk, tuple(t[row0 : row0 + chunk.n_out] for t in slab))
        item["slab"] = (slab, row0)
        return item

    def _chunks(self, plan: list[_Chunk]):
        if self.num_workers == 0:
            for c, place in self._slabs(plan):
                yield self._read_into(self._reader, c, place)
        elif self.worker_type == "thread":
            yield from self._thread_chunks(plan)
        else:
            if self._dataloader is None or not self.persistent_workers:
                self._dataloader = _ListDataLoader(self, self._reader)
            self._dataloader.sampler_items = plan
            yield from self._dataloader

    def _thread_chunks(self, plan: list[_Chunk]):
        """Chunks in plan order, read ahead by a thread pool. Threads, not processes, by default: HDF5 reads
        hold h5py's lock but the fused pass (numba, nogil) runs beside them, outputs land directly in reused
        (or pinned) memory, and nothing is pickled or copied between processes."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="fastspec-loader")
        ahead = max(1, self.num_workers * self.prefetch)
        pending: deque = deque()
        it = self._slabs(plan)

        def submit(c, place):
            pending.append(self._executor.submit(lambda: self._read_into(self._thread_reader(), c, place)))

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
                last = buffers[s][-1] if buffers[s] else None
                if last is not None and _adjacent(last, item):
                    buffers[s][-1] = _join(last, item)
                else:
                    buffers[s].append(item)
                have[s] += len(item["z"])
            parts = [self._take(buffers[s], have, s) for s in self.my_shards]
            parts = [p for p in parts if len(p[2])]
            if not parts:
                return
            if len(parts) == 1:
                yield Batch(*parts[0])
            else:
                yield Batch(*self._cat(parts))
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
        self._dataloader = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        for r in [self._reader, *self._thread_readers]:
            r.close()
        self._thread_readers = []
        self._local = threading.local()
        self._pool.clear()


_SLAB_CHUNKS = 4  # chunks per output allocation: a batch spanning a slab boundary is still copied


def _adjacent(a: dict, b: dict) -> bool:
    """Whether chunk output b starts where a ends in the same slab."""
    return "slab" in a and "slab" in b and a["slab"][0] is b["slab"][0] and \
        a["slab"][1] + len(a["z"]) == b["slab"][1]


def _join(a: dict, b: dict) -> dict:
    slab, row0 = a["slab"]
    n = len(a["z"]) + len(b["z"])
    return {"shard": a["shard"], "slab": (slab, row0),
            **{key: t[row0 : row0 + n] for key, t in zip(("y", "w", "z", "index"), slab)}}


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
