"""Mock galaxy spectra with known ground truth, for demos, tests and science checks (DESIGN §2, Data).

A mock galaxy is a non-negative mixture of the five kcorrect v4 galaxy templates (their stellar continuum: the
nebular lines the templates carry are cut out) plus twelve emission lines whose strengths follow the mixture,
broadened by a velocity dispersion, attenuated by dust (Calzetti 2000), redshifted, sampled on an instrument's
observed grid with a wavelength-dependent noise model, sky-line and bad-pixel masks, and normalised exactly as
ingest normalises (`fastspec.prep`).

The ground truth is kept: mixture weights, line fluxes, velocity dispersion, E(B−V), z and the noiseless
restframe spectrum on the model grid `Instrument.wave_rest(z_max)`, in the normalisation of the stored flux.

Generation runs in fixed chunks of `CHUNK` spectra; chunk c draws from generators seeded by (seed, c), in a way
that makes a row independent of how many rows are asked for: rows of ``make_mock(n)`` are the first rows of
``make_mock(m)`` for m ≥ n, and the same seed gives byte-identical arrays.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from importlib import resources

import numba
import numpy as np

from .errors import FastspecError
from .h5format import SpectraWriter
from .instruments import NORM_WINDOW, Instrument, get_instrument
from .mockvar import (
    add_agn,
    apply_systematics,
    draw_lines,
    draw_systematics,
    lsf_sigma_kms,
    oii_relation,
    parse_features,
)
from .prep import apply_normalization, bad_pixel_mask, normalization
from .spectra import Spectra

C_KMS = 299792.458
LN10 = math.log(10.0)
CHUNK = 1024  # spectra per chunk; fixed so that the seeded result does not depend on N
FINE_DLOG = 5e-5  # log10 step of the internal restframe grid (≈35 km/s, half an SDSS pixel)
# Velocity dispersions (km/s) at which templates and lines are pre-broadened; a galaxy's vdisp mixes the two
# neighbours with weights that make the kernel's second moment exactly vdisp².
SIGMA_GRID = np.geomspace(30.0, 500.0, 13)
VDISP_RANGE = (40.0, 450.0)
TEMPLATE_FILE = "kcorrect-default-v4.fits"
TRUTH = "truth/"  # the group the ground truth is written to

# Emission lines added to the continuum (vacuum wavelengths, Å: SDSS and DESI spectra are in vacuum, and so
# are the kcorrect templates — their [O III] 5007 centroid sits at 5008.2 Å).
LINES = (
    ("OII_3726", 3727.09), ("OII_3729", 3729.88), ("Hdelta", 4102.89), ("Hgamma", 4341.69),
    ("Hbeta", 4862.68), ("OIII_4959", 4960.30), ("OIII_5007", 5008.24), ("NII_6548", 6549.86),
    ("Halpha", 6564.61), ("NII_6584", 6585.27), ("SII_6717", 6718.29), ("SII_6731", 6732.67),
    # lines the templates lose and only the `extra_lines` feature adds back (zero flux without it)
    ("NeIII_3869", 3869.86), ("HeI_5876", 5877.25), ("OI_6300", 6302.05), ("OI_6363", 6365.54),
    ("ArIII_7135", 7137.77), ("SIII_9069", 9071.10),
)
LINE_NAMES = tuple(n for n, _ in LINES)
LINE_WAVE = np.array([w for _, w in LINES])
_IL = {n: i for i, n in enumerate(LINE_NAMES)}

# Nebular lines the kcorrect templates carry (vacuum Å), cut out so that the only lines are ours and their
# strengths are known. Balmer and Paschen series, forbidden lines of O, N, S, Ne, Ar, and the UV lines.
NEBULAR_IN_TEMPLATES = (
    2326.0, 2471.0, 2796.35, 2803.53, 3727.09, 3729.88, 3798.98, 3836.47, 3869.86, 3890.15, 3968.59,
    3971.20, 4069.75, 4077.5, 4102.89, 4341.69, 4364.44, 4472.7, 4687.0, 4862.68, 4960.30, 5008.24,
    5877.25, 6302.05, 6313.8, 6365.5, 6549.86, 6564.61, 6585.27, 6679.99, 6718.29, 6732.67, 7067.2,
    7137.8, 7321.9, 7332.2, 7753.2, 8752.9, 8865.2, 9017.4, 9071.1, 9231.5, 9533.2, 9548.6, 10052.1,
    10941.1,
)

# Case-B Balmer ratios (T = 10^4 K) and fixed atomic ratios of the doublets.
HALPHA_HBETA = 2.86
HGAMMA_HBETA = 0.468
HDELTA_HBETA = 0.259
OIII_RATIO = 2.98  # 5007 / 4959
NII_RATIO = 3.05  # 6584 / 6548
OII_RATIO = 1.3  # 3729 / 3726 (n_e ~ 100 cm^-3)
SII_RATIO = 1.3  # 6717 / 6731
EBV_STARS_PER_GAS = 0.44  # Calzetti (2000): the continuum sees 0.44 of the nebular E(B−V)
CASE_B = {"HALPHA_HBETA": HALPHA_HBETA, "HGAMMA_HBETA": HGAMMA_HBETA, "HDELTA_HBETA": HDELTA_HBETA,
          "OIII_RATIO": OIII_RATIO, "NII_RATIO": NII_RATIO, "OII_RATIO": OII_RATIO, "SII_RATIO": SII_RATIO}

# Default median S/N per pixel of each survey's galaxies (lognormal spread SNR_SPREAD in ln).
SNR_MEDIAN = {"sdss": 10.0, "boss": 5.0, "desi": 4.0}
SNR_SPREAD = 0.5
SNR_RANGE = (1.5, 100.0)

# Relative noise σ (flux units) vs observed wavelength (throughput and sky), read off the bundled real spectra:
# SDSS/BOSS blue end ≈1.6–2× noisier than at 5000 Å, red arm quietest; DESI falls steeply from the b to the z
# arm with bumps where the arms overlap.
NOISE_SHAPE = {
    "sdss": ((3700, 2.2), (4050, 1.6), (4500, 1.2), (5150, 1.0), (5800, 0.95), (6200, 0.78), (6650, 0.72),
             (7500, 0.8), (8650, 1.1), (9400, 1.6)),
    "boss": ((3500, 2.6), (4000, 1.5), (5000, 1.0), (6000, 0.85), (7000, 0.75), (8500, 1.0), (9500, 1.4),
             (10500, 2.5)),
    "desi": ((3600, 5.5), (3650, 5.0), (4050, 2.0), (4450, 1.5), (4850, 1.12), (5250, 1.0), (5650, 1.0),
             (5800, 0.9), (6200, 0.7), (6600, 0.6), (7000, 0.5), (7400, 0.55), (7570, 0.7), (7900, 0.42),
             (8400, 0.34), (9200, 0.34), (9600, 0.5), (9824, 0.8)),
}

# Random bad pixels: a few % of spectra get a masked run (bad column, dead fibre stretch), every spectrum a
# handful of isolated bad pixels (cosmics). Both get ivar = 0, flux = 0.
BAD_RUN_PROB = 0.03
BAD_RUN_FRACTION = (0.005, 0.06)  # run length as a fraction of L
COSMICS_PER_SPECTRUM = 1.0
_MAX_COSMICS = 8

# SDSS main galaxy sample–like n(z) ∝ z² exp(−(z/z0)^1.5): mode 0.086, median 0.10, 1% beyond z = 0.25.
Z0_SDSS = 0.071

Z_DISTRIBUTIONS = ("sdss", "uniform")


class MockError(FastspecError, ValueError):
    """Invalid mock parameters; the message names the parameter."""


# The published Calzetti fit jumps by 0.025 at 0.63 μm; the red branch is lowered by that much so the curve is
# continuous (the dust factor is interpolated between nodes on the output grids).
_CALZETTI_RED_OFFSET = 2.659 * (-1.857 + 1.040 / 0.63) - 2.659 * (-2.156 + 1.509 / 0.63 - 0.198 / 0.63**2
                                                                   + 0.011 / 0.63**3)


def calzetti_k(wave) -> np.ndarray:
    """Calzetti et al. (2000) attenuation curve k(λ) = A_λ / E(B−V) at restframe wavelengths `wave` (Å)
    (red branch offset by 0.025 to join the blue one continuously at 0.63 μm)."""
    lam = np.asarray(wave, dtype=np.float64) * 1e-4
    blue = 2.659 * (-2.156 + 1.509 / lam - 0.198 / lam**2 + 0.011 / lam**3) + 4.05
    red = 2.659 * (-1.857 + 1.040 / lam) + 4.05 - _CALZETTI_RED_OFFSET
    return np.where(lam < 0.63, blue, red)


@numba.njit(cache=True, inline="always")
def _calzetti_scalar(lam_um):
    if lam_um < 0.63:
        return 2.659 * (-2.156 + 1.509 / lam_um - 0.198 / lam_um**2 + 0.011 / lam_um**3) + 4.05
    return 2.659 * (-1.857 + 1.040 / lam_um) + 4.05 - _CALZETTI_RED_OFFSET


DUST_STRIDE = 8  # output pixels between exact evaluations of the (smooth) dust factor


@numba.njit(cache=True)
def _sample_row(buf, log0, dlog, logw_out, wave_out, shift, a, out):
    """out[l] = buf(λ_out[l] / (1+z)) · 10^(−0.4 k(λ_rest) E): linear interpolation in log λ on the fine grid;
    shift = log10(1+z), a = −0.4 ln10 E. The dust factor is exact every DUST_STRIDE pixels, linear between."""
    F = buf.shape[0]
    L = logw_out.shape[0]
    origin = shift + log0
    inv_dlog = 1.0 / dlog
    to_um = 10.0 ** (-shift) * 1e-4
    d1 = math.exp(a * _calzetti_scalar(wave_out[0] * to_um))
    for l0 in range(0, L, DUST_STRIDE):
        l1 = min(l0 + DUST_STRIDE, L - 1)
        d0 = d1
        d1 = math.exp(a * _calzetti_scalar(wave_out[l1] * to_um))
        step = (d1 - d0) / (l1 - l0) if l1 > l0 else 0.0
        for l in range(l0, min(l0 + DUST_STRIDE, L)):
            u = (logw_out[l] - origin) * inv_dlog
            i = int(u)
            f = u - i
            if i < 0:
                i, f = 0, 0.0
            elif i >= F - 1:
                i, f = F - 2, 1.0
            out[l] = (buf[i] * (1.0 - f) + buf[i + 1] * f) * (d0 + step * (l - l0))


@numba.njit(parallel=True, cache=True)
def _render(templates, rows, coefs, lines, line_start, k_gas, line_coefs, log0, dlog, log1pz, ebv_star,
            logw_obs, wave_obs, model_obs, logw_rest, wave_rest, rest, do_rest):
    """Noiseless spectra, one galaxy per iteration, its fine-grid spectrum kept in a row buffer (cache-resident).

    templates (T·K, F) pre-broadened templates; rows/coefs (N, P): which rows each galaxy mixes and how much
    (two neighbouring dispersions per template); lines (J, K, W) unit-flux profiles starting at line_start (J,);
    k_gas (N,) lower dispersion index of the gas; line_coefs (N, J, 2) line fluxes at k_gas and k_gas+1,
    already divided by the continuum dust at the line. Writes model_obs (N, L) and, if do_rest, rest (N, R) (z = 0)."""
    N, P = rows.shape
    F = templates.shape[1]
    J, _, W = lines.shape
    for n in numba.prange(N):
        buf = np.zeros(F, np.float32)
        for p in range(P):
            row = rows[n, p]
            c = coefs[n, p]
            for i in range(F):
                buf[i] += c * templates[row, i]
        k = k_gas[n]
        for j in range(J):
            s = line_start[j]
            c0 = line_coefs[n, j, 0]
            c1 = line_coefs[n, j, 1]
            for w in range(W):
                buf[s + w] += c0 * lines[j, k, w] + c1 * lines[j, k + 1, w]
        a = -0.4 * LN10 * ebv_star[n]
        _sample_row(buf, log0, dlog, logw_obs, wave_obs, log1pz[n], a, model_obs[n])
        if do_rest:
            _sample_row(buf, log0, dlog, logw_rest, wave_rest, 0.0, a, rest[n])


@numba.njit(parallel=True, cache=True)
def _add_noise(model, shape2, sky2, sky_ratio, scale, amp, eps, flux, ivar):
    """Noise σ² = scale² · shape² · (f⁺ + b·sky) / (1 + b) (object + sky Poisson terms); raw flux and ivar.

    `model` is the noiseless spectrum in window units (≈1 at 5300–5850 Å before dust); everything is multiplied
    by the galaxy's amplitude `amp`."""
    N, L = model.shape
    for n in numba.prange(N):
        b = sky_ratio[n]
        c = scale[n] * scale[n] / (1.0 + b)
        A = amp[n]
        for l in range(L):
            f = model[n, l]
            var = c * shape2[l] * (max(f, 0.0) + b * sky2[l])
            sig = math.sqrt(var)
            flux[n, l] = A * (f + sig * eps[n, l])
            ivar[n, l] = 1.0 / (A * A * var)


def _median_snr(model, shape2, sky2, sky_ratio, stride):
    """Median over every `stride`-th pixel of f/σ for noise scale 1: what a target S/N divides."""
    f = model[:, ::stride].astype(np.float64)
    b = sky_ratio[:, None]
    return np.median(f / np.sqrt(shape2[::stride] * (np.maximum(f, 0.0) + b * sky2[::stride]) / (1.0 + b)), axis=1)


def _dispersion_mix(v):
    """Lower SIGMA_GRID index k and weight a of k+1 whose mixture has kernel variance exactly v²."""
    K = SIGMA_GRID.size
    k = np.clip(np.searchsorted(SIGMA_GRID, v) - 1, 0, K - 2)
    s1, s2 = SIGMA_GRID[k], SIGMA_GRID[k + 1]
    return k, (v**2 - s1**2) / (s2**2 - s1**2)


def _template_path():
    path = resources.files("kcorrect") / "data" / "templates" / TEMPLATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"kcorrect template file {TEMPLATE_FILE} not found at {path}")
    return path


@functools.lru_cache(maxsize=1)
def stellar_templates():
    """kcorrect v4 templates with their nebular lines cut out.

    Returns (wave (nw,) Å, flux (5, nw) normalised to mean 1 over the 5300–5850 Å window, hbeta_ew (5,)):
    hbeta_ew is the Hβ emission each template carried, in Å of its window continuum — the scale of our lines.

    The cut replaces ±4 template pixels (±340 km/s) around each line by min(flux, a line between the medians
    either side), which removes emission and keeps absorption where absorption wins.
    """
    from astropy.io import fits

    with fits.open(_template_path()) as hdul:
        row = hdul["FLUX"].data[0]
        wave = np.asarray(row["wave"], dtype=np.float64)
        flux = np.asarray(row["flux"], dtype=np.float64)
    pix = np.interp(np.log10(NEBULAR_IN_TEMPLATES), np.log10(wave), np.arange(wave.size))
    half = 4
    windows = []
    for lo, hi in sorted((int(np.floor(x)) - half + 1, int(np.ceil(x)) + half - 1) for x in pix):
        if windows and lo <= windows[-1][1] + 2:
            windows[-1] = (windows[-1][0], max(hi, windows[-1][1]))
        else:
            windows.append((lo, hi))
    clean = flux.copy()
    for lo, hi in windows:
        xl, xr = lo - 2, hi + 3
        yl = np.median(flux[:, lo - 4:lo - 1], axis=1)
        yr = np.median(flux[:, hi + 2:hi + 5], axis=1)
        x = np.arange(lo, hi + 1)
        line = yl[:, None] + (yr - yl)[:, None] * (x - xl) / (xr - xl)
        clean[:, lo:hi + 1] = np.minimum(flux[:, lo:hi + 1], line)
    in_window = (wave >= NORM_WINDOW[0]) & (wave <= NORM_WINDOW[1])
    level = clean[:, in_window].mean(axis=1)
    dwave = np.gradient(wave)
    hb = (wave > 4840.0) & (wave < 4885.0)
    hbeta_ew = np.clip(((flux - clean) * dwave)[:, hb].sum(axis=1) / level, 0.0, None)
    return wave, clean / level[:, None], hbeta_ew


@dataclass(frozen=True)
class _Basis:
    """Pre-broadened templates and line profiles on the fine restframe log grid (cached per grid)."""

    log0: float
    dlog: float
    wave: np.ndarray  # (F,) fine restframe grid, Å
    templates: np.ndarray  # (T*K, F) float32, row t*K + k: template t broadened to SIGMA_GRID[k]
    lines: np.ndarray  # (J, K, W) float32 unit-flux line profiles on windows of the fine grid
    line_start: np.ndarray  # (J,) first fine pixel of each line window
    hbeta_ew: np.ndarray  # (T,)
    n_templates: int


def _gauss_kernel(sigma_pix: float) -> np.ndarray:
    h = int(math.ceil(5 * sigma_pix))
    x = np.arange(-h, h + 1)
    k = np.exp(-0.5 * (x / sigma_pix) ** 2)
    return k / k.sum()


@functools.lru_cache(maxsize=8)
def _basis(wave_lo: float, wave_hi: float) -> _Basis:
    twave, tflux, hbeta_ew = stellar_templates()
    dlog = FINE_DLOG
    pix_per_kms = 1.0 / (C_KMS * LN10 * dlog)
    pad = int(math.ceil(5 * SIGMA_GRID[-1] * pix_per_kms)) + 2
    log0 = math.log10(wave_lo) - dlog
    F = int(math.ceil((math.log10(wave_hi) + dlog - log0) / dlog)) + 1
    log_pad = log0 + dlog * np.arange(-pad, F + pad)
    if 10 ** log_pad[0] < twave[0] or 10 ** log_pad[-1] > twave[-1]:
        raise MockError(f"restframe range {wave_lo:.0f}–{wave_hi:.0f} Å is outside the kcorrect templates")
    padded = np.stack([np.interp(log_pad, np.log10(twave), t) for t in tflux])
    T, K = padded.shape[0], SIGMA_GRID.size
    templates = np.empty((T * K, F), np.float32)
    for k, sigma in enumerate(SIGMA_GRID):
        kern = _gauss_kernel(sigma * pix_per_kms)
        for t in range(T):
            templates[t * K + k] = np.convolve(padded[t], kern, mode="same")[pad:pad + F]
    wave = 10.0 ** (log0 + dlog * np.arange(F))
    # Line windows ±5σ_max; profiles normalised to unit integral over restframe Å.
    W = 2 * pad + 1
    line_start = np.empty(len(LINES), np.int64)
    lines = np.zeros((len(LINES), K, W), np.float32)
    for j, lam in enumerate(LINE_WAVE):
        c = int(round((math.log10(lam) - log0) / dlog))
        line_start[j] = c - pad
        lw = 10.0 ** (log0 + dlog * np.arange(c - pad, c + pad + 1))
        for k, sigma in enumerate(SIGMA_GRID):
            s = lam * sigma / C_KMS
            lines[j, k] = np.exp(-0.5 * ((lw - lam) / s) ** 2) / (math.sqrt(2 * math.pi) * s)
    if line_start.min() < 0 or line_start.max() + W > F:
        raise MockError("emission-line windows fall outside the internal restframe grid")
    return _Basis(log0, dlog, wave, templates, lines, line_start, hbeta_ew, T)


@dataclass
class MockSpectra(Spectra):
    """Mock spectra on an instrument grid with their ground truth (all rows share the instrument).

    flux, ivar, mask, z, z_err, object_id, norm: as in the HDF5 layout (normalised like ingest).
    The per-row ground truth travels as the extra columns ``truth/<name>`` (so a writer stores it as such);
    `truth` maps each <name> to its array —
      weights (n, 5)       mixture weights of the kcorrect v4 templates (fractions of the dust-free
                           5300–5850 Å continuum light; they sum to 1)
      line_flux (n, 12)    emission-line fluxes as they appear in the spectrum (after dust), integrated over
                           restframe Å, in the units of the stored (normalised) flux; order LINE_NAMES
      vdisp (n,)           velocity dispersion, km/s (RMS of the LOSVD applied to templates and lines)
      ebv (n,)             nebular E(B−V); the continuum is attenuated by 0.44·ebv (Calzetti 2000)
      z (n,)               true redshift (the Z column holds the same value)
      snr (n,)             the median S/N per pixel the noise was scaled to
      quiescent (n,)       True for the passive population, False for star-forming
      spec_rest (n, R)     noiseless restframe spectrum on wave_rest, in the stored flux normalisation
                           (only with restframe_truth)
      model_obs (n, L)     noiseless observed spectrum on wave_obs, stored normalisation (only with
                           observed_truth)
    """

    instrument: Instrument | None = None
    z_max: float = 0.5

    @property
    def truth(self) -> dict:
        return {k[len(TRUTH):]: v for k, v in self.extra.items() if k.startswith(TRUTH)}

    @property
    def wave_obs(self) -> np.ndarray:
        return self.instrument.wave_obs

    @property
    def wave_rest(self) -> np.ndarray:
        return self.instrument.wave_rest(self.z_max)


def z_limit(instrument) -> float:
    """Largest z_max for which the normalisation window 5300–5850 Å stays on the observed grid."""
    inst = get_instrument(instrument)
    return math.floor((inst.wave_max / NORM_WINDOW[1] - 1.0) * 1000) / 1000


class MockGenerator:
    """Draws mock spectra chunk by chunk; chunk c is a pure function of (parameters, seed, c)."""

    def __init__(self, instrument="sdss", seed: int = 0, z_max: float = 0.5, z_min: float = 0.0,
                 z_dist: str = "sdss", snr_median: float | None = None, restframe_truth: bool = True,
                 observed_truth: bool = False, id_offset: int = 0, features=()):
        self.instrument = get_instrument(instrument)
        try:
            self.features = parse_features(features)
        except ValueError as err:
            raise MockError(str(err)) from None
        inst = self.instrument
        if not (isinstance(seed, (int, np.integer)) and seed >= 0):
            raise MockError(f"seed must be a non-negative integer, got {seed!r}")
        zlim = z_limit(inst)
        if not (0.0 <= z_min < z_max):
            raise MockError(f"need 0 ≤ z_min < z_max, got z_min={z_min}, z_max={z_max}")
        if z_max > zlim:
            raise MockError(
                f"z_max={z_max} is too high for {inst.name}: the normalisation window "
                f"{NORM_WINDOW[0]:.0f}–{NORM_WINDOW[1]:.0f} Å leaves the observed grid (≤ {inst.wave_max:.0f} Å) "
                f"beyond z = {zlim}"
            )
        if z_dist not in Z_DISTRIBUTIONS:
            raise MockError(f"z_dist must be one of {', '.join(Z_DISTRIBUTIONS)}, got {z_dist!r}")
        self.snr_median = SNR_MEDIAN.get(inst.name, 10.0) if snr_median is None else float(snr_median)
        if not (self.snr_median > 0):
            raise MockError(f"snr_median must be positive, got {snr_median}")
        self.seed, self.z_min, self.z_max, self.z_dist = int(seed), float(z_min), float(z_max), z_dist
        self.restframe_truth, self.observed_truth = bool(restframe_truth), bool(observed_truth)
        if not (isinstance(id_offset, (int, np.integer)) and id_offset >= 0):
            raise MockError(f"id_offset must be a non-negative integer, got {id_offset!r}")
        self.id_offset = int(id_offset)

        self.lsf_kms = lsf_sigma_kms(inst.name) if "lsf" in self.features else 0.0
        self.wave_obs = inst.wave_obs
        self.logw_obs = np.log10(self.wave_obs)
        self.wave_rest = inst.wave_rest(self.z_max)
        self.logw_rest = np.log10(self.wave_rest)
        self.basis = _basis(float(self.wave_rest[0]), float(self.wave_obs[-1]))
        shape = NOISE_SHAPE.get(inst.name, NOISE_SHAPE["sdss"])
        self.noise_shape2 = np.interp(self.wave_obs, *zip(*shape)) ** 2
        # Sky background relative to its continuum (whose colour NOISE_SHAPE already holds) plus the bright lines.
        sky = np.ones_like(self.wave_obs)
        for lam in inst.sky_lines:
            amp = 10.0 if abs(lam - 5577.34) < 1 else 4.0
            sky = sky + amp * np.exp(-0.5 * ((self.wave_obs - lam) / 1.5) ** 2)
        self.sky2 = sky
        self.sky_mask = inst.sky_mask()
        # Attenuation of each line relative to the continuum at its wavelength, per unit nebular E(B−V).
        self.k_lines = calzetti_k(LINE_WAVE)
        zt = np.linspace(self.z_min, self.z_max, 4097)
        u = (zt / Z0_SDSS) ** 1.5
        cdf = 1.0 - np.exp(-u) * (1.0 + u)
        self._z_table = (zt, (cdf - cdf[0]) / (cdf[-1] - cdf[0]))

    # -- parameters ---------------------------------------------------------------------------------------
    def _draw_parameters(self, rng: np.random.Generator, M: int) -> dict:
        T = self.basis.n_templates
        p = {}
        u = rng.random(M)
        if self.z_dist == "uniform":
            p["z"] = self.z_min + (self.z_max - self.z_min) * u
        else:
            p["z"] = np.interp(u, self._z_table[1], self._z_table[0])
        q = rng.random(M) < 0.45
        p["quiescent"] = q
        # Passive: old template (3) with some of the weak-line old one (0) and A-star light (4).
        w_q = rng.dirichlet([1.0, 0.02, 0.05, 3.0, 0.3], size=M)
        w_sf = rng.dirichlet([0.5, 0.8, 1.2, 0.5, 0.8], size=M)
        p["weights"] = np.where(q[:, None], w_q, w_sf)[:, :T]
        g = rng.standard_normal((M, 8))
        p["vdisp"] = np.clip(np.where(q, 190.0, 90.0) * np.exp(0.3 * g[:, 0]), *VDISP_RANGE)
        p["ebv"] = np.clip(np.where(q, 0.08, 0.25) * np.exp(0.5 * g[:, 1]), 0.0, 1.0)
        # Line ratios: star-forming galaxies on the BPT star-forming sequence (below Kauffmann et al. 2003),
        # parameterised by log [N II]/Hα (a metallicity proxy); passive ones LINER-like.
        x_sf = np.clip(-0.45 + 0.2 * g[:, 2], -1.2, -0.15)
        x_q = np.clip(0.15 * g[:, 2], -0.4, 0.4)
        log_n2ha = np.where(q, x_q, x_sf)
        log_o3hb = np.where(q, 0.1 + 0.2 * g[:, 3], 0.61 / (x_sf - 0.05) + 1.15 + 0.1 * g[:, 3])
        o2_median, o2_scatter = oii_relation(np.where(q, 3, 0), log_n2ha)
        log_o2hb = o2_median + o2_scatter * g[:, 4]
        log_s2ha = np.where(q, -0.2, -0.55) + 0.1 * g[:, 5]
        hbeta = (p["weights"] @ self.basis.hbeta_ew) * 10.0 ** (0.15 * g[:, 6])
        F = np.zeros((M, len(LINES)))  # the extra lines stay 0 unless a mockvar feature adds them
        F[:, _IL["Hbeta"]] = hbeta
        F[:, _IL["Halpha"]] = HALPHA_HBETA * hbeta
        F[:, _IL["Hgamma"]] = HGAMMA_HBETA * hbeta
        F[:, _IL["Hdelta"]] = HDELTA_HBETA * hbeta
        o3 = 10.0**log_o3hb * hbeta
        F[:, _IL["OIII_5007"]], F[:, _IL["OIII_4959"]] = o3, o3 / OIII_RATIO
        n2 = 10.0**log_n2ha * HALPHA_HBETA * hbeta
        F[:, _IL["NII_6584"]], F[:, _IL["NII_6548"]] = n2, n2 / NII_RATIO
        o2 = 10.0**log_o2hb * hbeta
        F[:, _IL["OII_3729"]], F[:, _IL["OII_3726"]] = o2 * OII_RATIO / (1 + OII_RATIO), o2 / (1 + OII_RATIO)
        s2 = 10.0**log_s2ha * HALPHA_HBETA * hbeta
        F[:, _IL["SII_6717"]], F[:, _IL["SII_6731"]] = s2 * SII_RATIO / (1 + SII_RATIO), s2 / (1 + SII_RATIO)
        p["line_flux_intrinsic"] = F
        p["line_flux"] = F * 10.0 ** (-0.4 * self.k_lines[None, :] * p["ebv"][:, None])
        p["snr"] = np.clip(self.snr_median * np.exp(SNR_SPREAD * g[:, 7]), *SNR_RANGE)
        h = rng.standard_normal((M, 3))
        p["sky_ratio"] = np.exp(0.5 * h[:, 0])
        p["amp"] = 10.0 ** (0.7 + 0.35 * h[:, 1])
        p["z_err"] = 10.0 ** (-4.7 + 0.2 * h[:, 2]) * np.sqrt(10.0 / p["snr"]) * (1.0 + p["z"])
        return p

    def _draw_bad_pixels(self, rng: np.random.Generator, M: int) -> np.ndarray:
        L = self.instrument.L
        bad = np.zeros((M, L), bool)
        has_run = rng.random(M) < BAD_RUN_PROB
        length = (L * rng.uniform(*BAD_RUN_FRACTION, size=M)).astype(np.int64) + 1
        start = (rng.random(M) * (L - length)).astype(np.int64)
        for n in np.flatnonzero(has_run):
            bad[n, start[n]:start[n] + length[n]] = True
        count = np.minimum(rng.poisson(COSMICS_PER_SPECTRUM * L / 3921, size=M), _MAX_COSMICS)
        where = rng.integers(0, L, size=(M, _MAX_COSMICS))
        use = np.arange(_MAX_COSMICS)[None, :] < count[:, None]
        bad[np.nonzero(use)[0], where[use]] = True
        return bad

    # -- spectra ------------------------------------------------------------------------------------------
    def _render(self, p: dict, M: int):
        """Noiseless observed spectra (M, L) and restframe spectra (M, R) or None, window units, with dust."""
        B = self.basis
        k, a = _dispersion_mix(np.hypot(p["vdisp"], self.lsf_kms))
        kg, ag = (k, a) if "vdisp_gas" not in p else _dispersion_mix(np.hypot(p["vdisp_gas"], self.lsf_kms))
        K = SIGMA_GRID.size
        T = p["weights"].shape[1]
        base = np.arange(T)[None, :] * K + k[:, None]
        rows = np.concatenate([base, base + 1], axis=1)
        coefs = np.concatenate([p["weights"] * (1 - a)[:, None], p["weights"] * a[:, None]], axis=1)
        # Lines enter before the continuum dust that _sample_row applies, so pre-divide by it.
        ebv_star = EBV_STARS_PER_GAS * p["ebv"]
        lf = p["line_flux"] * 10.0 ** (0.4 * self.k_lines[None, :] * ebv_star[:, None])
        line_coefs = np.stack([lf * (1 - ag)[:, None], lf * ag[:, None]], axis=2)
        model = np.empty((M, self.instrument.L), np.float32)
        rest = np.empty((M, self.wave_rest.size) if self.restframe_truth else (M, 1), np.float32)
        _render(B.templates, rows, coefs.astype(np.float32), B.lines, B.line_start, kg,
                line_coefs.astype(np.float32), B.log0, B.dlog, np.log10(1.0 + p["z"]), ebv_star,
                self.logw_obs, self.wave_obs, model, self.logw_rest, self.wave_rest, rest, self.restframe_truth)
        if "broad" in p and (p["broad"][:, 2] > 0).any():  # broad-line AGN: broad Balmer lines + power law
            add_agn(model, self.wave_obs, p["z"], p["broad"], self.lsf_kms)
            if self.restframe_truth:
                add_agn(rest, self.wave_rest, np.zeros(M), p["broad"], self.lsf_kms)
        return model, (rest if self.restframe_truth else None)

    def _chunk_draws(self, c: int):
        """Chunk c's parameters (all CHUNK rows), systematics (or None) and its noise and bad-pixel generators."""
        ss = np.random.SeedSequence(self.seed, spawn_key=(int(c),))
        rng_par, rng_noise, rng_bad = (np.random.default_rng(s) for s in ss.spawn(3))
        p = self._draw_parameters(rng_par, CHUNK)
        sys_ = None
        if self.features:  # their own generators (children 3, 4): the basic draws above stay as they were
            rng_var, rng_sys = (np.random.default_rng(s) for s in ss.spawn(2))
            draw_lines(rng_var, p, self.features, _IL, self.basis.hbeta_ew, self.k_lines, CASE_B)
            sys_ = draw_systematics(rng_sys, CHUNK, self.features, len(self.instrument.sky_lines))
        return p, sys_, rng_noise, rng_bad

    def chunk(self, c: int, m: int = CHUNK) -> MockSpectra:
        """The first `m` spectra of chunk c (rows c·CHUNK … c·CHUNK + m − 1).

        Parameters and bad pixels are drawn for the full chunk and cut to m rows; the noise generator fills
        rows in order, so drawing m rows gives the first m rows of a full draw. Either way a row does not
        depend on m, and a short run costs only its own rows."""
        if not 1 <= m <= CHUNK:
            raise ValueError(f"rows per chunk must be in [1, {CHUNK}], got {m}")
        p, sys_, rng_noise, rng_bad = self._chunk_draws(c)
        p = {k: v[:m] for k, v in p.items()}
        sys_ = None if sys_ is None else {k: v[:m] for k, v in sys_.items()}
        eps = rng_noise.standard_normal((m, self.instrument.L), dtype=np.float32)
        bad = self._draw_bad_pixels(rng_bad, CHUNK)[:m]
        ids = self.id_offset + c * CHUNK + np.arange(m, dtype=np.int64)
        return self._observe(p, sys_, eps, bad, ids, c * CHUNK, f"mock chunk {c}")

    def rerender(self, rows, z, noise_seed: int) -> MockSpectra:
        """Rows `rows` of this generator's output — the same galaxies (physical parameters and systematics) — at
        redshifts `z` (one per row), with fresh noise and bad pixels drawn from `noise_seed`: independent
        observations of the same galaxies at other redshifts. Rows may repeat; object_id stays the row's."""
        rows = np.asarray(rows, np.int64)
        z = np.broadcast_to(np.asarray(z, np.float64), rows.shape).copy()
        if rows.ndim != 1 or rows.size == 0 or rows.min() < 0:
            raise MockError("rows must be a non-empty 1-d array of non-negative row numbers")
        if not np.all((z >= 0) & (z <= self.z_max)):
            raise MockError(f"re-render redshifts must lie in [0, z_max = {self.z_max}]")
        parts, sys_parts = [], []
        for c in np.unique(rows // CHUNK):
            sel = rows[rows // CHUNK == c] - c * CHUNK
            p, sys_, _, _ = self._chunk_draws(int(c))
            parts.append({k: v[sel] for k, v in p.items()})
            sys_parts.append(None if sys_ is None else {k: v[sel] for k, v in sys_.items()})
        order = np.argsort(rows // CHUNK, kind="stable")  # rows were gathered chunk by chunk
        back = np.empty_like(order)
        back[order] = np.arange(order.size)
        p = {k: np.concatenate([q[k] for q in parts])[back] for k in parts[0]}
        sys_ = None if sys_parts[0] is None else {k: np.concatenate([q[k] for q in sys_parts])[back]
                                                    for k in sys_parts[0]}
        p["z_err"] = p["z_err"] * (1.0 + z) / (1.0 + p["z"])
        p["z"] = z
        rng = np.random.default_rng(noise_seed)
        eps = rng.standard_normal((rows.size, self.instrument.L), dtype=np.float32)
        bad = self._draw_bad_pixels(rng, rows.size)
        return self._observe(p, sys_, eps, bad, self.id_offset + rows, 0, "mock re-render")

    def _observe(self, p: dict, sys_, eps, bad, ids, start: int, what: str) -> MockSpectra:
        """Render the galaxies of `p`, observe them (noise eps, systematics, bad pixels) and normalise as ingest."""
        inst = self.instrument
        M, L = len(p["z"]), inst.L
        model, rest = self._render(p, M)

        snr1 = _median_snr(model, self.noise_shape2, self.sky2, p["sky_ratio"], 16)
        scale = snr1 / p["snr"]
        flux_raw = np.empty((M, L), np.float32)
        ivar_raw = np.empty((M, L), np.float32)
        _add_noise(model, self.noise_shape2, self.sky2, p["sky_ratio"], scale, p["amp"], eps, flux_raw, ivar_raw)
        if sys_ is not None:
            apply_systematics(flux_raw, ivar_raw, self.wave_obs, inst.sky_lines, sys_)
        flux_raw[bad] = 0.0
        ivar_raw[bad] = 0.0

        norm = normalization(flux_raw, ivar_raw, self.wave_obs, p["z"])
        if not np.all(np.isfinite(norm)):
            n = int(np.flatnonzero(~np.isfinite(norm))[0])
            raise RuntimeError(f"{what} row {n}: no valid normalisation (z={p['z'][n]:.4f}); a bug")
        flux, ivar = apply_normalization(flux_raw, ivar_raw, norm)
        mask = bad_pixel_mask(ivar, pipeline_mask=bad, sky=self.sky_mask[None, :])
        scale_out = (p["amp"] / norm)[:, None]
        scale_out32 = scale_out.astype(np.float32)
        truth = {
            "weights": p["weights"].astype(np.float32),
            "line_flux": (p["line_flux"] * scale_out).astype(np.float32),
            "vdisp": p["vdisp"].astype(np.float32),
            "ebv": p["ebv"].astype(np.float32),
            "z": p["z"],
            "snr": p["snr"].astype(np.float32),
            "quiescent": p["quiescent"],
        }
        if self.features:
            broad = p["broad"].copy()
            broad[:, :2] *= scale_out  # fluxes in stored units; σ and the power-law fraction as they are
            truth.update(line_class=p["line_class"], vdisp_gas=p["vdisp_gas"].astype(np.float32),
                         broad=broad.astype(np.float32), calibration=sys_["calibration"].astype(np.float32),
                         sky_residual=sys_["sky_residual"].astype(np.float32),
                         ivar_scale=sys_["ivar_scale"].astype(np.float32))
        if rest is not None:
            rest *= scale_out32
            truth["spec_rest"] = rest
        if self.observed_truth:
            model *= scale_out32
            truth["model_obs"] = model
        return MockSpectra(flux, ivar, mask, p["z"], p["z_err"].astype(np.float32), np.asarray(ids).astype(np.uint64),
                           norm.astype(np.float32), extra={TRUTH + k: v for k, v in truth.items()},
                           start=start, instrument=inst, z_max=self.z_max)

    def rows(self, start: int, stop: int):
        """Yield MockSpectra covering rows [start, stop), one (partial) chunk at a time."""
        c = start // CHUNK
        while c * CHUNK < stop:
            lo, hi = max(start, c * CHUNK), min(stop, (c + 1) * CHUNK)
            yield self.chunk(c, hi - c * CHUNK).rows(lo - c * CHUNK, hi - c * CHUNK)
            c += 1


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise MockError(f"n (number of spectra) must be a positive integer, got {n!r}")
    return int(n)


def make_mock(n: int, instrument="sdss", seed: int = 0, z_max: float = 0.5, z_min: float = 0.0,
              z_dist: str = "sdss", snr_median: float | None = None, restframe_truth: bool = True,
              observed_truth: bool = False, id_offset: int = 0, features=()) -> MockSpectra:
    """`n` mock spectra in memory (see MockSpectra for the fields and the truth they carry).

    instrument: 'sdss' | 'boss' | 'desi'; z_dist: 'sdss' (main-sample-like n(z), truncated to [z_min, z_max])
    or 'uniform'; snr_median: median S/N per pixel (default per survey: SDSS 10, BOSS 5, DESI 4);
    restframe_truth: keep the noiseless restframe spectrum (n × R floats); observed_truth: keep the noiseless
    observed spectrum too. features: 'basic' (none, the default), 'rich' (all) or a list of
    fastspec.mockvar.FEATURES — the variation beyond a template mixture (see fastspec.mockvar).
    """
    n = _check_n(n)
    gen = MockGenerator(instrument, seed, z_max, z_min, z_dist, snr_median, restframe_truth, observed_truth,
                        id_offset, features)
    return MockSpectra.concat(list(gen.rows(0, n)))


def write_mock(path, n: int, instrument="sdss", seed: int = 0, z_max: float = 0.5, z_min: float = 0.0,
               z_dist: str = "sdss", snr_median: float | None = None, restframe_truth: bool = True,
               observed_truth: bool = False, id_offset: int = 0, progress: bool = True, features=()) -> dict:
    """Write `n` mock spectra to `path` in the fastspec HDF5 layout (atomically), truth under `truth/`.

    File-level extras: `truth_wave_rest` (R,) the restframe grid of truth/spec_rest, `truth_line_wave` and
    `truth_line_names` (12,) for truth/line_flux; attrs record the mock parameters. Returns a summary dict
    (path, n, seconds, spectra_per_s, bytes). object_id runs from `id_offset` (to keep ids unique across files).
    features: as for make_mock.
    """
    from tqdm import tqdm

    n = _check_n(n)
    gen = MockGenerator(instrument, seed, z_max, z_min, z_dist, snr_median, restframe_truth, observed_truth,
                        id_offset, features)
    inst = gen.instrument
    attrs = {
        "mock": True, "mock_seed": gen.seed, "mock_z_min": gen.z_min, "mock_z_max": gen.z_max,
        "mock_z_dist": gen.z_dist, "mock_snr_median": gen.snr_median, "mock_templates": TEMPLATE_FILE,
        "mock_dust": "Calzetti (2000); continuum E(B-V) = 0.44 * truth/ebv",
        "mock_chunk": CHUNK, "mock_features": ",".join(gen.features) or "basic",
        "mock_lsf_kms": gen.lsf_kms,
    }
    t0 = time.perf_counter()
    with SpectraWriter(path, inst, attrs=attrs) as w, \
            tqdm(total=n, unit="spec", unit_scale=True, desc="mock", disable=not progress) as bar:
        for part in gen.rows(0, n):
            w.write_spectra(part)
            bar.update(len(part))
        # File-level arrays (marked file_level, which validate honours) go in after the last write: the writer
        # treats every dataset present during a write as a per-row column.
        h5 = w.h5
        for name, data in (("truth_wave_rest", gen.wave_rest), ("truth_line_wave", LINE_WAVE),
                           ("truth_line_names", np.array(LINE_NAMES, dtype="S"))):
            h5.create_dataset(name, data=data).attrs["file_level"] = True
        h5["truth/line_flux"].attrs["names"] = np.array(LINE_NAMES, dtype="S")
        h5["truth/line_flux"].attrs["wave_rest"] = LINE_WAVE
        h5["truth/line_flux"].attrs["units"] = "stored flux units x restframe Angstrom (after dust)"
        h5["truth/weights"].attrs["templates"] = f"{TEMPLATE_FILE} templates 0-4"
        h5["truth/vdisp"].attrs["units"] = "km/s"
        if restframe_truth:
            h5["truth/spec_rest"].attrs["wave"] = "truth_wave_rest"
    seconds = time.perf_counter() - t0
    return {"path": os.fspath(path), "n": n, "instrument": inst.name, "seconds": seconds,
            "spectra_per_s": n / seconds, "bytes": os.path.getsize(path)}
