"""What the autoencoder is measured against: a weighted restframe PCA with as many components as it has latents,
and the simple regressors (kNN, quadratic ridge) that read the physics off latents or PCA coefficients."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from ..losses import reduced_chi2
from ..restframe import to_restframe
from .config import ScienceConfig, say
from .data import observed_arrays
from .stats import chi2_summary, r2_score, signal_error


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
        from .. import kernels

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


@dataclass
class PCABaseline:
    """The weighted PCA with cfg.n_latent components and its fits to the held-out and low-z sets."""

    pca: WeightedPCA
    n_fit: int  # training spectra it was fitted to
    test: dict  # WeightedPCA.fit_observed of the held-out set
    lowz: dict  # ... of the low-z set
    rank_scan: dict  # S -> χ² and signal-error summaries of a rank-S PCA on the held-out set (cfg.pca_scan)
    rank_chi2: dict = field(default_factory=dict)  # S -> per-spectrum held-out χ² (the scan's ranks and n_latent)


def fit_pca_baseline(cfg: ScienceConfig, train_path: str, test: dict, lowz: dict, wave_obs, wave_rest) -> PCABaseline:
    """Fit the PCA (and the smaller ranks of cfg.pca_scan) to the first cfg.n_pca_fit training spectra moved to the
    restframe grid, then to the held-out and low-z sets in the observed frame."""
    say(cfg, f"weighted restframe PCA with {cfg.n_latent} components on {cfg.n_pca_fit} training spectra")
    from ..spectra_io import open_spectra

    with open_spectra(train_path) as f:
        b = f.read(0, min(cfg.n_pca_fit, len(f)))
    y_fit, w_fit = observed_arrays(b.flux, b.ivar, b.mask)
    x_rest, w_rest = to_restframe(y_fit, w_fit, b.z, wave_obs, wave_rest)
    del y_fit, w_fit
    pca = WeightedPCA(cfg.n_latent).fit(x_rest, w_rest, n_iter=cfg.pca_iter, seed=cfg.seed, progress=cfg.progress)
    pca_test = pca.fit_observed(test["y"], test["w"], test["z"], wave_rest, wave_obs)
    pca_scan, rank_chi2 = {}, {cfg.n_latent: pca_test["chi2"]}
    for S in sorted((set(cfg.pca_scan) | set(cfg.s_scan)) - {cfg.n_latent}):
        p_s = WeightedPCA(S).fit(x_rest, w_rest, n_iter=cfg.pca_iter, seed=cfg.seed)
        fit_s = p_s.fit_observed(test["y"], test["w"], test["z"], wave_rest, wave_obs)
        pca_scan[S] = {"chi2": chi2_summary(fit_s["chi2"]), "signal_error": chi2_summary(
            signal_error(test["truth/model_obs"], fit_s["spec_obs"], test["w"], fit_s["valid"])),
            "iterations": len(p_s.history)}
        rank_chi2[S] = fit_s["chi2"]
    del x_rest, w_rest
    pca_lowz = pca.fit_observed(lowz["y"], lowz["w"], lowz["z"], wave_rest, wave_obs)
    return PCABaseline(pca=pca, n_fit=int(len(b.z)), test=pca_test, lowz=pca_lowz, rank_scan=pca_scan,
                       rank_chi2=rank_chi2)


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


def ridge_predict(X_train, Y_train, X_test, alpha: float = 1.0, quadratic: bool = True, clip: float = 5.0
                  ) -> np.ndarray:
    """Ridge regression on standardised (quadratic) features with an unpenalised intercept. The standardised
    predictors are clipped to ±clip first: a few extreme rows (e.g. PCA coefficients of broad-line AGN) would
    otherwise dominate the quadratic terms and wreck every other prediction."""
    a, b = _standardise(np.asarray(X_train, np.float64), np.asarray(X_test, np.float64))
    a, b = np.clip(a, -clip, clip), np.clip(b, -clip, clip)
    if quadratic:
        a, b = _standardise(quadratic_features(a), quadratic_features(b))
    Y = np.asarray(Y_train, np.float64)
    ym = Y.mean(0)
    coef = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ (Y - ym))
    return b @ coef + ym


def crossfit_predict(X, Y, method: str = "knn", folds: int = 2, seed: int = 0) -> np.ndarray:
    """Held-out predictions: each fold predicted by a regressor (knn_predict or ridge_predict) fitted on the others."""
    n = len(X)
    perm = np.random.default_rng(seed).permutation(n)
    pred = np.empty_like(np.asarray(Y, np.float64))
    for f in range(folds):
        test = perm[f::folds]
        train = np.setdiff1d(perm, test)
        fn = knn_predict if method == "knn" else ridge_predict
        pred[test] = fn(X[train], Y[train], X[test])
    return pred


def crossfit_r2(X, Y, method: str = "knn", folds: int = 2, seed: int = 0) -> np.ndarray:
    """Held-out R² per target: each fold predicted by a regressor fitted on the other folds."""
    return r2_score(Y, crossfit_predict(X, Y, method, folds, seed))
