"""Per-spectrum preparation shared by ingest and mock: weights and normalisation (DESIGN §1)."""
from __future__ import annotations

import numpy as np

from .instruments import NORM_WINDOW


def normalization(flux, ivar, wave_obs, z, window=NORM_WINDOW) -> np.ndarray:
    """Median flux in the restframe `window` over pixels with ivar > 0, per spectrum.

    flux, ivar: (N, L); wave_obs: (L,); z: (N,). Returns (N,) float64; NaN where the window holds no
    valid pixel or the median is not positive (such spectra are rejected by the caller, with a reason).
    """
    flux = np.atleast_2d(np.asarray(flux))
    ivar = np.atleast_2d(np.asarray(ivar))
    z = np.atleast_1d(np.asarray(z, dtype=np.float64))
    wave_rest = np.asarray(wave_obs, dtype=np.float64)[None, :] / (1.0 + z[:, None])
    sel = (wave_rest >= window[0]) & (wave_rest <= window[1]) & (ivar > 0) & np.isfinite(flux)
    norm = np.full(flux.shape[0], np.nan)
    for n in range(flux.shape[0]):
        if sel[n].any():
            m = float(np.median(flux[n, sel[n]]))
            if m > 0:
                norm[n] = m
    return norm


def apply_normalization(flux, ivar, norm):
    """flux / norm and ivar · norm² (float32), rows broadcast against `norm` (N,)."""
    norm = np.asarray(norm, dtype=np.float64)[:, None]
    return (flux / norm).astype(np.float32), (ivar * norm**2).astype(np.float32)


def bad_pixel_mask(ivar, pipeline_mask=None, sky=None) -> np.ndarray:
    """True = bad: ivar ≤ 0 or non-finite, the pipeline mask set, or a sky line (`sky` broadcast over rows)."""
    ivar = np.asarray(ivar)
    bad = ~(ivar > 0) | ~np.isfinite(ivar)
    if pipeline_mask is not None:
        bad |= np.asarray(pipeline_mask) != 0
    if sky is not None:
        bad |= np.asarray(sky, dtype=bool)
    return bad
