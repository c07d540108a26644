"""What every survey reader shares: the task it is given, the report entry it fills, and the steps from a file's
pixels to `Spectra` — snapping onto the instrument grid by an integer offset, the bad-pixel mask, the
normalisation (rows without one are skipped with a reason) and the `source/*` columns.

A survey module (`fastspec.surveys.sdss`, `desi`, `sdss_dr7`) offers:

    NAME, LABEL                 its name, and what one of its files is called in messages
    FAMILY, INSTRUMENTS         the grid family it belongs to ("SDSS/BOSS", "DESI") and the instruments its
                                spectra can be put on (the first is the default)
    KINDS                       the file kinds it reads (FileReport.kind of its tasks)
    CATALOG_KINDS               kinds it recognises but does not read: catalogs its files need (may be empty)
    recognise_name(name)        (kind, instrument guess) from a file name alone, or None
    recognise(f)                the same from an open FITS file (`fastspec.fits`), or None
    read(task)                  (FileReport, Spectra or None); raises IngestError / FitsError for a file
                                that cannot be used at all
    pair_catalogs(files, catalogs)   (only with CATALOG_KINDS) file -> the catalogs it needs
    catalog_note(used)          (only with CATALOG_KINDS) the report note of a catalog given as input
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from ..errors import FastspecError
from ..instruments import NORM_WINDOW, Instrument, InstrumentError, get_instrument
from ..prep import apply_normalization, bad_pixel_mask, normalization
from ..spectra import Spectra

DEFAULT_SPECTYPES = ("GALAXY",)


class IngestError(FastspecError, ValueError):
    """A file or spectrum that cannot be ingested; the message names the file, HDU / row and field."""


@dataclass
class FileReport:
    """What happened to one input file (one entry of the machine-readable report)."""

    file: str
    kind: str = "unknown"  # sdss-spec, sdss-spec-lite, sdss-dr7-spspec, desi-coadd, redrock, arrays, unknown
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
    """One file to read, with everything a worker process needs (it is pickled to the pool)."""

    path: str
    kind: str  # one of its survey's KINDS
    instrument: str
    catalogs: tuple = ()  # the redshift catalogs it needs (DESI redrock files)
    spectypes: tuple | None = DEFAULT_SPECTYPES
    zwarn_zero: bool = False
    reader: str = "fast"


def hdu_index(f, names, what: str, index: int | None = None) -> tuple[int, str]:
    """(i, label "i (NAME)") of the first HDU named in `names`, else HDU `index`; IngestError otherwise."""
    have = f.names
    for name in names:
        if name in have:
            i = have.index(name)
            return i, f"{i} ({name})"
    if index is not None and len(have) > index:
        return index, f"{index} ({have[index] or 'unnamed'})"
    raise IngestError(f"{f.path}: no {what} HDU (looked for {', '.join(names)}; the file has {', '.join(have)})")


def text(value) -> str:
    """A FITS string value (bytes or str) without its padding."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip()


def parse_object_id(value, path: str, label: str, name: str = "SPECOBJID") -> np.uint64:
    """SPECOBJID / TARGETID / OBJID as uint64: SDSS writes it as a string or as (u)int64 (DR16 ids pass 2**63)."""
    try:
        if isinstance(value, (bytes, str, np.bytes_, np.str_)):
            iv = int(text(value))
        else:
            iv = int(value)
    except (TypeError, ValueError):
        raise IngestError(f"{path}: HDU {label} field {name} {value!r} is not an integer id") from None
    if iv < 0:
        iv += 1 << 64  # an unsigned id stored in a signed int64 without TZERO
    if not 0 <= iv < (1 << 64):
        raise IngestError(f"{path}: HDU {label} field {name} {iv} does not fit in 64 bits")
    return np.uint64(iv)


def check_finite(arr: np.ndarray, path: str, label: str, name: str, nonneg: bool = False):
    """IngestError naming the field and the first bad element when `arr` holds NaN/inf (or, with `nonneg`,
    negative values)."""
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
def sky_mask(name: str) -> np.ndarray:
    """The instrument's bright-sky-line mask (L,), read-only and cached per process."""
    sky = get_instrument(name).sky_mask()
    sky.setflags(write=False)
    return sky


def snap(inst: Instrument, wave: np.ndarray, path: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Grid indices of the file pixels that land on the grid, and the selector of those file pixels."""
    try:
        offset = inst.snap_offset(wave, where=f"{path}: HDU {label}")
    except InstrumentError as err:
        raise IngestError(f"{err}; the file is corrupted or not on the {inst.name} lattice") from None
    idx = offset + np.arange(wave.size)
    keep = (idx >= 0) & (idx < inst.L)
    return idx[keep], keep


def dropped_note(inst: Instrument, keep: np.ndarray, ivar: np.ndarray) -> str:
    """The report note for file pixels that fall outside the instrument grid."""
    n_good = int(((ivar > 0) & ~keep).sum())
    return (f"{int((~keep).sum())} pixels outside the {inst.name} grid ({inst.wave_min:.0f}–{inst.wave_max:.0f} Å) "
            f"dropped ({n_good} with ivar > 0)")


def on_grid(report: FileReport, inst, wave, flux, ivar, pipeline_mask, path: str, label: str):
    """One spectrum's pixels on the grid as (1, L) raw flux, raw ivar and bad-pixel mask (pipeline mask,
    ivar ≤ 0, sky lines, grid pixels without data); pixels off the grid are dropped with a note."""
    idx, keep = snap(inst, wave, path, label)
    if not keep.all():
        report.notes.append(dropped_note(inst, keep, ivar))
    if idx.size == 0:
        raise IngestError(f"{path}: no pixel of the spectrum lies on the {inst.name} grid")
    L = inst.L
    raw_flux = np.zeros((1, L), np.float64)
    raw_ivar = np.zeros((1, L), np.float64)
    pipe = np.ones((1, L), np.int64)  # grid pixels without data count as pipeline-masked
    raw_flux[0, idx] = flux[keep]
    raw_ivar[0, idx] = ivar[keep]
    pipe[0, idx] = pipeline_mask[keep]
    return raw_flux, raw_ivar, bad_pixel_mask(raw_ivar, pipe, sky_mask(inst.name)[None, :])


def skip_reason(spectype: str, zwarn: int, spectypes, zwarn_zero: bool, class_field: str, zwarn_field: str):
    """Why a spectrum of this class and redshift warning is not wanted (naming the survey's fields), or None."""
    if spectypes is not None and spectype.upper() not in spectypes:
        return f"{class_field} {spectype} not in {','.join(spectypes)} (see --spectype)"
    if zwarn_zero and zwarn != 0:
        return f"{zwarn_field}={zwarn} (unreliable redshift; --zwarn-zero set)"
    return None


def source_columns(row, plate, mjd, fiber, spectype, zwarn) -> dict:
    """The `source/*` columns ingest writes: where each spectrum came from and what the pipeline said of it."""
    row = np.asarray(row, np.int32)
    n = row.size
    return {
        "source/row": row,
        "source/plate": np.broadcast_to(np.asarray(plate, np.int32), n).copy(),
        "source/mjd": np.broadcast_to(np.asarray(mjd, np.int32), n).copy(),
        "source/fiber": np.broadcast_to(np.asarray(fiber, np.int32), n).copy(),
        "source/class": np.array([text(s).encode()[:16] for s in np.atleast_1d(spectype)], "S16"),
        "source/zwarn": np.broadcast_to(np.asarray(zwarn, np.int32), n).copy(),
    }


def _norm_reason(n_good: int, lo: float, hi: float, z: float) -> str:
    window = f"{NORM_WINDOW[0]:.0f}–{NORM_WINDOW[1]:.0f} Å"
    if n_good == 0:
        return (f"no valid normalisation: no unmasked pixel with ivar > 0 in the restframe window {window} "
                f"(observed {lo:.0f}–{hi:.0f} Å at z={z:.4f})")
    return f"no valid normalisation: median flux over the {n_good} good pixels of the restframe window {window} " \
        "is not positive"


def normalised(report: FileReport, inst: Instrument, raw_flux, raw_ivar, bad, z, z_err, object_id, rows,
               extra: dict) -> Spectra | None:
    """The candidate rows (file rows `rows`, raw values on the grid, `bad` = True where masked) normalised
    (DESIGN §1); rows without a valid norm go to ``report.skipped`` with the reason. Sets
    ``report.n_ingested``; None when no row is left.

    The norm is the median flux in the restframe window over pixels that are not bad (the loss weights > 0).
    It is rounded to float32 before dividing, so that stored flux · stored norm reproduces the raw flux.
    """
    z = np.asarray(z, np.float64)
    object_id = np.asarray(object_id, np.uint64)
    weights = np.where(bad, 0.0, raw_ivar)
    norm = normalization(raw_flux, weights, inst.wave_obs, z)
    ok = np.isfinite(norm)
    wave = inst.wave_obs
    for i in np.flatnonzero(~ok):
        lo, hi = NORM_WINDOW[0] * (1 + z[i]), NORM_WINDOW[1] * (1 + z[i])
        n_good = int(((wave >= lo) & (wave <= hi) & (weights[i] > 0)).sum())
        report.skipped.append({"row": int(rows[i]), "object_id": int(object_id[i]),
                               "reason": _norm_reason(n_good, lo, hi, z[i])})
    report.n_ingested = int(ok.sum())
    if not ok.any():
        return None
    norm32 = norm[ok].astype(np.float32)
    flux, ivar = apply_normalization(raw_flux[ok], raw_ivar[ok], norm32.astype(np.float64))
    return Spectra(flux=flux, ivar=ivar, mask=bad[ok], z=z[ok], z_err=np.asarray(z_err, np.float32)[ok],
                   object_id=object_id[ok], norm=norm32, extra={k: v[ok] for k, v in extra.items()})
