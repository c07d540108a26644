"""The fastspec HDF5 layout for spectra (DESIGN §2): its writer (atomic, appendable) and its reader.

Layout (Multimodal Universe names where they exist), every per-spectrum column a top-level dataset of N
rows, chunked by rows:

    spectrum_flux (N, L) float32    normalised flux on the instrument grid
    spectrum_ivar (N, L) float32    inverse variance of the normalised flux
    spectrum_mask (N, L) bool       True = bad (pipeline mask, ivar ≤ 0, sky line)
    Z, Z_ERR      (N,)   float64 / float32
    object_id     (N,)   uint64     SPECOBJID / TARGETID / mock id (decimal strings are parsed)
    norm          (N,)   float32    the normalisation divided out (raw flux = flux · norm)
    wave_obs      (L,)   float64    the instrument grid (file-level)
    <group>/<name>  optional extra per-row columns, e.g. truth/* for mocks, source/* for ingest;
                    text columns are stored as variable-length UTF-8 and read back as bytes arrays
    attrs: format="fastspec-spectra", format_version, instrument

Weights for the loss are ``ivar · ~mask``. Rows travel as `fastspec.spectra.Spectra`; `SpectraFile` is the
`fastspec.spectra.SpectraReader` for this layout (`fastspec.mmu` reads Multimodal Universe files, and
`fastspec.spectra_io.open_spectra` opens either).
"""
from __future__ import annotations

import os
import shutil

import h5py
import numpy as np

from .atomic import atomic_path
from .instruments import Instrument, InstrumentError, get_instrument
from .spectra import (
    Spectra,
    SpectraFormatError,
    SpectraReader,
    as_object_id,
    attr_str,
    datasets,
    native,
    open_hdf5,
    row_range,
)

FORMAT = "fastspec-spectra"
FORMAT_VERSION = 1
CORE_COLUMNS = ("spectrum_flux", "spectrum_ivar", "spectrum_mask", "Z", "Z_ERR", "object_id", "norm")
SPECTRAL_COLUMNS = ("spectrum_flux", "spectrum_ivar", "spectrum_mask")
_DTYPES = {
    "spectrum_flux": np.float32,
    "spectrum_ivar": np.float32,
    "spectrum_mask": np.bool_,
    "Z": np.float64,
    "Z_ERR": np.float32,
    "object_id": np.uint64,
    "norm": np.float32,
}
# A stored grid may differ from the instrument's by float rounding only.
GRID_TOL_PIXELS = 1e-3


def _chunk_rows(row_size: int, target_bytes: int = 1 << 20) -> int:
    # ~1 MiB chunks of float32 rows: large enough for contiguous block reads, small enough to append.
    return max(1, min(4096, target_bytes // (4 * row_size)))


def grid_mismatch(wave_obs, instrument: Instrument) -> str | None:
    """None when `wave_obs` is the instrument's grid, else a message naming the first differing pixel."""
    wave_obs = np.asarray(wave_obs, dtype=np.float64)
    if wave_obs.shape != (instrument.L,):
        return f"has shape {wave_obs.shape}, the {instrument.name} grid has ({instrument.L},)"
    with np.errstate(invalid="ignore", divide="ignore"):
        off = np.abs(instrument.coordinate(wave_obs) - np.arange(instrument.L))
    bad = ~(off <= GRID_TOL_PIXELS)
    if bad.any():
        i = int(np.argmax(bad))
        return (
            f"differs from the {instrument.name} grid first at pixel {i} "
            f"({wave_obs[i]:.4f} Å, expected {instrument.wave_obs[i]:.4f} Å)"
        )
    return None


class _Aborted(Exception):
    """Handed to the temporary file's context on abort: it removes the file instead of renaming it."""


class SpectraWriter:
    """Write spectra to `path` atomically: data go to a temporary file renamed over `path` on close.

    With ``append=True`` an existing file is copied to the temporary name and extended; its instrument must
    match. Use as a context manager; on an exception the temporary file is removed and `path` is untouched.
    ``compression=N`` (1–9) stores the columns it creates gzip-compressed at level N with the byte shuffle
    filter (for files that ship, like the bundled sample); readers then go through h5py instead of the memory
    map, so files for training stay uncompressed (None, the default).
    """

    def __init__(self, path, instrument: str | Instrument, append: bool = False, attrs: dict | None = None,
                 compression: int | None = None):
        self.path = os.fspath(path)
        self.instrument = get_instrument(instrument)
        if compression is not None and not (isinstance(compression, int) and 1 <= compression <= 9):
            raise ValueError(f"{self.path}: compression must be a gzip level 1-9 or None, got {compression!r}")
        self._filters = {} if compression is None else \
            {"compression": "gzip", "compression_opts": compression, "shuffle": True}
        self._closed = True
        append = append and os.path.exists(self.path)
        if append:
            self._check_appendable()  # before copying: a refused append should cost nothing
        self._atomic = atomic_path(self.path)  # fsync before the rename: durable before visible
        self.tmp = os.fspath(self._atomic.__enter__())
        try:
            if append:
                shutil.copyfile(self.path, self.tmp)
                self.h5 = h5py.File(self.tmp, "a")
            else:
                self.h5 = h5py.File(self.tmp, "w")
                self.h5.attrs["format"] = FORMAT
                self.h5.attrs["format_version"] = FORMAT_VERSION
                self.h5.attrs["instrument"] = self.instrument.name
                self.h5.create_dataset("wave_obs", data=self.instrument.wave_obs)
                # Empty core columns: a file with zero rows is still a valid file.
                L = self.instrument.L
                for name in CORE_COLUMNS:
                    shape = (0, L) if name in SPECTRAL_COLUMNS else (0,)
                    self._create(name, np.zeros(shape, _DTYPES[name]))
            for k, v in (attrs or {}).items():
                self.h5.attrs[k] = v
        except BaseException as err:
            if getattr(self, "h5", None) is not None:
                self.h5.close()
            self._atomic.__exit__(type(err), err, err.__traceback__)  # removes the temporary
            raise
        self._closed = False

    def _check_appendable(self):
        with open_hdf5(self.path) as h5:
            fmt = attr_str(h5.attrs.get("format"))
            have = attr_str(h5.attrs.get("instrument"))
            version = int(h5.attrs.get("format_version", 0))
        if fmt != FORMAT:
            raise SpectraFormatError(
                f"{self.path}: cannot append: not a fastspec spectra file (format attribute {fmt!r})"
            )
        if version != FORMAT_VERSION:
            raise SpectraFormatError(
                f"{self.path}: cannot append: format_version {version}, this fastspec writes {FORMAT_VERSION}"
            )
        if have != self.instrument.name:
            raise SpectraFormatError(
                f"{self.path}: cannot append {self.instrument.name} spectra to a file of instrument {have!r}"
            )

    @property
    def n(self) -> int:
        return int(self.h5["Z"].shape[0]) if "Z" in self.h5 else 0

    def _row_columns(self) -> set[str]:
        return set(datasets(self.h5)) - {"wave_obs"}

    def _create(self, name: str, data: np.ndarray):
        row_size = int(np.prod(data.shape[1:])) if data.ndim > 1 else 1
        chunks = (_chunk_rows(row_size),) + data.shape[1:]
        dtype = h5py.string_dtype() if data.dtype.kind in "SUO" else data.dtype
        ds = self.h5.create_dataset(
            name, shape=data.shape, dtype=dtype, maxshape=(None,) + data.shape[1:], chunks=chunks, **self._filters
        )
        if data.shape[0]:
            ds[:] = data

    def _append(self, name: str, data: np.ndarray):
        if data.dtype.kind in "SU":
            data = data.astype(object)  # variable-length strings: no silent truncation on append
        if name not in self.h5:
            self._create(name, data)
            return
        ds = self.h5[name]
        if ds.shape[1:] != data.shape[1:]:
            raise SpectraFormatError(f"{self.path}: field {name} has row shape {ds.shape[1:]}, got {data.shape[1:]}")
        n0 = ds.shape[0]
        ds.resize(n0 + data.shape[0], axis=0)
        ds[n0:] = data

    def write(self, flux, ivar, mask, z, z_err, object_id, norm=None, extra: dict | None = None):
        """Append N rows. `extra` maps 'group/name' (or 'name') to arrays with N rows; once a file has rows,
        every write must give the same extra columns."""
        L = self.instrument.L
        flux = np.asarray(flux, dtype=np.float32)
        n = flux.shape[0] if flux.ndim else 0
        where = f"{self.path} (writing rows {self.n}–{self.n + n - 1})"
        cols = {
            "spectrum_flux": flux,
            "spectrum_ivar": np.asarray(ivar, dtype=np.float32),
            "spectrum_mask": np.asarray(mask, dtype=np.bool_),
        }
        for name in SPECTRAL_COLUMNS:
            if cols[name].shape != (n, L):
                raise SpectraFormatError(
                    f"{where}: field {name} has shape {cols[name].shape}, expected ({n}, {L}) for {self.instrument.name}"
                )
        per_row = {"Z": (z, np.float64), "Z_ERR": (z_err, np.float32), "object_id": (object_id, None),
                   "norm": (np.ones(n) if norm is None else norm, np.float32)}
        for name, (arr, dtype) in per_row.items():
            arr = np.asarray(arr)
            if arr.size != n or arr.ndim > 2:
                raise SpectraFormatError(f"{where}: field {name} has shape {arr.shape}, expected ({n},)")
            arr = arr.reshape(n)
            cols[name] = as_object_id(arr, self.path, self.n) if dtype is None else arr.astype(dtype)
        for name, arr in (extra or {}).items():
            arr = np.asarray(arr)
            if name in cols or name == "wave_obs":
                raise SpectraFormatError(f"{where}: extra field {name} would overwrite a core field")
            if arr.shape[:1] != (n,):
                raise SpectraFormatError(f"{where}: extra field {name} has {arr.shape[:1]} rows, expected {n}")
            cols[name] = arr
        if self.n > 0:
            have, given = self._row_columns(), set(cols)
            if have != given:
                missing, new = sorted(have - given), sorted(given - have)
                raise SpectraFormatError(
                    f"{where}: every write must give the file's columns: "
                    + (f"missing {', '.join(missing)}" if missing else "")
                    + ("; " if missing and new else "")
                    + (f"new {', '.join(new)}" if new else "")
                )
        for name, arr in cols.items():
            self._append(name, arr)

    def write_spectra(self, spectra: Spectra):
        """Append the rows of `spectra` (its extra columns included)."""
        self.write(spectra.flux, spectra.ivar, spectra.mask, spectra.z, spectra.z_err, spectra.object_id,
                   spectra.norm, extra=spectra.extra)

    def close(self):
        """Finish the file: synced to disk, then renamed to `path`."""
        if self._closed:
            return
        self._closed = True
        self.h5.flush()
        self.h5.close()
        self._atomic.__exit__(None, None, None)

    def abort(self):
        """Drop what was written; `path` stays as it was."""
        if self._closed:
            return
        self._closed = True
        try:
            self.h5.close()
        finally:
            self._atomic.__exit__(_Aborted, _Aborted(), None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class SpectraFile(SpectraReader):
    """Read a fastspec spectra file (open it in the process that reads it).

    `instrument`, when given, must be the file's. The stored grid must be the instrument's grid
    (``check_grid=False`` skips that check; `fastspec.validate` reports it instead).
    """

    kind = "fastspec"

    def __init__(self, path, instrument: str | Instrument | None = None, check_grid: bool = True):
        super().__init__(path, instrument, check_grid=check_grid)

    def _open(self, instrument, check_grid):
        h = self.h5
        fmt = attr_str(h.attrs.get("format"))
        if fmt != FORMAT:
            raise SpectraFormatError(f"{self.path}: not a fastspec spectra file (format attribute {fmt!r})")
        try:
            self.format_version = int(h.attrs.get("format_version", 0))
        except (TypeError, ValueError):
            raise SpectraFormatError(
                f"{self.path}: format_version attribute {h.attrs.get('format_version')!r} is not an integer"
            ) from None
        if self.format_version > FORMAT_VERSION:
            raise SpectraFormatError(
                f"{self.path}: format_version {self.format_version} is newer than this fastspec ({FORMAT_VERSION})"
            )
        try:
            self.instrument = get_instrument(attr_str(h.attrs.get("instrument")))
        except InstrumentError as err:
            raise SpectraFormatError(f"{self.path}: instrument attribute: {err}") from None
        if instrument is not None and get_instrument(instrument).name != self.instrument.name:
            raise SpectraFormatError(
                f"{self.path}: instrument: the file holds {self.instrument.name} spectra, "
                f"{get_instrument(instrument).name} was asked for"
            )
        missing = [c for c in ("wave_obs", "spectrum_flux", "spectrum_ivar", "spectrum_mask", "Z", "Z_ERR",
                               "object_id") if c not in h]
        if missing:
            raise SpectraFormatError(f"{self.path}: missing field(s) {', '.join(missing)}")
        self.wave_obs = np.asarray(h["wave_obs"][:], dtype=np.float64)
        if check_grid:
            msg = grid_mismatch(self.wave_obs, self.instrument)
            if msg:
                raise SpectraFormatError(f"{self.path}: wave_obs: {msg}")

    def __len__(self) -> int:
        return int(self.h5["Z"].shape[0])

    def read(self, start: int = 0, stop: int | None = None) -> Spectra:
        """Contiguous rows [start, stop)."""
        start, stop = row_range(self.path, start, stop, len(self))
        h = self.h5
        return Spectra(
            flux=native(h["spectrum_flux"][start:stop]),
            ivar=native(h["spectrum_ivar"][start:stop]),
            mask=h["spectrum_mask"][start:stop].astype(bool),
            z=native(h["Z"][start:stop]).astype(np.float64),
            z_err=native(h["Z_ERR"][start:stop]).astype(np.float32),
            object_id=native(h["object_id"][start:stop]),
            norm=native(h["norm"][start:stop]) if "norm" in h else np.ones(stop - start, np.float32),
            start=start,
        )

    def read_column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Any dataset of the file as stored (native byte order); `wave_obs` whole."""
        if name == "wave_obs" and name in self.h5:
            return native(self.h5[name][()])
        return self._stored_column(name, start, stop)
