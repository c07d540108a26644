"""Plain-torch references of the redshift-resample ops (the 'torch' backend, tests and benchmarks).

Two formulations, kept independent on purpose:

* index arithmetic (`resample_index`, `resample_loss_index`): the same math the numba/Triton kernels do,
  in the generic form every op is built on — the source spectrum x (N, R) lives on a uniform grid, and
  output pixel l of row n samples it at the fractional source index ``u = c[l]·a[n] + b[n]``;
  ``ŷ = (1−t)·x[i] + t·x[i+1]`` with ``i = min(floor(u), R−2)``, ``t = u − i``, valid iff ``0 ≤ u ≤ R−1``
  (both ends included) and ``a[n] > 0``. Autograd gives the gradients to x, a and b.
* the searchsorted formulation of spender (`interp1d`, `resample_searchsorted`,
  `redshift_observed_searchsorted`): wavelength arrays, `torch.searchsorted`, gathers — what spender 0.3
  does in `spender.util.interp1d` and `SpectrumDecoder.transform`, re-stated here because importing spender
  pulls in optional dependencies (nflows). With `loglinear` it interpolates linearly in log λ instead, as the
  kernels do on log-linear grids.
"""
from __future__ import annotations

import torch

from .core import acc_dtype


def _interp_index(x, c, a, b):
    """(ŷ in the compute dtype, valid) for the generic index form; differentiable in x, a, b."""
    R = x.shape[1]
    u = torch.addcmul(b[:, None], a[:, None], c[None, :])
    valid = (u >= 0) & (u <= R - 1) & (a[:, None] > 0)
    us = torch.where(valid, u, torch.zeros((), dtype=u.dtype, device=u.device))
    i = us.detach().floor().to(torch.int64).clamp_(max=R - 2)
    cd = acc_dtype(x.dtype)
    t = (us - i).to(cd)
    xf = x.to(cd)
    x0 = xf.gather(1, i)
    x1 = xf.gather(1, i + 1)
    y = torch.where(valid, x0 + t * (x1 - x0), torch.zeros((), dtype=cd, device=x.device))
    return y, valid


def resample_index(x, c, a, b):
    """Generic resample by index arithmetic: x (N, R), c (L,), a (N,), b (N,) → (ŷ (N, L) in x.dtype, valid)."""
    y, valid = _interp_index(x, c, a, b)
    return y.to(x.dtype), valid


def resample_loss_index(x, c, a, b, y, w, weight: bool = False):
    """Per-spectrum Σ_l w·valid·(y − ŷ)² (pixels with w = 0 or not valid are skipped, even if y is NaN there);
    with `weight`, (that, Σ_l w·valid) — the second without gradient."""
    yhat, valid = _interp_index(x, c, a, b)
    cd = yhat.dtype
    m = valid & (w != 0)
    zero = torch.zeros((), dtype=cd, device=x.device)
    r = torch.where(m, y.to(cd) - yhat, zero)
    wm = torch.where(m, w.to(cd), zero)
    loss = (wm * r * r).sum(1)
    return (loss, wm.detach().sum(1)) if weight else loss


# ---- spender's searchsorted formulation -------------------------------------------------------------------


def interp1d(x, y, xnew):
    """Linear interpolation of y(x) at xnew, as spender.util.interp1d (spender 0.3, MIT licence) does it.

    x (L,) or (N, L) sorted, y (L,) or (N, L), xnew (M,) or (N, M) → (N, M); extrapolates linearly beyond
    the ends (callers mask those pixels).
    """
    x, y, xnew = torch.atleast_2d(x), torch.atleast_2d(y), torch.atleast_2d(xnew)
    N = max(x.shape[0], y.shape[0], xnew.shape[0])
    x, y, xnew = x.expand(N, -1), y.expand(N, -1), xnew.expand(N, -1)
    dtype = torch.promote_types(x.dtype, xnew.dtype)
    ind = torch.searchsorted(x.to(dtype).contiguous(), xnew.to(dtype).contiguous()) - 1
    ind = ind.clamp(0, x.shape[1] - 2)
    eps = torch.finfo(y.dtype).eps
    slopes = (y[:, 1:] - y[:, :-1]) / (eps + x[:, 1:] - x[:, :-1])
    ynew = y.gather(1, ind) + slopes.gather(1, ind) * (xnew - x.gather(1, ind))
    return ynew.to(y.dtype)


def resample_searchsorted(spec_rest, z, wave_rest, wave_obs, loglinear: bool = False):
    """spender's SpectrumDecoder.transform: redshift the restframe grid per spectrum, searchsorted, gather.

    Returns (spec_obs (N, L), valid (N, L)); valid includes both ends, like the kernels (spender: strict).
    `loglinear`: interpolate linearly in log λ (for a restframe grid uniform in log λ).
    """
    zf = (1 + z)[:, None]
    wave_redshifted = wave_rest[None, :] * zf
    if loglinear:
        spec = interp1d(torch.log10(wave_redshifted), spec_rest, torch.log10(wave_obs))
    else:
        spec = interp1d(wave_redshifted, spec_rest, wave_obs)
    valid = (wave_obs[None, :] >= wave_rest[0] * zf) & (wave_obs[None, :] <= wave_rest[-1] * zf)
    spec = torch.where(valid, spec, torch.zeros((), dtype=spec.dtype, device=spec.device))
    return spec, valid


def resample_loss_searchsorted(spec_rest, z, wave_rest, wave_obs, y, w, loglinear: bool = False):
    spec, valid = resample_searchsorted(spec_rest, z, wave_rest, wave_obs, loglinear)
    m = valid & (w != 0)
    zero = torch.zeros((), dtype=spec.dtype, device=spec.device)
    r = torch.where(m, y.to(spec.dtype) - spec, zero)
    return (torch.where(m, w.to(spec.dtype), zero) * r * r).sum(1)


def redshift_observed_searchsorted(spec_obs, z, z_new, wave_obs, loglinear: bool = False):
    """spender's augment_spectra redshift step: spec_obs at λ·(1+z)/(1+z_new), masked outside the grid.

    spender interpolates linearly in λ; with `loglinear` the interpolation is linear in log λ (in the pixel
    index of a log-linear grid), which is what fastspec's redshift_observed does on SDSS/BOSS grids.
    """
    wave_new = wave_obs[None, :] * ((1 + z) / (1 + z_new))[:, None]
    if loglinear:
        spec = interp1d(torch.log10(wave_obs), spec_obs, torch.log10(wave_new))
    else:
        spec = interp1d(wave_obs, spec_obs, wave_new)
    valid = (wave_new >= wave_obs[0]) & (wave_new <= wave_obs[-1])
    spec = torch.where(valid, spec, torch.zeros((), dtype=spec.dtype, device=spec.device))
    return spec, valid
