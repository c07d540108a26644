"""The epoch plan: which rows an epoch reads, in which order, on which rank — what exact resume depends on.

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

Resuming mid-epoch (`skip_batches`) is cheap: whole chunks before the resume point are not in the plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..h5format import SpectraFile
from ..spectra import SpectraFormatError
from ..spectra_io import open_spectra
from .hashing import stable_seed


@dataclass
class FileInfo:
    path: str
    n: int
    L: int
    instrument: str
    offset: int  # global index of the file's row 0
    chunk_rows: int = 0  # rows per HDF5 chunk of spectrum_flux (0: contiguous or unknown)


@dataclass(frozen=True)
class Chunk:
    """What a worker reads: blocks (file, start, stop), how to shuffle them, and rows to drop at the front."""

    shard: int
    number: int
    blocks: tuple  # ((file_idx, start, stop), ...)
    perm_seed: int
    shuffle: bool
    skip: int
    n_out: int = -1  # rows it delivers (after skip); -1: unknown


def file_infos(paths: Sequence[str]) -> list[FileInfo]:
    """Rows, grid and HDF5 chunking of each file (all of one instrument), global row offsets in order."""
    files: list[FileInfo] = []
    offset = 0
    for p in paths:
        # Metadata only; the reading process opens the file again itself.
        with open_spectra(p) as f:
            chunks = f.h5["spectrum_flux"].chunks if isinstance(f, SpectraFile) else None
            info = FileInfo(p, len(f), f.instrument.L, f.instrument.name, offset, int(chunks[0]) if chunks else 0)
        if files and info.instrument != files[0].instrument:
            raise SpectraFormatError(
                f"{p}: instrument {info.instrument!r} differs from {files[0].path} "
                f"({files[0].instrument!r}); one run reads one instrument"
            )
        files.append(info)
        offset += info.n
    return files


class EpochPlan:
    """The blocks, shards and chunks of every epoch for one rank (see the module docstring).

    `rows`: per-file row selection — None (all rows) or a list with, per file, None or a boolean array of the
    file's length or an array of row indices.
    """

    def __init__(self, files: list[FileInfo], batch_size: int, block_rows: int, shuffle_blocks: int,
                 shuffle: bool, seed: int, rank: int, world_size: int, shards: int | None, drop_last: bool,
                 rows: Sequence[np.ndarray | None] | None = None):
        self.files = files
        self.shards = self.check(batch_size, block_rows, shuffle_blocks, rank, world_size, shards)
        self.batch_size = int(batch_size)
        self.shard_batch = self.batch_size // self.shards
        self.block_rows = int(block_rows)
        self.shuffle_blocks = int(shuffle_blocks)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.my_shards = list(range(self.rank, self.shards, self.world_size))
        self.drop_last = bool(drop_last)
        self.selection = self._normalise_rows(rows)
        self.blocks = self._make_blocks()
        self.n_rows = int(sum(b[3] for b in self.blocks))

    @staticmethod
    def check(batch_size: int, block_rows: int, shuffle_blocks: int, rank: int, world_size: int,
              shards: int | None) -> int:
        """ValueError for a layout no plan can follow; the number of shards otherwise."""
        shards = int(shards or world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if shards % world_size:
            raise ValueError(f"shards ({shards}) must be a multiple of world_size ({world_size})")
        if batch_size < 1 or batch_size % shards:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of shards ({shards})")
        if block_rows < 1 or shuffle_blocks < 1:
            raise ValueError("block_rows and shuffle_blocks must be positive")
        return shards

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

    def shard_blocks(self, epoch: int) -> list[list[tuple[int, int, int, int]]]:
        """Every shard's blocks in the order of `epoch`."""
        order = np.arange(len(self.blocks))
        if self.shuffle:
            order = np.random.default_rng(stable_seed(self.seed, epoch, 1)).permutation(len(self.blocks))
        return [[self.blocks[i] for i in order[s :: self.shards]] for s in range(self.shards)]

    def batches_per_epoch(self, epoch: int) -> int:
        rows = [sum(b[3] for b in blocks) for blocks in self.shard_blocks(epoch)]
        if self.drop_last:
            return min(r // self.shard_batch for r in rows)
        return max(-(-r // self.shard_batch) for r in rows)

    def chunks(self, epoch: int, skip_batches: int = 0) -> list[Chunk]:
        """Chunks this rank reads, round-robin over its shards so every shard's stream advances together."""
        per_shard = []
        n_batches = self.batches_per_epoch(epoch)
        for s, blocks in enumerate(self.shard_blocks(epoch)):
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
                        Chunk(
                            shard=s,
                            number=c // self.shuffle_blocks,
                            blocks=tuple((b[0], b[1], b[2]) for b in group),
                            perm_seed=stable_seed(self.seed, epoch, s, c),
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

