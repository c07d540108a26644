"""Ingest of real survey files into one HDF5 spectra file (DESIGN §2, "Data").

Reads SDSS/BOSS `spec` and `spec-lite` FITS files (HDU1 COADD `loglam flux ivar and_mask`, HDU2 SPECOBJ/SPALL
row) and DESI `coadd` files (cameras B/R/Z on the 0.8 Å lattice) with their `redrock` redshift files. Every
spectrum is snapped onto the instrument grid by an integer pixel offset (no interpolation), masked (pipeline
mask, ivar ≤ 0, bright sky lines, grid pixels without data), normalised by its median flux in the restframe
window (DESIGN §1) and written through `fastspec.h5format.SpectraWriter`.

Files are read in parallel (a process pool) and written in input order. A file that cannot be read, or a
spectrum that cannot be used, is skipped with its reason in the report; nothing is dropped silently.

Public API: `ingest(paths, output, ...) -> IngestReport`, `read_sdss`, `read_desi`, `plan`, `classify`,
`expand_paths`, `open_fits`, `format_summary`, `IngestError`.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import FastspecError
from .instruments import NORM_WINDOW, Instrument, InstrumentError, get_instrument
from .prep import apply_normalization, bad_pixel_mask, normalization

# SDSS-I/II plates are numbered below this; BOSS/eBOSS plates from it on (DR16 convention).
BOSS_FIRST_PLATE = 3510
DEFAULT_SPECTYPES = ("GALAXY",)
FITS_SUFFIXES = (".fits", ".fits.gz", ".fit", ".fts")

_SDSS_NAME = re.compile(r"^spec-(\d+)-(\d+)-(\d+)\.", re.IGNORECASE)
_COADD_NAME = re.compile(r"^coadd-(.+)$", re.IGNORECASE)
_REDROCK_NAME = re.compile(r"^(?:redrock|zbest)-(.+)$", re.IGNORECASE)


class IngestError(FastspecError, ValueError):
    """A file or spectrum that cannot be ingested; the message names the file, HDU / row and field."""


@dataclass
class Spectra:
    """Rows ready for SpectraWriter.write: normalised, on the instrument grid."""

    flux: np.ndarray  # (n, L) float32, raw / norm
    ivar: np.ndarray  # (n, L) float32, raw ivar · norm²
    mask: np.ndarray  # (n, L) bool, True = bad
    z: np.ndarray
    z_err: np.ndarray
    object_id: np.ndarray  # uint64
    norm: np.ndarray  # float32
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.z.shape[0])


@dataclass
class FileReport:
    """What happened to one input file (one entry of the machine-readable report)."""

    file: str
    kind: str = "unknown"  # sdss-spec, sdss-spec-lite, desi-coadd, redrock, unknown
    instrument: str | None = None
    n_spectra: int = 0  # rows in the file
    n_ingested: int = 0
    skipped: list = field(default_factory=list)  # [{"row", "object_id", "reason"}]
    error: str | None = None  # the file as a whole could not be used
    notes: list = field(default_factory=list)
    redrock: str | None = None

    @property
    def reason(self) -> str:
        if self.error:
            return self.error
        reasons = sorted({s["reason"] for s in self.skipped})
        return "; ".join(reasons + list(self.notes))


@dataclass
class IngestTask:
    path: str
    kind: str  # "sdss" or "desi-coadd"
    instrument: str
    redrock: tuple = ()
    spectypes: tuple | None = DEFAULT_SPECTYPES
    zwarn_zero: bool = False
    reader: str = "fast"


# ---------------------------------------------------------------------------------------------- reading FITS
#
# Two readers with one interface (`names`, `header(i)`, `table(i, fields, label)`, `image(name)`, `close()`):
# "fast" parses the header cards itself and reads only the table fields / images it is asked for; "astropy"
# goes through astropy.io.fits. astropy builds a Column object per table field on first access, ~25 ms for a
# 126-field SPECOBJ row — most of the time of an ingest — so "fast" is the default and astropy the reference
# (the tests compare what ingest wrote with astropy-read values; bench/bench_ingest.py times both).

_BLOCK = 2880
_TFORM = re.compile(r"^\s*(\d*)([LXBIJKAEDCMPQ])")
_TSIZE = {"L": 1, "B": 1, "I": 2, "J": 4, "K": 8, "A": 1, "E": 4, "D": 8, "C": 8, "M": 16, "P": 8, "Q": 16}
_TDTYPE = {"L": "u1", "B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8", "C": ">c8",
           "M": ">c16", "P": ">i4", "Q": ">i8"}
_BITPIX = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
# TZERO that turns a signed FITS integer into the unsigned type of the same width (FITS convention).
_UNSIGNED = {(">i2", 1 << 15): np.uint16, (">i4", 1 << 31): np.uint32, (">i8", 1 << 63): np.uint64}


def _parse_value(raw: str):
    """A header card's value: quoted string, T/F, int or float (comment after '/' dropped)."""
    raw = raw.lstrip()
    if raw.startswith("'"):
        i = 1
        while True:
            j = raw.find("'", i)
            if j < 0:
                return raw[1:].rstrip()
            if raw[j + 1: j + 2] == "'":
                i = j + 2
                continue
            return raw[1:j].replace("''", "'").rstrip()
    v = raw.split("/", 1)[0].strip()
    if v == "T":
        return True
    if v == "F":
        return False
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v.replace("D", "E"))
    except ValueError:
        return v


class _Header:
    """Header cards (raw value strings, parsed on access)."""

    def __init__(self, cards: dict):
        self._cards = cards

    def __contains__(self, key) -> bool:
        return key in self._cards

    def get(self, key, default=None):
        raw = self._cards.get(key)
        return default if raw is None else _parse_value(raw)

    def __getitem__(self, key):
        if key not in self._cards:
            raise KeyError(key)
        return _parse_value(self._cards[key])


def _scale(arr: np.ndarray, zero, scale) -> np.ndarray:
    zero = 0 if zero is None else zero
    scale = 1 if scale is None else scale
    if zero == 0 and scale == 1:
        return arr.astype(arr.dtype.newbyteorder("=")) if arr.dtype.byteorder == ">" else arr
    unsigned = _UNSIGNED.get((arr.dtype.str.replace("<", ">"), zero)) if scale == 1 else None
    if unsigned is not None:
        signed = arr.astype(arr.dtype.newbyteorder("="))
        return signed.view(unsigned) ^ unsigned(int(zero))  # flip the sign bit: exact, no float rounding
    return arr.astype(np.float64) * scale + zero


class _FastFits:
    """Minimal FITS reader: header cards of every HDU, fixed-width binary-table fields and images."""

    def __init__(self, path: str):
        self.path = path
        self.fh = gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")
        try:
            self._scan()
        except Exception:
            self.fh.close()
            raise

    def _read_header(self, pos: int):
        self.fh.seek(pos)
        cards = {}
        first = True
        while True:
            block = self.fh.read(_BLOCK)
            if len(block) == 0 and first and pos > 0:
                return None, pos  # clean end of file
            if len(block) < _BLOCK:
                raise IngestError(f"{self.path}: file is truncated inside the header of HDU {len(self.hdus)}; "
                                  "incomplete download? fetch it again")
            text = block.decode("latin-1")
            if first:
                key0 = text[:8]
                if pos == 0 and key0 != "SIMPLE  ":
                    raise IngestError(f"{self.path}: not a FITS file (does not start with SIMPLE)")
                if pos > 0 and key0 != "XTENSION":
                    return None, pos  # trailing bytes after the last HDU (astropy ignores them too)
                first = False
            for k in range(0, _BLOCK, 80):
                key = text[k: k + 8].rstrip()
                if key == "END":
                    return _Header(cards), self.fh.tell()
                if text[k + 8: k + 10] == "= " and key not in cards:
                    cards[key] = text[k + 10: k + 80]
            if len(cards) > 100000:
                raise IngestError(f"{self.path}: HDU {len(self.hdus)} header has no END card")

    def _scan(self):
        self.hdus = []  # (name, header, data_start, data_bytes)
        size = None if isinstance(self.fh, gzip.GzipFile) else os.fstat(self.fh.fileno()).st_size
        pos = 0
        while True:
            header, data_start = self._read_header(pos)
            if header is None:
                break
            i = len(self.hdus)
            try:
                bitpix = int(header["BITPIX"])
                naxis = int(header["NAXIS"])
                dims = [int(header[f"NAXIS{k}"]) for k in range(1, naxis + 1)]
                nbytes = abs(bitpix) // 8 * int(header.get("GCOUNT", 1)) * (
                    int(header.get("PCOUNT", 0)) + (int(np.prod(dims)) if naxis else 0))
            except (KeyError, ValueError, TypeError) as err:
                raise IngestError(f"{self.path}: HDU {i} header is damaged ({type(err).__name__}: {err})") from None
            if nbytes and naxis == 0:
                nbytes = 0
            name = str(header.get("EXTNAME", "PRIMARY" if i == 0 else "")).strip().upper()
            self.hdus.append((name, header, data_start, nbytes))
            end = data_start + nbytes
            if size is not None and end > size:
                raise IngestError(
                    f"{self.path}: file is truncated ({size} bytes, HDU {i} {name} ends at byte {end}); "
                    "incomplete download? fetch it again"
                )
            pos = data_start + -(-nbytes // _BLOCK) * _BLOCK
            if size is not None and pos >= size:
                break
        if size is None and self.hdus:  # gzip: make sure the last HDU's data are all there
            _, _, start, nbytes = self.hdus[-1]
            try:
                self.fh.seek(start + nbytes - 1) if nbytes else None
                short = nbytes and len(self.fh.read(1)) != 1
            except EOFError:
                short = True
            if short:
                raise IngestError(f"{self.path}: file is truncated; incomplete download? fetch it again")

    @property
    def names(self) -> list[str]:
        return [h[0] for h in self.hdus]

    def header(self, i: int) -> _Header:
        return self.hdus[i][1]

    def _read(self, i: int, nbytes: int, what: str) -> bytes:
        name, _, start, have = self.hdus[i]
        self.fh.seek(start)
        try:
            raw = self.fh.read(nbytes)
        except EOFError:
            raw = b""
        if len(raw) < nbytes:
            raise IngestError(f"{self.path}: HDU {i} ({name}) {what} is cut short; the file is truncated")
        return raw

    def table(self, i: int, fields, label: str) -> dict:
        h = self.header(i)
        if str(h.get("XTENSION", "")).strip() != "BINTABLE":
            raise IngestError(f"{self.path}: HDU {label} is not a binary table (looking for {', '.join(fields)})")
        row_bytes, nrows, nfields = int(h["NAXIS1"]), int(h["NAXIS2"]), int(h.get("TFIELDS", 0))
        layout, offset = {}, 0
        for k in range(1, nfields + 1):
            tform = str(h.get(f"TFORM{k}", ""))
            m = _TFORM.match(tform)
            if not m:
                raise IngestError(f"{self.path}: HDU {label} column {k} has an unreadable TFORM {tform!r}")
            rep, code = int(m.group(1) or 1), m.group(2)
            width = (rep + 7) // 8 if code == "X" else rep * _TSIZE[code]
            ttype = str(h.get(f"TTYPE{k}", f"col{k}")).strip()
            layout.setdefault(ttype.lower(), (ttype, k, rep, code, offset))
            offset += width
        if offset != row_bytes:
            raise IngestError(f"{self.path}: HDU {label} columns add up to {offset} bytes, NAXIS1 says {row_bytes}")
        names, formats, offsets, picked = [], [], [], []
        for f in fields:
            if f.lower() not in layout:
                have = ", ".join(v[0] for v in layout.values())
                raise IngestError(f"{self.path}: HDU {label} has no field {f} (fields: {have})")
            ttype, k, rep, code, off = layout[f.lower()]
            if code == "X":
                raise IngestError(f"{self.path}: HDU {label} field {f} is a bit array; not supported")
            dt = f"S{rep}" if code == "A" else (_TDTYPE[code] if rep == 1 else (_TDTYPE[code], (rep,)))
            names.append(f"f{len(names)}")
            formats.append(dt)
            offsets.append(off)
            picked.append((f, k, code))
        dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": row_bytes})
        rec = np.frombuffer(self._read(i, row_bytes * nrows, "table data"), dtype=dtype, count=nrows)
        out = {}
        for n, (f, k, code) in zip(names, picked):
            arr = rec[n]
            if code == "L":
                arr = arr == ord("T")
            elif code != "A":
                arr = _scale(arr, h.get(f"TZERO{k}"), h.get(f"TSCAL{k}"))
            out[f] = arr
        return out

    def image(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise IngestError(f"{self.path}: no HDU {name}")
        i = self.names.index(name)
        h = self.header(i)
        naxis = int(h["NAXIS"])
        if naxis == 0:
            raise IngestError(f"{self.path}: HDU {name} holds no data")
        shape = tuple(int(h[f"NAXIS{k}"]) for k in range(naxis, 0, -1))
        dt = np.dtype(_BITPIX[int(h["BITPIX"])])
        n = int(np.prod(shape))
        arr = np.frombuffer(self._read(i, n * dt.itemsize, "image data"), dtype=dt, count=n).reshape(shape)
        return _scale(arr, h.get("BZERO"), h.get("BSCALE"))

    def close(self):
        self.fh.close()


class _AstropyFits:
    """The same interface through astropy.io.fits (the reference reader)."""

    def __init__(self, path: str):
        from astropy.io import fits

        self.path = path
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.hdul = fits.open(path, memmap=False, lazy_load_hdus=True)
                try:
                    len(self.hdul)  # reads every header; astropy warns when data run past the end of file
                except Exception:
                    self.hdul.close()
                    raise
        except EOFError:
            raise IngestError(f"{path}: file is truncated (the compressed stream ends early); "
                              "incomplete download? fetch it again") from None
        except Exception as err:
            raise IngestError(f"{path}: cannot be read as FITS ({type(err).__name__}: {err})") from None
        for w in caught:
            msg = str(w.message)
            if "truncated" in msg.lower():
                self.hdul.close()
                m = re.search(r"actual file length \((\d+)\).*expected size \((\d+)\)", msg)
                detail = f" ({m.group(1)} bytes, its headers need {m.group(2)})" if m else ""
                raise IngestError(f"{path}: file is truncated{detail}; incomplete download? fetch it again")
        self.names = [h.name.upper() for h in self.hdul]

    def header(self, i: int):
        return self.hdul[i].header

    def table(self, i: int, fields, label: str) -> dict:
        hdu = self.hdul[i]
        if getattr(hdu, "columns", None) is None:
            raise IngestError(f"{self.path}: HDU {label} is not a binary table (looking for {', '.join(fields)})")
        try:
            data = hdu.data
            cols = {c.lower(): c for c in hdu.columns.names}
        except Exception as err:
            raise IngestError(f"{self.path}: HDU {label} cannot be read ({type(err).__name__}: {err})") from None
        out = {}
        for f in fields:
            if f.lower() not in cols:
                raise IngestError(f"{self.path}: HDU {label} has no field {f} (fields: {', '.join(hdu.columns.names)})")
            arr = np.asarray(data[cols[f.lower()]])
            out[f] = arr.astype(arr.dtype.newbyteorder("=")) if arr.dtype.byteorder == ">" else arr
        return out

    def image(self, name: str) -> np.ndarray:
        try:
            data = self.hdul[name].data
        except KeyError:
            raise IngestError(f"{self.path}: no HDU {name}") from None
        except Exception as err:
            raise IngestError(f"{self.path}: HDU {name} cannot be read ({type(err).__name__}: {err})") from None
        if data is None:
            raise IngestError(f"{self.path}: HDU {name} holds no data")
        data = np.asarray(data)
        return data.astype(data.dtype.newbyteorder("=")) if data.dtype.byteorder == ">" else data

    def close(self):
        self.hdul.close()


READERS = {"fast": _FastFits, "astropy": _AstropyFits}


@contextlib.contextmanager
def open_fits(path: str, reader: str = "fast"):
    """Open `path` with the named reader; IngestError (naming the file) when it cannot be read."""
    if reader not in READERS:
        raise ValueError(f"unknown FITS reader {reader!r}; known: {', '.join(READERS)}")
    try:
        f = READERS[reader](path)
    except IngestError:
        raise
    except FileNotFoundError:
        raise IngestError(f"{path}: no such file") from None
    except EOFError:
        raise IngestError(f"{path}: file is truncated (the compressed stream ends early); "
                          "incomplete download? fetch it again") from None
    except Exception as err:
        raise IngestError(f"{path}: cannot be read as FITS ({type(err).__name__}: {err})") from None
    try:
        yield f
    finally:
        f.close()


def _hdu_index(f, names, what: str, index: int | None = None) -> tuple[int, str]:
    """(i, label "i (NAME)") of the first HDU named in `names`, else HDU `index`; IngestError otherwise."""
    have = f.names
    for name in names:
        if name in have:
            i = have.index(name)
            return i, f"{i} ({name})"
    if index is not None and len(have) > index:
        return index, f"{index} ({have[index] or 'unnamed'})"
    raise IngestError(f"{f.path}: no {what} HDU (looked for {', '.join(names)}; the file has {', '.join(have)})")


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip()


def _object_id(value, path: str, label: str) -> np.uint64:
    """SPECOBJID / TARGETID as uint64: SDSS writes it as a string or as (u)int64 (DR16 ids pass 2**63)."""
    try:
        if isinstance(value, (bytes, str, np.bytes_, np.str_)):
            iv = int(_text(value))
        else:
            iv = int(value)
    except (TypeError, ValueError):
        raise IngestError(f"{path}: HDU {label} field SPECOBJID {value!r} is not an integer id") from None
    if iv < 0:
        iv += 1 << 64  # an unsigned id stored in a signed int64 without TZERO
    if not 0 <= iv < (1 << 64):
        raise IngestError(f"{path}: HDU {label} field SPECOBJID {iv} does not fit in 64 bits")
    return np.uint64(iv)


def _check_finite(arr: np.ndarray, path: str, label: str, name: str, nonneg: bool = False):
    bad = ~np.isfinite(arr)
    if nonneg:
        bad |= arr < 0
    if bad.any():
        idx = np.flatnonzero(bad.ravel())
        what = "negative or not finite" if nonneg else "not finite"
        raise IngestError(
            f"{path}: HDU {label} field {name}: {idx.size} value(s) {what} (first at element {int(idx[0])}); "
            "the file looks corrupted"
        )


@functools.lru_cache(maxsize=8)
def _sky(name: str) -> np.ndarray:
    inst = get_instrument(name)
    sky = inst.sky_mask()
    sky.setflags(write=False)
    return sky


def _snap(inst: Instrument, wave: np.ndarray, path: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Grid indices of the file pixels that land on the grid, and the selector of those file pixels."""
    try:
        offset = inst.snap_offset(wave, where=f"{path}: HDU {label}")
    except InstrumentError as err:
        raise IngestError(f"{err}; the file is corrupted or not on the {inst.name} lattice") from None
    idx = offset + np.arange(wave.size)
    keep = (idx >= 0) & (idx < inst.L)
    return idx[keep], keep


def _finish(raw_flux, raw_ivar, bad, z, inst: Instrument, path: str, rows, object_ids, report: FileReport):
    """Normalise rows on the grid; rows without a valid norm go to report.skipped. Returns the kept selector.

    The norm is the median flux in the restframe window over pixels that are not bad (the loss weights > 0).
    """
    weights = np.where(bad, 0.0, raw_ivar)
    norm = normalization(raw_flux, weights, inst.wave_obs, z)
    ok = np.isfinite(norm)
    for i in np.flatnonzero(~ok):
        lo, hi = NORM_WINDOW[0] * (1 + z[i]), NORM_WINDOW[1] * (1 + z[i])
        wave = inst.wave_obs
        n_good = int(((wave >= lo) & (wave <= hi) & (weights[i] > 0)).sum())
        if n_good == 0:
            why = (
                f"no valid normalisation: no unmasked pixel with ivar > 0 in the restframe window "
                f"{NORM_WINDOW[0]:.0f}–{NORM_WINDOW[1]:.0f} Å (observed {lo:.0f}–{hi:.0f} Å at z={z[i]:.4f})"
            )
        else:
            why = (
                f"no valid normalisation: median flux over the {n_good} good pixels of the restframe window "
                f"{NORM_WINDOW[0]:.0f}–{NORM_WINDOW[1]:.0f} Å is not positive"
            )
        report.skipped.append({"row": int(rows[i]), "object_id": int(object_ids[i]), "reason": why})
    return ok, norm


def _spectra(raw_flux, raw_ivar, bad, norm, z, z_err, object_id, extra) -> Spectra:
    # Round the norm to float32 first, so that stored flux · stored norm reproduces the raw flux.
    norm32 = norm.astype(np.float32)
    flux, ivar = apply_normalization(raw_flux, raw_ivar, norm32.astype(np.float64))
    return Spectra(
        flux=flux,
        ivar=ivar,
        mask=bad,
        z=np.asarray(z, np.float64),
        z_err=np.asarray(z_err, np.float32),
        object_id=np.asarray(object_id, np.uint64),
        norm=norm32,
        extra=extra,
    )


def _want_class(spectype: str, spectypes) -> bool:
    return spectypes is None or spectype.upper() in spectypes


def read_sdss(path, instrument="sdss", spectypes=DEFAULT_SPECTYPES, zwarn_zero=False, reader="fast"):
    """One SDSS/BOSS spec or spec-lite file → (FileReport, Spectra or None) on `instrument`'s grid.

    Raises IngestError (naming the file, HDU and field) when the file cannot be used at all.
    """
    path = os.fspath(path)
    inst = get_instrument(instrument)
    report = FileReport(file=path, instrument=inst.name, kind="sdss-spec")
    if not inst.loglinear:
        raise IngestError(
            f"{path}: an SDSS/BOSS spectrum cannot go on the {inst.name} grid; ingest SDSS/BOSS and DESI "
            "files into separate outputs"
        )
    with open_fits(path, reader) as f:
        ci, clabel = _hdu_index(f, ["COADD"], "COADD spectrum", index=1)
        mi, mlabel = _hdu_index(f, ["SPECOBJ", "SPALL"], "SPECOBJ/SPALL", index=2)
        report.kind = "sdss-spec" if len(f.names) > 4 else "sdss-spec-lite"
        coadd = f.table(ci, ["loglam", "flux", "ivar", "and_mask"], clabel)
        meta_fields = ["Z", "Z_ERR", "SPECOBJID", "CLASS"]
        try:
            meta = f.table(mi, meta_fields + ["PLATE", "MJD", "FIBERID", "ZWARNING"], mlabel)
        except IngestError:
            meta = f.table(mi, meta_fields, mlabel)  # the message names the missing required field
    loglam = coadd["loglam"].astype(np.float64)
    flux, ivar, and_mask = coadd["flux"], coadd["ivar"], coadd["and_mask"]
    if loglam.ndim != 1 or loglam.size == 0:
        raise IngestError(f"{path}: HDU {clabel} field loglam has shape {loglam.shape}; expected 1-d pixels")
    _check_finite(loglam, path, clabel, "loglam")
    _check_finite(flux, path, clabel, "flux")
    _check_finite(ivar, path, clabel, "ivar", nonneg=True)
    if meta["Z"].shape[0] != 1:
        raise IngestError(f"{path}: HDU {mlabel} has {meta['Z'].shape[0]} rows; expected the one row of this spectrum")
    row = {k: v[0] for k, v in meta.items()}
    for k in ("PLATE", "MJD", "FIBERID", "ZWARNING"):
        row[k] = int(row[k]) if k in row else -1
    report.n_spectra = 1
    z = float(row["Z"])
    object_id = _object_id(row["SPECOBJID"], path, mlabel)
    spectype = _text(row["CLASS"])
    if not np.isfinite(z):
        raise IngestError(f"{path}: HDU {mlabel} row 0 field Z is {z}")
    if not _want_class(spectype, spectypes):
        report.skipped.append({"row": 0, "object_id": int(object_id),
                               "reason": f"CLASS {spectype} not in {','.join(spectypes)} (see --spectype)"})
        return report, None
    if zwarn_zero and row["ZWARNING"] != 0:
        report.skipped.append({"row": 0, "object_id": int(object_id),
                               "reason": f"ZWARNING={row['ZWARNING']} (unreliable redshift; --zwarn-zero set)"})
        return report, None

    idx, keep = _snap(inst, 10.0**loglam, path, f"{clabel} field loglam")
    if not keep.all():
        n_drop = int((~keep).sum())
        n_good = int(((ivar > 0) & ~keep).sum())
        report.notes.append(
            f"{n_drop} pixels outside the {inst.name} grid ({inst.wave_min:.0f}–{inst.wave_max:.0f} Å) dropped "
            f"({n_good} with ivar > 0)"
        )
    if idx.size == 0:
        raise IngestError(f"{path}: no pixel of the spectrum lies on the {inst.name} grid")
    L = inst.L
    raw_flux = np.zeros((1, L), np.float64)
    raw_ivar = np.zeros((1, L), np.float64)
    pipe = np.ones((1, L), np.int64)  # grid pixels without data count as pipeline-masked
    raw_flux[0, idx] = flux[keep]
    raw_ivar[0, idx] = ivar[keep]
    pipe[0, idx] = and_mask[keep]
    bad = bad_pixel_mask(raw_ivar, pipe, _sky(inst.name)[None, :])
    zs = np.array([z])
    ok, norm = _finish(raw_flux, raw_ivar, bad, zs, inst, path, [0], [object_id], report)
    if not ok[0]:
        return report, None
    extra = {
        "source/row": np.array([0], np.int32),
        "source/plate": np.array([row["PLATE"]], np.int32),
        "source/mjd": np.array([row["MJD"]], np.int32),
        "source/fiber": np.array([row["FIBERID"]], np.int32),
        "source/class": np.array([spectype.encode()[:16]], "S16"),
        "source/zwarn": np.array([row["ZWARNING"]], np.int32),
    }
    report.n_ingested = 1
    return report, _spectra(raw_flux, raw_ivar, bad, norm, zs, [float(row["Z_ERR"])], [object_id], extra)


def _read_redshifts(paths, reader="fast") -> dict:
    """TARGETID → (Z, ZERR, ZWARN, SPECTYPE) from redrock/zbest REDSHIFTS tables (first file wins)."""
    out = {}
    for rr in paths:
        with open_fits(rr, reader) as f:
            i, label = _hdu_index(f, ["REDSHIFTS", "ZBEST"], "REDSHIFTS")
            t = f.table(i, ["TARGETID", "Z", "ZERR", "ZWARN", "SPECTYPE"], label)
        for k in range(t["TARGETID"].size):
            out.setdefault(int(t["TARGETID"][k]),
                           (float(t["Z"][k]), float(t["ZERR"][k]), int(t["ZWARN"][k]), _text(t["SPECTYPE"][k])))
    return out


def read_desi(path, redrock, instrument="desi", spectypes=DEFAULT_SPECTYPES, zwarn_zero=False, reader="fast"):
    """One DESI coadd file + its redrock file(s) → (FileReport, Spectra or None) on the DESI grid.

    Cameras overlap (B/R near 5800 Å, R/Z near 7600 Å); there flux and ivar are combined by inverse-variance
    weighting over the cameras whose pixel is good (MASK == 0 and IVAR > 0): ivar = Σ ivar_c,
    flux = Σ ivar_c·flux_c / Σ ivar_c. A pixel with no good camera gets ivar 0, the mean camera flux and
    mask True (as in desispec's camera coaddition, the ivar of masked camera pixels is zeroed).
    """
    path = os.fspath(path)
    inst = get_instrument(instrument)
    redrock = [os.fspath(r) for r in ([redrock] if isinstance(redrock, (str, os.PathLike)) else redrock)]
    report = FileReport(file=path, instrument=inst.name, kind="desi-coadd", redrock=", ".join(redrock) or None)
    if inst.loglinear:
        raise IngestError(
            f"{path}: a DESI coadd cannot go on the {inst.name} grid; ingest DESI and SDSS/BOSS files into "
            "separate outputs"
        )
    if not redrock:
        raise IngestError(f"{path}: no redrock file found (expected {_redrock_beside(path)}); pass it as an input")
    L = inst.L
    with open_fits(path, reader) as f:
        names = f.names
        cameras = [n[: -len("_WAVELENGTH")] for n in names if n.endswith("_WAVELENGTH")]
        if not cameras:
            raise IngestError(f"{path}: no *_WAVELENGTH HDU; not a DESI coadd file (HDUs: {', '.join(names)})")
        fi, flabel = _hdu_index(f, ["FIBERMAP"], "FIBERMAP")
        targetid = f.table(fi, ["TARGETID"], flabel)["TARGETID"].astype(np.int64)
        N = targetid.size
        acc_w = np.zeros((N, L))
        acc_wf = np.zeros((N, L))
        acc_f = np.zeros((N, L))
        n_cam = np.zeros(L, np.int32)
        for cam in cameras:
            wave = f.image(f"{cam}_WAVELENGTH").astype(np.float64)
            flux = f.image(f"{cam}_FLUX")
            ivar = f.image(f"{cam}_IVAR")
            mask = f.image(f"{cam}_MASK") if f"{cam}_MASK" in names else np.zeros(flux.shape, np.int32)
            for name, arr in ((f"{cam}_FLUX", flux), (f"{cam}_IVAR", ivar), (f"{cam}_MASK", mask)):
                if arr.shape != (N, wave.size):
                    raise IngestError(
                        f"{path}: HDU {name} has shape {arr.shape}, expected ({N}, {wave.size}) "
                        f"(FIBERMAP rows × {cam}_WAVELENGTH pixels)"
                    )
            _check_finite(wave, path, f"{cam}_WAVELENGTH", "wavelength")
            _check_finite(flux, path, f"{cam}_FLUX", "flux")
            _check_finite(ivar, path, f"{cam}_IVAR", "ivar", nonneg=True)
            idx, keep = _snap(inst, wave, path, f"{cam}_WAVELENGTH")
            if not keep.all():
                report.notes.append(f"{int((~keep).sum())} {cam} pixels outside the desi grid dropped")
            good = (mask[:, keep] == 0) & (ivar[:, keep] > 0)
            w = np.where(good, ivar[:, keep].astype(np.float64), 0.0)
            acc_w[:, idx] += w
            acc_wf[:, idx] += w * flux[:, keep]
            acc_f[:, idx] += flux[:, keep]
            n_cam[idx] += 1
    report.n_spectra = N
    zinfo = _read_redshifts(redrock, reader)
    with np.errstate(invalid="ignore", divide="ignore"):
        raw_flux = np.where(acc_w > 0, acc_wf / acc_w, acc_f / np.maximum(n_cam, 1))
    raw_ivar = acc_w
    # pixels without a good camera (or without any camera) are bad; so are sky lines
    bad = bad_pixel_mask(raw_ivar, None, _sky(inst.name)[None, :])

    rows, z, z_err, zwarn, spectype = [], [], [], [], []
    for i in range(N):
        tid = int(targetid[i])
        info = zinfo.get(tid)
        reason = None
        if tid < 0:
            reason = f"negative TARGETID {tid} (sky or unassigned fiber)"
        elif info is None:
            reason = f"TARGETID {tid} not in {report.redrock}"
        elif not np.isfinite(info[0]):
            reason = f"redrock Z is {info[0]}"
        elif not _want_class(info[3], spectypes):
            reason = f"SPECTYPE {info[3]} not in {','.join(spectypes)} (see --spectype)"
        elif zwarn_zero and info[2] != 0:
            reason = f"ZWARN={info[2]} (unreliable redshift; --zwarn-zero set)"
        if reason:
            report.skipped.append({"row": i, "object_id": tid, "reason": reason})
            continue
        rows.append(i)
        z.append(info[0])
        z_err.append(info[1])
        zwarn.append(info[2])
        spectype.append(info[3])
    if not rows:
        return report, None
    rows = np.array(rows)
    z = np.array(z, np.float64)
    oid = targetid[rows].astype(np.uint64)
    ok, norm = _finish(raw_flux[rows], raw_ivar[rows], bad[rows], z, inst, path, rows, oid, report)
    if not ok.any():
        return report, None
    sel = rows[ok]
    extra = {
        "source/row": sel.astype(np.int32),
        "source/plate": np.full(sel.size, -1, np.int32),
        "source/mjd": np.full(sel.size, -1, np.int32),
        "source/fiber": np.full(sel.size, -1, np.int32),
        "source/class": np.array([s.encode()[:16] for s in np.asarray(spectype)[ok]], "S16"),
        "source/zwarn": np.asarray(zwarn, np.int32)[ok],
    }
    report.n_ingested = int(sel.size)
    return report, _spectra(raw_flux[sel], raw_ivar[sel], bad[sel], norm[ok], z[ok], np.asarray(z_err)[ok],
                            oid[ok], extra)


def _run_task(task: IngestTask):
    """Worker: read one file; every failure becomes the report's error (no traceback crosses the pool)."""
    try:
        if task.kind == "desi-coadd":
            return read_desi(task.path, task.redrock, task.instrument, task.spectypes, task.zwarn_zero,
                             task.reader)
        return read_sdss(task.path, task.instrument, task.spectypes, task.zwarn_zero, task.reader)
    except IngestError as err:
        return FileReport(file=task.path, kind=task.kind, instrument=task.instrument, error=str(err)), None
    except Exception as err:  # a failure we did not foresee: still reported per file, with its type
        msg = f"{task.path}: unexpected {type(err).__name__}: {err}"
        return FileReport(file=task.path, kind=task.kind, instrument=task.instrument, error=msg), None


# ---------------------------------------------------------------------------------------------- planning


def expand_paths(paths) -> list[str]:
    """Files as given, directories searched recursively for FITS files (sorted); duplicates dropped."""
    out, seen = [], set()
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(
                str(f) for f in Path(p).rglob("*") if f.is_file() and f.name.lower().endswith(FITS_SUFFIXES)
            )
        else:
            found = [p]
        for f in found:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def _redrock_beside(path: str) -> str:
    d, name = os.path.split(path)
    m = _COADD_NAME.match(name)
    return os.path.join(d, f"redrock-{m.group(1)}" if m else f"redrock-{name}")


def classify(path: str, reader: str = "fast") -> tuple[str, str | None]:
    """(kind, instrument guess): kind sdss / desi-coadd / redrock. By file name, else by the FITS headers.

    SDSS/BOSS: plate ≥ 3510 is the BOSS spectrograph (the DR16 convention), else SDSS-I/II.
    """
    name = os.path.basename(path)
    m = _SDSS_NAME.match(name)
    if m:
        return "sdss", "boss" if int(m.group(1)) >= BOSS_FIRST_PLATE else "sdss"
    if _COADD_NAME.match(name):
        return "desi-coadd", "desi"
    if _REDROCK_NAME.match(name):
        return "redrock", "desi"
    with open_fits(path, reader) as f:
        names = f.names
        head = f.header(0)
        if any(n.endswith("_FLUX") for n in names):
            return "desi-coadd", "desi"
        if "REDSHIFTS" in names or "ZBEST" in names:
            return "redrock", "desi"
        if "COADD" in names or "PLATEID" in head:
            run2d = _text(head.get("RUN2D", ""))
            if run2d:
                return "sdss", "boss" if run2d.lower().startswith("v") else "sdss"
            if "PLATEID" in head:
                return "sdss", "boss" if int(head["PLATEID"]) >= BOSS_FIRST_PLATE else "sdss"
            return "sdss", "boss" if float(head.get("COEFF0", 3.578)) < 3.5775 else "sdss"
    raise IngestError(f"{path}: not an SDSS/BOSS spec file nor a DESI coadd/redrock file (HDUs: {', '.join(names)})")


def plan(paths, instrument="auto", spectypes=DEFAULT_SPECTYPES, zwarn_zero=False, reader="fast"):
    """Decide the output instrument and what to do with each file.

    Returns (instrument name or None, [IngestTask or FileReport] in input order): a FileReport where the
    file is not ingested (unreadable, incompatible, a redshift catalog), an IngestTask otherwise.
    With instrument "auto": SDSS files → sdss; BOSS (or SDSS mixed with BOSS) → boss (SDSS spectra fit on
    the BOSS grid); DESI → desi. DESI mixed with SDSS/BOSS: the minority (DESI on a tie) is skipped with a
    reason telling the user to ingest it separately.
    """
    files = expand_paths(paths)
    entries = []
    for f in files:
        if not os.path.exists(f):
            entries.append(FileReport(file=f, error=f"{f}: no such file or directory"))
            continue
        try:
            kind, guess = classify(f, reader)
        except IngestError as err:
            entries.append(FileReport(file=f, error=str(err)))
            continue
        entries.append((f, kind, guess))
    classified = [e for e in entries if isinstance(e, tuple)]
    redrocks = [f for f, kind, _ in classified if kind == "redrock"]

    inst = None if instrument in (None, "auto") else get_instrument(instrument).name
    if inst is None:
        n_desi = sum(1 for _, k, _ in classified if k == "desi-coadd")
        sdss_guesses = [g for _, k, g in classified if k == "sdss"]
        if sdss_guesses and len(sdss_guesses) >= n_desi:
            inst = "boss" if "boss" in sdss_guesses else "sdss"
        elif n_desi:
            inst = "desi"
    by_suffix = {}
    for r in redrocks:
        m = _REDROCK_NAME.match(os.path.basename(r))
        by_suffix.setdefault(m.group(1) if m else os.path.basename(r), r)
    coadd_suffixes = {m.group(1) for m in (_COADD_NAME.match(os.path.basename(f))
                                           for f, k, _ in classified if k == "desi-coadd") if m}
    name_paired = {r for sfx, r in by_suffix.items() if sfx in coadd_suffixes}
    paired = set()
    out = []
    for e in entries:
        if isinstance(e, FileReport):
            out.append(e)
            continue
        f, kind, guess = e
        if kind == "redrock":
            out.append(f)  # placeholder, resolved below once pairing is known
            continue
        family_ok = (kind == "desi-coadd") == (inst == "desi")
        if not family_ok:
            what = "DESI coadd" if kind == "desi-coadd" else "SDSS/BOSS spectrum"
            why = "mixed with more files of the other survey" if instrument in (None, "auto") else \
                f"the output instrument is {inst}"
            out.append(FileReport(file=f, kind=kind, instrument=guess, error=(
                f"{f}: {what} skipped: {why}; ingest DESI and SDSS/BOSS files into separate outputs "
                f"(fastspec ingest ... --instrument {'desi' if kind == 'desi-coadd' else 'auto'})")))
            continue
        rr = ()
        if kind == "desi-coadd":
            m = _COADD_NAME.match(os.path.basename(f))
            explicit = by_suffix.get(m.group(1)) if m else None
            beside = _redrock_beside(f)
            if explicit:
                rr = (explicit,)
            elif os.path.exists(beside):
                rr = (beside,)
            else:
                rr = tuple(r for r in redrocks if r not in name_paired)  # matched by TARGETID
            paired.update(rr)
        out.append(IngestTask(path=f, kind=kind, instrument=inst, redrock=rr, spectypes=spectypes,
                              zwarn_zero=zwarn_zero, reader=reader))
    final = []
    for e in out:
        if isinstance(e, str):
            note = "redshift catalog, used for the DESI coadd(s) it matches" if e in paired else \
                "redshift catalog; no coadd being ingested uses it"
            final.append(FileReport(file=e, kind="redrock", instrument="desi", notes=[note]))
        else:
            final.append(e)
    return inst, final


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class IngestReport:
    output: str
    instrument: str | None
    files: list  # [FileReport] in input order
    written: bool = False

    @property
    def n_ingested(self) -> int:
        return sum(f.n_ingested for f in self.files)

    @property
    def n_skipped(self) -> int:
        return sum(len(f.skipped) for f in self.files)

    @property
    def n_failed_files(self) -> int:
        return sum(1 for f in self.files if f.error)

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "written": self.written,
            "instrument": self.instrument,
            "n_files": len(self.files),
            "n_ingested": self.n_ingested,
            "n_skipped_spectra": self.n_skipped,
            "n_failed_files": self.n_failed_files,
            "files": [asdict(f) for f in self.files],
        }

    def write_json(self, path) -> None:
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
        os.replace(tmp, path)


def _concat(parts: list[Spectra]) -> Spectra:
    keys = parts[0].extra.keys()
    return Spectra(
        flux=np.concatenate([p.flux for p in parts]),
        ivar=np.concatenate([p.ivar for p in parts]),
        mask=np.concatenate([p.mask for p in parts]),
        z=np.concatenate([p.z for p in parts]),
        z_err=np.concatenate([p.z_err for p in parts]),
        object_id=np.concatenate([p.object_id for p in parts]),
        norm=np.concatenate([p.norm for p in parts]),
        extra={k: np.concatenate([p.extra[k] for p in parts]) for k in keys},
    )


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def ingest(paths, output, instrument="auto", jobs=None, spectypes=DEFAULT_SPECTYPES, zwarn_zero=False,
           append=False, progress=True, reader="fast", block_rows=512) -> IngestReport:
    """Ingest FITS files (or folders of them) into the spectra file `output`; returns the report.

    `output` is written only if at least one spectrum was ingested (atomically, through SpectraWriter).
    `spectypes`: classes to keep (CLASS for SDSS, SPECTYPE for DESI), None for all.
    """
    from tqdm import tqdm

    from .h5format import SpectraWriter

    output = os.fspath(output)
    spectypes = None if spectypes is None else tuple(s.strip().upper() for s in spectypes)
    inst_name, entries = plan(paths, instrument, spectypes, zwarn_zero, reader)
    tasks = [e for e in entries if isinstance(e, IngestTask)]
    jobs = default_jobs() if not jobs else max(1, int(jobs))
    jobs = min(jobs, max(1, len(tasks)))

    writer = None
    pending: list[Spectra] = []
    n_pending = 0

    def flush():
        nonlocal writer, pending, n_pending
        if not pending:
            return
        if writer is None:
            writer = SpectraWriter(output, inst_name, append=append, attrs={"source": "fastspec ingest"})
        block = _concat(pending)
        writer.write(block.flux, block.ivar, block.mask, block.z, block.z_err, block.object_id, block.norm,
                     extra=block.extra)
        pending, n_pending = [], 0

    results = iter(())
    pool = None
    if jobs > 1:
        import multiprocessing as mp

        pool = mp.get_context().Pool(jobs)
        chunk = max(1, min(16, len(tasks) // (jobs * 8)))
        results = pool.imap(_run_task, tasks, chunksize=chunk)
    else:
        results = map(_run_task, tasks)
    reports = {}
    n_spectra = 0
    bar = tqdm(total=len(tasks), unit="file", disable=not progress, desc="ingest", dynamic_ncols=True)
    try:
        for task, (rep, spec) in zip(tasks, results):
            reports[id(task)] = rep
            if spec is not None and len(spec):
                spec.extra["source/file"] = np.array([task.path.encode()] * len(spec), dtype=object)
                pending.append(spec)
                n_pending += len(spec)
                n_spectra += len(spec)
                if n_pending >= block_rows:
                    flush()
            bar.update(1)
            bar.set_postfix(spectra=n_spectra, refresh=False)
        flush()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if writer is not None:
        writer.close()
    files = [reports[id(e)] if isinstance(e, IngestTask) else e for e in entries]
    return IngestReport(output=output, instrument=inst_name, files=files, written=writer is not None)


def _short(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if len(rel) < len(path) else path


def format_summary(report: IngestReport, max_rows: int = 60) -> str:
    """The table printed at the end: file, instrument, spectra ingested, skipped, reason.

    With many files, only those with something to say are listed (up to `max_rows`); the JSON report has all.
    """
    rows = report.files
    if len(rows) > max_rows:
        rows = [f for f in rows if f.error or f.skipped or f.notes]
    shown = rows[:max_rows]
    header = ("file", "instrument", "ingested", "skipped", "reason")
    lines = []
    for f in shown:
        reason = f.reason
        if f.error and reason.startswith(f.file + ": "):
            reason = reason[len(f.file) + 2:]  # the file column already names it
        lines.append((_short(f.file), f.instrument or "-", str(f.n_ingested),
                      "file" if f.error else str(len(f.skipped)), reason))
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])
    fmt = lambda r: "  ".join(c.ljust(widths[i]) if i < 4 else c for i, c in enumerate(r))  # noqa: E731
    out = [fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in lines]
    if len(rows) > len(shown) or len(report.files) > len(rows):
        out.append(f"... {len(report.files) - len(shown)} more files not listed (all in the JSON report)")
    out.append(
        f"total: {report.n_ingested} spectra ingested from {len(report.files)} files "
        f"({report.n_skipped} spectra skipped, {report.n_failed_files} files not usable) "
        f"→ {report.output if report.written else 'nothing written'}"
        + (f" [{report.instrument}]" if report.instrument else "")
    )
    return "\n".join(out)
