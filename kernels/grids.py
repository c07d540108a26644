"""Wavelength grids as the resample kernels take them: validated once (cached per grid), described as uniform
in λ (linear, DESI) or in log10 λ (log-linear, SDSS/BOSS), with their float64 coordinates on the device."""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

# A grid is accepted as uniform when no point is further than this many pixels from the straight line.
GRID_TOL_PIXELS = 0.01


@dataclass(frozen=True, eq=False)
class Grid:
    """A validated, strictly increasing 1-D wavelength grid.

    `c` is float64 on the device: λ for a linear or merely monotone grid, the pixel index (log10 λ − ξ0)/Δ for
    a log-linear one. `start`, `step` describe the uniform coordinate (λ0, Δλ or ξ0, Δlog10λ); NaN step for a
    monotone grid.
    """

    loglinear: bool
    start: float
    step: float
    c: torch.Tensor
    _log_coords: dict = field(default_factory=dict, repr=False)

    def log_coords(self, start: float, step: float) -> torch.Tensor:
        """(log10 λ − start)/step for a grid whose `c` is λ (linear or monotone), float64 on the device: the
        fractional pixel index of each λ on a log-linear grid (start, step). Cached per (start, step)."""
        c = self._log_coords.get((start, step))
        if c is None:
            c = self._log_coords[start, step] = (torch.log10(self.c) - start) / step
        return c


_CACHE: dict = {}
_CACHE_MAX = 32


def _cache_key(arr, kind, device):
    if isinstance(arr, torch.Tensor):
        # torch.Size, stride tuples and devices hash as they are (no str(): this runs on every call)
        return ("t", id(arr), arr.data_ptr(), arr._version, arr.shape, arr.stride(), arr.dtype, arr.device, kind,
                device)
    digest = hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=16).hexdigest()
    return ("a", digest, arr.shape, arr.dtype.str, kind, str(device))


def fit_uniform(coord: np.ndarray):
    """(start, step, worst deviation in steps, where) of the straight line through the end points."""
    n = coord.size
    start = float(coord[0])
    step = float(coord[-1] - coord[0]) / (n - 1)
    dev = np.abs(coord - (start + step * np.arange(n))) / abs(step) if step != 0 else np.full(n, np.inf)
    worst = int(np.argmax(dev))
    return start, step, float(dev[worst]), worst


def grid(arr, name: str, fn: str, device, kind: str, min_len: int, owner: str) -> Grid:
    """Validate a wavelength grid (cached) and describe it.

    kind: 'linear', 'loglinear', 'monotone' (any strictly increasing grid) or 'auto' (linear or log-linear,
    whichever fits better). `owner` names the spectra argument the grid must share a device with.
    """
    if isinstance(arr, torch.Tensor) and arr.device != torch.device(device):
        raise ValueError(f"{fn}: {name} is on {arr.device} but {owner} is on {device}")
    key = _cache_key(arr, kind, device)
    hit = _CACHE.get(key)
    if hit is not None and (hit[0] is None or hit[0]() is arr):
        return hit[1]
    g = make_grid(arr, name, fn, device, kind, min_len)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (weakref.ref(arr) if isinstance(arr, torch.Tensor) else None, g)
    return g


def make_grid(arr, name, fn, device, kind, min_len) -> Grid:
    """`grid` without the cache."""
    host = arr.detach().cpu().double().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr, np.float64)
    if host.ndim != 1:
        raise ValueError(f"{fn}: {name} must be 1-D, got shape {tuple(host.shape)}")
    if host.size < min_len:
        raise ValueError(f"{fn}: {name} needs at least {min_len} wavelengths, got {host.size}")
    bad = np.flatnonzero(~np.isfinite(host) | (host <= 0))
    if bad.size:
        raise ValueError(f"{fn}: {name}[{bad[0]}] = {host[bad[0]]} is not a positive finite wavelength")
    steps = np.diff(host)
    if np.any(steps <= 0):
        k = int(np.flatnonzero(steps <= 0)[0])
        raise ValueError(f"{fn}: {name} must increase strictly, but {name}[{k + 1}] = {host[k + 1]} ≤ "
                         f"{name}[{k}] = {host[k]}")
    if kind == "monotone":
        return Grid(False, float(host[0]), float("nan"), torch.as_tensor(host, device=device))
    fits = {}
    if kind in ("linear", "auto"):
        fits[False] = fit_uniform(host)
    if kind in ("loglinear", "auto"):
        fits[True] = fit_uniform(np.log10(host))
    ok = {log: f for log, f in fits.items() if f[2] <= GRID_TOL_PIXELS}
    if not ok:
        what = {"linear": "linear", "loglinear": "log-linear", "auto": "linear or log-linear"}[kind]
        log, (_, _, dev, worst) = min(fits.items(), key=lambda kv: kv[1][2])
        raise ValueError(f"{fn}: {name} is not a {what} grid: {name}[{worst}] = {host[worst]:.6g} lies "
                         f"{dev:.3g} pixels off the uniform {'log-linear' if log else 'linear'} grid through "
                         f"its end points (tolerance {GRID_TOL_PIXELS})")
    log = min(ok, key=lambda k: ok[k][2])
    start, step, _, _ = ok[log]
    c = (np.log10(host) - start) / step if log else host
    return Grid(log, start, step, torch.as_tensor(c, dtype=torch.float64, device=device))


# ---- under torch.compile: tensor ops only (no validation, no host sync) --------------------------------


def traced_wave(arr, device) -> torch.Tensor:
    """The grid as a float64 tensor on the device."""
    return torch.as_tensor(arr, device=device).detach().to(torch.float64)


def traced_fit(coord: torch.Tensor):
    """(start, step, worst deviation in steps) of the straight line through the end points, as tensors."""
    start = coord[0]
    step = (coord[-1] - coord[0]) / (coord.shape[0] - 1)
    line = start + step * torch.arange(coord.shape[0], device=coord.device, dtype=coord.dtype)
    return start, step, ((coord - line).abs() / step.abs()).amax()


def traced_grid(arr, device, loglinear: bool):
    """(start, step, c) of a grid of known type, as tensors."""
    wave = traced_wave(arr, device)
    coord = torch.log10(wave) if loglinear else wave
    start = coord[0]
    step = (coord[-1] - coord[0]) / (coord.shape[0] - 1)
    c = (coord - start) / step if loglinear else wave
    return start, step, c
