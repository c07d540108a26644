"""The statistics the experiments report: robust spread, correlation, R², bootstrap intervals, χ² summaries, the
model error against the noiseless truth, and how far latents move when a spectrum is moved in redshift."""
from __future__ import annotations

import math

import numpy as np


def signal_error(y_true, y_model, w, valid) -> np.ndarray:
    """Σ w·valid·(ŷ − y_true)² / Σ valid·(w > 0): the model's error against the noiseless truth in units of the
    noise variance. Below 1: the model is closer to the truth than the data are (residuals below the noise)."""
    good = (w > 0) & valid
    num = np.where(good, w * (y_model.astype(np.float64) - y_true) ** 2, 0).sum(1)
    cnt = good.sum(1)
    return np.where(cnt > 0, num / np.maximum(cnt, 1), np.nan)


def nmad(x) -> float:
    """1.4826 × median absolute deviation: a robust standard deviation."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if x.size else float("nan")


def pearson(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def r2_score(y_true, y_pred) -> np.ndarray:
    """1 − SS_res / SS_tot per column."""
    y_true = np.asarray(y_true, np.float64)
    y_pred = np.asarray(y_pred, np.float64)
    ss_res = ((y_true - y_pred) ** 2).sum(0)
    ss_tot = ((y_true - y_true.mean(0)) ** 2).sum(0)
    return 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, np.nan)


def latent_displacement(moved, native, sample, native_index=None, k: int = 5) -> dict:
    """How far latents move when a spectrum is moved in redshift, against the spread of the sample.

    moved (n, K, S): latents of n spectra moved to K redshifts; native (n, S): of the unmoved spectra; sample
    (m, S): the held-out sample's latents. Returns
      displacement (n, K) = ‖s(z') − s(native)‖ / σ_sample, σ²_sample = mean ‖s − s̄‖² (rotation invariant, but
        dominated by the sample's widest direction when the latent cloud is anisotropic);
      rms (n,) the RMS of displacement over the K redshifts;
      spread_ratio (n,) = mean over latent dims of std over z' / sample std of that dim (`fastspec report`'s);
      effective_dimensions: participation ratio (Σλ)²/Σλ² of the sample covariance's eigenvalues λ;
    and, with native_index (rows of `sample` that hold the native spectra), two scale-free numbers:
      local (n, K) = ‖s(z') − s(native)‖ / (distance from s(native) to its k-th nearest sample neighbour);
      self_rank (n, K) = how many sample spectra lie closer to s(z') than the galaxy's own s(native)
        (0: the moved copy is still recognised as itself).
    """
    moved = np.asarray(moved, np.float64)
    native = np.asarray(native, np.float64)
    sample = np.asarray(sample, np.float64)
    sigma = math.sqrt(float(((sample - sample.mean(0)) ** 2).sum(1).mean()))
    delta = np.linalg.norm(moved - native[:, None, :], axis=2)
    disp = delta / sigma
    sd = sample.std(0)
    ratio = (moved.std(1) / np.where(sd > 0, sd, 1)).mean(1)
    ev = np.clip(np.linalg.eigvalsh(np.cov(sample.T)), 0, None)
    out = {"displacement": disp, "rms": np.sqrt((disp**2).mean(1)), "spread_ratio": ratio, "sigma_sample": sigma,
           "effective_dimensions": float(ev.sum() ** 2 / max((ev**2).sum(), 1e-300))}
    if native_index is not None:
        import torch

        samp = torch.as_tensor(sample)
        d_nat = torch.cdist(torch.as_tensor(native), samp).numpy()  # (n, m); 0 at the galaxy itself
        d_k = np.sort(d_nat, axis=1)[:, min(k, sample.shape[0] - 1)]
        out["local"] = delta / np.where(d_k > 0, d_k, np.nan)[:, None]
        d_mov = torch.cdist(torch.as_tensor(moved.reshape(-1, moved.shape[2])), samp).numpy()
        d_mov = d_mov.reshape(moved.shape[0], moved.shape[1], -1)
        own = np.take_along_axis(d_mov, np.asarray(native_index)[:, None, None].repeat(moved.shape[1], 1), 2)
        out["self_rank"] = (d_mov < own).sum(2)
    return out


def _quantiles(x, qs=(16, 50, 84)) -> dict:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": float(v) for q, v in zip(qs, np.percentile(x, qs))}


def bootstrap_ci(stat, *arrays, n_boot: int = 300, seed: int = 0) -> list:
    """16th–84th percentile of `stat` over bootstrap resamples of the rows of `arrays` (the sampling
    uncertainty of a number measured on a finite test set; not the training-to-training scatter)."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if n < 3:
        return [None, None]
    rng = np.random.default_rng(seed)
    vals = np.array([stat(*(a[idx] for a in arrays)) for idx in rng.integers(0, n, (n_boot, n))], np.float64)
    vals = vals[np.isfinite(vals)]
    return [float(v) for v in np.percentile(vals, [16, 84])] if vals.size else [None, None]


def chi2_summary(chi2) -> dict:
    c = np.asarray(chi2, np.float64)
    ok = np.isfinite(c)
    return {"median": float(np.median(c[ok])) if ok.any() else None,
            "median_ci68": bootstrap_ci(np.median, c[ok]) if ok.any() else [None, None], **_quantiles(c, (16, 84)),
            "fraction_below_1": float(np.mean(c[ok] < 1)) if ok.any() else None,
            "fraction_below_2": float(np.mean(c[ok] < 2)) if ok.any() else None, "n": int(ok.sum())}


def repeat_retrieval(latents: np.ndarray, group: np.ndarray) -> dict:
    """Repeat observations as a real-noise invariance test: for each spectrum of a galaxy observed more than once,
    the distance to its other observation(s) (nearest) against the distance to the nearest spectrum of another
    galaxy, in latents standardised per dimension over the set. self_retrieval: the fraction with ratio < 1."""
    x = (latents - latents.mean(0)) / latents.std(0).clip(1e-12)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    same = group[:, None] == group[None]
    np.fill_diagonal(same, False)
    rows = np.flatnonzero(same.any(1))
    if not rows.size:
        return {"n_spectra": 0}
    d_same = np.where(same, d, np.inf)[rows].min(1)
    other = ~same
    np.fill_diagonal(other, False)
    d_other = np.where(other, d, np.inf)[rows].min(1)
    ratio = d_same / d_other
    return {"n_spectra": int(rows.size), "n_galaxies": int(len(set(group[rows]))),
            "median_ratio": float(np.median(ratio)), "ratio_ci68": bootstrap_ci(np.median, ratio),
            "self_retrieval": float(np.mean(ratio < 1)), "ratios": ratio.tolist()}
