"""Instrument wavelength grids (observed frame) and the model's restframe grid.

An instrument knows its observed grid `wave_obs` (log-linear for SDSS/BOSS, linear for DESI), how to snap
a survey file's wavelengths onto it by an integer offset, its bright sky lines, and how to build the model's
*linear* restframe grid `wave_rest` for a given z_max (DESIGN §1: R = ceil(L·(1+z_max))).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import FastspecError

# Bright night-sky emission lines (Å, air wavelengths as SDSS reports them): [O I], Na D, strong OH bands.
SKY_LINES = np.array([
    5577.34, 5889.95, 5895.92, 6300.30, 6363.78, 6863.96, 7276.41, 7316.28, 7340.89, 7750.64,
    7794.11, 7821.50, 7913.71, 7964.65, 8344.60, 8399.17, 8430.17, 8465.36, 8493.39, 8827.10,
    8885.85, 8919.64, 8943.40, 8958.10, 8988.39, 9375.98, 9439.67,
])

# Restframe window for normalisation (DESIGN §1).
NORM_WINDOW = (5300.0, 5850.0)


class InstrumentError(FastspecError, ValueError):
    """A wavelength grid that does not belong to the instrument, or an unknown instrument."""


@dataclass(frozen=True)
class Instrument:
    """An observed wavelength grid.

    For a log-linear grid ``wave_obs[i] = 10**(start + step*i)``; for a linear one ``start + step*i``.
    """

    name: str
    start: float
    step: float
    L: int
    loglinear: bool
    sky_lines: np.ndarray = field(default_factory=lambda: SKY_LINES, repr=False, compare=False)
    sky_halfwidth: float = 5.0  # Å either side of a sky line that is masked

    @property
    def wave_obs(self) -> np.ndarray:
        """Observed wavelengths in Å, float64, shape (L,)."""
        grid = self.start + self.step * np.arange(self.L, dtype=np.float64)
        return 10.0**grid if self.loglinear else grid

    @property
    def wave_min(self) -> float:
        return float(self.wave_obs[0])

    @property
    def wave_max(self) -> float:
        return float(self.wave_obs[-1])

    def coordinate(self, wave) -> np.ndarray:
        """Fractional pixel coordinate of wavelengths `wave` (Å) on this grid (index arithmetic, no search)."""
        wave = np.asarray(wave, dtype=np.float64)
        x = np.log10(wave) if self.loglinear else wave
        return (x - self.start) / self.step

    def snap_offset(self, wave, tol: float = 0.05, where: str = "") -> int:
        """Integer offset that puts survey pixels `wave` (Å, on the same grid) onto this grid.

        Raises InstrumentError naming `where` when the pixels are not on this grid within `tol` pixels.
        """
        coord = self.coordinate(wave)
        if coord.size == 0:
            raise InstrumentError(f"{where}: empty wavelength array")
        offset = int(np.rint(coord[0]))
        expect = offset + np.arange(coord.size)
        err = np.abs(coord - expect)
        worst = int(np.argmax(err))
        if err[worst] > tol:
            raise InstrumentError(
                f"{where}: wavelengths are not on the {self.name} grid "
                f"(pixel {worst} at {float(np.asarray(wave)[worst]):.3f} Å is {err[worst]:.3f} pixels off)"
            )
        return offset

    def sky_mask(self, wave=None) -> np.ndarray:
        """True where a pixel lies within `sky_halfwidth` Å of a bright sky line."""
        wave = self.wave_obs if wave is None else np.asarray(wave, dtype=np.float64)
        d = np.abs(wave[:, None] - self.sky_lines[None, :])
        return (d <= self.sky_halfwidth).any(axis=1)

    def n_rest(self, z_max: float) -> int:
        return int(math.ceil(self.L * (1.0 + z_max) - 1e-9))

    def wave_rest(self, z_max: float = 0.5) -> np.ndarray:
        """The model's linear restframe grid, from wave_min/(1+z_max) to wave_max, R = ceil(L·(1+z_max))."""
        if not (0.0 <= z_max < 10.0):
            raise ValueError(f"z_max must be in [0, 10), got {z_max}")
        R = self.n_rest(z_max)
        return np.linspace(self.wave_min / (1.0 + z_max), self.wave_max, R, dtype=np.float64)


INSTRUMENTS: dict[str, Instrument] = {
    # SDSS-I/II spectrograph: 10**(3.578 + 1e-4 i), L = 3921 (≈3784–9333 Å)
    "sdss": Instrument("sdss", start=3.578, step=1e-4, L=3921, loglinear=True),
    # BOSS spectrograph: 10**(3.549 + 1e-4 i) up to ≈10.4 kÅ
    "boss": Instrument("boss", start=3.549, step=1e-4, L=4685, loglinear=True),
    # DESI: linear 3600–9824 Å in 0.8 Å steps
    "desi": Instrument("desi", start=3600.0, step=0.8, L=7781, loglinear=False),
}


def get_instrument(name: str | Instrument) -> Instrument:
    """Look an instrument up by name (case-insensitive): 'sdss', 'boss' or 'desi'."""
    if isinstance(name, Instrument):
        return name
    key = str(name).strip().lower()
    if key not in INSTRUMENTS:
        raise InstrumentError(f"unknown instrument {name!r}; known: {', '.join(sorted(INSTRUMENTS))}")
    return INSTRUMENTS[key]


def infer_instrument(wave_row, wave_lo: float, wave_hi: float, where: str = "", tol: float = 0.05) -> Instrument:
    """The instrument for wavelengths of unknown origin: `wave_row` (one spectrum's valid wavelengths) must lie on
    its grid, and of those grids the smallest that covers [wave_lo, wave_hi] (≥ 99 % of it, in pixels) wins —
    SDSS rows also lie on the BOSS grid (same log step), so coverage tells the two apart."""
    candidates = []
    for inst in INSTRUMENTS.values():
        try:
            inst.snap_offset(wave_row, tol=tol)
        except InstrumentError:
            continue
        lo, hi = inst.coordinate([wave_lo, wave_hi])
        covered = (min(hi, inst.L - 1) - max(lo, 0)) / max(hi - lo, 1e-9)
        candidates.append((covered >= 0.99, -inst.L if covered >= 0.99 else covered, inst))
    if not candidates:
        raise InstrumentError(
            f"{where}: wavelengths {wave_row[0]:.2f}–{wave_row[-1]:.2f} Å lie on no known "
            f"instrument grid ({', '.join(INSTRUMENTS)}); pass instrument= if they should"
        )
    return max(candidates, key=lambda c: (c[0], c[1]))[2]


def instrument_for_grid(wave_obs, tol: float = 0.05) -> Instrument:
    """The instrument whose grid `wave_obs` equals (same length, same first pixel)."""
    wave_obs = np.asarray(wave_obs, dtype=np.float64)
    for inst in INSTRUMENTS.values():
        if wave_obs.size == inst.L:
            try:
                if inst.snap_offset(wave_obs, tol=tol) == 0:
                    return inst
            except InstrumentError:
                continue
    raise InstrumentError(
        f"wavelength grid of {wave_obs.size} pixels ({wave_obs[0]:.2f}–{wave_obs[-1]:.2f} Å) "
        "matches no known instrument"
    )
