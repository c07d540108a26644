"""Observed spectra moved to a restframe grid, and their weighted mean restframe spectrum.

Used where a model-free view of the restframe is needed: the weighted PCA baseline fits in it, and training
starts the decoder's output at the training set's mean restframe spectrum (`mean_spectrum`) instead of at
noise, which takes the first hundreds of steps out of learning the mean (bench/results/recipe.md).
"""
from __future__ import annotations

import numpy as np


def to_restframe(y, w, z, wave_obs, wave_rest, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Observed spectra (N, L) → restframe grid (N, R): x(λ) = y(λ·(1+z)) by linear interpolation.

    Weights move as inverse interpolated variances (as fastspec.augment does); a restframe pixel is 0 with
    weight 0 where λ·(1+z) leaves the observed grid or touches a masked pixel.
    """
    wave_obs = np.asarray(wave_obs, np.float64)
    wave_rest = np.asarray(wave_rest, np.float64)
    L = wave_obs.size
    N, R = len(z), wave_rest.size
    x_out = np.zeros((N, R), np.float32)
    w_out = np.zeros((N, R), np.float32)
    for a in range(0, N, chunk):
        b = min(a + chunk, N)
        lam = wave_rest[None, :] * (1.0 + np.asarray(z[a:b], np.float64)[:, None])
        u = np.interp(lam.ravel(), wave_obs, np.arange(L, dtype=np.float64), left=-1.0, right=-1.0).reshape(lam.shape)
        inside = u >= 0
        i = np.clip(np.floor(u).astype(np.int64), 0, L - 2)
        t = np.where(inside, u - i, 0.0)
        ya, yb = np.take_along_axis(y[a:b], i, 1), np.take_along_axis(y[a:b], i + 1, 1)
        wa, wb = np.take_along_axis(w[a:b], i, 1), np.take_along_axis(w[a:b], i + 1, 1)
        # a neighbour that gets (almost) no share of the interpolation does not need to be good
        need_a, need_b = t < 1 - 1e-6, t > 1e-6
        ok = inside & (~need_a | (wa > 0)) & (~need_b | (wb > 0))
        var = np.where(need_a, (1 - t) / np.where(wa > 0, wa, 1), 0) + np.where(need_b, t / np.where(wb > 0, wb, 1), 0)
        x_out[a:b] = np.where(ok, (1 - t) * ya + t * yb, 0)
        w_out[a:b] = np.where(ok & (var > 0), 1.0 / np.where(var > 0, var, 1), 0)
    return x_out, w_out


def weighted_sums(y, w, z, wave_obs, wave_rest) -> tuple[np.ndarray, np.ndarray]:
    """(Σ w·x, Σ w) per restframe pixel (R,) in float64: the parts of `mean_spectrum`, which ranks of a
    distributed run can add up before dividing."""
    x, wr = to_restframe(y, w, z, wave_obs, wave_rest)
    return (wr * x).sum(0, dtype=np.float64), wr.sum(0, dtype=np.float64)


def mean_from_sums(wx_sum, w_sum) -> np.ndarray:
    """Σ w·x / Σ w where covered; uncovered pixels take the nearest covered value (a flat extension: the
    decoder learns the rest); no weight at all gives ones (spectra are normalised to ~1). float32 (R,)."""
    wx_sum, w_sum = np.asarray(wx_sum, np.float64), np.asarray(w_sum, np.float64)
    covered = w_sum > 0
    if not covered.any():
        return np.ones(w_sum.shape[0], np.float32)
    pix = np.arange(w_sum.shape[0])
    return np.interp(pix, pix[covered], wx_sum[covered] / w_sum[covered]).astype(np.float32)


def mean_spectrum(y, w, z, wave_obs, wave_rest) -> np.ndarray:
    """Inverse-variance weighted mean of observed spectra on the restframe grid (R,), float32; see
    `mean_from_sums` for pixels no spectrum covers."""
    return mean_from_sums(*weighted_sums(y, w, z, wave_obs, wave_rest))


__all__ = ["to_restframe", "weighted_sums", "mean_from_sums", "mean_spectrum"]
