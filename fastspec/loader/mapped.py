"""Reading an uncompressed fastspec file in place through a read-only memory map (`MappedFile`): the loader's
fill pass then reads the page cache directly, with no h5py call and no copy into a buffer.
"""
from __future__ import annotations

import mmap
import os
import sys

import h5py
import numpy as np

from ..h5format import SpectraFile

# Blocks after a wait for the disk that still get read-ahead advice (see `MappedFile.will_need`).
COLD_BLOCKS = 8


class MappedFile:
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
        self.cold = COLD_BLOCKS  # blocks still to give read-ahead advice (see `fastspec.loader.reader.ChunkReader.read_block`)
        # per column: (dtype, values per row, rows per chunk, byte offset of each chunk)
        self.columns = columns
        self.sizes = [dt.itemsize * k for dt, k, _, _ in columns]  # bytes per row
        self.n = n
        self._chunks: list[dict] = [{} for _ in columns]  # chunk number -> view

    @classmethod
    def open(cls, f: SpectraFile) -> MappedFile | None:
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
        self._advise(getattr(mmap, "MADV_WILLNEED", None), a, b)

    def release(self, a: int, b: int) -> None:
        """Drop rows [a, b) from this process's page tables once they have been read: the pages stay in the page
        cache (a later read refaults them for ~0.1 µs a page), but they no longer count towards the process's
        resident set, which would otherwise grow by the whole file (a streaming encode of a 35 GB survey file)."""
        self._advise(getattr(mmap, "MADV_DONTNEED", None), a, b)

    def _advise(self, advice, a: int, b: int) -> None:
        if advice is None:
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
                self._mm.madvise(advice, page, hi - page)
            except (OSError, ValueError):
                return

    def close(self) -> None:
        self._chunks = []
        self._base = None
        try:
            self._mm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the map closes with it


def major_faults() -> int | None:
    """Major page faults (waits for the disk) of the calling thread so far; None where unknown."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_THREAD).ru_majflt
    except (ImportError, AttributeError, OSError):
        return None
