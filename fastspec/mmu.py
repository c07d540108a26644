"""Read Multimodal Universe (MMU) spectra files through the common reader interface (`fastspec.spectra`).

MMU's builders write one HDF5 file per HEALPix pixel, every column a top-level dataset of N rows:
`spectrum_lambda` (N, Lmax) per row, padded at the end with lambda = −1 (mask True, ivar 0, edge flux
repeated); `spectrum_flux`, `spectrum_ivar`, `spectrum_mask` (True = bad); `Z` with `Z_ERR` (SDSS) or `ZERR`
(DESI); `object_id`. Arrays read from FITS may be big-endian and lambdas are float32.

Reading a row block here:
* snaps each row onto the instrument grid by an integer offset (the instrument is given, or inferred from the
  lambdas: the smallest known grid the pixels lie on that covers the file's wavelength range); pixels outside
  the grid are dropped, grid pixels without data get ivar 0 / mask True;
* builds the mask as ingest does: MMU mask | ivar ≤ 0 | bright sky lines;
* normalises like ingest (MMU flux is not normalised): norm = median flux in the restframe window over pixels
  with nonzero weight; rows without a valid norm keep their raw flux and ivar with norm = NaN, and
  `fastspec.validate.find_bad_rows` reports them ("norm: not finite");
* rows whose lambdas are not on the grid are left fully masked and reported in `Spectra.problems`.

object_id is returned as stored: integers as native-endian ints, strings as a bytes array (numpy 'S'; SDSS
SPECOBJID strings keep their padding). Writing such rows with `SpectraWriter` parses decimal strings to uint64.
A file without Z_ERR/ZERR reads z_err as NaN.
"""
from __future__ import annotations

import numpy as np

from .instruments import Instrument, InstrumentError, get_instrument, infer_instrument
from .prep import apply_normalization, bad_pixel_mask, normalization
from .spectra import Spectra, SpectraFormatError, SpectraReader, native, row_range

# MMU lambdas are float32: ~3e-4 pixel of rounding on these grids, far inside this tolerance.
SNAP_TOL_PIXELS = 0.05
_SPECTRAL = ("spectrum_lambda", "spectrum_flux", "spectrum_ivar")
_ID_FIELDS = ("object_id", "TARGETID", "SPECOBJID")
_ZERR_FIELDS = ("Z_ERR", "ZERR")


def _valid_lambda(lam: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.isfinite(lam) & (lam > 0)


class MMUSpectraFile(SpectraReader):
    """Reader for an MMU spectra file; rows come back on the instrument grid, normalised (see module doc)."""

    kind = "mmu"

    def __init__(self, path, instrument: str | Instrument | None = None):
        super().__init__(path, instrument)

    def _open(self, instrument):
        h = self.h5
        missing = [c for c in (*_SPECTRAL, "Z") if c not in h]
        if missing:
            raise SpectraFormatError(f"{self.path}: not an MMU spectra file: missing field(s) {', '.join(missing)}")
        self._n = int(h["Z"].shape[0]) if h["Z"].ndim == 1 else -1
        if self._n < 0:
            raise SpectraFormatError(f"{self.path}: field Z has shape {h['Z'].shape}, expected (N,)")
        shape = h["spectrum_lambda"].shape
        if len(shape) != 2 or shape[0] != self._n:
            raise SpectraFormatError(
                f"{self.path}: field spectrum_lambda has shape {shape}, expected ({self._n}, Lmax) to match Z"
            )
        for name in ("spectrum_flux", "spectrum_ivar", "spectrum_mask"):
            if name in h and h[name].shape != shape:
                raise SpectraFormatError(
                    f"{self.path}: field {name} has shape {h[name].shape}, expected {shape} like spectrum_lambda"
                )
        self._id_field = next((c for c in _ID_FIELDS if c in h), None)
        self._zerr_field = next((c for c in _ZERR_FIELDS if c in h), None)
        for name in (self._id_field, self._zerr_field):
            if name is not None and h[name].shape != (self._n,):
                raise SpectraFormatError(f"{self.path}: field {name} has shape {h[name].shape}, expected ({self._n},)")
        if self._id_field is None:
            raise SpectraFormatError(f"{self.path}: no object id field (looked for {', '.join(_ID_FIELDS)})")

        if self._n == 0 and instrument is None:
            raise SpectraFormatError(f"{self.path}: no rows to infer the instrument from; pass instrument=")
        self.instrument = self._instrument(instrument) if self._n else get_instrument(instrument)
        self.wave_obs = self.instrument.wave_obs
        self._sky = self.instrument.sky_mask()

    def _first_row_lambdas(self) -> tuple[int, np.ndarray]:
        lam_ds = self.h5["spectrum_lambda"]
        for r in range(min(self._n, 64)):
            lam = native(lam_ds[r]).astype(np.float64)
            lam = lam[_valid_lambda(lam)]
            if lam.size:
                return r, lam
        raise SpectraFormatError(f"{self.path}: spectrum_lambda: no row among the first 64 has lambda > 0")

    def _instrument(self, instrument) -> Instrument:
        row, lam = self._first_row_lambdas()
        if instrument is not None:
            inst = get_instrument(instrument)
            try:
                inst.snap_offset(lam, tol=SNAP_TOL_PIXELS, where=f"{self.path}: row {row}: spectrum_lambda")
            except InstrumentError as err:
                raise SpectraFormatError(str(err)) from None
            return inst
        # The file's wavelength range from its first and last columns (padding sits at the end of a row).
        lam_ds = self.h5["spectrum_lambda"]
        ends = np.concatenate([native(lam_ds[:, 0]), native(lam_ds[:, -1]), lam[[0, -1]]]).astype(np.float64)
        ends = ends[_valid_lambda(ends)]
        try:
            return infer_instrument(lam, float(ends.min()), float(ends.max()), f"{self.path}: spectrum_lambda",
                                    SNAP_TOL_PIXELS)
        except InstrumentError as err:
            raise SpectraFormatError(str(err)) from None

    def __len__(self) -> int:
        return self._n

    def read(self, start: int = 0, stop: int | None = None) -> Spectra:
        """Contiguous rows [start, stop) on the instrument grid, normalised."""
        start, stop = row_range(self.path, start, stop, self._n)
        h, inst = self.h5, self.instrument
        lam = native(h["spectrum_lambda"][start:stop]).astype(np.float64)
        flux_in = native(h["spectrum_flux"][start:stop]).astype(np.float32)
        ivar_in = native(h["spectrum_ivar"][start:stop]).astype(np.float32)
        mask_in = h["spectrum_mask"][start:stop].astype(bool) if "spectrum_mask" in h else None
        n, Lmax = lam.shape
        problems: dict[int, str] = {}

        valid = _valid_lambda(lam)
        has = valid.any(axis=1)
        j0 = np.argmax(valid, axis=1)
        coord = inst.coordinate(np.where(valid, lam, inst.wave_min))
        offset = np.rint(coord[np.arange(n), j0] - j0).astype(np.int64)  # grid index of row pixel j: offset + j
        j = np.arange(Lmax)
        err = np.where(valid, np.abs(coord - (offset[:, None] + j)), 0.0)
        off_grid = (err > SNAP_TOL_PIXELS).any(axis=1)
        for r in np.flatnonzero(off_grid | ~has):
            if not has[r]:
                problems[start + int(r)] = "spectrum_lambda: no pixel with lambda > 0"
                continue
            p = int(np.argmax(err[r] > SNAP_TOL_PIXELS))
            problems[start + int(r)] = (
                f"spectrum_lambda: pixel {p} at {lam[r, p]:.3f} Å is {err[r, p]:.2f} pixels off the {inst.name} grid"
            )

        target = offset[:, None] + j
        keep = valid & ~off_grid[:, None] & (target >= 0) & (target < inst.L)
        r_idx, c_idx = np.nonzero(keep)
        t_idx = target[r_idx, c_idx]
        flux = np.zeros((n, inst.L), np.float32)
        ivar = np.zeros((n, inst.L), np.float32)
        pipe = np.ones((n, inst.L), bool)
        flux[r_idx, t_idx] = flux_in[r_idx, c_idx]
        ivar[r_idx, t_idx] = ivar_in[r_idx, c_idx]
        pipe[r_idx, t_idx] = mask_in[r_idx, c_idx] if mask_in is not None else False
        for r in np.flatnonzero(has & ~off_grid & ~keep.any(axis=1)):
            problems[start + int(r)] = f"spectrum_lambda: no pixel on the {inst.name} grid"

        mask = bad_pixel_mask(ivar, pipe, sky=self._sky)
        z = native(h["Z"][start:stop]).astype(np.float64)
        weights = np.where(mask, np.float32(0), ivar)
        norm = normalization(flux, weights, self.wave_obs, z)
        ok = np.isfinite(norm)
        if ok.any():
            flux[ok], ivar[ok] = apply_normalization(flux[ok], ivar[ok], norm[ok])
        if self._zerr_field is not None:
            z_err = native(h[self._zerr_field][start:stop]).astype(np.float32)
        else:
            z_err = np.full(n, np.nan, np.float32)
        return Spectra(
            flux=flux,
            ivar=ivar,
            mask=mask,
            z=z,
            z_err=z_err,
            object_id=native(h[self._id_field][start:stop]),
            norm=norm.astype(np.float32),
            start=start,
            problems=problems,
        )

    def read_column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A column by fastspec name (spectral columns and norm as `read` returns them, Z_ERR/ZERR and
        object_id resolved) or any dataset of the file as stored (native byte order)."""
        batch_fields = {"spectrum_flux": "flux", "spectrum_ivar": "ivar", "spectrum_mask": "mask", "norm": "norm"}
        if name == "wave_obs":
            return self.wave_obs
        if name in batch_fields:
            return getattr(self.read(start, stop), batch_fields[name])
        if name == "Z_ERR" and self._zerr_field is None:
            start, stop = row_range(self.path, start, stop, self._n)
            return np.full(stop - start, np.nan, np.float32)
        real = {"Z_ERR": self._zerr_field, "object_id": self._id_field}.get(name, name)
        if real not in self.h5:
            raise SpectraFormatError(f"{self.path}: no field {name!r}")
        return self._stored_column(real, start, stop)

