"""SDSS DR7 `spSpec-MJD-PLATE-FIBER.fit` files: the format of the SDSS-I/II Main Galaxy Sample as DR7 released it.

The primary HDU is an image of one spectrum, one quantity per row (DR7 data model, spSpec): flux, continuum-
subtracted flux, error (standard deviation), pixel mask (a 5th row, where present, is not used). Units are
1e-17 erg/s/cm²/Å, wavelengths are vacuum, on the log-linear grid ``10**(COEFF0 + COEFF1·i)`` (the SDSS lattice
of 1e-4 dex). The header carries the redshift (`Z`, `Z_ERR`), the class (`SPEC_CLN`), `Z_WARNIN`, `PLATEID`,
`MJD` and `FIBERID`.

Read here: ivar = 1/error², and 0 (pixel masked) where the error is ≤ 0 or not finite, or where the mask has a
bad bit. The mask bits are the spectro pixel mask (NOPLUG … REDMONSTER) plus spectro1d's EMLINE (bit 30,
"emission line detected here"), which is information, not a defect: every bit but EMLINE marks a bad pixel,
as every and_mask bit does for DR8+ files. object_id is the SPECOBJID DR8 and later give the same plate, MJD and
fiber (the SDSS-I/II reduction run2d 26), so a spectrum keeps one id across releases.
"""
from __future__ import annotations

import os
import re

import numpy as np

from ..fits import open_fits
from ..instruments import get_instrument
from .base import (
    DEFAULT_SPECTYPES,
    FileReport,
    IngestError,
    IngestTask,
    check_finite,
    normalised,
    on_grid,
    skip_reason,
    source_columns,
)

NAME = "sdss-dr7"
LABEL = "SDSS DR7 spSpec spectrum"
FAMILY = "SDSS/BOSS"
INSTRUMENTS = ("sdss", "boss")
KINDS = ("sdss-dr7",)
CATALOG_KINDS = ()

ROW_FLUX, ROW_ERROR, ROW_MASK = 0, 2, 3
EMLINE = 1 << 30  # spectro1d: "emission line detected here"; not a defect
# SPEC_CLN (DR7 SpecClass) in the CLASS vocabulary of DR8+ files, so --spectype means the same for both.
SPEC_CLASSES = {0: "UNKNOWN", 1: "STAR", 2: "GALAXY", 3: "QSO", 4: "QSO", 5: "SKY", 6: "STAR", 7: "GALAXY"}
RUN2D_SDSS = 26  # the DR8+ reduction of SDSS-I/II plates, part of their SPECOBJID

_NAME = re.compile(r"^spSpec-(\d+)-(\d+)-(\d+)\.fits?(\.gz)?$", re.IGNORECASE)


def recognise_name(name: str):
    return ("sdss-dr7", "sdss") if _NAME.match(name) else None


def recognise(f):
    """A primary image of ≥ 4 rows with the COEFF0/COEFF1 grid and a redshift in its header."""
    head = f.header(0)
    if int(head.get("NAXIS", 0)) != 2 or int(head.get("NAXIS2", 0)) < 4:
        return None
    if all(k in head for k in ("COEFF0", "COEFF1", "Z")):
        return "sdss-dr7", "sdss"
    return None


def specobjid(plate: int, mjd: int, fiber: int, run2d: int = RUN2D_SDSS) -> np.uint64:
    """The DR8+ SPECOBJID: plate (14 bits) | fiber (12) | MJD − 50000 (14) | run2d (14) | 0 (10), from the top."""
    return np.uint64((plate << 50) | (fiber << 38) | ((mjd - 50000) << 24) | (run2d << 10))


def read(task: IngestTask):
    return read_sdss_dr7(task.path, task.instrument, task.spectypes, task.zwarn_zero, task.reader)


def read_sdss_dr7(path, instrument="sdss", spectypes=DEFAULT_SPECTYPES, zwarn_zero=False, reader="fast"):
    """One DR7 spSpec file → (FileReport, Spectra or None) on `instrument`'s grid (SDSS or BOSS).

    Raises IngestError or FitsError (naming the file, HDU and header card) when the file cannot be used.
    """
    path = os.fspath(path)
    inst = get_instrument(instrument)
    report = FileReport(file=path, instrument=inst.name, kind="sdss-dr7-spspec")
    if not inst.loglinear:
        raise IngestError(f"{path}: an SDSS spectrum cannot go on the {inst.name} grid; ingest SDSS/BOSS and DESI "
                          "files into separate outputs")
    with open_fits(path, reader) as f:
        head = f.header(0)
        image = f.image(f.names[0])
    label = "0 (primary)"
    if image.ndim != 2 or image.shape[0] < 4:
        raise IngestError(f"{path}: HDU {label} has shape {image.shape}; a spSpec image has 4 or more rows "
                          "(flux, continuum-subtracted flux, error, mask)")
    card = {}
    for key in ("COEFF0", "COEFF1", "Z", "Z_ERR", "PLATEID", "MJD", "FIBERID"):
        if key not in head:
            raise IngestError(f"{path}: HDU {label} header has no {key} card")
        try:
            card[key] = float(head[key])
        except (TypeError, ValueError):
            raise IngestError(f"{path}: HDU {label} header card {key} = {head[key]!r} is not a number") from None
    plate, mjd, fiber = int(card["PLATEID"]), int(card["MJD"]), int(card["FIBERID"])
    zwarn = int(head.get("Z_WARNIN", head.get("ZWARNING", 0)))
    spectype = SPEC_CLASSES.get(int(head.get("SPEC_CLN", 0)), "UNKNOWN")
    object_id = specobjid(plate, mjd, fiber)
    z = card["Z"]
    report.n_spectra = 1
    if not np.isfinite(z):
        raise IngestError(f"{path}: HDU {label} header card Z is {z}")
    reason = skip_reason(spectype, zwarn, spectypes, zwarn_zero, "SPEC_CLN", "Z_WARNIN")
    if reason:
        report.skipped.append({"row": 0, "object_id": int(object_id), "reason": reason})
        return report, None

    flux = image[ROW_FLUX].astype(np.float64)
    error = image[ROW_ERROR].astype(np.float64)
    check_finite(flux, path, label, "row 0 (flux)")
    check_finite(image[ROW_MASK], path, label, "row 3 (mask)")
    mask = image[ROW_MASK].astype(np.int64)  # bit patterns stored as float32 values
    with np.errstate(divide="ignore", invalid="ignore"):
        good = np.isfinite(error) & (error > 0) & ((mask & ~EMLINE) == 0)
        ivar = np.where(good, 1.0 / np.where(good, error, 1.0) ** 2, 0.0)
    wave = 10.0 ** (card["COEFF0"] + card["COEFF1"] * np.arange(flux.size))
    raw_flux, raw_ivar, bad = on_grid(report, inst, wave, flux, ivar, (~good).astype(np.int64), path,
                                      f"{label} COEFF0/COEFF1 grid")
    extra = source_columns([0], plate, mjd, fiber, spectype, zwarn)
    return report, normalised(report, inst, raw_flux, raw_ivar, bad, [z], [card["Z_ERR"]], [object_id], [0],
                              extra)
