"""DESI `coadd` files (cameras B/R/Z on the 0.8 Å lattice, FIBERMAP with TARGETID) with the redshifts of their
`redrock` (or `zbest`) files, which are recognised here too and paired with the coadds they belong to.
"""
from __future__ import annotations

import os
import re

import numpy as np

from ..fits import open_fits
from ..instruments import get_instrument
from ..prep import bad_pixel_mask
from .base import (
    DEFAULT_SPECTYPES,
    FileReport,
    IngestError,
    IngestTask,
    check_finite,
    hdu_index,
    normalised,
    skip_reason,
    sky_mask,
    snap,
    source_columns,
    text,
)

NAME = "desi"
FAMILY = "DESI"
LABEL = "DESI coadd"
INSTRUMENTS = ("desi",)
KINDS = ("desi-coadd",)
CATALOG_KINDS = ("redrock",)

_COADD_NAME = re.compile(r"^coadd-(.+)$", re.IGNORECASE)
_REDROCK_NAME = re.compile(r"^(?:redrock|zbest)-(.+)$", re.IGNORECASE)


def recognise_name(name: str):
    if _COADD_NAME.match(name):
        return "desi-coadd", "desi"
    if _REDROCK_NAME.match(name):
        return "redrock", "desi"
    return None


def recognise(f):
    if any(n.endswith("_FLUX") for n in f.names):
        return "desi-coadd", "desi"
    if "REDSHIFTS" in f.names or "ZBEST" in f.names:
        return "redrock", "desi"
    return None


def redrock_beside(path: str) -> str:
    """The redrock file named after a coadd, in its folder."""
    d, name = os.path.split(path)
    m = _COADD_NAME.match(name)
    return os.path.join(d, f"redrock-{m.group(1)}" if m else f"redrock-{name}")


def _suffix(path: str, pattern) -> str | None:
    m = pattern.match(os.path.basename(path))
    return m.group(1) if m else None


def pair_catalogs(coadds: list[str], redrocks: list[str]) -> dict[str, tuple]:
    """The redrock file(s) of each coadd: the one named after it among the inputs, else the one beside it on
    disk, else every input redrock file not named after another coadd (matched by TARGETID)."""
    by_suffix: dict = {}
    for r in redrocks:
        by_suffix.setdefault(_suffix(r, _REDROCK_NAME) or os.path.basename(r), r)
    coadd_suffixes = {s for s in (_suffix(c, _COADD_NAME) for c in coadds) if s}
    name_paired = {r for sfx, r in by_suffix.items() if sfx in coadd_suffixes}
    out = {}
    for c in coadds:
        sfx = _suffix(c, _COADD_NAME)
        explicit = by_suffix.get(sfx) if sfx else None
        beside = redrock_beside(c)
        if explicit:
            out[c] = (explicit,)
        elif os.path.exists(beside):
            out[c] = (beside,)
        else:
            out[c] = tuple(r for r in redrocks if r not in name_paired)
    return out


def catalog_note(used: bool) -> str:
    """The report note of a redrock file given as input (it is not ingested itself)."""
    if used:
        return "redshift catalog, used for the DESI coadd(s) it matches"
    return "redshift catalog; no coadd being ingested uses it"


def read(task: IngestTask):
    return read_desi(task.path, task.catalogs, task.instrument, task.spectypes, task.zwarn_zero, task.reader)


def _read_redshifts(paths, reader="fast") -> dict:
    """TARGETID → (Z, ZERR, ZWARN, SPECTYPE) from redrock/zbest REDSHIFTS tables (first file wins)."""
    out = {}
    for rr in paths:
        with open_fits(rr, reader) as f:
            i, label = hdu_index(f, ["REDSHIFTS", "ZBEST"], "REDSHIFTS")
            t = f.table(i, ["TARGETID", "Z", "ZERR", "ZWARN", "SPECTYPE"], label)
        for k in range(t["TARGETID"].size):
            out.setdefault(int(t["TARGETID"][k]),
                           (float(t["Z"][k]), float(t["ZERR"][k]), int(t["ZWARN"][k]), text(t["SPECTYPE"][k])))
    return out


def read_desi(path, redrock, instrument="desi", spectypes=DEFAULT_SPECTYPES, zwarn_zero=False, reader="fast"):
    """One DESI coadd file + its redrock file(s) → (FileReport, Spectra or None) on the DESI grid; raises
    IngestError or FitsError (naming the file, HDU and field) when the file cannot be used at all.

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
        raise IngestError(f"{path}: no redrock file found (expected {redrock_beside(path)}); pass it as an input")
    L = inst.L
    with open_fits(path, reader) as f:
        names = f.names
        cameras = [n[: -len("_WAVELENGTH")] for n in names if n.endswith("_WAVELENGTH")]
        if not cameras:
            raise IngestError(f"{path}: no *_WAVELENGTH HDU; not a DESI coadd file (HDUs: {', '.join(names)})")
        fi, flabel = hdu_index(f, ["FIBERMAP"], "FIBERMAP")
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
            check_finite(wave, path, f"{cam}_WAVELENGTH", "wavelength")
            check_finite(flux, path, f"{cam}_FLUX", "flux")
            check_finite(ivar, path, f"{cam}_IVAR", "ivar", nonneg=True)
            idx, keep = snap(inst, wave, path, f"{cam}_WAVELENGTH")
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
    bad = bad_pixel_mask(raw_ivar, None, sky_mask(inst.name)[None, :])

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
        else:
            reason = skip_reason(info[3], info[2], spectypes, zwarn_zero, "SPECTYPE", "ZWARN")
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
    extra = source_columns(rows, -1, -1, -1, spectype, zwarn)
    return report, normalised(report, inst, raw_flux[rows], raw_ivar[rows], bad[rows], z, z_err,
                              targetid[rows].astype(np.uint64), rows, extra)
