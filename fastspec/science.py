"""Science checks: does fastspec reproduce what Melchior, Hahn & Liang 2022 report? (issue 6)

Mock spectra carry their ground truth (fastspec.mock), so each finding of the paper becomes a number:

1. fidelity — reduced χ² of held-out mock spectra under AE-S (S latents) against a weighted restframe PCA
   with S components fitted to the same training spectra, and the model error against the noiseless truth
   in units of the noise ("residuals below the noise");
2. extended restframe — for galaxies whose [O II] 3727 lies blueward of the observed range, the [O II] flux
   of the restframe model against the true one;
3. redshift invariance — held-out spectra moved to z = 0 … z_max (fastspec.augment.redshift_augment), the
   latent displacement relative to the sample's latent spread, for models trained (a) without augmentation,
   (b) with redshift augmentation, (c) with augmentation and consistency regularisation;
4. latents carry the physics — held-out R² of simple regressors (kNN, quadratic ridge) from latents to the
   true mixture weights, line strengths, velocity dispersion and dust;
5. real spectra — reduced χ² of the bundled real SDSS spectra under the mock-trained models.

`run(ScienceConfig.for_mode("quick"))` does everything (mocks → training → experiments → figures → JSON and
Markdown); bench/science.py is its command line. Models and mocks are cached in a work directory, so a rerun
with the same configuration only redoes the analysis.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .atomic import atomic_path, write_json, write_text
from .encode import encode_arrays
from .instruments import get_instrument
from .losses import CHI2_DEFINITION, reduced_chi2
from .mock import LINE_NAMES, make_mock, write_mock
from .model import load_model
from .plotting import pick_examples, pyplot, save_figure
from .restframe import to_restframe

# ---- configuration ------------------------------------------------------------------------------------------

# The paper's encoder has 128/256/512 channels; a CPU trains that at ~20 spectra/s, so the quick mode keeps the
# layout (kernels, pools, attention, MLPs, decoder to the full restframe grid) with 8x fewer channels.
QUICK_MODEL = dict(encoder_channels=(16, 32, 64))
TINY_MODEL = dict(encoder_channels=(4, 8, 16), encoder_hidden=(16, 8, 8), decoder_hidden=(16, 32, 64))

VARIANTS = {
    "a": dict(augment=False, consistency=0.0, label="(a) no augmentation"),
    "b": dict(augment=True, consistency=0.0, label="(b) redshift augmentation"),
    "c": dict(augment=True, consistency=None, label="(c) augmentation + consistency"),  # None: cfg weight
}

MODES = {
    # seconds on a laptop: for tests of the experiment code, numbers mean nothing
    "smoke": dict(n_train=320, n_test=96, n_lowz=64, n_invariance=8, n_pca_fit=256, pca_iter=4, pca_scan=(2,),
                  steps=4, batch_size=32, lr=2e-3, model=TINY_MODEL, invariance_z=(0.0, 0.25, 0.5)),
    # < 20 min on an idle 2-core CPU, three variants included. bf16 autocast with the fused numba kernels reaches
    # the fp32 loss (400 steps of 64: val loss 0.02169 vs 0.02151, held-out median χ² 1.318 vs 1.307) at half the
    # step time. Measured at batch 64 on the 2-core CPU (load 1–1.7, validation included): (a) 0.05–0.055 s/step,
    # (b) 0.08–0.09, (c) 0.095–0.11 → 3200 steps ≈ 170 + 280 + 330 s of training, plus ~2 min for compile, mocks,
    # PCA and analysis: ~15–16 min. Tuning (variant a, 3000 steps): held-out median χ² 1.061 at lr 2e-3, 1.048 at
    # 4e-3, 1.048 at 8e-3.
    "quick": dict(n_train=12000, n_test=2000, n_lowz=800, n_invariance=150, n_pca_fit=4000, pca_iter=25,
                  steps=3200, batch_size=64, lr=4e-3, precision="bf16", model=QUICK_MODEL),
    # a GPU: the paper's architecture, ~100 epochs of 100k spectra
    "full": dict(n_train=100_000, n_test=10_000, n_lowz=4000, n_invariance=1000, n_pca_fit=20_000, pca_iter=30,
                 steps=40_000, batch_size=256, lr=1e-3, model={}, precision="bf16", num_workers=4),
}

# [O II] 3727,3729 flux: continuum-subtracted integral over LINE, continuum a straight line through the
# medians of the two sidebands (restframe vacuum Å).
OII_WINDOW = (3708.0, 3750.0)
OII_SIDEBANDS = ((3680.0, 3705.0), (3753.0, 3780.0))
# Regression targets from the mock truth: line strengths as log10(0.5 + F), F in stored-flux·Å (≈ equivalent
# width against the 5300–5850 Å continuum); the 0.5 Å softening keeps line-free galaxies finite.
LINE_TARGETS = {"Halpha": ("Halpha",), "Hbeta": ("Hbeta",), "OIII_5007": ("OIII_5007",),
                "OII_3727": ("OII_3726", "OII_3729"), "NII_6584": ("NII_6584",)}
LINE_SOFTENING = 0.5


@dataclass
class ScienceConfig:
    """One science run. `for_mode` fills the sizes; fields can be overridden."""

    mode: str = "quick"
    n_train: int = 12000
    n_test: int = 2000
    # uniform in lowz_range; exp_extended_restframe counts [O II] unobserved below z ≈ 0.0078 (λ_obs,min/(1+z)
    # > 3755 Å, the window's red edge + 5 Å) and observed above z ≈ 0.030 (< 3675 Å, the blue sideband − 5 Å)
    n_lowz: int = 800
    lowz_range: tuple = (0.002, 0.035)
    n_invariance: int = 150
    invariance_z: tuple = tuple(np.round(np.linspace(0.0, 0.5, 11), 3))
    invariance_z_native_max: float = 0.15
    n_latent: int = 10
    model: dict = field(default_factory=lambda: dict(QUICK_MODEL))
    steps: int = 3200
    batch_size: int = 64
    lr: float = 4e-3
    precision: str = "bf16"
    consistency: float = 0.1
    variants: tuple = ("a", "b", "c")
    n_pca_fit: int = 4000
    pca_iter: int = 25
    pca_scan: tuple = (2, 4, 6, 8)  # smaller PCA ranks: how many dimensions the mocks need
    curve_fractions: tuple = (0.1, 0.25, 0.5, 0.75)  # learning-curve snapshots, as fractions of the steps
    refine_steps: int = 100  # fidelity also with each spectrum's latents refined (fastspec.fit.refine); 0: off
    n_curve: int = 500  # held-out spectra the learning curve is measured on (the first n_curve of the test set)
    seed: int = 1
    device: str = "cpu"
    num_workers: int = 0
    workdir: str = "/tmp/fastspec-science"
    out_dir: str = "bench/results"
    real_dir: str | None = None
    progress: bool = True

    @classmethod
    def for_mode(cls, mode: str, **overrides) -> ScienceConfig:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        kw = {**MODES[mode], **overrides}
        return cls(mode=mode, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _say(cfg, msg: str) -> None:
    if cfg.progress:
        print(f"science: {msg}", file=sys.stderr, flush=True)


# ---- data --------------------------------------------------------------------------------------------------


def observed_arrays(flux, ivar, mask) -> tuple[np.ndarray, np.ndarray]:
    """(y, w) as training sees them: w = ivar with masked / ivar ≤ 0 pixels zeroed, y zeroed there too."""
    w = np.where(mask | ~(ivar > 0), np.float32(0), ivar).astype(np.float32)
    y = np.where(w > 0, flux, np.float32(0)).astype(np.float32)
    return y, w


def mock_set(n, seed, id_offset, z_dist="sdss", z_range=(0.0, 0.5), restframe=True, observed=True) -> dict:
    """In-memory mock spectra as arrays: y, w, z, object_id, snr and the truth columns (`truth/...`)."""
    m = make_mock(n, "sdss", seed=seed, z_min=z_range[0], z_max=z_range[1], z_dist=z_dist,
                  restframe_truth=restframe, observed_truth=observed, id_offset=id_offset)
    y, w = observed_arrays(m.flux, m.ivar, m.mask)
    out = {"y": y, "w": w, "z": m.z.astype(np.float64), "object_id": m.object_id, "wave_obs": m.wave_obs,
           "wave_rest_truth": m.wave_rest}
    out.update({f"truth/{k}": v for k, v in m.truth.items()})
    return out


def median_snr(y, w) -> np.ndarray:
    """Median of y·sqrt(w) over weighted pixels, per spectrum."""
    snr = np.where(w > 0, y * np.sqrt(w), np.nan)
    return np.nanmedian(snr, axis=1)


def real_sdss_files(real_dir) -> list[str]:
    """The bundled SDSS-I/II spectrograph files (the SDSS grid; BOSS spectra need a BOSS model)."""
    import csv

    real_dir = os.fspath(real_dir)
    with open(os.path.join(real_dir, "MANIFEST.tsv")) as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [os.path.join(real_dir, r["file"]) for r in rows if r["instrument"] == "SDSS" and r["file"].startswith("sdss/")]


def real_set(real_dir, workdir) -> dict:
    """Ingest the bundled SDSS spectra (fastspec.ingest) and read them back as arrays."""
    from .ingest import ingest
    from .spectra_io import open_spectra

    paths = real_sdss_files(real_dir)
    out = os.path.join(workdir, "real-sdss.h5")
    if os.path.exists(out):
        os.remove(out)
    rep = ingest(paths, out, instrument="sdss", jobs=1, progress=False)
    with open_spectra(out) as f:
        b = f.read()
        src = f.read_column("source/plate"), f.read_column("source/mjd"), f.read_column("source/fiber")
        wave_obs = np.asarray(f.wave_obs, np.float64)
    y, w = observed_arrays(b.flux, b.ivar, b.mask)
    names = [f"spec-{p:04d}-{m}-{fi:04d}" for p, m, fi in zip(*src)]
    skipped = [{"file": os.path.relpath(fr.file, real_dir), "reason": fr.reason}
               for fr in rep.files if not fr.n_ingested]
    return {"y": y, "w": w, "z": b.z.astype(np.float64), "object_id": np.asarray(names), "n_files": len(paths),
            "skipped": skipped, "wave_obs": wave_obs}


# ---- restframe PCA baseline -----------------------------------------------------------------------------------


def _ridge_solve(A: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> torch.Tensor:
    """Solve (A + ε I) x = b for a batch of small SPD systems; ε = rel·trace/dim (0-weight systems → x = 0)."""
    k = A.shape[-1]
    tr = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)
    eps = rel * tr / k + 1e-12
    A = A + eps[..., None, None] * torch.eye(k, dtype=A.dtype, device=A.device)
    return torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)


class WeightedPCA:
    """Rank-S model of restframe spectra with per-pixel weights: x_n ≈ μ + c_n·V, fitted by alternating
    weighted least squares (mean and components per pixel given the coefficients, then the coefficients given
    the components; Tsalmantza & Hogg 2012 style "weighted PCA"), started from an SVD over the pixels nearly
    every spectrum covers. Components are orthonormalised each iteration and finally ordered by the variance of
    their coefficients. Pixels no training spectrum covers get μ = V = 0.
    """

    def __init__(self, n_components: int):
        self.S = int(n_components)
        self.mean = None  # (R,)
        self.components = None  # (S, R)
        self.coverage = None  # (R,) fraction of the training spectra that cover each restframe pixel
        self.history: list[float] = []

    def _coeffs(self, X, Wt, mu, V) -> torch.Tensor:
        # A_n = Σ_r w_nr V_r V_rᵀ as one GEMM over the outer products of the component columns
        S = V.shape[0]
        outer = (V[:, None, :] * V[None, :, :]).reshape(S * S, -1)  # (S², R)
        A = (Wt @ outer.T).reshape(-1, S, S)
        b = (Wt * (X - mu)) @ V.T
        return _ridge_solve(A, b)

    def fit(self, x, w, n_iter: int = 25, tol: float = 1e-5, seed: int = 0, progress: bool = False) -> WeightedPCA:
        X = torch.as_tensor(x, dtype=torch.float64)
        Wt = torch.as_tensor(w, dtype=torch.float64)
        N, R = X.shape
        S = self.S
        wsum = Wt.sum(0)
        mu = torch.where(wsum > 0, (Wt * X).sum(0) / wsum.clamp_min(1e-300), 0.0)
        self.coverage = (Wt > 0).float().mean(0)
        # Start from the coefficients of an SVD over the pixels (almost) every spectrum covers, then solve the
        # components everywhere: an SVD of the zero-filled matrix instead starts ALS among the window-edge
        # artefacts, where it stalls far from the optimum (seen on planted windowed data).
        cov = (Wt > 0).double().mean(0)
        core = cov >= 0.9 * cov.max()
        if int(core.sum()) < 4 * S:
            core = torch.zeros_like(core)
            core[torch.argsort(cov, descending=True)[: max(4 * S, R // 20)]] = True
        Xc = torch.where(Wt[:, core] > 0, X[:, core] - mu[core], 0.0)
        torch.manual_seed(seed)
        U, sv, _ = torch.svd_lowrank(Xc, q=min(S + 10, *Xc.shape), niter=4)
        C = U[:, :S] * sv[:S]
        prev = math.inf
        for it in range(n_iter):
            D = torch.cat([torch.ones(N, 1, dtype=X.dtype), C], 1)  # (N, S+1): mean and components per pixel
            outer = (D[:, :, None] * D[:, None, :]).reshape(N, -1)  # (N, (S+1)²)
            A = (outer.T @ Wt).T.reshape(R, S + 1, S + 1)
            b = (D.T @ (Wt * X)).T  # (R, S+1)
            sol = _ridge_solve(A, b)
            mu, V = sol[:, 0].contiguous(), sol[:, 1:].T.contiguous()
            V = torch.linalg.qr(V.T)[0].T.contiguous()  # orthonormal rows spanning the same subspace
            C = self._coeffs(X, Wt, mu, V)
            chi = float((Wt * (X - mu - C @ V) ** 2).sum())
            self.history.append(chi)
            if progress:
                print(f"science: weighted PCA iteration {it + 1}: weighted SSR {chi:.6g}", file=sys.stderr, flush=True)
            if prev - chi < tol * chi:
                break
            prev = chi
        # order by coefficient variance (an SVD of the coefficients rotates the orthonormal basis)
        _, _, Wr = torch.linalg.svd(C - C.mean(0), full_matrices=False)
        self.mean, self.components = mu.float(), (Wr @ V).float()
        return self

    def restframe(self, coeffs) -> np.ndarray:
        c = torch.as_tensor(coeffs, dtype=torch.float32)
        return (self.mean + c @ self.components).numpy()

    def fit_observed(self, y, w, z, wave_rest, wave_obs, min_coverage: float = 0.05, chunk: int = 128) -> dict:
        """Best coefficients of each observed spectrum (weighted least squares in the observed frame, the
        components redshifted by fastspec.kernels.resample like the autoencoder's restframe model).

        Only pixels whose restframe wavelength at least `min_coverage` of the training spectra covered enter the
        fit: elsewhere the components rest on a handful of spectra, and fitting them drags the coefficients (at
        z < 0.013 the [O II] extrapolation then anti-correlates with the truth). The model and χ² still cover
        every valid pixel. Returns coeffs (N, S), spec_obs (N, L), valid (N, L) and chi2 (N,)
        (CHI2_DEFINITION with S parameters).
        """
        from . import kernels

        basis = torch.cat([self.mean[None], self.components, self.coverage[None]]).contiguous()  # (S+2, R)
        K = basis.shape[0]
        wave_rest = np.asarray(wave_rest, np.float64)
        wave_obs = np.asarray(wave_obs, np.float64)
        parts = {"coeffs": [], "spec_obs": [], "valid": [], "chi2": []}
        for a in range(0, len(z), chunk):
            yb = torch.as_tensor(y[a:a + chunk])
            wb = torch.as_tensor(w[a:a + chunk])
            n = yb.shape[0]
            zb = torch.as_tensor(np.asarray(z[a:a + chunk], np.float32)).repeat_interleave(K)
            phi, valid = kernels.resample(basis.repeat(n, 1), zb, wave_rest, wave_obs)
            phi = phi.reshape(n, K, -1).double()
            valid = valid.reshape(n, K, -1)[:, 0]
            wv = wb.double() * valid * (phi[:, -1] >= min_coverage)
            comp = phi[:, 1:-1]
            A = torch.einsum("nsl,nl,ntl->nst", comp, wv, comp)
            rhs = torch.einsum("nsl,nl->ns", comp, wv * (yb.double() - phi[:, 0]))
            c = _ridge_solve(A, rhs)
            model = phi[:, 0] + torch.einsum("ns,nsl->nl", c, comp)
            model = torch.where(valid, model, 0.0)
            parts["coeffs"].append(c.float().numpy())
            parts["spec_obs"].append(model.float().numpy())
            parts["valid"].append(valid.numpy())
            parts["chi2"].append(reduced_chi2(yb.double(), wb.double(), model, valid, self.S).numpy())
        return {k: np.concatenate(v) for k, v in parts.items()}


# ---- metrics ---------------------------------------------------------------------------------------------------


def signal_error(y_true, y_model, w, valid) -> np.ndarray:
    """Σ w·valid·(ŷ − y_true)² / Σ valid·(w > 0): the model's error against the noiseless truth in units of the
    noise variance. Below 1: the model is closer to the truth than the data are (residuals below the noise)."""
    good = (w > 0) & valid
    num = np.where(good, w * (y_model.astype(np.float64) - y_true) ** 2, 0).sum(1)
    cnt = good.sum(1)
    return np.where(cnt > 0, num / np.maximum(cnt, 1), np.nan)


def line_flux(wave, spec, window=OII_WINDOW, sidebands=OII_SIDEBANDS) -> np.ndarray:
    """Continuum-subtracted line flux ∫(f − c) dλ over `window` (trapezoids), c a straight line through the
    medians of the two sidebands; wave (R,) restframe Å, spec (N, R)."""
    wave = np.asarray(wave, np.float64)
    spec = np.asarray(spec, np.float64)
    centres, levels = [], []
    for lo, hi in sidebands:
        sel = (wave >= lo) & (wave <= hi)
        if sel.sum() < 3:
            raise ValueError(f"sideband {lo}–{hi} Å holds {sel.sum()} pixels of the grid {wave[0]:.0f}–{wave[-1]:.0f} Å")
        centres.append(0.5 * (lo + hi))
        levels.append(np.median(spec[:, sel], axis=1))
    slope = (levels[1] - levels[0]) / (centres[1] - centres[0])
    sel = (wave >= window[0]) & (wave <= window[1])
    lam = wave[sel]
    cont = levels[0][:, None] + slope[:, None] * (lam[None, :] - centres[0])
    return np.trapezoid(spec[:, sel] - cont, lam, axis=1)


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


def _standardise(train, test):
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 0, sd, 1)
    return (train - mu) / sd, (test - mu) / sd


def knn_predict(X_train, Y_train, X_test, k: int = 10) -> np.ndarray:
    """Mean target of the k nearest training points (Euclidean on standardised predictors)."""
    a, b = _standardise(np.asarray(X_train, np.float64), np.asarray(X_test, np.float64))
    d = torch.cdist(torch.as_tensor(b), torch.as_tensor(a))
    idx = torch.topk(d, min(k, len(a)), largest=False).indices.numpy()
    return np.asarray(Y_train, np.float64)[idx].mean(1)


def quadratic_features(X) -> np.ndarray:
    X = np.asarray(X, np.float64)
    iu = np.triu_indices(X.shape[1])
    return np.concatenate([X, (X[:, :, None] * X[:, None, :])[:, iu[0], iu[1]]], axis=1)


def ridge_predict(X_train, Y_train, X_test, alpha: float = 1.0, quadratic: bool = True) -> np.ndarray:
    """Ridge regression on standardised (quadratic) features with an unpenalised intercept."""
    a, b = _standardise(np.asarray(X_train, np.float64), np.asarray(X_test, np.float64))
    if quadratic:
        a, b = _standardise(quadratic_features(a), quadratic_features(b))
    Y = np.asarray(Y_train, np.float64)
    ym = Y.mean(0)
    coef = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ (Y - ym))
    return b @ coef + ym


def crossfit_r2(X, Y, method: str = "knn", folds: int = 2, seed: int = 0) -> np.ndarray:
    """Held-out R² per target: each fold predicted by a regressor fitted on the other folds."""
    n = len(X)
    perm = np.random.default_rng(seed).permutation(n)
    pred = np.empty_like(np.asarray(Y, np.float64))
    for f in range(folds):
        test = perm[f::folds]
        train = np.setdiff1d(perm, test)
        fn = knn_predict if method == "knn" else ridge_predict
        pred[test] = fn(X[train], Y[train], X[test])
    return r2_score(Y, pred)


def physics_targets(data) -> tuple[list[str], np.ndarray]:
    """(names, (n, T) array) of the regression targets from the truth columns."""
    names, cols = [], []
    wts = data["truth/weights"]
    for t in range(wts.shape[1]):
        names.append(f"weight_template{t}")
        cols.append(wts[:, t])
    lf = data["truth/line_flux"]
    for name, parts in LINE_TARGETS.items():
        f = sum(lf[:, LINE_NAMES.index(p)].astype(np.float64) for p in parts)
        names.append(f"log10({LINE_SOFTENING}+F_{name})")
        cols.append(np.log10(LINE_SOFTENING + np.maximum(f, 0)))
    names += ["vdisp_kms", "ebv"]
    cols += [data["truth/vdisp"], data["truth/ebv"]]
    return names, np.stack(cols, 1).astype(np.float64)


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


# ---- training ------------------------------------------------------------------------------------------------


def _variant_train_config(cfg: ScienceConfig, variant: str, data_path: str):
    from .train import TrainConfig

    v = VARIANTS[variant]
    cons = cfg.consistency if v["consistency"] is None else v["consistency"]
    model = {"n_latent": cfg.n_latent, "z_max": 0.5, **cfg.model}
    return TrainConfig(
        data=[data_path], out=os.path.join(cfg.workdir, f"model-{variant}"), model=model, steps=cfg.steps,
        batch_size=cfg.batch_size, lr=cfg.lr, precision=cfg.precision, seed=cfg.seed, augment=v["augment"],
        consistency=float(cons), val_fraction=0.05, checkpoint_every=0, log_every=10, device=cfg.device,
        num_workers=cfg.num_workers, progress=cfg.progress, block_rows=256, shuffle_blocks=8,
    )


def _same_config(path: str, want: dict) -> bool:
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        have = json.load(fh)
    keys = ("data", "model", "steps", "batch_size", "lr", "precision", "seed", "augment", "consistency",
            "val_fraction")
    return all(json.dumps(have.get(k), sort_keys=True) == json.dumps(want.get(k), sort_keys=True) for k in keys)


def train_variant(cfg: ScienceConfig, variant: str, data_path: str) -> dict:
    """Train (or reuse a finished run with the same configuration) and return a training summary."""
    tc = _variant_train_config(cfg, variant, data_path)
    final = os.path.join(tc.out, "final.pt")
    want = tc.to_dict()
    want["model"] = {**{"n_latent": cfg.n_latent, "z_max": 0.5}, **cfg.model}
    cached = os.path.join(tc.out, "science-train.json")
    if os.path.exists(final) and _same_config(cached, {**want, "data": [os.path.abspath(data_path)]}):
        _say(cfg, f"variant {variant}: reusing the trained model in {tc.out}")
        with open(cached) as fh:
            return {**json.load(fh)["summary"], "reused": True}
    _say(cfg, f"training variant {variant} ({VARIANTS[variant]['label']}): {cfg.steps} steps of {cfg.batch_size}")
    from .train import Trainer

    marks = set(curve_steps(cfg.steps, cfg.curve_fractions))
    for old in os.listdir(tc.out) if os.path.isdir(tc.out) else ():
        if old.startswith("curve-") and old.endswith(".pt"):
            os.remove(os.path.join(tc.out, old))

    def snapshot(trainer):
        # weights at a few points of the run, for the learning curve (evaluated after training)
        if trainer.step in marks:
            state = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
            path = os.path.join(tc.out, f"curve-{trainer.step}.pt")
            with atomic_path(path, sync=False) as tmp:
                torch.save(state, tmp)

    t0, c0 = time.perf_counter(), _cpu_s()
    trainer = Trainer(tc)
    try:
        summary = trainer.run(on_step=snapshot)
    finally:
        trainer.close()
    summary["curve_steps"] = sorted(marks)
    summary["wall_s"] = time.perf_counter() - t0
    summary["cpu_s"] = _cpu_s() - c0
    summary["load_average_after"] = _load_average()
    summary["augment"] = tc.augment
    summary["consistency"] = tc.consistency
    with open(os.path.join(tc.out, "history.json")) as fh:
        hist = json.load(fh)
    summary["final_train_loss"] = hist["train"][-1]["loss"] if hist["train"] else None
    summary["val_losses"] = [h["loss"] for h in hist["val"]]
    rec = {**want, "data": [os.path.abspath(data_path)]}
    write_json(cached, {**rec, "summary": summary}, sync=False, indent=1, default=str)
    return summary


def curve_steps(steps: int, fractions) -> list[int]:
    """Steps (before the last) at which the learning curve takes a snapshot of the weights."""
    return sorted({min(steps - 1, max(1, round(f * steps))) for f in fractions} - {0}) if steps > 1 else []


def load_variant(cfg: ScienceConfig, variant: str):
    return load_model(os.path.join(cfg.workdir, f"model-{variant}", "final.pt"), cfg.device)


# ---- experiments ---------------------------------------------------------------------------------------------


def _encode(model, data, **kw) -> dict:
    return encode_arrays(model, data["y"], data["w"], data["z"], batch_size=128, **kw)


def exp_fidelity(models: dict, pca_fit: dict, test: dict, n_latent: int) -> dict:
    """Reduced χ² (vs data) and signal error (vs noiseless truth) of each model on the held-out mocks."""
    truth_obs = test["truth/model_obs"]
    allvalid = np.ones_like(test["w"], bool)
    truth_chi2 = reduced_chi2(torch.as_tensor(test["y"]).double(), torch.as_tensor(test["w"]).double(),
                              torch.as_tensor(truth_obs).double(), torch.as_tensor(allvalid), 0).numpy()
    res = {"truth_model": {"chi2": chi2_summary(truth_chi2),
                           "note": "the noiseless truth against the data: the χ² a perfect model gets"}}
    per_spec = {"truth_model": {"chi2": truth_chi2}}
    for name, enc in models.items():
        err = signal_error(truth_obs, enc["spec_obs"], test["w"], enc["valid"])
        res[name] = {"chi2": chi2_summary(enc["chi2"]), "signal_error": chi2_summary(err),
                     "n_parameters_per_spectrum": n_latent}
        per_spec[name] = {"chi2": enc["chi2"], "signal_error": err}
    err = signal_error(truth_obs, pca_fit["spec_obs"], test["w"], pca_fit["valid"])
    res["pca"] = {"chi2": chi2_summary(pca_fit["chi2"]), "signal_error": chi2_summary(err),
                  "n_parameters_per_spectrum": n_latent}
    per_spec["pca"] = {"chi2": pca_fit["chi2"], "signal_error": err}
    for name in models:
        res[name]["fraction_chi2_below_pca"] = float(np.nanmean(per_spec[name]["chi2"] < pca_fit["chi2"]))
    return res, per_spec


def _agreement(pred, ref) -> dict:
    d = pred - ref
    n = len(d)
    return {
        "pearson_r": pearson(pred, ref),
        "pearson_r_ci68": bootstrap_ci(pearson, pred, ref),
        "spearman_r": pearson(np.argsort(np.argsort(pred)), np.argsort(np.argsort(ref))) if n > 2 else None,
        "r2": float(r2_score(ref[:, None], pred[:, None])[0]) if n > 2 else None,
        "bias_median": float(np.median(d)) if n else None,
        "scatter_nmad": nmad(d),
        "rms": float(np.sqrt(np.mean(d**2))) if n else None,
    }


def exp_extended_restframe(rest_models: dict, lowz: dict, wave_rest: np.ndarray, wave_obs_min: float) -> dict:
    """[O II] flux of the restframe models for galaxies with [O II] unobserved / observed.

    The reference is the same measurement on the noiseless true restframe spectrum (so the measurement's own
    systematics, e.g. Balmer absorption in the window, cancel); agreement with the catalogue line flux is
    reported too, and the measurement on the true spectrum against the catalogue gives the method's floor."""
    lf = lowz["truth/line_flux"]
    catalogue = (lf[:, LINE_NAMES.index("OII_3726")] + lf[:, LINE_NAMES.index("OII_3729")]).astype(np.float64)
    rest_lo = wave_obs_min / (1 + lowz["z"])  # bluest restframe wavelength observed
    groups = {"unobserved": rest_lo > OII_WINDOW[1] + 5, "observed": rest_lo < OII_SIDEBANDS[0][0] - 5}
    ref = line_flux(lowz["wave_rest_truth"], lowz["truth/spec_rest"])
    out = {"definition": f"[O II] 3727+3729 flux, ∫(f − continuum) dλ over {OII_WINDOW[0]:.0f}–{OII_WINDOW[1]:.0f} Å "
                         f"restframe, continuum a line through the sideband medians {OII_SIDEBANDS}; units: stored "
                         "flux × Å; reference: the same measurement on the noiseless true restframe spectrum",
           "unobserved_means": f"λ_obs,min/(1+z) > {OII_WINDOW[1] + 5:.0f} Å (the whole [O II] window is unseen)",
           "n": {g: int(m.sum()) for g, m in groups.items()},
           "reference_spread_nmad": {g: nmad(ref[m]) for g, m in groups.items()},
           "reference_std": {g: float(np.std(ref[m])) if m.any() else None for g, m in groups.items()},
           "measurement_floor_vs_catalogue": {g: _agreement(ref[m], catalogue[m]) for g, m in groups.items()},
           "models": {}}
    preds = {name: line_flux(wave_rest, spec) for name, spec in rest_models.items()}
    for name, p in preds.items():
        out["models"][name] = {g: {**_agreement(p[m], ref[m]),
                                   "pearson_r_vs_catalogue": pearson(p[m], catalogue[m])}
                               for g, m in groups.items()}
    return out, {"ref": ref, "catalogue": catalogue, "groups": groups, "preds": preds}


def moved_copies(data: dict, idx, z_new) -> dict:
    """Spectra idx moved to every redshift in z_new on their own observed grid (fastspec.augment)."""
    from .augment import redshift_augment

    idx = np.asarray(idx)
    K = len(z_new)
    y = torch.as_tensor(np.repeat(data["y"][idx], K, 0))
    w = torch.as_tensor(np.repeat(data["w"][idx], K, 0))
    z = torch.as_tensor(np.repeat(data["z"][idx], K).astype(np.float32))
    zn = torch.as_tensor(np.tile(np.asarray(z_new, np.float32), len(idx)))
    y2, w2, z2 = redshift_augment(y, w, z, zn, wave_obs=np.asarray(data["wave_obs"], np.float64))
    return {"y": y2.numpy(), "w": w2.numpy(), "z": z2.numpy().astype(np.float64)}


def cross_chi2(model, data: dict, idx, latents_moved, batch_size: int = 256) -> np.ndarray:
    """χ² of each galaxy's own (unmoved) spectrum under the latents inferred from its moved copies: decode
    s(z'), redshift to the galaxy's z, compare with its data. (n, K); invariance in units of the noise."""
    n, K, S = latents_moved.shape
    device = next(model.parameters()).device
    s_all = torch.as_tensor(latents_moved.reshape(n * K, S), dtype=torch.float32)
    y = np.repeat(data["y"][idx], K, 0)
    w = np.repeat(data["w"][idx], K, 0)
    z = np.repeat(np.asarray(data["z"][idx], np.float32), K)
    out = []
    with torch.inference_mode():
        for a in range(0, n * K, batch_size):
            spec, valid = model.generate(s_all[a:a + batch_size].to(device), torch.as_tensor(z[a:a + batch_size]).to(device))
            out.append(reduced_chi2(torch.as_tensor(y[a:a + batch_size]), torch.as_tensor(w[a:a + batch_size]), spec.float().cpu(),
                               valid.cpu(), S).numpy())
    return np.concatenate(out).reshape(n, K)


def exp_invariance(latents_native: dict, latents_moved: dict, latents_sample: dict, z_new, chi2_native: dict,
                   chi2_moved: dict, native_index=None, chi2_cross: dict | None = None) -> dict:
    out = {"z_moved_to": [float(v) for v in z_new], "variants": {}}
    per = {}
    for name in latents_moved:
        d = latent_displacement(latents_moved[name], latents_native[name], latents_sample[name], native_index)
        per[name] = d
        disp = d["displacement"]
        v = {
            "median_rms_displacement": float(np.median(d["rms"])),
            "median_rms_displacement_ci68": bootstrap_ci(np.median, d["rms"]),
            "rms_displacement_p16_p84": [float(x) for x in np.percentile(d["rms"], [16, 84])],
            "median_displacement_at_z": [float(x) for x in np.median(disp, 0)],
            "median_spread_ratio": float(np.median(d["spread_ratio"])),
            "sigma_sample": d["sigma_sample"],
            "latent_effective_dimensions": d["effective_dimensions"],
            "chi2_native_median": float(np.nanmedian(chi2_native[name])),
            "chi2_moved_median": float(np.nanmedian(chi2_moved[name])),
        }
        if "local" in d:
            local_rms = np.sqrt(np.nanmean(d["local"] ** 2, 1))
            v["median_rms_local_displacement"] = float(np.nanmedian(local_rms))
            v["median_rms_local_displacement_ci68"] = bootstrap_ci(np.nanmedian, local_rms)
            v["median_local_displacement_at_z"] = [float(x) for x in np.nanmedian(d["local"], 0)]
            v["self_retrieval_top1"] = float(np.mean(d["self_rank"] == 0))
            v["self_retrieval_top1_at_z"] = [float(x) for x in np.mean(d["self_rank"] == 0, 0)]
            v["median_self_rank"] = float(np.median(d["self_rank"]))
            v["sample_size"] = int(len(latents_sample[name]))
        if chi2_cross is not None:
            cc = chi2_cross[name]
            per[name]["chi2_cross"] = cc
            mean_cc = np.nanmean(cc, 1)
            v["median_chi2_own_spectrum_from_moved_latents"] = float(np.nanmedian(mean_cc))
            v["median_chi2_own_spectrum_from_moved_latents_ci68"] = bootstrap_ci(np.nanmedian, mean_cc)
            v["median_chi2_own_spectrum_from_moved_latents_at_z"] = [float(x) for x in np.nanmedian(cc, 0)]
            v["median_chi2_own_spectrum_native_latents"] = float(np.nanmedian(
                np.asarray(chi2_native[name])[native_index])) if native_index is not None else None
        out["variants"][name] = v
    return out, per


def exp_learning_curve(cfg: ScienceConfig, models: dict, training: dict, test: dict, enc_test: dict,
                       pca_chi2: np.ndarray) -> dict:
    """Held-out median χ² of each variant at the snapshots taken during training (and at the end), on the first
    n_curve test spectra, with the weighted PCA's median χ² on the same spectra as the line to beat."""
    n = min(cfg.n_curve, len(test["z"]))
    sub = {k: test[k][:n] for k in ("y", "w", "z")}
    out = {"n_spectra": n, "pca_median_chi2": float(np.nanmedian(pca_chi2[:n])),
           "pca_median_chi2_ci68": bootstrap_ci(np.nanmedian, pca_chi2[:n]), "variants": {}}
    for v, model in models.items():
        name = f"ae_{v}"
        final_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        pts = []
        for step in training[name].get("curve_steps", []):
            path = os.path.join(cfg.workdir, f"model-{v}", f"curve-{step}.pt")
            if not os.path.exists(path):
                continue
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            chi2 = _encode(model, sub, chi2=True)["chi2"]
            pts.append({"step": int(step), "spectra_seen": int(step) * cfg.batch_size,
                        "median_chi2": float(np.nanmedian(chi2))})
        model.load_state_dict(final_state)
        chi2 = enc_test[name]["chi2"][:n]
        pts.append({"step": cfg.steps, "spectra_seen": cfg.steps * cfg.batch_size, "median_chi2": float(np.nanmedian(chi2)),
                    "median_chi2_ci68": bootstrap_ci(np.nanmedian, chi2)})
        out["variants"][name] = pts
    return out


# restframe windows counted as emission-line pixels in the residual breakdown (± this many Å of each line)
LINE_HALF_WIDTH = 10.0


def exp_residual_by_wavelength(models_obs: dict, test: dict, wave_obs, wave_rest, n_bins: int = 340) -> dict:
    """Where in the spectrum each model loses: the χ² contribution w·(y − ŷ)² and the error against the noiseless
    truth w·(ŷ − y_true)² of every valid pixel, stacked by restframe wavelength λ_obs/(1+z) in bins, and split
    into emission-line pixels (within ±LINE_HALF_WIDTH Å restframe of a mock line) and continuum."""
    from .mock import LINE_WAVE

    wave_obs = np.asarray(wave_obs, np.float64)
    lam = wave_obs[None, :] / (1 + np.asarray(test["z"], np.float64)[:, None])
    edges = np.linspace(float(wave_rest[0]), float(wave_rest[-1]), n_bins + 1)
    idx = np.clip(np.searchsorted(edges, lam, side="right") - 1, 0, n_bins - 1)
    near = np.zeros(lam.shape, bool)
    for lw in LINE_WAVE:
        near |= np.abs(lam - lw) <= LINE_HALF_WIDTH
    y, w, truth = test["y"].astype(np.float64), test["w"].astype(np.float64), test["truth/model_obs"]
    out = {"bin_edges": edges, "line_half_width": LINE_HALF_WIDTH, "models": {},
           "definition": "Per valid weighted pixel: chi2 = w (y − ŷ)², signal error = w (ŷ − y_true)²; per restframe "
                         "bin the mean and median over the pixels of all held-out spectra; for line / continuum "
                         "pixels the pooled mean, and the median over spectra of each spectrum's mean (robust to the "
                         "few spectra far off at the grid ends); a perfect model has chi2 = 1, signal error = 0"}
    for name, (spec, valid) in models_obs.items():
        good = (w > 0) & valid
        c = np.where(good, w * (y - spec) ** 2, 0.0)
        e = np.where(good, w * (spec - truth) ** 2, 0.0)
        cnt = np.bincount(idx[good], minlength=n_bins)
        binned = {"n_pixels": cnt,
                  "mean_chi2": np.bincount(idx[good], c[good], n_bins) / np.maximum(cnt, 1),
                  "mean_signal_error": np.bincount(idx[good], e[good], n_bins) / np.maximum(cnt, 1)}
        # medians per bin: a few spectra far off (the grid ends, where few training spectra reach) dominate means
        order = np.argsort(idx[good], kind="stable")
        bounds = np.concatenate([[0], np.cumsum(cnt)])
        for key, vals in (("median_chi2", c[good][order]), ("median_signal_error", e[good][order])):
            binned[key] = np.array([np.median(vals[a:b]) if b > a else np.nan for a, b in zip(bounds[:-1], bounds[1:])])
        for k in ("mean_chi2", "mean_signal_error"):
            binned[k] = np.where(cnt > 0, binned[k], np.nan)
        split = {}
        for part, sel in (("lines", good & near), ("continuum", good & ~near)):
            npx = int(sel.sum())
            # per spectrum: the mean over its pixels of this kind; then the median over spectra (robust)
            per = np.where(sel, e, 0).sum(1) / np.where(sel.sum(1) > 0, sel.sum(1), np.nan)
            per_c = np.where(sel, c, 0).sum(1) / np.where(sel.sum(1) > 0, sel.sum(1), np.nan)
            split[part] = {"n_pixels": npx, "mean_chi2": float(c[sel].sum() / max(npx, 1)),
                           "mean_signal_error": float(e[sel].sum() / max(npx, 1)),
                           "median_over_spectra_chi2": float(np.nanmedian(per_c)),
                           "median_over_spectra_signal_error": float(np.nanmedian(per)),
                           "share_of_total_signal_error": float(e[sel].sum() / max(e[good].sum(), 1e-300))}
        out["models"][name] = {"binned": binned, **split}
    return out


def exp_physics(predictors: dict, targets: np.ndarray, names: list[str], seed: int) -> dict:
    out = {"targets": names, "regressors": {"knn": "k = 10 nearest neighbours, standardised predictors",
                                            "ridge2": "ridge (α = 1) on standardised linear + quadratic terms"},
           "protocol": "2-fold cross-fitting on the held-out test set (each half predicted from the other)",
           "r2": {}}
    for name, X in predictors.items():
        out["r2"][name] = {}
        for method in ("knn", "ridge2"):
            r2 = crossfit_r2(X, targets, "knn" if method == "knn" else "ridge", seed=seed)
            out["r2"][name][method] = {t: float(v) for t, v in zip(names, r2)}
    return out


# ---- figures -----------------------------------------------------------------------------------------------------


COLORS = {"ae_a": "tab:blue", "ae_b": "tab:orange", "ae_c": "tab:green", "pca": "tab:purple",
          "ae_a_refined": "navy", "ae_b_refined": "saddlebrown", "ae_c_refined": "darkgreen",
          "pca_every_pixel": "tab:pink",
          "truth_model": "0.4"}


def _label(name: str) -> str:
    if name.startswith("ae_") and name.endswith("_refined"):
        return f"AE {VARIANTS[name[3:-8]]['label']}, refined latents"
    if name.startswith("ae_"):
        return f"AE {VARIANTS[name[3:]]['label']}"
    return {"pca": "weighted restframe PCA", "truth_model": "noiseless truth (perfect model)",
            "pca_every_pixel": "weighted PCA fitted on every pixel"}.get(name, name)


def fig_fidelity(path, per_spec, snr, S, budget) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    allc = np.concatenate([v["chi2"] for v in per_spec.values()])
    allc = allc[np.isfinite(allc) & (allc > 0)]
    bins = np.geomspace(max(np.percentile(allc, 0.5), 1e-2) / 1.2, np.percentile(allc, 99.5) * 1.2, 60)
    for name, v in per_spec.items():
        c = v["chi2"][np.isfinite(v["chi2"])]
        axes[0].hist(np.clip(c, bins[0], bins[-1]), bins=bins, histtype="step", lw=1.4, color=COLORS[name],
                     label=f"{_label(name)}: median {np.median(c):.2f}")
    axes[0].axvline(1, color="k", ls=":", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("reduced χ² against the data")
    axes[0].set_ylabel("held-out spectra")
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"reconstruction χ² (S = {S} latents / components)")
    errs = {k: v["signal_error"] for k, v in per_spec.items() if "signal_error" in v}
    alle = np.concatenate(list(errs.values()))
    alle = alle[np.isfinite(alle) & (alle > 0)]
    bins = np.geomspace(max(np.percentile(alle, 0.5), 1e-3) / 1.2, np.percentile(alle, 99.5) * 1.2, 60)
    for name, e in errs.items():
        e = e[np.isfinite(e)]
        axes[1].hist(np.clip(e, bins[0], bins[-1]), bins=bins, histtype="step", lw=1.4, color=COLORS[name],
                     label=f"{_label(name)}: median {np.median(e):.2f}")
    axes[1].axvline(1, color="k", ls="--", lw=1, label="= noise variance")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("model error vs noiseless truth: Σ w (ŷ − y_true)² / N  [noise variances]")
    axes[1].legend(fontsize=7)
    axes[1].set_title("below 1: residuals below the noise")
    edges = np.percentile(snr, np.linspace(0, 100, 9))
    mid = 0.5 * (edges[1:] + edges[:-1])
    for name, v in per_spec.items():
        med = [np.nanmedian(v["chi2"][(snr >= a) & (snr <= b)]) for a, b in zip(edges[:-1], edges[1:])]
        axes[2].plot(mid, med, "o-", ms=3, color=COLORS[name], label=_label(name))
    axes[2].axhline(1, color="k", ls=":", lw=0.8)
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    for axis in (axes[2].xaxis, axes[2].yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    axes[2].set_xlabel("median S/N per pixel")
    axes[2].set_ylabel("median reduced χ² in S/N bin")
    axes[2].legend(fontsize=7)
    axes[2].set_title("χ² grows with S/N where the model misses signal")
    fig.suptitle(f"Experiment 1 — fidelity on {len(snr)} held-out mock SDSS spectra ({budget})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def fig_oii(path, ext, lowz, wave_rest, rest_models, wave_obs_min, budget) -> str:
    plt = pyplot()
    names = list(ext["preds"])
    ncol = 3
    nrow = -(-(len(names) + 1) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 4.3 * nrow), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(names) + 1:]:
        ax.set_visible(False)
    true = ext["ref"]
    lim = (min(-1.0, np.percentile(true, 0.5)), np.percentile(true, 99.5) * 1.3)
    for ax, name in zip(axes, names):
        p = ext["preds"][name]
        for g, col in (("observed", "0.65"), ("unobserved", COLORS.get(name, "tab:red"))):
            m = ext["groups"][g]
            r = pearson(p[m], true[m])
            ax.scatter(true[m], p[m], s=5, lw=0, color=col, alpha=0.7, rasterized=True,
                       label=f"[O II] {g} (n={m.sum()}): r = {r:.2f}, NMAD = {nmad(p[m] - true[m]):.2f}")
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlim(lim)
        ax.set_ylim(lim)
        ax.set_xlabel("[O II] 3727+3729 flux of the true restframe spectrum [flux × Å]")
        ax.set_ylabel("[O II] flux of the restframe model")
        ax.set_title(_label(name), fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    # one unobserved example: truth, models, observed edge
    ax = axes[len(names)]
    m = np.flatnonzero(ext["groups"]["unobserved"])
    if m.size:
        i = int(m[np.argsort(true[m])[int(0.8 * m.size)]])  # a strong line, to see the prediction
        wt = lowz["wave_rest_truth"]
        sel = (wt > 3640) & (wt < 3900)
        ax.plot(wt[sel], lowz["truth/spec_rest"][i, sel], color="k", lw=1.2, label="true restframe spectrum")
        sel = (wave_rest > 3640) & (wave_rest < 3900)
        for name, spec in rest_models.items():
            ax.plot(wave_rest[sel], spec[i, sel], color=COLORS.get(name, "tab:red"), lw=1, label=_label(name))
        edge = wave_obs_min / (1 + lowz["z"][i])
        ax.axvspan(edge, 3900, color="0.9", lw=0, label="observed part")
        ax.axvline(3728.5, color="tab:green", ls="--", lw=0.7)
        ax.set_xlim(3640, 3900)
        ax.set_xlabel("restframe wavelength [Å]")
        ax.set_ylabel("normalised flux")
        ax.set_title(f"example: z = {lowz['z'][i]:.4f}, [O II] unobserved", fontsize=9)
        ax.legend(fontsize=6.5, loc="upper right")
    fig.suptitle(f"Experiment 2 — extended restframe: [O II] predicted where it is not observed ({budget})",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def fig_invariance(path, inv, per, budget) -> str:
    plt = pyplot()
    panels = [("displacement", "‖s(z') − s(z_obs)‖ / σ_sample", "against the whole sample's latent spread"),
              ("local", "‖s(z') − s(z_obs)‖ / d_5NN", "against the distance to the 5th nearest neighbour"),
              ("chi2_cross", "χ² of the unmoved spectrum decoded from s(z')", "in noise units: own spectrum from moved latents")]
    panels = [p for p in panels if all(p[0] in d for d in per.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.3), squeeze=False)
    zs = np.asarray(inv["z_moved_to"])
    for ax, (key, ylabel, title) in zip(axes[0], panels):
        for name, d in per.items():
            vals = d[key]
            lo, med, hi = np.nanpercentile(vals, [16, 50, 84], axis=0)
            ax.fill_between(zs, lo, hi, color=COLORS[name], alpha=0.15, lw=0)
            ax.plot(zs, med, "o-", ms=3, color=COLORS[name], label=_label(name))
            if key == "chi2_cross":
                ax.axhline(inv["variants"][name]["median_chi2_own_spectrum_native_latents"], color=COLORS[name],
                           ls=":", lw=1)
        if key == "chi2_cross":
            ax.set_yscale("log")
            ax.plot([], [], "k:", lw=1, label="its own latents (unmoved)")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("redshift the held-out spectrum was moved to")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Experiment 3 — redshift invariance: median and 16–84% band over {len(next(iter(per.values()))['rms'])} "
                 f"held-out spectra ({budget})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def fig_physics(path, phys, budget) -> str:
    plt = pyplot()
    names = phys["targets"]
    models = list(phys["r2"])
    fig, axes = plt.subplots(2, 1, figsize=(13, 7), sharex=True)
    x = np.arange(len(names))
    wdt = 0.8 / len(models)
    for ax, method in zip(axes, ("knn", "ridge2")):
        for k, m in enumerate(models):
            vals = [phys["r2"][m][method][t] for t in names]
            ax.bar(x - 0.4 + (k + 0.5) * wdt, np.clip(vals, -0.2, 1), wdt, color=COLORS.get(m, "0.5"), label=_label(m))
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylim(-0.2, 1)
        ax.set_ylabel(f"held-out R² ({method})")
        ax.set_title(phys["regressors"][method], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=len(models))
    axes[1].set_xticks(x, [n.replace("weight_template", "w").replace("log10(0.5+F_", "log F ").rstrip(")") for n in names],
                       rotation=30, fontsize=8)
    fig.suptitle(f"Experiment 4 — latents carry the physics: R² of true mock parameters predicted from S numbers "
                 f"({budget})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def fig_real(path, real, real_chi2, mock_snr, mock_chi2, budget) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    snr_r = median_snr(real["y"], real["w"])
    for name, c in mock_chi2.items():
        axes[0].scatter(mock_snr, c, s=2, lw=0, alpha=0.25, color=COLORS[name], rasterized=True)
    for name, c in real_chi2.items():
        axes[0].scatter(snr_r, c, s=28, marker="*", color=COLORS[name], edgecolor="k", lw=0.4,
                        label=f"real SDSS, {_label(name)}: median {np.nanmedian(c):.2f}")
    axes[0].axhline(1, color="k", ls=":", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axes[0].set_xticks([2, 3, 5, 10, 20, 30, 50])
    axes[0].xaxis.set_major_formatter(ScalarFormatter())
    axes[0].xaxis.set_minor_formatter(NullFormatter())
    axes[0].set_xlabel("median S/N per pixel")
    axes[0].set_ylabel("reduced χ²")
    axes[0].legend(fontsize=7)
    axes[0].set_title("real spectra (stars) against held-out mocks (dots) of the same models", fontsize=9)
    order = np.argsort(real["z"])
    names = list(real_chi2)
    wdt = 0.8 / len(names)
    for k, name in enumerate(names):
        axes[1].bar(np.arange(len(order)) - 0.4 + (k + 0.5) * wdt, real_chi2[name][order], wdt,
                    color=COLORS[name], label=_label(name))
    axes[1].set_yscale("log")
    axes[1].axhline(1, color="k", ls=":", lw=0.8)
    axes[1].set_xticks(np.arange(len(order)), [f"{real['z'][i]:.3f}" for i in order], rotation=90, fontsize=6)
    axes[1].set_xlabel("real spectrum (by redshift)")
    axes[1].set_ylabel("reduced χ²")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Experiment 5 — {len(real['z'])} real SDSS spectra under mock-trained models ({budget})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def fig_learning_curve(path, lc: dict, budget: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for name, pts in lc["variants"].items():
        ax.plot([p["spectra_seen"] for p in pts], [p["median_chi2"] for p in pts], "o-", ms=4, color=COLORS[name],
                label=_label(name))
    ax.axhline(lc["pca_median_chi2"], color=COLORS["pca"], ls="--", lw=1.2,
               label=f"weighted restframe PCA (same S): {lc['pca_median_chi2']:.3f}")
    ax.axhline(1, color="k", ls=":", lw=0.8, label="noiseless truth ≈ 1")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("training spectra seen")
    ax.set_ylabel(f"median reduced χ², {lc['n_spectra']} held-out mocks")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"learning curve: is the autoencoder still improving toward the PCA? ({budget})", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def fig_residual_by_wavelength(path, res: dict, budget: str) -> str:
    from .mock import LINES

    plt = pyplot()
    edges = np.asarray(res["bin_edges"])
    mid = 0.5 * (edges[1:] + edges[:-1])
    fig, axes = plt.subplots(2, 1, figsize=(13, 7), sharex=True)
    for name, m in res["models"].items():
        b = m["binned"]
        col = COLORS.get(name, "0.5")
        axes[0].plot(mid, b["median_chi2"], lw=1, color=col, label=f"{_label(name)}: lines "
                     f"{m['lines']['median_over_spectra_chi2']:.2f}, continuum {m['continuum']['median_over_spectra_chi2']:.2f}")
        axes[0].plot(mid, b["mean_chi2"], lw=0.7, ls=":", color=col)
        axes[1].plot(mid, b["median_signal_error"], lw=1, color=col,
                     label=f"{_label(name)}: lines {m['lines']['median_over_spectra_signal_error']:.3f}, continuum "
                           f"{m['continuum']['median_over_spectra_signal_error']:.3f}")
        axes[1].plot(mid, b["mean_signal_error"], lw=0.7, ls=":", color=col)
    for ax in axes:
        for _, lw in LINES:
            ax.axvline(lw, color="0.85", lw=0.6, zorder=0)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].axhline(1, color="k", ls=":", lw=0.8)
    axes[0].set_ylabel("w (y − ŷ)² per pixel")
    axes[1].set_ylabel("w (ŷ − y_true)² per pixel")
    axes[1].set_xlabel("restframe wavelength [Å] (grey: mock emission lines)")
    axes[0].set_title("where the models lose: χ² and error against the noiseless truth stacked by restframe "
                      "wavelength; solid: median per bin, dotted: mean (legend: median over spectra of the mean over "
                      f"line pixels ±{res['line_half_width']:.0f} Å / continuum)", fontsize=9)
    fig.suptitle(f"Fidelity by wavelength ({budget})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def fig_training(path, histories: dict) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for v, h in histories.items():
        col = COLORS[f"ae_{v}"]
        tr = h.get("train", [])
        ax.plot([e["spectra"] for e in tr], [e["loss"] for e in tr], lw=1, color=col, label=f"{VARIANTS[v]['label']} train")
        if any("loss_aug" in e for e in tr):
            ax.plot([e["spectra"] for e in tr], [e.get("loss_aug", np.nan) for e in tr], lw=0.7, ls=":", color=col,
                    label=f"{VARIANTS[v]['label']} augmented copies")
        va = h.get("val", [])
        ax.plot([e["spectra"] for e in va], [e["loss"] for e in va], "o--", ms=4, color=col, label=f"{VARIANTS[v]['label']} validation")
    ax.set_yscale("log")
    ax.set_xlabel("spectra seen")
    ax.set_ylabel("loss Σ w (y − ŷ)² / Σ w")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("training of the three variants", fontsize=10)
    return save_figure(fig, path)


# ---- the run ----------------------------------------------------------------------------------------------------


def _cpu_s() -> float:
    """CPU seconds of this process (all threads) and its finished children."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _mock_file(cfg, path, n, seed, id_offset) -> str:
    """The training mock file, reused if it exists with the same parameters."""
    import h5py

    if os.path.exists(path):
        with h5py.File(path, "r") as f:
            if (f.attrs.get("mock_seed") == seed and len(f["Z"]) == n and int(f["object_id"][0]) == id_offset):
                _say(cfg, f"reusing {path}")
                return path
    _say(cfg, f"writing {n} training mock spectra to {path}")
    write_mock(path, n, "sdss", seed=seed, restframe_truth=False, id_offset=id_offset, progress=cfg.progress)
    return path


def run(cfg: ScienceConfig, machine: dict | None = None, note: str | None = None) -> dict:
    """All five experiments; writes figures to <out_dir>/science-<mode>/, numbers to science-<mode>.json and a
    Markdown table to science-<mode>.md. Returns the results dict."""
    from .plotting import plot_reconstructions, plot_redshift_invariance

    t_start, c_start = time.perf_counter(), _cpu_s()
    timings = {}
    os.makedirs(cfg.workdir, exist_ok=True)
    fig_dir = os.path.join(cfg.out_dir, f"science-{cfg.mode}")
    os.makedirs(fig_dir, exist_ok=True)
    load_start = _load_average()
    torch.manual_seed(cfg.seed)

    # -- data
    t0, c0 = time.perf_counter(), _cpu_s()
    train_path = _mock_file(cfg, os.path.join(cfg.workdir, f"train-{cfg.mode}.h5"), cfg.n_train, cfg.seed, 0)
    _say(cfg, f"making {cfg.n_test} held-out and {cfg.n_lowz} low-z mock spectra")
    test = mock_set(cfg.n_test, cfg.seed + 1000, 10**9)
    lowz = mock_set(cfg.n_lowz, cfg.seed + 2000, 2 * 10**9, z_dist="uniform", z_range=cfg.lowz_range,
                    observed=False)
    inst = get_instrument("sdss")
    wave_obs = inst.wave_obs
    timings["data_s"] = time.perf_counter() - t0
    timings["data_cpu_s"] = _cpu_s() - c0

    # -- training
    t0, c0 = time.perf_counter(), _cpu_s()
    training = {v: train_variant(cfg, v, train_path) for v in cfg.variants}
    timings["training_s"] = time.perf_counter() - t0
    timings["training_cpu_s"] = _cpu_s() - c0
    models = {v: load_variant(cfg, v) for v in cfg.variants}
    wave_rest = next(iter(models.values())).wave_rest.double().numpy()
    n_params = int(sum(p.numel() for p in next(iter(models.values())).parameters()))
    budget = (f"{cfg.mode} mode: {cfg.steps} steps × {cfg.batch_size} spectra from {cfg.n_train} mocks, "
              f"encoder channels {tuple(cfg.model.get('encoder_channels', (128, 256, 512)))}")

    # -- PCA baseline
    t0, c0 = time.perf_counter(), _cpu_s()
    _say(cfg, f"weighted restframe PCA with {cfg.n_latent} components on {cfg.n_pca_fit} training spectra")
    from .spectra_io import open_spectra

    with open_spectra(train_path) as f:
        b = f.read(0, min(cfg.n_pca_fit, len(f)))
    y_fit, w_fit = observed_arrays(b.flux, b.ivar, b.mask)
    x_rest, w_rest = to_restframe(y_fit, w_fit, b.z, wave_obs, wave_rest)
    del y_fit, w_fit
    pca = WeightedPCA(cfg.n_latent).fit(x_rest, w_rest, n_iter=cfg.pca_iter, seed=cfg.seed, progress=cfg.progress)
    pca_test = pca.fit_observed(test["y"], test["w"], test["z"], wave_rest, wave_obs)
    pca_scan = {}
    for S in cfg.pca_scan:
        p_s = WeightedPCA(S).fit(x_rest, w_rest, n_iter=cfg.pca_iter, seed=cfg.seed)
        fit_s = p_s.fit_observed(test["y"], test["w"], test["z"], wave_rest, wave_obs)
        pca_scan[S] = {"chi2": chi2_summary(fit_s["chi2"]), "signal_error": chi2_summary(
            signal_error(test["truth/model_obs"], fit_s["spec_obs"], test["w"], fit_s["valid"])),
            "iterations": len(p_s.history)}
    del x_rest, w_rest
    pca_lowz = pca.fit_observed(lowz["y"], lowz["w"], lowz["z"], wave_rest, wave_obs)
    timings["pca_s"] = time.perf_counter() - t0
    timings["pca_cpu_s"] = _cpu_s() - c0

    # -- encode everything once per variant
    t0, c0 = time.perf_counter(), _cpu_s()
    _say(cfg, "encoding held-out, low-z and moved spectra with every variant")
    rng = np.random.default_rng(cfg.seed)
    cand = np.flatnonzero(test["z"] <= cfg.invariance_z_native_max)
    inv_idx = np.sort(rng.choice(cand, size=min(cfg.n_invariance, cand.size), replace=False))
    moved = moved_copies({**test, "wave_obs": wave_obs}, inv_idx, cfg.invariance_z)
    K = len(cfg.invariance_z)
    enc_test, enc_lowz, enc_moved, enc_refined = {}, {}, {}, {}
    for v, model in models.items():
        name = f"ae_{v}"
        enc_test[name] = _encode(model, test, chi2=True, observed=True)
        if cfg.refine_steps:
            enc_refined[f"{name}_refined"] = _encode(model, test, chi2=True, observed=True, refine=cfg.refine_steps)
        enc_lowz[name] = _encode(model, lowz, restframe=True)
        enc_moved[name] = _encode(model, moved, chi2=True)
    timings["encode_s"] = time.perf_counter() - t0
    timings["encode_cpu_s"] = _cpu_s() - c0

    results = {
        "experiment": "fastspec science: the findings of Melchior, Hahn & Liang 2022 against mock ground truth",
        "mode": cfg.mode, "config": cfg.to_dict(), "machine": machine or {}, "load_average_start": load_start,
        "note": note,
        "training_budget": budget, "model_parameters": n_params, "chi2_definition": CHI2_DEFINITION,
        "variants": {f"ae_{v}": VARIANTS[v]["label"] for v in cfg.variants},
        "training": {f"ae_{v}": training[v] for v in cfg.variants},
        "pca": {"method": WeightedPCA.__doc__.split("\n")[0].strip(), "n_components": cfg.n_latent,
                "n_fit": int(len(b.z)), "iterations": len(pca.history),
                "weighted_ssr_history": pca.history},
    }
    figures = {}

    # 1. fidelity
    t_an, c_an = time.perf_counter(), _cpu_s()
    fid, per_spec = exp_fidelity({**enc_test, **enc_refined}, pca_test, test, cfg.n_latent)
    results["fidelity"] = fid
    test_snr = median_snr(test["y"], test["w"])
    results["fidelity"]["test_snr_median"] = float(np.median(test_snr))
    results["fidelity"]["pca_rank_scan"] = {f"S={S}": v for S, v in pca_scan.items()}
    figures["fidelity"] = fig_fidelity(os.path.join(fig_dir, "fidelity.png"), per_spec, test_snr, cfg.n_latent, budget)
    main = f"ae_{cfg.variants[0]}"
    ex = pick_examples(test["z"], enc_test[main]["chi2"], 3)
    rec = _encode(models[cfg.variants[0]], {k: test[k][ex] for k in ("y", "w", "z")}, chi2=True, restframe=True,
                  observed=True)
    figures["reconstructions_mock"] = plot_reconstructions(
        os.path.join(fig_dir, "reconstructions_mock.png"), test, rec, ex, wave_obs, wave_rest, 0.5)

    # 1b. learning curve and where in the spectrum each model loses
    lc = exp_learning_curve(cfg, models, results["training"], test, enc_test, pca_test["chi2"])
    results["learning_curve"] = lc
    figures["learning_curve"] = fig_learning_curve(os.path.join(fig_dir, "learning_curve.png"), lc, budget)
    obs_models = {k: (v["spec_obs"], v["valid"]) for k, v in enc_test.items()}
    obs_models["pca"] = (pca_test["spec_obs"], pca_test["valid"])
    byw = exp_residual_by_wavelength(obs_models, test, wave_obs, wave_rest)
    results["fidelity_by_wavelength"] = byw
    figures["fidelity_by_wavelength"] = fig_residual_by_wavelength(
        os.path.join(fig_dir, "fidelity_by_wavelength.png"), byw, budget)

    # 2. extended restframe
    rest_models = {k: v["spec_rest"] for k, v in enc_lowz.items()}
    rest_models["pca"] = pca.restframe(pca_lowz["coeffs"])
    rest_models["pca_every_pixel"] = pca.restframe(
        pca.fit_observed(lowz["y"], lowz["w"], lowz["z"], wave_rest, wave_obs, min_coverage=0.0)["coeffs"])
    ext, ext_arrays = exp_extended_restframe(rest_models, lowz, wave_rest, float(wave_obs[0]))
    results["extended_restframe"] = ext
    figures["oii_extended"] = fig_oii(os.path.join(fig_dir, "oii_extended.png"), ext_arrays, lowz, wave_rest,
                                      rest_models, float(wave_obs[0]), budget)

    # 3. redshift invariance
    n_inv = len(inv_idx)
    lat_moved = {k: v["latents"].reshape(n_inv, K, -1) for k, v in enc_moved.items()}
    lat_native = {k: v["latents"][inv_idx] for k, v in enc_test.items()}
    lat_sample = {k: v["latents"] for k, v in enc_test.items()}
    cross = {f"ae_{v}": cross_chi2(model, test, inv_idx, lat_moved[f"ae_{v}"]) for v, model in models.items()}
    inv, inv_per = exp_invariance(lat_native, lat_moved, lat_sample, cfg.invariance_z,
                                  {k: v["chi2"] for k, v in enc_test.items()},
                                  {k: v["chi2"] for k, v in enc_moved.items()}, inv_idx, cross)
    inv["n_spectra"] = n_inv
    inv["native_z_range"] = [float(test["z"][inv_idx].min()), float(test["z"][inv_idx].max())]
    inv["method"] = ("held-out spectra with z ≤ %.2f moved on the observed grid to each z' by "
                     "fastspec.augment.redshift_augment (pixels from outside the observed range removed); "
                     "displacement = ‖s(z') − s(z_obs)‖ / σ_sample with σ²_sample = mean ‖s − s̄‖² over the "
                     "held-out set (JSON: also the 5th-NN-distance version, self-retrieval, own-spectrum χ² from the "
                     "moved latents, and `fastspec report`'s spread_ratio = mean_d std_z'(s_d)/σ_d)"
                     % cfg.invariance_z_native_max)
    results["redshift_invariance"] = inv
    figures["invariance"] = fig_invariance(os.path.join(fig_dir, "invariance.png"), inv, inv_per, budget)
    # one example spectrum through report's Figure-3 panel, per variant
    good = (test["w"][inv_idx] > 0).mean(1)
    j = int(np.argmax(np.where(good > 0.85, -test["z"][inv_idx], -np.inf)))
    for v, model in models.items():
        name = f"ae_{v}"
        sel = slice(j * K, (j + 1) * K)
        one = _encode(model, {k: moved[k][sel] for k in ("y", "w", "z")}, chi2=True, restframe=True, observed=True)
        ex_inv = {"index": int(inv_idx[j]), "object_id": test["object_id"][inv_idx[j]], "z": float(test["z"][inv_idx[j]]),
                  "z_new": np.asarray(cfg.invariance_z, float), "y": moved["y"][sel], "w": moved["w"][sel], **one,
                  "ratio": float(inv_per[name]["spread_ratio"][j])}
        figures[f"invariance_example_{v}"] = plot_redshift_invariance(
            os.path.join(fig_dir, f"invariance_example_{v}.png"), ex_inv, lat_sample[name], wave_obs, wave_rest)

    # 4. physics
    tnames, targets = physics_targets(test)
    predictors = {k: v["latents"] for k, v in enc_test.items()}
    predictors["pca"] = pca_test["coeffs"]
    results["latent_physics"] = exp_physics(predictors, targets, tnames, cfg.seed)
    figures["physics"] = fig_physics(os.path.join(fig_dir, "physics.png"), results["latent_physics"], budget)

    timings["analysis_s"] = time.perf_counter() - t_an
    timings["analysis_cpu_s"] = _cpu_s() - c_an

    # 5. real spectra
    if cfg.real_dir:
        t0, c0 = time.perf_counter(), _cpu_s()
        real = real_set(cfg.real_dir, cfg.workdir)
        real_chi2 = {}
        for v, model in models.items():
            real_chi2[f"ae_{v}"] = _encode(model, real, chi2=True)["chi2"]
        pca_real = pca.fit_observed(real["y"], real["w"], real["z"], wave_rest, wave_obs)
        real_chi2["pca"] = pca_real["chi2"]
        real_snr = median_snr(real["y"], real["w"])
        results["real_spectra"] = {
            "files": real["n_files"], "n_ingested": int(len(real["z"])), "skipped": real["skipped"],
            "z_range": [float(real["z"].min()), float(real["z"].max())],
            "snr_median": float(np.median(real_snr)),
            "chi2": {k: chi2_summary(c) for k, c in real_chi2.items()},
            "per_spectrum": [{"spectrum": str(real["object_id"][i]), "z": float(real["z"][i]),
                              "snr": float(real_snr[i]),
                              **{f"chi2_{k}": float(c[i]) for k, c in real_chi2.items()}}
                             for i in range(len(real["z"]))],
            "mock_same_snr": {},
        }
        lo, hi = np.percentile(real_snr, [10, 90])
        same = (test_snr >= lo) & (test_snr <= hi)
        for k in real_chi2:
            c = per_spec[k]["chi2"][same]
            results["real_spectra"]["mock_same_snr"][k] = chi2_summary(c)
        results["real_spectra"]["mock_same_snr"]["snr_range"] = [float(lo), float(hi)]
        results["real_spectra"]["mock_same_snr"]["n"] = int(same.sum())
        figures["real"] = fig_real(os.path.join(fig_dir, "real.png"), real, real_chi2, test_snr,
                                   {k: per_spec[k]["chi2"] for k in real_chi2}, budget)
        order = np.argsort(real_chi2[main])
        ex_r = [int(order[len(order) // 4]), int(order[len(order) // 2]), int(order[-1])]
        rec = _encode(models[cfg.variants[0]], {k: real[k][ex_r] for k in ("y", "w", "z")}, chi2=True,
                      restframe=True, observed=True)
        figures["reconstructions_real"] = plot_reconstructions(
            os.path.join(fig_dir, "reconstructions_real.png"), real, rec, ex_r, wave_obs, wave_rest, 0.5)
        timings["real_s"] = time.perf_counter() - t0
        timings["real_cpu_s"] = _cpu_s() - c0

    histories = {}
    for v in cfg.variants:
        with open(os.path.join(cfg.workdir, f"model-{v}", "history.json")) as fh:
            histories[v] = json.load(fh)
    figures["training"] = fig_training(os.path.join(fig_dir, "training.png"), histories)

    timings["total_s"] = time.perf_counter() - t_start
    timings["total_cpu_s"] = _cpu_s() - c_start
    # Models reused from an earlier run of the same configuration: count the training as it was recorded then.
    reused = [v for v in cfg.variants if training[v].get("reused")]
    timings["training_reused"] = reused
    extra_wall = sum(float(training[v].get("wall_s") or 0) for v in reused)
    extra_cpu = sum(float(training[v].get("cpu_s") or 0) for v in reused)
    timings["end_to_end_s"] = timings["total_s"] + extra_wall
    timings["end_to_end_cpu_s"] = timings["total_cpu_s"] + extra_cpu
    # On an idle machine the wall time lies between CPU time / cores (all of it parallel) and CPU time.
    timings["idle_wall_estimate_s"] = [timings["end_to_end_cpu_s"] / max(1, torch.get_num_threads()),
                                       timings["end_to_end_cpu_s"]]
    results["timings"] = timings
    results["load_average_end"] = _load_average()
    results["figures"] = {k: os.path.relpath(p, cfg.out_dir) for k, p in figures.items()}
    write_text(os.path.join(cfg.out_dir, f"science-{cfg.mode}.json"), json.dumps(_jsonable(results), indent=1),
               sync=False)
    write_text(os.path.join(cfg.out_dir, f"science-{cfg.mode}.md"), markdown(results), sync=False)
    _say(cfg, f"done in {timings['total_s']:.0f} s: {cfg.out_dir}/science-{cfg.mode}.md")
    return results


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _f(v, spec=".3g"):
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _ci(ci, spec=".3g") -> str:
    """' [lo, hi]' for a 68% interval, '' when there is none."""
    if not ci or ci[0] is None:
        return ""
    return f"[{_f(ci[0], spec)}, {_f(ci[1], spec)}]"


def findings(r: dict) -> list[str]:
    """One sentence per experiment: what the paper reports and what these numbers say (computed, not typed)."""
    out = []
    variants = list(r["variants"])
    f = r["fidelity"]
    pca = f["pca"]
    out.append(
        "**Fidelity:** median reduced χ² " + ", ".join(f"{_label(k)} {_f(f[k]['chi2']['median'])}" for k in variants)
        + f" against {_f(pca['chi2']['median'])} for the weighted PCA with as many components (the noiseless truth: "
        f"{_f(f['truth_model']['chi2']['median'])}); the autoencoder has the lower χ² on "
        + ", ".join(f"{_f(f[k]['fraction_chi2_below_pca'], '.0%')}" for k in variants) + " of the spectra. Median "
        "error against the noiseless truth, in noise variances (below 1 = residuals below the noise): "
        + ", ".join(f"{_label(k)} {_f(f[k]['signal_error']['median'])}" for k in variants)
        + f", PCA {_f(pca['signal_error']['median'])}. Paper: AE-10 residuals below the noise, better than PCA.")
    wins = [k for k in variants if (f[k]["chi2"]["median"] or math.inf) < (pca["chi2"]["median"] or math.inf)]
    verdict = (f"at this training budget {'every' if len(wins) == len(variants) else 'no' if not wins else 'only'} "
               + ("autoencoder variant" if not wins or len(wins) == len(variants) else ", ".join(_label(k) for k in wins))
               + " reaches a lower median χ² than the weighted PCA with as many components")
    if "fidelity_by_wavelength" in r:
        bw = r["fidelity_by_wavelength"]["models"]
        key = "median_over_spectra_signal_error"
        lose_lines = [k for k in variants if bw[k]["lines"][key] > bw["pca"]["lines"][key]]
        win_cont = [k for k in variants if bw[k]["continuum"][key] < bw["pca"]["continuum"][key]]
        verdict += (f"; on emission-line pixels {len(lose_lines)} of {len(variants)} variants have a larger error "
                    f"against the truth than the PCA, on continuum pixels {len(win_cont)} of {len(variants)} a "
                    "smaller one (see 'Where in the spectrum')")
    refined = [k for k in f if k.endswith("_refined")]
    if refined:
        verdict += ("; with each spectrum's latents refined through the frozen decoder: "
                    + ", ".join(f"{_label(k)} {_f(f[k]['chi2']['median'])} (lower χ² than the PCA on "
                                f"{_f(f[k]['fraction_chi2_below_pca'], '.0%')} of the spectra)" for k in refined))
    out[-1] += " **Verdict:** " + verdict + "."
    if "learning_curve" in r:
        lc = r["learning_curve"]
        seg = []
        for k, pts in lc["variants"].items():
            trend = ""
            if len(pts) >= 2:
                a = pts[-2]
                trend = f", {_f(a['median_chi2'])} at {a['spectra_seen']} spectra seen"
            seg.append(f"{_label(k)} {_f(pts[-1]['median_chi2'])} after {pts[-1]['spectra_seen']} spectra{trend}")
        out.append(f"**Learning curve** (median χ² of {lc['n_spectra']} held-out mocks): " + "; ".join(seg)
                   + f"; the weighted PCA: {_f(lc['pca_median_chi2'])}.")
    if "fidelity_by_wavelength" in r:
        bw = r["fidelity_by_wavelength"]["models"]
        out.append("**Where the models lose** (error against the noiseless truth per pixel in noise variances, median "
                   "over spectra, emission-line pixels / continuum; share of the pooled error in line pixels): "
                   + ", ".join(f"{_label(k)} {_f(m['lines']['median_over_spectra_signal_error'])} / "
                               f"{_f(m['continuum']['median_over_spectra_signal_error'])} "
                               f"({_f(m['lines']['share_of_total_signal_error'], '.0%')})" for k, m in bw.items()) + ".")
    e = r["extended_restframe"]["models"]
    parts = [f"{_label(k)} r = {_f(e[k]['unobserved']['pearson_r'], '.2f')} (NMAD {_f(e[k]['unobserved']['scatter_nmad'])}; "
             f"observed [O II]: r = {_f(e[k]['observed']['pearson_r'], '.2f')})" for k in e]
    out.append("**Extended restframe:** [O II] of galaxies where it is not observed, against the truth: " + "; ".join(parts)
               + ". The paper shows (Fig. 2) plausible [O II] predicted beyond the observed range.")
    inv = r["redshift_invariance"]["variants"]
    d = {k: inv[k]["median_rms_displacement"] for k in inv}
    loc = {k: inv[k].get("median_rms_local_displacement") for k in inv}
    c = {k: inv[k]["chi2_native_median"] for k in inv}
    s = ("**Redshift invariance:** median RMS latent displacement over z' = 0…0.5 in units of the sample's latent "
         "spread: " + ", ".join(f"{_label(k)} {_f(v, '.3f')}" for k, v in d.items()) + "; in units of the distance to "
         "the 5th nearest neighbour: " + ", ".join(f"{_f(loc[k], '.2f')}" for k in inv) + "; moved copies still "
         "recognised as themselves: " + ", ".join(f"{_f(inv[k].get('self_retrieval_top1'), '.0%')}" for k in inv)
         + "; own spectrum decoded from the moved latents, median χ² " + ", ".join(
             f"{_f(inv[k].get('median_chi2_own_spectrum_from_moved_latents'))}" for k in inv)
         + f" (from its own latents {_f(inv[variants[0]].get('median_chi2_own_spectrum_native_latents'))}).")
    base = variants[0] if variants[0] in d else None
    if base:
        for k in variants[1:]:
            if k in d and d[k] > 0:
                s += (f" {_label(k)} moves {_f(d[base] / d[k], '.2f')}× less than {_label(base)} (×"
                      f"{_f(loc[base] / loc[k], '.2f') if loc.get(k) else '—'} in neighbour units) at a median-χ² cost "
                      f"of ×{_f(c[k] / c[base], '.2f')}.")
    s += (" The paper finds (a) unstable and (b), (c) stable, at the cost of using only features seen at all "
          "redshifts.")
    out.append(s)
    p = r["latent_physics"]["r2"]
    means = {k: float(np.mean([max(p[k][m][t] for m in p[k]) for t in r["latent_physics"]["targets"]])) for k in p}
    out.append("**Latents carry the physics:** mean over the targets of the best held-out R² (kNN or quadratic ridge): "
               + ", ".join(f"{_label(k)} {_f(v, '.2f')}" for k, v in means.items()) + ".")
    if "real_spectra" in r:
        rs = r["real_spectra"]
        out.append("**Real SDSS spectra:** median χ² " + ", ".join(
            f"{_label(k)} {_f(v['median'])} (mocks at the same S/N {_f(rs['mock_same_snr'][k]['median'])})"
            for k, v in rs["chi2"].items()) + ": the gap between the two is what the mocks miss of real galaxies "
            "(and of real noise, sky residuals and calibration).")
    return out


CAVEATS = {
    "quick": "Quick mode trains each variant for a few minutes on a CPU (bf16 autocast) with an encoder of "
             "16/32/64 channels (the paper: 128/256/512 on a GPU for many epochs of ~500k spectra); the learning "
             "curve shows whether the models were still improving when the budget ran out, and every number here "
             "is a statement about that budget, not about the architecture's limit. Each variant is one training "
             "run (one seed): the brackets give the test-set sampling error only, so small differences between "
             "variants may be training noise. The full mode (`fastspec science --full`, a GPU) uses the paper's "
             "encoder, 100k mocks and 40k steps of 256.",
    "full": "Full mode: the paper's encoder, 100k mocks, 40k steps of 256 spectra per variant.",
    "smoke": "Smoke mode checks that the code runs; its numbers mean nothing.",
}


def markdown(r: dict) -> str:
    """The results as a Markdown page: tables per experiment, the figures, and the training budget."""
    cfg = r["config"]
    variants = list(r["variants"])
    L = [f"# fastspec science check — {r['mode']} mode", "",
         "Findings of Melchior, Hahn & Liang 2022 (\"Autoencoding Galaxy Spectra\") measured against mock ground "
         "truth (fastspec.mock) and on the bundled real SDSS spectra. Produced by `fastspec science` (or `bench/science.py`).", "",
         f"**Training budget behind every number:** {r['training_budget']}; S = {cfg['n_latent']} latents, "
         f"{r['model_parameters']:,} parameters, {cfg['precision']}, lr {cfg['lr']} one-cycle. "
         f"Test sets: {cfg['n_test']} held-out mocks (SDSS-like n(z)), {cfg['n_lowz']} low-z mocks "
         f"(uniform z in {cfg['lowz_range'][0]}–{cfg['lowz_range'][1]}).", ""]
    m = r.get("machine", {})
    L += [f"Machine: {m.get('cpu', '?')} × {m.get('cpu_count', '?')} cores, torch {m.get('torch', '?')}"
          f"{', GPU ' + m['gpu'] if m.get('gpu') else ''}; load average (1, 5, 15 min) at the start of the analysis "
          f"{', '.join(_f(x, '.1f') for x in (r.get('load_average_start') or []))}; total "
          f"{_f(r['timings'].get('end_to_end_s', r['timings']['total_s']), '.0f')} s wall (training "
          f"{_f(sum(float(t.get('wall_s') or 0) for t in r['training'].values()), '.0f')} s"
          + (f", trained in an earlier run: {', '.join(r['timings']['training_reused'])}"
             if r["timings"].get("training_reused") else "") + "), "
          f"{_f(r['timings'].get('end_to_end_cpu_s', r['timings'].get('total_cpu_s')), '.0f')} CPU s — on an idle machine between "
          f"{_f((r['timings'].get('idle_wall_estimate_s') or [None])[0], '.0f')} and "
          f"{_f((r['timings'].get('idle_wall_estimate_s') or [None, None])[1], '.0f')} s.", ""]
    if r.get("note"):
        L += [f"*Note:* {r['note']}", ""]
    L += ["## Findings", ""] + [f"- {line}" for line in findings(r)]
    L += ["", f"*Caveat:* {CAVEATS.get(r['mode'], '')}", "",
          "## Training", "", "| variant | steps | spectra seen | train time [s] | final val loss |", "|---|---|---|---|---|"]
    for k in variants:
        t = r["training"][k]
        L.append(f"| {r['variants'][k]} | {t.get('step')} | {t.get('spectra_seen')} | {_f(t.get('train_time_s'), '.0f')} "
                 f"| {_f(t.get('val_loss'), '.4g')} |")
    f = r["fidelity"]
    L += ["", "## 1. Fidelity (held-out mocks)", "",
          f"Reduced χ²: {r['chi2_definition']}. Signal error: Σ w·valid·(ŷ − y_true)² / N_valid against the noiseless "
          "truth, in units of the noise variance — below 1 means the residuals to the truth are below the noise. "
          f"Median S/N of the test spectra: {_f(f['test_snr_median'])}.", "",
          "Brackets: bootstrap 68% interval of the number over the test set (not the scatter between trainings).", "",
          "| model | median χ² | χ² 16–84% | frac χ² < 2 | median signal error | frac spectra better than PCA |",
          "|---|---|---|---|---|---|"]
    for k in ["truth_model", *variants, "pca"]:
        c = f[k]["chi2"]
        se = f[k].get("signal_error", {})
        L.append(f"| {_label(k)} | {_f(c['median'])} {_ci(c.get('median_ci68'))} | {_f(c['p16'])}–{_f(c['p84'])} "
                 f"| {_f(c['fraction_below_2'], '.1%')} "
                 f"| {_f(se.get('median'))} | {_f(f[k].get('fraction_chi2_below_pca'), '.1%')} |")
    scan = f.get("pca_rank_scan", {})
    if scan:
        L += ["", "Weighted PCA with fewer components (how many dimensions the mocks need): "
              + "; ".join(f"{k}: median χ² {_f(v['chi2']['median'])}, signal error {_f(v['signal_error']['median'])}"
                          for k, v in scan.items()) + "."]
    if "learning_curve" in r:
        lc = r["learning_curve"]
        L += ["", "### Learning curve", "",
              f"Median reduced χ² of the first {lc['n_spectra']} held-out mocks under the weights at a few points of "
              "each training run (the one-cycle learning rate is still high at the early points); the weighted "
              f"restframe PCA with as many components reaches {_f(lc['pca_median_chi2'])} "
              f"{_ci(lc.get('pca_median_chi2_ci68'))} on the same spectra.", "",
              "| variant | " + " | ".join(f"{p['spectra_seen']} spectra" for p in next(iter(lc["variants"].values())))
              + " |", "|---|" + "---|" * len(next(iter(lc["variants"].values())))]
        for k, pts in lc["variants"].items():
            L.append(f"| {_label(k)} | " + " | ".join(_f(p["median_chi2"], ".4g") for p in pts) + " |")
    if "fidelity_by_wavelength" in r:
        bw = r["fidelity_by_wavelength"]
        L += ["", "### Where in the spectrum", "",
              f"{bw['definition']}. Line pixels: within ±{bw['line_half_width']:.0f} Å restframe of a mock emission "
              "line.", "",
              "| model | line pixels: χ² median (mean) | continuum: χ² median (mean) | line pixels: signal error "
              "median (mean) | continuum: signal error median (mean) | share of the pooled signal error in line "
              "pixels |", "|---|---|---|---|---|---|"]
        for k, m in bw["models"].items():
            cell = [f"{_f(m[p]['median_over_spectra_' + q])} ({_f(m[p]['mean_' + q])})"
                    for q in ("chi2", "signal_error") for p in ("lines", "continuum")]
            L.append(f"| {_label(k)} | " + " | ".join(cell)
                     + f" | {_f(m['lines']['share_of_total_signal_error'], '.0%')} |")
    e = r["extended_restframe"]
    L += ["", "## 2. Extended restframe: [O II] where it is not observed", "",
          f"{e['definition']}. Unobserved: {e['unobserved_means']} (n = {e['n']['unobserved']}); control group with "
          f"[O II] observed: n = {e['n']['observed']}. Spread of the reference flux (NMAD): unobserved "
          f"{_f(e['reference_spread_nmad']['unobserved'])}, observed {_f(e['reference_spread_nmad']['observed'])}. "
          "Measurement floor (the measurement on the true spectrum vs the catalogue line flux): Pearson r "
          f"{_f(e['measurement_floor_vs_catalogue']['unobserved']['pearson_r'], '.3f')} (unobserved), median bias "
          f"{_f(e['measurement_floor_vs_catalogue']['unobserved']['bias_median'])}.", "",
          "| model | [O II] | Pearson r | Spearman r | R² | median bias | NMAD scatter | r vs catalogue flux |",
          "|---|---|---|---|---|---|---|---|"]
    for k, groups in e["models"].items():
        for g, s in groups.items():
            L.append(f"| {_label(k)} | {g} | {_f(s['pearson_r'], '.3f')} {_ci(s.get('pearson_r_ci68'), '.2f')} "
                     f"| {_f(s['spearman_r'], '.3f')} | {_f(s['r2'], '.3f')} "
                     f"| {_f(s['bias_median'])} | {_f(s['scatter_nmad'])} | {_f(s['pearson_r_vs_catalogue'], '.3f')} |")
    inv = r["redshift_invariance"]
    L += ["", "## 3. Redshift invariance", "",
          f"{inv['n_spectra']} held-out spectra (z = {_f(inv['native_z_range'][0])}–{_f(inv['native_z_range'][1])}) moved "
          f"to z' = {', '.join(_f(z, 'g') for z in inv['z_moved_to'])} on their observed grid by "
          "fastspec.augment.redshift_augment (pixels that come from outside the observed range removed), each copy "
          "encoded.", "",
          "Columns: RMS over z' of the displacement in units of the sample's latent spread σ_sample (and at three z'); "
          "the same in units of the distance to the 5th nearest neighbour in the held-out sample (scale- and "
          "anisotropy-free: the latent clouds are far from round, see 'effective dims'); self-retrieval: fraction of "
          "moved copies whose nearest unmoved latent is the galaxy's own; χ² of the galaxy's own spectrum decoded from "
          "the moved copies' latents (mean over z'), against χ² from its own latents.", "",
          "| variant | RMS displ. / σ_sample | at z'=0 / 0.25 / 0.5 | RMS displ. / d_5NN | self-retrieval | "
          "own-spectrum χ² from moved latents | from own latents | effective dims | χ² moved copies |",
          "|---|---|---|---|---|---|---|---|---|"]
    zs = inv["z_moved_to"]
    picks = [int(np.argmin(np.abs(np.asarray(zs) - q))) for q in (0.0, 0.25, 0.5)]
    for k, s in inv["variants"].items():
        at = " / ".join(_f(s["median_displacement_at_z"][i], ".2f") for i in picks)
        L.append(f"| {_label(k)} | {_f(s['median_rms_displacement'], '.3f')} {_ci(s.get('median_rms_displacement_ci68'), '.3f')} "
                 f"| {at} | {_f(s.get('median_rms_local_displacement'), '.2f')} "
                 f"{_ci(s.get('median_rms_local_displacement_ci68'), '.2f')} | {_f(s.get('self_retrieval_top1'), '.0%')} "
                 f"| {_f(s.get('median_chi2_own_spectrum_from_moved_latents'))} "
                 f"{_ci(s.get('median_chi2_own_spectrum_from_moved_latents_ci68'))} "
                 f"| {_f(s.get('median_chi2_own_spectrum_native_latents'))} | {_f(s.get('latent_effective_dimensions'), '.2f')} "
                 f"| {_f(s['chi2_moved_median'])} |")
    p = r["latent_physics"]
    L += ["", "## 4. Latents carry the physics (held-out R²)", "",
          f"{p['protocol']}; regressors: kNN — {p['regressors']['knn']}; ridge2 — {p['regressors']['ridge2']}. "
          "Predictors: the S latents of each AE variant, or the S PCA coefficients.", ""]
    heads = p["targets"]
    L += ["| predictors | regressor | " + " | ".join(h.replace("weight_template", "w").replace("log10(0.5+F_", "logF ")
                                                   .rstrip(")") for h in heads) + " |",
          "|---|---|" + "---|" * len(heads)]
    for k, by in p["r2"].items():
        for meth, vals in by.items():
            L.append(f"| {_label(k)} | {meth} | " + " | ".join(_f(vals[h], '.2f') for h in heads) + " |")
    if "real_spectra" in r:
        rs = r["real_spectra"]
        ms = rs["mock_same_snr"]
        L += ["", "## 5. Real SDSS spectra under mock-trained models", "",
              f"{rs['n_ingested']} of {rs['files']} bundled SDSS-spectrograph files ingested (z = {_f(rs['z_range'][0])}–"
              f"{_f(rs['z_range'][1])}, median S/N {_f(rs['snr_median'])}); mocks in the same S/N range "
              f"({_f(ms['snr_range'][0])}–{_f(ms['snr_range'][1])}, n = {ms['n']}) for comparison.", "",
              "| model | real: median χ² | real: 16–84% | mocks at the same S/N: median χ² |", "|---|---|---|---|"]
        for k, c in rs["chi2"].items():
            L.append(f"| {_label(k)} | {_f(c['median'])} | {_f(c['p16'])}–{_f(c['p84'])} | {_f(ms[k]['median'])} |")
    L += ["", "## Figures", ""]
    for k, path in r["figures"].items():
        L += [f"### {k.replace('_', ' ')}", "", f"![{k}]({path})", ""]
    return "\n".join(L) + "\n"
