"""The one spectra type and the reader interface that every spectra file format builds on (DESIGN §2, Data).

`Spectra` is a block of spectra on one instrument grid as numpy arrays: what ingest and the mock generator
produce, what `fastspec.h5format.SpectraWriter` writes and what every reader returns. `SpectraReader` is what a
reader of a spectra file offers (fastspec files: `fastspec.h5format.SpectraFile`; Multimodal Universe files:
`fastspec.mmu.MMUSpectraFile`; `fastspec.spectra_io.open_spectra` picks the right one). `open_hdf5` opens an
HDF5 file or raises an error that names it, for every reader of HDF5 files in fastspec.

The training loader's `Batch` is not a second spectra type: it holds the torch tensors the model consumes
(flux, loss weights, z and a row id), made from these arrays in one fused pass.
"""
from __future__ import annotations

import abc
import dataclasses
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from .errors import FastspecError

# Per-row array fields of `Spectra`, in the order its constructor takes them.
ROW_FIELDS = ("flux", "ivar", "mask", "z", "z_err", "object_id", "norm")


class SpectraFormatError(FastspecError, ValueError):
    """A file that does not follow the layout; the message names file, row and field."""


@dataclass
class Spectra:
    """Spectra on an instrument grid; rows [start, start + n) of a file when a reader made them.

    flux, ivar, mask, z, z_err, object_id, norm: as in the HDF5 layout (`fastspec.h5format`).
    extra: further per-row columns by their file name ('source/plate', 'truth/z', ...), each with n rows.
    problems: what a reader found while placing rows (file row -> "field: reason"), e.g. MMU rows off the grid.
    """

    flux: np.ndarray  # (n, L) float32, raw flux / norm
    ivar: np.ndarray  # (n, L) float32, raw ivar · norm²
    mask: np.ndarray  # (n, L) bool, True = bad
    z: np.ndarray  # (n,) float64
    z_err: np.ndarray  # (n,) float32
    object_id: np.ndarray  # (n,) uint64 (MMU files: as stored, ints or bytes strings)
    norm: np.ndarray  # (n,) float32
    extra: dict = field(default_factory=dict)
    start: int = 0
    problems: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.z.shape[0])

    @property
    def weights(self) -> np.ndarray:
        """ivar with bad pixels zeroed: the loss weights."""
        return np.where(self.mask, np.float32(0), self.ivar).astype(np.float32)

    def rows(self, start: int, stop: int):
        """Rows [start, stop) of these (a subclass keeps its own fields)."""
        lo, hi = self.start + start, self.start + stop
        return dataclasses.replace(
            self,
            **{f: getattr(self, f)[start:stop] for f in ROW_FIELDS},
            extra={k: v[start:stop] for k, v in self.extra.items()},
            start=lo,
            problems={r: m for r, m in self.problems.items() if lo <= r < hi},
        )

    @classmethod
    def concat(cls, parts: list[Spectra]):
        """The rows of `parts` one after the other; every part must carry the same extra columns."""
        first = parts[0]
        if len(parts) == 1:
            return first
        return dataclasses.replace(
            first,
            **{f: np.concatenate([getattr(p, f) for p in parts]) for f in ROW_FIELDS},
            extra={k: np.concatenate([p.extra[k] for p in parts]) for k in first.extra},
            problems={r: m for p in parts for r, m in p.problems.items()},
        )


def attr_str(value):
    """An HDF5 attribute as str when it was stored as bytes."""
    return value.decode() if isinstance(value, bytes) else value


def native(a: np.ndarray) -> np.ndarray:
    """`a` in native byte order, variable-length strings as a bytes array.

    FITS-derived arrays may be big-endian, which torch refuses; h5py returns variable-length strings as objects.
    """
    if a.dtype.kind == "O":
        return np.asarray([v if isinstance(v, bytes) else str(v).encode() for v in a.ravel()],
                          dtype="S").reshape(a.shape)
    return a.astype(a.dtype.newbyteorder("=")) if a.dtype.byteorder == ">" else a


def row_range(path: str, start: int, stop: int | None, n: int) -> tuple[int, int]:
    """(start, stop) clipped to a file's `n` rows; IndexError naming the file when it is not a range."""
    stop = n if stop is None else min(int(stop), n)
    start = int(start)
    if start < 0 or start > stop:
        raise IndexError(f"{path}: rows [{start}, {stop}) are not a range inside the file's {n} rows")
    return start, stop


def as_object_id(values, where: str = "", row0: int = 0) -> np.ndarray:
    """object_id as uint64: integers ≥ 0, or decimal strings (SDSS SPECOBJID is a padded string in FITS).

    Errors name `where` and the file row (`row0` + index)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "ui":
        if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
            row = int(np.argmax(arr < 0))
            raise SpectraFormatError(f"{where}: row {row0 + row}: object_id: negative value {arr[row]}")
        return arr.astype(np.uint64)
    if arr.dtype.kind in "SUO":
        out = np.empty(arr.shape, np.uint64)
        for i, v in enumerate(arr.ravel()):
            s = attr_str(v).strip() if isinstance(v, (bytes, str)) else v
            try:
                if not (isinstance(s, str) and s.isdigit()):
                    raise ValueError
                out.flat[i] = np.uint64(int(s))
            except (ValueError, OverflowError):
                raise SpectraFormatError(
                    f"{where}: row {row0 + i}: object_id: {s!r} is not a non-negative integer"
                ) from None
        return out
    raise SpectraFormatError(f"{where}: object_id: unsupported dtype {arr.dtype} (integers or decimal strings)")


def open_hdf5(path, mode: str = "r", error: type[Exception] = SpectraFormatError) -> h5py.File:
    """`h5py.File(path, mode)`, or `error` naming the file when it cannot be opened as HDF5."""
    try:
        return h5py.File(path, mode)
    except OSError as err:
        raise error(f"{os.fspath(path)}: cannot open as HDF5 ({err})") from None


def datasets(h5: h5py.File) -> list[str]:
    """The names of every dataset in the file, groups walked ('truth/z')."""
    out: list[str] = []
    h5.visit(lambda k: out.append(k) if isinstance(h5[k], h5py.Dataset) else None)
    return out


class H5Reader:
    """An open read-only HDF5 file in `self.h5`: close() and use as a context manager."""

    h5: h5py.File

    def close(self):
        self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class SpectraReader(H5Reader, abc.ABC):
    """What a reader of a spectra file offers, whatever the file's format.

    Attributes: `path`, `kind` (the format's name), `instrument` and `wave_obs` (its grid). `read(start, stop)`
    returns contiguous rows as `Spectra` on the instrument grid; `read_column(name, start, stop)` one column by
    its fastspec name. A subclass checks the opened file in `_open(instrument, **options)`; the file is closed
    again when that raises.
    """

    kind = ""

    def __init__(self, path, instrument=None, **options):
        self.path = os.fspath(path)
        self.h5 = open_hdf5(self.path)
        try:
            self._open(instrument, **options)
        except BaseException:
            self.h5.close()
            raise

    @abc.abstractmethod
    def _open(self, instrument, **options) -> None:
        """Check the opened file (`self.h5`) and set `instrument`, `wave_obs`."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of spectra (rows)."""

    @property
    def n(self) -> int:
        return len(self)

    def columns(self) -> list[str]:
        return datasets(self.h5)

    @abc.abstractmethod
    def read(self, start: int = 0, stop: int | None = None) -> Spectra:
        """Rows [start, stop) as `Spectra` on the instrument grid."""

    @abc.abstractmethod
    def read_column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """One column by its fastspec name, rows [start, stop)."""

    def _stored_column(self, name: str, start: int, stop: int | None) -> np.ndarray:
        """Dataset `name` as stored (native byte order): rows [start, stop), or all of a scalar."""
        if name not in self.h5 or not isinstance(self.h5[name], h5py.Dataset):
            raise SpectraFormatError(f"{self.path}: no field {name!r}")
        ds = self.h5[name]
        if ds.ndim == 0:
            return native(ds[()])
        start, stop = row_range(self.path, start, stop, ds.shape[0])
        return native(ds[start:stop])


__all__ = [
    "ROW_FIELDS", "H5Reader", "Spectra", "SpectraFormatError", "SpectraReader", "as_object_id", "attr_str",
    "datasets", "native", "open_hdf5", "row_range",
]
