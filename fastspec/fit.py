"""Fitting a trained model to spectra: latent refinement (and redshift) through the frozen decoder.

One encoder pass is an amortised guess of each spectrum's latents. `refine` closes the gap: it optimises
every spectrum's latents (optionally its redshift too) to minimise its own χ² through the frozen decoder and
the fused `resample_loss` kernel, for a whole batch at once. Adam works elementwise, so one optimiser over the
(N, S) latents is N independent per-spectrum optimisers without a Python loop per spectrum; a spectrum stops
(its rows frozen) once its χ² has not improved by a relative `tol` for `patience` steps, and the best state
each spectrum reached is what is returned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .losses import reduced_chi2
from .optim import Adam


@dataclass
class Refined:
    """What `refine` returns, one row per spectrum (float32 tensors on the model's device)."""

    latents: torch.Tensor  # (N, S) the refined latents
    z: torch.Tensor  # (N,) the redshift (refined when fit_z, else the input)
    chi2_before: torch.Tensor  # (N,) reduced χ² of the encoder's latents (losses.CHI2_DEFINITION)
    chi2_after: torch.Tensor  # (N,) reduced χ² of the refined latents (one more parameter when fit_z)
    steps: torch.Tensor  # (N,) int: the optimiser steps each spectrum used before it stopped


def _chi2_sum(model, s, z, y, w) -> torch.Tensor:
    x = model.decode(s)
    return kernels.resample_loss(x, z, model.wave_rest, model.wave_obs, y, w)


def _reduced(model, s, z, y, w, n_par: int) -> torch.Tensor:
    x = model.decode(s)
    y_model, valid = kernels.resample(x, z, model.wave_rest, model.wave_obs)
    return reduced_chi2(y, w, y_model, valid, n_par)


def refine(model, y: torch.Tensor, w: torch.Tensor, z, s: torch.Tensor | None = None, steps: int = 100,
           lr: float = 0.1, fit_z: bool = False, lr_z: float = 1e-4, tol: float = 1e-4,
           patience: int = 10) -> Refined:
    """Optimise each spectrum's latents (and z if fit_z) through the frozen decoder; see the module docstring.

    y, w: (N, L) normalised flux and weights (masked pixels zeroed, as the loader feeds them); z: (N,).
    s: starting latents (default: the encoder's). lr is in units of each spectrum's own latent magnitude
    (the mean |s| of its starting latents), so it does not depend on how the encoder happens to scale its
    latents, nor on the other spectra in the batch. lr_z is in units of z. The model's parameters are left
    as they were (frozen only for the duration of the call).
    """
    if steps < 0:
        raise ValueError(f"refine: steps must be ≥ 0, got {steps}")
    was_training = model.training
    model.eval()
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        y, w = y.float(), w.float()
        z0 = model.as_redshifts(z, y.shape[0], y.device)
        with torch.no_grad():
            s0 = (model.encode(y, z0) if s is None else s).float()
        n = s0.shape[0]
        # per spectrum: its own latents' mean magnitude, so a spectrum's result never depends on its batch
        scale = s0.abs().mean(1, keepdim=True).clamp_min(1e-3)
        u = torch.zeros_like(s0, requires_grad=True)  # s = s0 + u·scale
        dz = torch.zeros_like(z0, requires_grad=fit_z)
        groups = [{"params": [u], "lr": lr}] + ([{"params": [dz], "lr": lr_z}] if fit_z else [])
        opt = Adam(groups)  # torch's Adam without torch.optim's import of torch._dynamo (fastspec.optim)
        best = torch.full((n,), float("inf"), device=y.device)
        best_u, best_dz = u.detach().clone(), dz.detach().clone()
        since = torch.zeros(n, dtype=torch.long, device=y.device)
        used = torch.zeros(n, dtype=torch.long, device=y.device)
        active = torch.ones(n, dtype=torch.bool, device=y.device)
        for it in range(steps + 1):
            chi = _chi2_sum(model, s0 + u * scale, z0 + dz, y, w)
            with torch.no_grad():
                improved = chi < best
                best_u[improved] = u.detach()[improved]
                best_dz[improved] = dz.detach()[improved]
                since = torch.where(chi < best * (1 - tol), 0, since + 1)
                best = torch.where(improved, chi.detach(), best)
                active &= since < patience
                used = torch.where(active, it, used)
            if it == steps or not bool(active.any()):
                break
            opt.zero_grad(set_to_none=True)
            chi.sum().backward()
            with torch.no_grad():
                keep_u, keep_dz = u[~active].clone(), dz[~active].clone()
            opt.step()
            with torch.no_grad():  # finished spectra stay where they stopped (Adam's momentum would move them)
                u[~active] = keep_u
                dz[~active] = keep_dz
        with torch.no_grad():
            s_best, z_best = s0 + best_u * scale, z0 + best_dz
            n_par = model.n_latent + int(fit_z)
            return Refined(s_best, z_best, _reduced(model, s0, z0, y, w, model.n_latent),
                           _reduced(model, s_best, z_best, y, w, n_par), used)
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)


__all__ = ["Refined", "refine"]
