"""How well a reconstruction fits, per spectrum: the paper's weighted MSE, spender's variant and the consistency
penalty between latents of a spectrum and of its augmented copy (training losses), and the reduced χ² that
encoding, reports and the science checks quote (`CHI2_DEFINITION`).

All take materialised reconstructions and return per-spectrum values (N,); reduce them (sum / mean) in the
training loop. The fused, memory-light form of the reconstruction losses is `SpectrumAutoencoder.loss`, which
never builds ŷ.
"""
from __future__ import annotations

import torch

CHI2_DEFINITION = (
    "reduced chi2 = sum(w * valid * (y - y_model)^2) / (sum(valid * (w > 0)) - n_latent), "
    "w = ivar with masked pixels zeroed, valid = observed pixel inside the restframe model; NaN if dof <= 0"
)


def _weights(y, y_hat, w, valid):
    if y.shape != y_hat.shape or y.shape != w.shape:
        raise ValueError(f"y, y_hat and w must have the same shape, got {tuple(y.shape)}, "
                         f"{tuple(y_hat.shape)}, {tuple(w.shape)}")
    if y.ndim != 2:
        raise ValueError(f"y must have shape (N, L), got {tuple(y.shape)}")
    if valid is not None:
        w = w * valid.to(w.dtype)
    return w


def weighted_mse(y: torch.Tensor, y_hat: torch.Tensor, w: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (1) of Melchior+2022 per spectrum: Σ w·(y−ŷ)² / Σ w, with w ← w·valid if valid is given.

    Accumulates in float32 at least; a spectrum with Σ w = 0 has loss 0 (it carries no information).
    """
    w = _weights(y, y_hat, w, valid)
    acc = torch.promote_types(y.dtype, torch.float32)
    w = w.to(acc)
    num = (w * (y.to(acc) - y_hat.to(acc)) ** 2).sum(dim=1)
    den = w.sum(dim=1)
    return num / den.clamp_min(torch.finfo(acc).tiny)


def spender_loss(y: torch.Tensor, y_hat: torch.Tensor, w: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """spender's per-spectrum loss Σ ½·w·(y−ŷ)² / L (dividing by L, not Σ w, so spectra with more valid
    pixels weigh more), with w ← w·valid if valid is given."""
    w = _weights(y, y_hat, w, valid)
    acc = torch.promote_types(y.dtype, torch.float32)
    return (0.5 * w.to(acc) * (y.to(acc) - y_hat.to(acc)) ** 2).sum(dim=1) / y.shape[1]


def consistency_loss(s: torch.Tensor, s_aug: torch.Tensor, sigma: float | str | torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Consistency penalty per spectrum: sigmoid(Σ_k (s'−s)² / (S·σ²)) − ½, 0 for identical latents.

    sigma: the latent distance scale. None uses spender 0.3's choice σ² = mean per-dimension variance of s
    across the batch (not detached, so the penalty cannot be lowered by shrinking the latent space; needs
    N ≥ 2) — but it can by stretching one direction, which raises the mean variance and so shrinks every
    other direction's penalty. "per_dim" closes that: each dimension k is scaled by its own batch variance σ_k²
    (Σ_k (s'_k−s_k)² / (S·σ_k²)), invariant to rescaling any axis — but not a rotated direction. "whiten" uses the
    batch covariance C of s (Δᵀ (C + εI)⁻¹ Δ / S), invariant to any invertible linear map of the latent space.
    A number fixes σ (Melchior+2022 / spender < 0.3 style).
    """
    if s.shape != s_aug.shape or s.ndim != 2:
        raise ValueError(f"s and s_aug must both have shape (N, S), got {tuple(s.shape)} and {tuple(s_aug.shape)}")
    n, size = s.shape
    if sigma is None or isinstance(sigma, str):
        if sigma not in (None, "per_dim", "whiten"):
            raise ValueError(f"sigma must be None, 'per_dim', 'whiten' or a number, got {sigma!r}")
        if n < 2:
            raise ValueError(f"consistency_loss with sigma={sigma!r} needs a batch of at least 2 to estimate the "
                             "latent variance; pass a number")
        if sigma == "whiten":
            x = s.double()
            c = torch.cov(x.T).reshape(size, size)
            c = c + 1e-6 * c.diagonal().mean().clamp(min=1e-12) * torch.eye(size, dtype=c.dtype, device=c.device)
            d = (s_aug - s).double()
            m = (d * torch.linalg.solve(c, d.T).T).sum(dim=1) / size
            return (torch.sigmoid(m) - 0.5).to(s.dtype)
        var = s.var(dim=0)
        if sigma == "per_dim":
            return torch.sigmoid(((s_aug - s) ** 2 / var.clamp(min=1e-12)).sum(dim=1) / size) - 0.5
        sigma2 = var.mean()
    else:
        sigma2 = torch.as_tensor(sigma, dtype=s.dtype, device=s.device) ** 2
    d2 = ((s_aug - s) ** 2).sum(dim=1) / (size * sigma2)
    return torch.sigmoid(d2) - 0.5


def reduced_chi2(y, w, y_model, valid, n_latent: int) -> torch.Tensor:
    """Per-spectrum reduced χ² as CHI2_DEFINITION says, accumulated in fp32 (float64 in, float64 out)."""
    dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    y, w, y_model = y.to(dtype), w.to(dtype), y_model.to(dtype)
    valid = valid.to(dtype)
    chi = (w * valid * (y - y_model) ** 2).sum(dim=-1)
    dof = (valid * (w > 0).to(dtype)).sum(dim=-1) - n_latent
    return torch.where(dof > 0, chi / dof.clamp(min=1), torch.full_like(chi, float("nan")))


__all__ = ["weighted_mse", "spender_loss", "consistency_loss", "reduced_chi2", "CHI2_DEFINITION"]
