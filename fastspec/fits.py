"""Reading FITS files: a fast reader of exactly the fields asked for, and astropy as the reference.

Two readers with one interface (`names`, `header(i)`, `columns(i)`, `table(i, fields, label)`, `image(name)`,
`close()`), opened by `open_fits(path, reader)`: "fast" parses the header cards itself and reads only the table
fields / images it is asked for; "astropy" goes through astropy.io.fits. astropy builds a Column object per
table field on first access, ~25 ms for a 126-field SPECOBJ row — most of the time of an ingest — so "fast" is
the default and astropy the reference (the tests compare what ingest wrote with astropy-read values;
bench/bench_ingest.py times both). Every failure is a `FitsError` naming the file, HDU and field.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import re
import warnings

import numpy as np

from .errors import FastspecError


class FitsError(FastspecError, ValueError):
    """A FITS file that cannot be read as asked; the message names the file, HDU and field."""


def _native_order(arr: np.ndarray) -> np.ndarray:
    return arr.astype(arr.dtype.newbyteorder("=")) if arr.dtype.byteorder == ">" else arr


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
        return _native_order(arr)
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
                raise FitsError(f"{self.path}: file is truncated inside the header of HDU {len(self.hdus)}; "
                                "incomplete download? fetch it again")
            text = block.decode("latin-1")
            if first:
                key0 = text[:8]
                if pos == 0 and key0 != "SIMPLE  ":
                    raise FitsError(f"{self.path}: not a FITS file (does not start with SIMPLE)")
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
                raise FitsError(f"{self.path}: HDU {len(self.hdus)} header has no END card")

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
                raise FitsError(f"{self.path}: HDU {i} header is damaged ({type(err).__name__}: {err})") from None
            if nbytes and naxis == 0:
                nbytes = 0
            name = str(header.get("EXTNAME", "PRIMARY" if i == 0 else "")).strip().upper()
            self.hdus.append((name, header, data_start, nbytes))
            end = data_start + nbytes
            if size is not None and end > size:
                raise FitsError(
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
                raise FitsError(f"{self.path}: file is truncated; incomplete download? fetch it again")

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
            raise FitsError(f"{self.path}: HDU {i} ({name}) {what} is cut short; the file is truncated")
        return raw

    def columns(self, i: int) -> list[str]:
        """The field names of binary table HDU i ([] for an image)."""
        h = self.header(i)
        if str(h.get("XTENSION", "")).strip() != "BINTABLE":
            return []
        return [str(h.get(f"TTYPE{k}", f"col{k}")).strip() for k in range(1, int(h.get("TFIELDS", 0)) + 1)]

    def table(self, i: int, fields, label: str) -> dict:
        h = self.header(i)
        if str(h.get("XTENSION", "")).strip() != "BINTABLE":
            raise FitsError(f"{self.path}: HDU {label} is not a binary table (looking for {', '.join(fields)})")
        row_bytes, nrows, nfields = int(h["NAXIS1"]), int(h["NAXIS2"]), int(h.get("TFIELDS", 0))
        layout, offset = {}, 0
        for k in range(1, nfields + 1):
            tform = str(h.get(f"TFORM{k}", ""))
            m = _TFORM.match(tform)
            if not m:
                raise FitsError(f"{self.path}: HDU {label} column {k} has an unreadable TFORM {tform!r}")
            rep, code = int(m.group(1) or 1), m.group(2)
            width = (rep + 7) // 8 if code == "X" else rep * _TSIZE[code]
            ttype = str(h.get(f"TTYPE{k}", f"col{k}")).strip()
            layout.setdefault(ttype.lower(), (ttype, k, rep, code, offset))
            offset += width
        if offset != row_bytes:
            raise FitsError(f"{self.path}: HDU {label} columns add up to {offset} bytes, NAXIS1 says {row_bytes}")
        names, formats, offsets, picked = [], [], [], []
        for f in fields:
            if f.lower() not in layout:
                have = ", ".join(v[0] for v in layout.values())
                raise FitsError(f"{self.path}: HDU {label} has no field {f} (fields: {have})")
            ttype, k, rep, code, off = layout[f.lower()]
            if code == "X":
                raise FitsError(f"{self.path}: HDU {label} field {f} is a bit array; not supported")
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
            raise FitsError(f"{self.path}: no HDU {name}")
        i = self.names.index(name)
        h = self.header(i)
        naxis = int(h["NAXIS"])
        if naxis == 0:
            raise FitsError(f"{self.path}: HDU {name} holds no data")
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
        with warnings.catch_warnings(record=True) as caught:  # open_fits turns exceptions into FitsError
            warnings.simplefilter("always")
            self.hdul = fits.open(path, memmap=False, lazy_load_hdus=True)
            try:
                len(self.hdul)  # reads every header; astropy warns when data run past the end of file
            except Exception:
                self.hdul.close()
                raise
        for w in caught:
            msg = str(w.message)
            if "truncated" in msg.lower():
                self.hdul.close()
                m = re.search(r"actual file length \((\d+)\).*expected size \((\d+)\)", msg)
                detail = f" ({m.group(1)} bytes, its headers need {m.group(2)})" if m else ""
                raise FitsError(f"{path}: file is truncated{detail}; incomplete download? fetch it again")
        self.names = [h.name.upper() for h in self.hdul]

    def header(self, i: int):
        return self.hdul[i].header

    def columns(self, i: int) -> list[str]:
        cols = getattr(self.hdul[i], "columns", None)
        return [] if cols is None else list(cols.names)

    def table(self, i: int, fields, label: str) -> dict:
        hdu = self.hdul[i]
        if getattr(hdu, "columns", None) is None:
            raise FitsError(f"{self.path}: HDU {label} is not a binary table (looking for {', '.join(fields)})")
        try:
            data = hdu.data
            cols = {c.lower(): c for c in hdu.columns.names}
        except Exception as err:
            raise FitsError(f"{self.path}: HDU {label} cannot be read ({type(err).__name__}: {err})") from None
        out = {}
        for f in fields:
            if f.lower() not in cols:
                raise FitsError(f"{self.path}: HDU {label} has no field {f} (fields: {', '.join(hdu.columns.names)})")
            arr = np.asarray(data[cols[f.lower()]])
            out[f] = _native_order(arr)
        return out

    def image(self, name: str) -> np.ndarray:
        try:
            data = self.hdul[name].data
        except KeyError:
            raise FitsError(f"{self.path}: no HDU {name}") from None
        except Exception as err:
            raise FitsError(f"{self.path}: HDU {name} cannot be read ({type(err).__name__}: {err})") from None
        if data is None:
            raise FitsError(f"{self.path}: HDU {name} holds no data")
        return _native_order(np.asarray(data))

    def close(self):
        self.hdul.close()


READERS = {"fast": _FastFits, "astropy": _AstropyFits}


@contextlib.contextmanager
def open_fits(path: str, reader: str = "fast"):
    """Open `path` with the named reader; FitsError (naming the file) when it cannot be read."""
    if reader not in READERS:
        raise ValueError(f"unknown FITS reader {reader!r}; known: {', '.join(READERS)}")
    try:
        f = READERS[reader](path)
    except FitsError:
        raise
    except FileNotFoundError:
        raise FitsError(f"{path}: no such file") from None
    except EOFError:
        raise FitsError(f"{path}: file is truncated (the compressed stream ends early); "
                        "incomplete download? fetch it again") from None
    except Exception as err:
        raise FitsError(f"{path}: cannot be read as FITS ({type(err).__name__}: {err})") from None
    try:
        yield f
    finally:
        f.close()
