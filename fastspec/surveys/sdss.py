"""SDSS / BOSS `spec` and `spec-lite` files (DR8 and later): HDU1 COADD `loglam flux ivar and_mask`, HDU2
SPECOBJ / SPALL row with `Z Z_ERR SPECOBJID CLASS`. One spectrum per file, on the SDSS or BOSS log-linear grid.
"""
from __future__ import annotations

import os
import re

import numpy as np

from ..fits import FitsError, open_fits
from ..instruments import get_instrument
from .base import (
    DEFAULT_SPECTYPES,
    FileReport,
    IngestError,
    IngestTask,
    check_finite,
    hdu_index,
    normalised,
    on_grid,
    parse_object_id,
    skip_reason,
    source_columns,
    text,
)

NAME = "sdss"
FAMILY = "SDSS/BOSS"
LABEL = "SDSS/BOSS spectrum"
INSTRUMENTS = ("sdss", "boss")
KINDS = ("sdss",)
CATALOG_KINDS = ()
# SDSS-I/II plates are numbered below this; BOSS/eBOSS plates from it on (DR16 convention).
BOSS_FIRST_PLATE = 3510

_NAME = re.compile(r"^spec-(\d+)-(\d+)-(\d+)\.", re.IGNORECASE)


def recognise_name(name: str):
    """By the name spec-PLATE-MJD-FIBER: plate ≥ 3510 is the BOSS spectrograph (the DR16 convention)."""
    m = _NAME.match(name)
    if m:
        return "sdss", "boss" if int(m.group(1)) >= BOSS_FIRST_PLATE else "sdss"
    return None


def recognise(f):
    """A COADD HDU, or the PLATEID card of the spectro pipeline with a loglam table in HDU 1; BOSS when RUN2D is
    a v5 reduction, the plate is a BOSS plate, or the grid starts blueward of the SDSS grid."""
    head = f.header(0)
    coadd_table = len(f.names) > 1 and "loglam" in (c.lower() for c in f.columns(1))
    if "COADD" not in f.names and not ("PLATEID" in head and coadd_table):
        return None
    run2d = text(head.get("RUN2D", ""))
    if run2d:
        return "sdss", "boss" if run2d.lower().startswith("v") else "sdss"
    if "PLATEID" in head:
        return "sdss", "boss" if int(head["PLATEID"]) >= BOSS_FIRST_PLATE else "sdss"
    return "sdss", "boss" if float(head.get("COEFF0", 3.578)) < 3.5775 else "sdss"


def read(task: IngestTask):
    return read_sdss(task.path, task.instrument, task.spectypes, task.zwarn_zero, task.reader)


def read_sdss(path, instrument="sdss", spectypes=DEFAULT_SPECTYPES, zwarn_zero=False, reader="fast"):
    """One SDSS/BOSS spec or spec-lite file → (FileReport, Spectra or None) on `instrument`'s grid.

    Raises IngestError or FitsError (naming the file, HDU and field) when the file cannot be used at all.
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
        ci, clabel = hdu_index(f, ["COADD"], "COADD spectrum", index=1)
        mi, mlabel = hdu_index(f, ["SPECOBJ", "SPALL"], "SPECOBJ/SPALL", index=2)
        report.kind = "sdss-spec" if len(f.names) > 4 else "sdss-spec-lite"
        coadd = f.table(ci, ["loglam", "flux", "ivar", "and_mask"], clabel)
        meta_fields = ["Z", "Z_ERR", "SPECOBJID", "CLASS"]
        try:
            meta = f.table(mi, meta_fields + ["PLATE", "MJD", "FIBERID", "ZWARNING"], mlabel)
        except FitsError:
            meta = f.table(mi, meta_fields, mlabel)  # the message names the missing required field
    loglam = coadd["loglam"].astype(np.float64)
    flux, ivar, and_mask = coadd["flux"], coadd["ivar"], coadd["and_mask"]
    if loglam.ndim != 1 or loglam.size == 0:
        raise IngestError(f"{path}: HDU {clabel} field loglam has shape {loglam.shape}; expected 1-d pixels")
    check_finite(loglam, path, clabel, "loglam")
    check_finite(flux, path, clabel, "flux")
    check_finite(ivar, path, clabel, "ivar", nonneg=True)
    if meta["Z"].shape[0] != 1:
        raise IngestError(f"{path}: HDU {mlabel} has {meta['Z'].shape[0]} rows; expected the one row of this spectrum")
    row = {k: v[0] for k, v in meta.items()}
    for k in ("PLATE", "MJD", "FIBERID", "ZWARNING"):
        row[k] = int(row[k]) if k in row else -1
    report.n_spectra = 1
    z = float(row["Z"])
    object_id = parse_object_id(row["SPECOBJID"], path, mlabel)
    spectype = text(row["CLASS"])
    if not np.isfinite(z):
        raise IngestError(f"{path}: HDU {mlabel} row 0 field Z is {z}")
    reason = skip_reason(spectype, row["ZWARNING"], spectypes, zwarn_zero, "CLASS", "ZWARNING")
    if reason:
        report.skipped.append({"row": 0, "object_id": int(object_id), "reason": reason})
        return report, None
    raw_flux, raw_ivar, bad = on_grid(report, inst, 10.0**loglam, flux, ivar, and_mask, path,
                                      f"{clabel} field loglam")
    extra = source_columns([0], row["PLATE"], row["MJD"], row["FIBERID"], spectype, row["ZWARNING"])
    return report, normalised(report, inst, raw_flux, raw_ivar, bad, [z], [float(row["Z_ERR"])], [object_id],
                              [0], extra)
