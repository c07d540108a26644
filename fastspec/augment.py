"""Data augmentation for training (DESIGN §1): move observed spectra to a new redshift on their own grid,
add noise, mask a random window. Every random draw goes through an optional `torch.Generator`, so a seed
reproduces an augmented batch exactly.

Weights under redshift augmentation. The moved spectrum at pixel l is a linear interpolation
ŷ = (1−t)·y_a + t·y_b of two neighbouring input pixels. Interpolating the inverse variance the same way (what
spender does) has no basis in error propagation, and a masked neighbour (w = 0) only lowers the weight although
its flux — often garbage — enters ŷ. fastspec's default ('variance') interpolates the *variance* instead,
w' = 1/((1−t)/w_a + t/w_b). By convexity this bounds the variance of ŷ from above whatever the correlation
of the input noise, so it never claims more information than the inputs hold — the smaller variance of the
independent-noise formula (1−t)²/w_a + t²/w_b would be bought with correlations between neighbouring output
pixels (they share inputs) that a per-pixel weight cannot express. And a masked input pixel zeroes every
output pixel it feeds by more than a negligible share `bad_tolerance`. ivar_interp='linear' gives spender's
behaviour. Pixels that come from outside the observed range get zero flux and zero weight either way.
"""
from __future__ import annotations

import numpy as np
import torch

from . import kernels
from .instruments import INSTRUMENTS, get_instrument

IVAR_INTERP = ("variance", "linear")


def _wave_obs(y: torch.Tensor, wave_obs=None, instrument=None):
    """The observed grid as the kernels take it: a float64 numpy array (the kernels cache its description by
    content, and float64 keeps the log-linear coordinate exact) or the caller's tensor on y's device."""
    if wave_obs is None:
        if instrument is None:
            matches = [inst for inst in INSTRUMENTS.values() if inst.L == y.shape[1]]
            if len(matches) != 1:
                raise ValueError(f"spectra have {y.shape[1]} pixels: pass wave_obs= or instrument= to say on "
                                 "which grid they are")
            instrument = matches[0]
        wave_obs = get_instrument(instrument).wave_obs
    if isinstance(wave_obs, torch.Tensor):
        grid = wave_obs.detach().to(y.device)
    else:
        grid = np.asarray(wave_obs, dtype=np.float64)
    if tuple(grid.shape) != (y.shape[1],):
        raise ValueError(f"wave_obs has shape {tuple(grid.shape)} but the spectra have {y.shape[1]} pixels")
    return grid


def _redshifts(z, n: int, device, name: str) -> torch.Tensor:
    z = torch.as_tensor(z, device=device)
    if z.ndim == 0:
        z = z.expand(n)
    elif z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if z.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the batch, got {tuple(z.shape)}")
    return z.float().contiguous()


def _rand(shape, generator, device, normal=False):
    # draw on the generator's device so a seeded CPU generator gives the same numbers whatever `device` is
    gdev = generator.device if generator is not None else device
    fn = torch.randn if normal else torch.rand
    return fn(shape, generator=generator, device=gdev).to(device)


def _check_pair(y, w):
    if y.ndim != 2 or y.shape != w.shape:
        raise ValueError(f"y and w must both have shape (N, L), got {tuple(y.shape)} and {tuple(w.shape)}")


def redshift_augment(y: torch.Tensor, w: torch.Tensor, z, z_new=None, generator: torch.Generator | None = None,
                     z_max: float = 0.5, *, wave_obs=None, instrument=None, ivar_interp: str = "variance",
                     bad_tolerance: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move observed spectra y (N, L) with weights w from redshifts z to z_new on the same observed grid.

    z_new: (N,) or a number; None draws z_new ~ U(0, z_max) per spectrum. The grid is `wave_obs`, else the
    `instrument`'s, else the one known instrument with L pixels. Returns (y', w', z_new); see the module
    docstring for how weights are moved (`ivar_interp`, `bad_tolerance`).
    """
    _check_pair(y, w)
    if ivar_interp not in IVAR_INTERP:
        raise ValueError(f"ivar_interp must be one of {IVAR_INTERP}, got {ivar_interp!r}")
    n = y.shape[0]
    grid = _wave_obs(y, wave_obs, instrument)
    z = _redshifts(z, n, y.device, "z")
    if z_new is None:
        z_new = _rand((n,), generator, y.device) * float(z_max)
    z_new = _redshifts(z_new, n, y.device, "z_new")

    if ivar_interp == "linear":
        parts = [y, w]
    else:
        good = w > 0
        var = torch.where(good, 1.0 / torch.where(good, w, 1.0), 0.0)
        parts = [y, var, (~good).to(y.dtype)]
    k = len(parts)
    moved, valid = kernels.redshift_observed(torch.cat(parts).contiguous(), z.repeat(k), z_new.repeat(k), grid)
    valid = valid[:n]
    y_new = torch.where(valid, moved[:n], 0.0)
    if ivar_interp == "linear":
        w_new = torch.where(valid, torch.relu(moved[n:]), 0.0)
    else:
        var_new, bad_new = moved[n:2 * n], moved[2 * n:]
        keep = valid & (bad_new <= bad_tolerance) & (var_new > 0)
        w_new = torch.where(keep, 1.0 / torch.where(keep, var_new, 1.0), 0.0)
    return y_new, w_new.to(w.dtype), z_new


def add_noise(y: torch.Tensor, w: torch.Tensor, generator: torch.Generator | None = None,
              amplitude: float = 0.2, fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise of σ = amplitude·max(y) (per spectrum, as spender) on a random `fraction` of pixels.

    The weights of hit pixels become 1/(1/w + σ²) (the added variance; spender adds the drawn noise² instead
    and turns w = 0 into 1e-6); masked pixels stay masked.
    """
    _check_pair(y, w)
    sigma = amplitude * y.amax(dim=1, keepdim=True).clamp_min(0)
    hit = _rand(y.shape, generator, y.device) < fraction
    noise = _rand(y.shape, generator, y.device, normal=True) * sigma
    y_new = torch.where(hit, y + noise, y)
    w_new = torch.where(hit, w / (1 + w * sigma**2), w)
    return y_new, w_new


def random_mask(y: torch.Tensor, w: torch.Tensor, generator: torch.Generator | None = None,
                fraction: float = 0.05, per_spectrum: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero flux and weight in one contiguous window of int(L·fraction) pixels at a random start, drawn per
    spectrum (or one start for the whole batch, as spender, with per_spectrum=False)."""
    _check_pair(y, w)
    n, L = y.shape
    length = int(L * fraction)
    if length <= 0:
        return y.clone(), w.clone()
    if generator is not None:
        start = torch.randint(0, L - length + 1, (n if per_spectrum else 1,), generator=generator,
                              device=generator.device).to(y.device)
    else:
        start = torch.randint(0, L - length + 1, (n if per_spectrum else 1,), device=y.device)
    pix = torch.arange(L, device=y.device)
    window = (pix >= start[:, None]) & (pix < start[:, None] + length)
    return y.masked_fill(window, 0), w.masked_fill(window, 0)


def augment(y, w, z, *, generator: torch.Generator | None = None, redshift: bool = True, noise: bool = False,
            mask: bool = False, z_max: float = 0.5, z_new=None, wave_obs=None, instrument=None,
            ivar_interp: str = "variance", noise_amplitude: float = 0.2, noise_fraction: float = 0.05,
            mask_fraction: float = 0.05):
    """Redshift augmentation, then optional noise and masking (spender's `augment_spectra` order).

    Returns (y', w', z')."""
    if redshift:
        y, w, z = redshift_augment(y, w, z, z_new=z_new, generator=generator, z_max=z_max, wave_obs=wave_obs,
                                   instrument=instrument, ivar_interp=ivar_interp)
    else:
        y, w, z = y.clone(), w.clone(), _redshifts(z, y.shape[0], y.device, "z")
    if noise:
        y, w = add_noise(y, w, generator, amplitude=noise_amplitude, fraction=noise_fraction)
    if mask:
        y, w = random_mask(y, w, generator, fraction=mask_fraction)
    return y, w, z


__all__ = ["redshift_augment", "add_noise", "random_mask", "augment", "IVAR_INTERP"]
