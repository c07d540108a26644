"""Reading one chunk of the epoch plan into output tensors: each block straight from the page cache (a memory-mapped
fastspec file), through h5py reads into a reused buffer, or through any other spectra reader (MMU files), then
the fused fill pass. A `ChunkReader` lives in the thread or process that reads, and opens files there.
"""
from __future__ import annotations

import h5py
import numpy as np
import torch

from ..h5format import SpectraFile
from ..spectra import SpectraFormatError
from ..spectra_io import open_spectra
from .fill import fill
from .mapped import COLD_BLOCKS, MappedFile, major_faults
from .memory import shared_empty
from .plan import Chunk, FileInfo


class ChunkReader(torch.utils.data.Dataset):
    """Reads one chunk per item. Lives in the worker; opens files on first use there."""

    def __init__(self, files: list[FileInfo], selection: list[np.ndarray | None], alloc=None,
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

    def __getitem__(self, chunk: Chunk) -> dict:
        return self.read(chunk)

    def read(self, chunk: Chunk, out: tuple | None = None) -> dict:
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
                alloc = shared_empty
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
            self.read_block(fi, start, stop, block_dest, y_np, w_np, z_np, index_np)
        return {"shard": chunk.shard, "y": y, "w": w, "z": z, "index": index}

    def read_block(self, fi, start, stop, dest, y, w, z, index):
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
            faults = major_faults()
            a = lo
            while a < hi:
                b = mapped.segment_end(a, hi)
                part = d[a - lo : b - lo]
                if (part >= 0).any():
                    flux, ivar, mask, zz = mapped.rows(a, b)
                    self._check(info, a, fill(flux, ivar, mask, zz, part, row0 + a - lo, y, w, z, index))
                a = b
            mapped.release(lo, hi)  # read into the output: off this process's resident set
            # read-ahead advice costs ~10% of the pass even when every page is cached: give it only while the
            # passes wait for the disk (major page faults in this thread), for a few blocks after each wait
            # (advised blocks themselves wait less)
            if faults is None or major_faults() > faults:
                mapped.cold = COLD_BLOCKS
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
        self._check(info, lo, fill(flux, ivar, mask, zz, d, row0, y, w, z, index))

    @staticmethod
    def _check(info: FileInfo, first_row: int, bad: tuple[int, int, int]) -> None:
        bad_row, bad_col, bad_field = bad
        if bad_row >= 0:
            field = "spectrum_flux" if bad_field == 0 else "spectrum_ivar"
            raise SpectraFormatError(
                f"{info.path}: row {first_row + bad_row}, field {field}: non-finite value at pixel {bad_col} "
                "with nonzero weight (run `fastspec validate`, or train with --exclude-bad)"
            )

    def _mapped(self, fi: int, f: SpectraFile) -> MappedFile | None:
        cache = self.__dict__.setdefault("_maps", {})
        if fi not in cache:
            cache[fi] = MappedFile.open(f) if self.memory_map else None
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
