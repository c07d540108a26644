"""The variation that makes mock galaxies less linear than a template mixture (`fastspec.mock`'s features).

Each feature is switchable (for ablations) and stores what it drew under truth/:
  decoupled_lines  line strengths scatter 0.5 dex at fixed continuum (0.15 dex without); half the passive
                   galaxies carry no lines                                         → truth/hbeta_scatter_dex
  bpt              star-forming, composite, Seyfert, LINER and broad-line AGN with class-dependent line ratios
                   and scatter (without: star-forming sequence or LINER-like by population) → truth/line_class
  extra_lines      [Ne III] 3869, He I 5876, [O I] 6300/6363, [Ar III] 7135, [S III] 9069 (zero without)
  gas_dispersion   gas velocity dispersion independent of the stellar one (without: the stellar one)
                                                                                   → truth/vdisp_gas
  lsf              the instrument's line-spread function (R ≈ 2000 SDSS/BOSS, 3500 DESI) on stars and gas
  calibration      smooth spectrophotometric calibration error: flux × exp(Σ a_k P_k), a_k ~ N(0, 0.03),
                   ivar consistent with it                                         → truth/calibration (n, 3)
  sky_residuals    sky-subtraction residuals at night-sky lines (wings of the masked bright lines and
                   unmasked faint OH lines), absent from ivar                       → truth/sky_residual
  ivar_scale       the stored ivar mis-scaled by a per-spectrum factor (lognormal, 0.15 in ln) → truth/ivar_scale
Broad-line AGN also get a power-law continuum and broad Hα/Hβ (truth/broad (n, 4): broad Hα flux, Hβ flux,
σ in km/s, power-law fraction of the window light).
"""
from __future__ import annotations

import math

import numpy as np

C_KMS = 299792.458

FEATURES = {
    "decoupled_lines": "line strengths with 0.5 dex scatter at fixed continuum; half the passive galaxies line-free",
    "bpt": "star-forming, composite, Seyfert, LINER and broad-line AGN, line ratios with scatter",
    "extra_lines": "[Ne III] 3869, He I 5876, [O I] 6300/6363, [Ar III] 7135, [S III] 9069",
    "gas_dispersion": "gas velocity dispersion independent of the stellar one",
    "lsf": "the instrument's line-spread function (R ≈ 2000 SDSS/BOSS, 3500 DESI)",
    "calibration": "smooth spectrophotometric calibration errors (a few %)",
    "sky_residuals": "sky-subtraction residuals at night-sky lines, not in ivar",
    "ivar_scale": "ivar mis-scaled by a per-spectrum factor",
}
PRESETS = {"basic": (), "rich": tuple(FEATURES)}
CLASSES = ("star-forming", "composite", "Seyfert", "LINER", "broad-line AGN", "line-free")
# class probabilities by population (with `bpt`); line-free only with `decoupled_lines`
# broad-line AGN in galaxy-selected samples sit in massive, mostly old hosts: passive hosts get them too
P_CLASS_ACTIVE = (0.70, 0.15, 0.08, 0.04, 0.03, 0.0)
P_CLASS_PASSIVE = (0.0, 0.05, 0.05, 0.37, 0.03, 0.50)
RESOLUTION = {"sdss": 2000.0, "boss": 2000.0, "desi": 3500.0}
CALIB_SIGMA = 0.03
IVAR_SCALE_SIGMA = 0.15
# Faint OH lines that no sky mask lists: a fixed pseudo-random forest over the red (where OH bands are).
OH_FOREST = np.sort(np.random.default_rng(20260).uniform(6500.0, 10400.0, 80))


def parse_features(spec) -> tuple[str, ...]:
    """'basic', 'rich', or a comma-separated list of FEATURES (also an iterable of names) → sorted tuple."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        if spec in PRESETS:
            return tuple(sorted(PRESETS[spec]))
        names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = list(spec)
    bad = [n for n in names if n not in FEATURES]
    if bad:
        raise ValueError(f"unknown mock feature(s) {', '.join(map(repr, bad))}; choose from "
                         f"{', '.join(PRESETS)} or a comma-separated list of {', '.join(FEATURES)}")
    return tuple(sorted(set(names)))


def lsf_sigma_kms(instrument_name: str) -> float:
    """σ of the line-spread function in km/s: c / (2.355 R)."""
    return C_KMS / (2.3548 * RESOLUTION.get(instrument_name, 2000.0))


def _kauffmann(x):
    return 0.61 / (x - 0.05) + 1.30


def _kewley(x):
    return 0.61 / (x - 0.47) + 1.19


def oii_relation(line_class, log_n2ha) -> tuple[np.ndarray, np.ndarray]:
    """What the mocks draw [O II] 3726+3729 from: (median log [O II]/Hβ, its Gaussian scatter in dex) by class —
    star-forming on the metallicity sequence in log [N II]/Hα, AGN and composites 0.3, LINERs 0.55. The science
    check's [O II] oracle uses it too: the spread around it is the part of [O II] nothing else in a mock predicts."""
    cls = np.asarray(line_class)
    x = np.asarray(log_n2ha, np.float64)
    median = np.select([cls == 0, np.isin(cls, (1, 2, 4)), cls == 3], [0.35 - 0.5 * (x + 0.45), 0.3, 0.55], 0.0)
    return median, np.where(cls == 0, 0.1, 0.15)


def draw_lines(rng, p: dict, features, line_index: dict, hbeta_ew, k_lines, case_b: dict) -> None:
    """Replace p's line fluxes (and add class, gas dispersion, broad components) for the enabled features.

    rng: this chunk's own generator (drawn in full whatever the features, so that switching one feature does
    not change the draws of another). p: the basic parameters of fastspec.mock (weights, quiescent, vdisp,
    ebv, line_flux_intrinsic, line_flux). Writes p['line_class'], p['vdisp_gas'], p['broad'] and, when a line
    feature is on, new line_flux_intrinsic / line_flux.
    """
    M = len(p["z"])
    q = p["quiescent"]
    g = rng.standard_normal((M, 16))
    u = rng.random((M, 4))
    # class: basic populations are star-forming (active) or LINER-like (passive)
    cls = np.where(q, 3, 0)
    if "bpt" in features or "decoupled_lines" in features:
        pa = np.array(P_CLASS_ACTIVE)
        pp = np.array(P_CLASS_PASSIVE)
        if "bpt" not in features:  # only the line-free passive fraction
            pa, pp = np.eye(6)[0], np.array([0, 0, 0, 0.5, 0, 0.5])
        if "decoupled_lines" not in features:  # no line-free class: its share goes to LINER
            pp = pp.copy()
            pp[3] += pp[5]
            pp[5] = 0.0
        cum_a, cum_p = np.cumsum(pa / pa.sum()), np.cumsum(pp / pp.sum())
        cls = np.where(q, np.searchsorted(cum_p, u[:, 0], side="right"),
                       np.searchsorted(cum_a, u[:, 0], side="right")).clip(0, 5)
    p["line_class"] = cls.astype(np.int8)
    gas = np.clip(np.where(np.isin(cls, (2, 3, 4)), 150.0, 70.0) * np.exp(0.35 * g[:, 0]), 30.0, 350.0)
    p["vdisp_gas"] = gas if "gas_dispersion" in features else p["vdisp"].copy()
    p["broad"] = np.zeros((M, 4))
    if not ({"bpt", "decoupled_lines", "extra_lines"} & set(features)):
        return
    scatter = 0.5 if "decoupled_lines" in features else 0.15
    hbeta = (p["weights"] @ hbeta_ew) * 10.0 ** (scatter * g[:, 1])
    hbeta = np.where(cls == 5, 0.0, hbeta)
    p["hbeta_scatter_dex"] = np.full(M, scatter)
    if "bpt" in features:
        x = np.select([cls == 0, cls == 1, np.isin(cls, (2, 4)), cls == 3],
                      [np.clip(-0.45 + 0.2 * g[:, 2], -1.2, -0.15), -0.35 + 0.3 * u[:, 1],
                       0.0 + 0.15 * g[:, 2], 0.1 + 0.15 * g[:, 2]], 0.0)
        y_comp = _kauffmann(np.minimum(x, -0.05)) + (0.1 + 0.8 * u[:, 2]) * (
            _kewley(np.minimum(x, -0.05)) - _kauffmann(np.minimum(x, -0.05)))
        y = np.select([cls == 0, cls == 1, np.isin(cls, (2, 4)), cls == 3],
                      [np.minimum(_kauffmann(x) - 0.15 + 0.1 * g[:, 3], _kauffmann(x) - 0.02), y_comp,
                       0.8 + 0.15 * g[:, 3], 0.0 + 0.15 * g[:, 3]], 0.0)
        o2_median, o2_scatter = oii_relation(cls, x)
        o2 = o2_median + o2_scatter * g[:, 4]
        s2 = np.select([cls == 0, cls == 1, np.isin(cls, (2, 4)), cls == 3], [-0.55, -0.4, -0.3, -0.15], 0.0)
        s2 = s2 + 0.1 * g[:, 5]
    else:  # the basic parameterisation (fastspec.mock) with this generator's draws
        x = np.where(q, np.clip(0.15 * g[:, 2], -0.4, 0.4), np.clip(-0.45 + 0.2 * g[:, 2], -1.2, -0.15))
        y = np.where(q, 0.1 + 0.2 * g[:, 3], 0.61 / (x - 0.05) + 1.15 + 0.1 * g[:, 3])
        o2_median, o2_scatter = oii_relation(np.where(q, 3, 0), x)
        o2 = o2_median + o2_scatter * g[:, 4]
        s2 = np.where(q, -0.2, -0.55) + 0.1 * g[:, 5]
    ha = case_b["HALPHA_HBETA"] * hbeta
    F = np.zeros((M, len(line_index)))
    F[:, line_index["Hbeta"]] = hbeta
    F[:, line_index["Halpha"]] = ha
    F[:, line_index["Hgamma"]] = case_b["HGAMMA_HBETA"] * hbeta
    F[:, line_index["Hdelta"]] = case_b["HDELTA_HBETA"] * hbeta
    o3 = 10.0**y * hbeta
    F[:, line_index["OIII_5007"]], F[:, line_index["OIII_4959"]] = o3, o3 / case_b["OIII_RATIO"]
    n2 = 10.0**x * ha
    F[:, line_index["NII_6584"]], F[:, line_index["NII_6548"]] = n2, n2 / case_b["NII_RATIO"]
    oii = 10.0**o2 * hbeta
    r = case_b["OII_RATIO"]
    F[:, line_index["OII_3729"]], F[:, line_index["OII_3726"]] = oii * r / (1 + r), oii / (1 + r)
    sii = 10.0**s2 * ha
    r = case_b["SII_RATIO"]
    F[:, line_index["SII_6717"]], F[:, line_index["SII_6731"]] = sii * r / (1 + r), sii / (1 + r)
    if "extra_lines" in features:
        agn = np.isin(cls, (2, 3, 4))
        F[:, line_index["NeIII_3869"]] = o3 * 10.0 ** (-1.0 + 0.15 * g[:, 6])
        F[:, line_index["HeI_5876"]] = hbeta * 10.0 ** (-1.0 + 0.1 * g[:, 7])
        oi = ha * 10.0 ** (np.select([cls == 0, cls == 1, np.isin(cls, (2, 4)), cls == 3],
                                     [-1.5, -1.2, -1.0, -0.7], -1.5) + 0.15 * g[:, 8])
        F[:, line_index["OI_6300"]], F[:, line_index["OI_6363"]] = oi, oi / 3.05
        F[:, line_index["ArIII_7135"]] = ha * 10.0 ** (np.where(agn, -1.3, -1.5) + 0.15 * g[:, 9])
        F[:, line_index["SIII_9069"]] = ha * 10.0 ** (-1.0 + 0.15 * g[:, 10])
    p["line_flux_intrinsic"] = F
    p["line_flux"] = F * 10.0 ** (-0.4 * k_lines[None, :] * p["ebv"][:, None])
    blr = cls == 4
    if blr.any():
        # broad Hα 1–5× the narrow Hα and a power law ≤ 0.2 of the light: galaxy-selected broad-line AGN are red
        # hosts with a weak broad base (the DR14 'AGN BROADLINE' spectra), not quasars
        ratio = 10.0 ** (0.7 * u[:, 3])
        sigma_b = np.clip(4000.0 * np.exp(0.3 * g[:, 11]), 1500.0, 8000.0) / 2.3548
        att_ha = 10.0 ** (-0.4 * k_lines[line_index["Halpha"]] * p["ebv"])
        att_hb = 10.0 ** (-0.4 * k_lines[line_index["Hbeta"]] * p["ebv"])
        p["broad"][blr, 0] = (ratio * ha * att_ha)[blr]
        p["broad"][blr, 1] = (ratio * ha / 3.1 * att_hb)[blr]
        p["broad"][blr, 2] = sigma_b[blr]
        p["broad"][blr, 3] = np.clip(0.08 * np.exp(0.5 * g[blr, 12]), 0.02, 0.2)


def add_agn(out: np.ndarray, wave: np.ndarray, z, broad: np.ndarray, lsf_kms: float = 0.0) -> None:
    """Add broad Hα/Hβ and the power-law continuum of broad-line AGN rows to spectra `out` (n, L) sampled at
    `wave` (observed Å) for galaxies at `z` (restframe: z = 0). Fluxes per restframe Å, window units."""
    for n in np.flatnonzero(broad[:, 2] > 0):
        rest = wave / (1.0 + z[n])
        s_kms = math.hypot(broad[n, 2], lsf_kms)
        for flux, lam in ((broad[n, 0], 6564.61), (broad[n, 1], 4862.68)):
            s = lam * s_kms / C_KMS
            out[n] += (flux * np.exp(-0.5 * ((rest - lam) / s) ** 2) / (math.sqrt(2 * math.pi) * s)).astype(out.dtype)
        out[n] += (broad[n, 3] * (rest / 5575.0) ** -1.5).astype(out.dtype)


def draw_systematics(rng, M: int, features, n_sky_lines: int) -> dict:
    """Per-spectrum systematics (always drawn, zero where off): calibration coefficients (M, 3), sky-residual
    amplitude (M,), ivar scale (M,), and the residual-sign draws (M, n_lines)."""
    g = rng.standard_normal((M, 5))
    signs = rng.standard_normal((M, n_sky_lines + OH_FOREST.size))
    return {"calibration": CALIB_SIGMA * g[:, :3] if "calibration" in features else np.zeros((M, 3)),
            "sky_residual": np.abs(1.5 * g[:, 3]) if "sky_residuals" in features else np.zeros(M),
            "ivar_scale": np.exp(IVAR_SCALE_SIGMA * g[:, 4]) if "ivar_scale" in features else np.ones(M),
            "sky_signs": signs}


def apply_systematics(flux, ivar, wave, sky_lines, s: dict) -> None:
    """In place, on raw flux and ivar (before normalisation): sky residuals (in units of each pixel's noise σ,
    not added to the variance), the calibration curve (flux × c, ivar / c²), then the ivar mis-scaling."""
    x = 2.0 * (wave - wave[0]) / (wave[-1] - wave[0]) - 1.0
    legendre = np.stack([x, 0.5 * (3 * x**2 - 1), 0.5 * (5 * x**3 - 3 * x)])  # P1..P3
    lines = np.concatenate([np.asarray(sky_lines, float), OH_FOREST])
    amp_line = np.concatenate([np.full(len(sky_lines), 1.0), np.full(OH_FOREST.size, 0.5)])
    rows = np.flatnonzero(s["sky_residual"] > 0)
    if rows.size:
        d = (wave[None, :] - lines[:, None]) / 3.0  # residual wings reach past the ±5 Å masks of the bright lines
        shape = amp_line[:, None] * np.where(np.abs(d) < 4.0, np.exp(-0.5 * d**2) * (1.0 + 0.7 * d), 0.0)
        sig = np.where(ivar[rows] > 0, 1.0 / np.sqrt(np.where(ivar[rows] > 0, ivar[rows], 1.0)), 0.0)
        r = s["sky_signs"][rows] @ shape  # (rows, L): a random-signed mix of line profiles per spectrum
        flux[rows] += (s["sky_residual"][rows, None] * r * sig).astype(flux.dtype)
    c = np.exp(s["calibration"] @ legendre).astype(flux.dtype)
    flux *= c
    ivar /= c * c
    ivar *= s["ivar_scale"][:, None].astype(ivar.dtype)
