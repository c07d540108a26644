"""The one HDF5 layout for spectra (DESIGN §2): writer (atomic, appendable) and reader.

Layout (Multimodal Universe names where they exist), every per-spectrum column a top-level dataset of N
rows, chunked by rows:

    spectrum_flux (N, L) float32    normalised flux on the instrument grid
    spectrum_ivar (N, L) float32    inverse variance of the normalised flux
    spectrum_mask (N, L) bool       True = bad (pipeline mask, ivar ≤ 0, sky line)
    Z, Z_ERR      (N,)   float64 / float32
    object_id     (N,)   uint64     SPECOBJID / TARGETID / mock id
    norm          (N,)   float32    the normalisation divided out (raw flux = flux · norm)
    wave_obs      (L,)   float64    the instrument grid (file-level)
    <group>/<name>  optional extra per-row columns, e.g. truth/* for mocks, source/* for ingest
    attrs: format="fastspec-spectra", format_version, instrument

Weights for the loss are ``ivar · ~mask``. Reading MMU files (per-row `spectrum_lambda`) is handled by
`fastspec.mmu`, which presents the same reader interface.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import h5py
import numpy as np

from .instruments import Instrument, get_instrument

FORMAT = "fastspec-spectra"
FORMAT_VERSION = 1
CORE_COLUMNS = ("spectrum_flux", "spectrum_ivar", "spectrum_mask", "Z", "Z_ERR", "object_id", "norm")
_DTYPES = {
    "spectrum_flux": np.float32,
    "spectrum_ivar": np.float32,
    "spectrum_mask": np.bool_,
    "Z": np.float64,
    "Z_ERR": np.float32,
    "object_id": np.uint64,
    "norm": np.float32,
}


class SpectraFormatError(ValueError):
    """A file that does not follow the layout; the message names file, row and field."""


def _chunk_rows(L: int, target_bytes: int = 1 << 20) -> int:
    # ~1 MiB chunks of float32 rows: large enough for contiguous block reads, small enough to append.
    return max(1, min(4096, target_bytes // (4 * L)))


class SpectraWriter:
    """Write spectra to `path` atomically: data go to a temporary file renamed over `path` on close.

    With ``append=True`` an existing file is copied to the temporary name and extended; its instrument must
    match. Use as a context manager; on an exception the temporary file is removed and `path` is untouched.
    """

    def __init__(self, path, instrument: str | Instrument, append: bool = False, attrs: dict | None = None):
        self.path = os.fspath(path)
        self.instrument = get_instrument(instrument)
        self.tmp = f"{self.path}.tmp-{os.getpid()}"
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        if append and os.path.exists(self.path):
            shutil.copyfile(self.path, self.tmp)
            self.h5 = h5py.File(self.tmp, "a")
            have = self.h5.attrs.get("instrument")
            if have != self.instrument.name:
                self.h5.close()
                os.remove(self.tmp)
                raise SpectraFormatError(
                    f"{self.path}: cannot append {self.instrument.name} spectra to a file of instrument {have!r}"
                )
        else:
            self.h5 = h5py.File(self.tmp, "w")
            self.h5.attrs["format"] = FORMAT
            self.h5.attrs["format_version"] = FORMAT_VERSION
            self.h5.attrs["instrument"] = self.instrument.name
            self.h5.create_dataset("wave_obs", data=self.instrument.wave_obs)
        for k, v in (attrs or {}).items():
            self.h5.attrs[k] = v
        self._closed = False

    @property
    def n(self) -> int:
        return int(self.h5["Z"].shape[0]) if "Z" in self.h5 else 0

    def _append(self, name: str, data: np.ndarray):
        if name in self.h5:
            ds = self.h5[name]
            if ds.shape[1:] != data.shape[1:]:
                raise SpectraFormatError(f"{self.path}: field {name} has row shape {ds.shape[1:]}, got {data.shape[1:]}")
            n0 = ds.shape[0]
            ds.resize(n0 + data.shape[0], axis=0)
            ds[n0:] = data
        else:
            row_size = int(np.prod(data.shape[1:])) if data.ndim > 1 else 1
            chunks = (_chunk_rows(row_size),) + data.shape[1:]
            if data.dtype.kind in "UO":
                data = np.asarray(data, dtype="S")
            self.h5.create_dataset(name, data=data, maxshape=(None,) + data.shape[1:], chunks=chunks)

    def write(self, flux, ivar, mask, z, z_err, object_id, norm=None, extra: dict | None = None):
        """Append N rows. `extra` maps 'group/name' (or 'name') to arrays with N rows."""
        L = self.instrument.L
        flux = np.asarray(flux, dtype=np.float32)
        n = flux.shape[0]
        cols = {
            "spectrum_flux": flux,
            "spectrum_ivar": np.asarray(ivar, dtype=np.float32),
            "spectrum_mask": np.asarray(mask, dtype=np.bool_),
            "Z": np.asarray(z, dtype=np.float64).reshape(n),
            "Z_ERR": np.asarray(z_err, dtype=np.float32).reshape(n),
            "object_id": np.asarray(object_id).astype(np.uint64).reshape(n),
            "norm": (np.ones(n) if norm is None else np.asarray(norm)).astype(np.float32).reshape(n),
        }
        for name in ("spectrum_flux", "spectrum_ivar", "spectrum_mask"):
            if cols[name].shape != (n, L):
                raise SpectraFormatError(
                    f"{self.path}: field {name} has shape {cols[name].shape}, expected ({n}, {L}) for {self.instrument.name}"
                )
        for name, arr in (extra or {}).items():
            arr = np.asarray(arr)
            if arr.shape[:1] != (n,):
                raise SpectraFormatError(f"{self.path}: extra field {name} has {arr.shape[:1]} rows, expected {n}")
            cols[name] = arr
        for name, arr in cols.items():
            self._append(name, arr)

    def close(self):
        if self._closed:
            return
        self._closed = True
        self.h5.flush()
        self.h5.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        if self._closed:
            return
        self._closed = True
        try:
            self.h5.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


@dataclass
class SpectraBatch:
    """Rows [start, stop) of a spectra file, native-endian numpy arrays on the instrument grid."""

    flux: np.ndarray  # (n, L) float32
    ivar: np.ndarray  # (n, L) float32
    mask: np.ndarray  # (n, L) bool
    z: np.ndarray  # (n,) float64
    z_err: np.ndarray  # (n,) float32
    object_id: np.ndarray  # (n,)
    norm: np.ndarray  # (n,) float32
    start: int = 0

    @property
    def weights(self) -> np.ndarray:
        """ivar with bad pixels zeroed: the loss weights."""
        return np.where(self.mask, np.float32(0), self.ivar).astype(np.float32)

    def __len__(self) -> int:
        return int(self.z.shape[0])


def _native(a: np.ndarray) -> np.ndarray:
    # FITS-derived arrays may be big-endian; torch refuses those.
    return a.astype(a.dtype.newbyteorder("=")) if a.dtype.byteorder == ">" else a


class SpectraFile:
    """Read a fastspec spectra file (open it in the process that reads it)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self.h5 = h5py.File(self.path, "r")
        except OSError as err:
            raise SpectraFormatError(f"{self.path}: cannot open as HDF5 ({err})") from None
        fmt = self.h5.attrs.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != FORMAT:
            self.h5.close()
            raise SpectraFormatError(f"{self.path}: not a fastspec spectra file (format attribute {fmt!r})")
        self.format_version = int(self.h5.attrs.get("format_version", 0))
        if self.format_version > FORMAT_VERSION:
            self.h5.close()
            raise SpectraFormatError(
                f"{self.path}: format_version {self.format_version} is newer than this fastspec ({FORMAT_VERSION})"
            )
        name = self.h5.attrs.get("instrument")
        self.instrument = get_instrument(name.decode() if isinstance(name, bytes) else name)
        self.wave_obs = np.asarray(self.h5["wave_obs"][:], dtype=np.float64)

    def __len__(self) -> int:
        return int(self.h5["Z"].shape[0]) if "Z" in self.h5 else 0

    @property
    def n(self) -> int:
        return len(self)

    def columns(self) -> list[str]:
        out = []
        self.h5.visit(lambda k: out.append(k) if isinstance(self.h5[k], h5py.Dataset) else None)
        return out

    def read(self, start: int = 0, stop: int | None = None) -> SpectraBatch:
        """Contiguous rows [start, stop)."""
        stop = len(self) if stop is None else min(stop, len(self))
        h = self.h5
        return SpectraBatch(
            flux=_native(h["spectrum_flux"][start:stop]),
            ivar=_native(h["spectrum_ivar"][start:stop]),
            mask=h["spectrum_mask"][start:stop].astype(bool),
            z=_native(h["Z"][start:stop]).astype(np.float64),
            z_err=_native(h["Z_ERR"][start:stop]).astype(np.float32),
            object_id=_native(h["object_id"][start:stop]),
            norm=_native(h["norm"][start:stop]) if "norm" in h else np.ones(stop - start, np.float32),
            start=start,
        )

    def read_column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        if name not in self.h5:
            raise SpectraFormatError(f"{self.path}: no field {name!r}")
        return _native(self.h5[name][start:stop])

    def close(self):
        self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
