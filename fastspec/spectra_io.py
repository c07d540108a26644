"""Open any spectra file fastspec reads: a fastspec file or a Multimodal Universe file, told apart by content.

Both readers build on `fastspec.spectra` and never import each other; this module is the one place that knows
them both.
"""
from __future__ import annotations

import os

import h5py

from .h5format import FORMAT, SpectraFile
from .instruments import Instrument
from .mmu import MMUSpectraFile
from .spectra import SpectraFormatError, SpectraReader, attr_str, open_hdf5

READERS: dict[str, type[SpectraReader]] = {"fastspec": SpectraFile, "mmu": MMUSpectraFile}


def file_kind(h5: h5py.File) -> str | None:
    """"fastspec" (its format attribute), "mmu" (a spectrum_lambda field) or None for an open HDF5 file."""
    if attr_str(h5.attrs.get("format")) == FORMAT:
        return "fastspec"
    if "spectrum_lambda" in h5:
        return "mmu"
    return None


def not_spectra_message(h5: h5py.File) -> str:
    """Why an HDF5 file is neither kind (after the file name)."""
    return (f"neither a fastspec spectra file (format attribute {attr_str(h5.attrs.get('format'))!r}) "
            "nor a Multimodal Universe spectra file (no spectrum_lambda field)")


def open_spectra(path, instrument: str | Instrument | None = None) -> SpectraReader:
    """A reader for `path`, whichever of the two kinds it is; both offer the `SpectraReader` interface."""
    path = os.fspath(path)
    with open_hdf5(path) as h5:
        kind, why = file_kind(h5), not_spectra_message(h5)
    if kind is None:
        raise SpectraFormatError(f"{path}: {why}")
    return READERS[kind](path, instrument=instrument)


__all__ = ["READERS", "file_kind", "not_spectra_message", "open_spectra"]
