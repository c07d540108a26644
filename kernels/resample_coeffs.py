"""The coefficients a, b that turn each public resample op into the generic one, from the redshifts, in torch.

The generic op samples row n of a source spectrum on a uniform grid at the fractional source index
``u[n, l] = c[l]·a[n] + b[n]``; c depends on the grids only, a and b on the redshifts:

* resample, linear restframe grid λ0 + jΔ:             c = λ_obs,                 a = 1/((1+z)Δ),  b = −λ0/Δ
* resample, log-linear restframe grid 10^(ξ0 + jΔξ):   c = (log10 λ_obs − ξ0)/Δξ, a = 1,  b = −log10(1+z)/Δξ
* redshift_observed on a log-linear grid (SDSS/BOSS):  c = (log10 λ − ξ0)/Δξ (= pixel index), a = 1,
                                                        b = log10((1+z)/(1+z_new))/Δξ
* redshift_observed on a linear grid (DESI):           c = λ,  a = (1+z)/((1+z_new)Δ),  b = −λ0/Δ

A redshift is usable when finite and > −1; a row with an unusable z (or z_new) gets a = NaN, which every
backend reads as "no valid pixel", and a, b computed from z = 0 instead, so that its gradients are 0 rather
than 0·inf = NaN. `resample_numba.coefficients` computes the same, with the derivatives, in one jitted call
for the numba eager path.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

# Which public op and grid type (shared with resample_numba.coefficients).
REST_LIN, REST_LOG, OBS_LOG, OBS_LIN = 0, 1, 2, 3


class Coeffs(NamedTuple):
    """a, b for N spectra and (when asked for) their derivatives to z and z_new; a derivative is None where
    it is identically 0. Tensors, or float64 numpy arrays from resample_numba.coefficients."""

    a: torch.Tensor
    b: torch.Tensor
    a_z: torch.Tensor | None = None
    b_z: torch.Tensor | None = None
    a_zn: torch.Tensor | None = None
    b_zn: torch.Tensor | None = None


def _usable(z, z_new):
    """(ok, z and z_new with the entries of rows that are not ok replaced by 0)."""
    ok = torch.isfinite(z) & (z > -1.0)
    if z_new is not None:
        ok = ok & torch.isfinite(z_new) & (z_new > -1.0)
        z_new = torch.where(ok, z_new, 0.0)
    return ok, torch.where(ok, z, 0.0), z_new


def coefficients(mode: int, z, z_new, start, step, derivs: bool) -> Coeffs:
    """a, b (float64) for the redshifts z (and z_new: redshift_observed) given as float64 tensors.

    start, step: λ0, Δ (linear grids) or ξ0, Δlog10λ (log-linear grids) of the grid the source lives on —
    the restframe grid for resample, the observed grid for redshift_observed; floats or 0-d tensors.
    derivs False: differentiable in z and z_new (the custom-op route, where autograd carries ∂/∂a, ∂/∂b on to
    the redshifts); True: with the derivatives, outside autograd (the eager route's chain rule).
    """
    ok, zs, zns = _usable(z, z_new)
    nan = float("nan")
    ones = torch.ones_like(z)
    if mode == REST_LIN:  # u = λ_obs/((1+z)Δ) − λ0/Δ
        a = 1.0 / ((1.0 + zs) * step)
        co = dict(a=a, b=(-start / step) * ones)
        if derivs:
            co.update(a_z=torch.where(ok, -a / (1.0 + zs), 0.0))
    elif mode == REST_LOG:  # u = c − log10(1+z)/Δξ
        k = 1.0 / (math.log(10.0) * step)
        co = dict(a=ones, b=-torch.log1p(zs) * k)
        if derivs:
            co.update(b_z=torch.where(ok, -k / (1.0 + zs), 0.0))
    elif mode == OBS_LOG:  # u = l + log10((1+z)/(1+z_new))/Δξ
        k = 1.0 / (math.log(10.0) * step)
        co = dict(a=ones, b=(torch.log1p(zs) - torch.log1p(zns)) * k)
        if derivs:
            co.update(b_z=torch.where(ok, k / (1.0 + zs), 0.0), b_zn=torch.where(ok, -k / (1.0 + zns), 0.0))
    elif mode == OBS_LIN:  # u = λ·(1+z)/((1+z_new)Δ) − λ0/Δ
        a = (1.0 + zs) / ((1.0 + zns) * step)
        co = dict(a=a, b=(-start / step) * ones)
        if derivs:
            co.update(a_z=torch.where(ok, 1.0 / ((1.0 + zns) * step), 0.0),
                      a_zn=torch.where(ok, -a / (1.0 + zns), 0.0))
    else:
        raise ValueError(f"unknown resample coefficient mode {mode!r}")
    co["a"] = torch.where(ok, co["a"], nan)
    return Coeffs(**co)
