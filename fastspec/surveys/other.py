"""Files no survey module reads: say what they look like and what it would take to ingest them, instead of
naming the first field a reader missed.
"""
from __future__ import annotations

from .base import text

READ = "fastspec reads SDSS/BOSS spec and spec-lite, SDSS DR7 spSpec and DESI coadd + redrock files"
BY_ARRAYS = ("read the spectra yourself and pass wavelengths, flux, inverse variance and redshifts to "
             "fastspec.ingest.from_arrays")


def _image_shape(head) -> tuple[int, ...]:
    naxis = int(head.get("NAXIS", 0) or 0)
    return tuple(int(head.get(f"NAXIS{k}", 0) or 0) for k in range(naxis, 0, -1))


def _columns(f, i: int, limit: int = 12) -> str:
    cols = f.columns(i)
    return ", ".join(cols[:limit]) + (f", … ({len(cols)} in all)" if len(cols) > limit else "")


def describe(f) -> str:
    """What the open FITS file `f` (`fastspec.fits`) is, as far as can be told, and what would be needed."""
    names = f.names
    head = f.header(0)
    prodcatg = text(head.get("PRODCATG", ""))
    if "FLUX" in names and "WAVE" in names and len(_image_shape(f.header(names.index("FLUX")))) == 3:
        return ("a MaNGA data cube (FLUX/IVAR/MASK with a WAVE axis): fastspec ingests one spectrum per object; "
                f"extract spectra from the cube (e.g. summed over an aperture), then {BY_ARRAYS}")
    if "FLUX" in names and "WAVE" in names:
        return (f"a MaNGA row-stacked spectra file (FLUX/IVAR/WAVE): its rows are fibers of one galaxy, not "
                f"galaxies; {BY_ARRAYS}")
    if prodcatg.upper().startswith("SCIENCE.SPECTRUM"):
        cols = _columns(f, 1) if len(names) > 1 else ""
        return (f"an ESO Phase 3 spectrum ({prodcatg}" + (f"; columns {cols}" if cols else "") + "): its "
                f"wavelength grid is not an SDSS, BOSS or DESI grid, and the redshift is not in the file; "
                f"resample it onto an instrument grid, then {BY_ARRAYS}")
    shape = _image_shape(head)
    if shape and ("CRVAL1" in head and ("CDELT1" in head or "CD1_1" in head)):
        kind = "log-linear" if int(head.get("DC-FLAG", 0) or 0) == 1 else "linear"
        return (f"an IRAF 1-D spectrum image (shape {shape}, {kind} grid from CRVAL1/CDELT1): it carries no "
                f"redshift and no inverse variance in a form fastspec knows; {BY_ARRAYS}")
    for i in range(1, len(names)):
        cols = f.columns(i)
        if cols:
            return (f"a table with columns {_columns(f, i)} (HDU {i}{' ' + names[i] if names[i] else ''}): "
                    f"{READ}; {BY_ARRAYS}")
    if shape:
        return f"an image of shape {shape} with no spectrum layout fastspec knows: {READ}; {BY_ARRAYS}"
    return f"a FITS file without data fastspec recognises (HDUs: {', '.join(n or '?' for n in names)}): {READ}"
