"""Redshift fitting with a trained model: find the z at which the learned restframe model best explains each
observed spectrum, with an uncertainty and a reliability flag.

`fit_redshift(model, y, w)` works in three stages, all batched across spectra:

1. **Scan.** χ²(z) on trial redshifts uniform in ln(1+z) over [z_min, z_max] (default [0, model.z_max]), spaced
   by half the restframe grid's median pixel (Δln λ; SDSS linear grid: ≈ 1e-4 ≈ 30 km/s, ≈ 4,000 trials), so
   that no χ² minimum — whose width is set by the ≈ 70 km/s SDSS pixels and the lines' widths — falls
   between trials. The encoder's convolutions run once per spectrum; its small MLP head (the part that sees
   z) runs at `n_nodes` node redshifts, those latents are fitted to the spectrum at each node (`node_steps`
   Adam steps, z fixed: the encoder's own latents are poor far from the redshifts it was trained on, and a
   decoder-made mock at z = 0.17–0.3 then lost its true minimum in 13 of 96 cases), and each trial takes the
   restframe model decoded from the latents of its nearest node: one decoder pass per node, not per trial. Each trial's χ² has the model's
   amplitude fitted analytically (a = Σwyŷ / Σwŷ², a ≥ 0), because the input flux was normalised in a
   restframe window placed by the catalogue redshift, and at any other z that window is somewhere else.
   The models are resampled onto the observed grid by the same kernel op the model uses
   (`fastspec.kernels.resample`), the sums accumulated in float64.
2. **Minima.** The best trial and the best *distinct* secondary minimum: a local minimum of χ²(z) more than
   `dv_secondary` (1,500 km/s) away from the best. Their difference Δχ² is the reliability flag redshift
   pipelines report (small Δχ²: two redshifts explain the data about equally well).
3. **Refinement.** Both minima are refined jointly in latents and z by Adam through the fused `resample_loss`
   kernel and its z-gradient (`fastspec.fit.refine`), then polished by Gauss–Newton steps whose normal matrix
   F = JᵀWJ (J: finite-difference Jacobian of the model in the observed frame, w.r.t. the S latents and z)
   also gives the uncertainty: σ_z² = (F⁻¹)_zz, the Δχ² = 1 width with the latents marginalised, in unreduced
   χ² (multiply by √χ²_reduced if the noise is underestimated). The lower of the two refined minima is the
   answer; Δχ² is recomputed between the refined pair (if both refined into one minimum, the scan's
   secondary and its Δχ² stand).

χ² is Σ_l w·valid·(y − ŷ)², unreduced; `chi2_reduced` divides by (valid pixels with w > 0) − S − 1.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import __version__, fit, kernels
from . import encode as E
from .errors import FastspecError

C_KMS = 299792.458


@dataclass
class RedshiftFit:
    """What `fit_redshift` returns, one row per spectrum (CPU tensors)."""

    z: torch.Tensor  # (N,) float64 best-fitting redshift
    z_err: torch.Tensor  # (N,) float64 1σ from the curvature of χ² (Δχ² = 1, latents marginalised)
    chi2: torch.Tensor  # (N,) float64 unreduced χ² at z
    chi2_reduced: torch.Tensor  # (N,) float64 χ² / (valid pixels − S − 1)
    delta_chi2: torch.Tensor  # (N,) float64 χ² of the best distinct secondary minimum − chi2 (inf: none)
    z_secondary: torch.Tensor  # (N,) float64 that secondary minimum (NaN: none)
    z_scan: torch.Tensor  # (N,) float64 the scan's best trial redshift (before refinement)
    latents: torch.Tensor  # (N, S) float32 latents at z


def redshift_grid(z_min: float, z_max: float, step: float) -> torch.Tensor:
    """Trial redshifts (T,) float64, uniform in ln(1+z) from z_min to z_max (both included), spacing ≤ step."""
    if not (z_max > z_min > -1):
        raise ValueError(f"redshift range must satisfy -1 < z_min < z_max, got [{z_min}, {z_max}]")
    if not step > 0:
        raise ValueError(f"redshift step must be positive, got {step}")
    a, b = math.log1p(z_min), math.log1p(z_max)
    n = max(2, int(math.ceil((b - a) / step)) + 1)
    return torch.expm1(torch.linspace(a, b, n, dtype=torch.float64))


def default_step(model, fraction: float = 0.5) -> float:
    """`fraction` of the restframe grid's median pixel in ln λ."""
    lnw = torch.log(model.wave_rest.detach().double().cpu())
    return fraction * float(torch.median(lnw[1:] - lnw[:-1]))


@torch.no_grad()
def node_latents(model, y: torch.Tensor, z_nodes: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
    """The encoder's latents (N, K, S) of every spectrum at each node redshift (the convolutions run once;
    an unconditioned encoder gives the same latents at every node)."""
    n, k = y.shape[0], len(z_nodes)
    if e is None:
        e = model.encoder.pooled(y)
    zz = z_nodes.to(device=y.device, dtype=torch.float32).repeat(n)
    s = model.encoder.head(e.repeat_interleave(k, 0), zz)
    return s.float().view(n, k, -1)


@torch.no_grad()
def chi2_scan(model, y: torch.Tensor, w: torch.Tensor, z_trials: torch.Tensor, s_nodes: torch.Tensor,
              node: torch.Tensor, fit_amplitude: bool = True, rows: int = 1024) -> torch.Tensor:
    """χ²(z) (N, T) float64 of each spectrum at each trial redshift, the model at trial t decoded from the
    latents s_nodes[:, node[t]] (s_nodes (N, K, S)), its amplitude fitted (a ≥ 0) when `fit_amplitude`.

    Batched across spectra and trials in blocks of ≈ `rows` (spectrum, trial) pairs; the model is resampled by
    `kernels.resample` and the three sums Σwvy², Σwyŷ, Σwŷ² accumulated in float64."""
    n, L = y.shape
    k = s_nodes.shape[1]
    dev = y.device
    x_nodes = model.decode(s_nodes.reshape(n * k, -1).to(dev)).float().view(n, k, -1)
    z_trials = z_trials.to(dev)
    node = node.to(dev)
    y64, w64 = y.double(), w.double()
    wy, wyy = w64 * y64, w64 * y64 * y64
    T = len(z_trials)
    out = torch.empty(n, T, dtype=torch.float64, device=dev)
    tb = max(1, min(T, rows))
    nb = max(1, rows // tb)
    for n0 in range(0, n, nb):
        n1 = min(n, n0 + nb)
        m = n1 - n0
        for t0 in range(0, T, tb):
            t1 = min(T, t0 + tb)
            x = x_nodes[n0:n1][:, node[t0:t1]].reshape(m * (t1 - t0), -1)
            zr = z_trials[t0:t1].float().repeat(m)
            yhat, valid = kernels.resample(x, zr, model.wave_rest, model.wave_obs)
            yhat = yhat.view(m, t1 - t0, L).double()
            A = torch.bmm(valid.view(m, t1 - t0, L).double(), wyy[n0:n1, :, None])[..., 0]
            B = torch.bmm(yhat, wy[n0:n1, :, None])[..., 0]
            C = torch.bmm(yhat * yhat, w64[n0:n1, :, None])[..., 0]
            if fit_amplitude:
                a = torch.where(C > 0, B / C.clamp_min(1e-300), 0.0).clamp_min(0.0)
            else:
                a = torch.ones_like(B)
            out[n0:n1, t0:t1] = A - 2 * a * B + a * a * C
    return out


def pick_minima(chi2: torch.Tensor, z_trials: torch.Tensor, dv_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (N,) of the best trial and of the best local minimum more than dv_min km/s from it (−1: none)."""
    chi2 = chi2.double()
    best = torch.argmin(chi2, 1)
    lnz = torch.log1p(z_trials.double().to(chi2.device))
    far = (C_KMS * (lnz[None, :] - lnz[best][:, None])).abs() > dv_min
    left = torch.cat([torch.full_like(chi2[:, :1], math.inf), chi2[:, :-1]], 1)
    right = torch.cat([chi2[:, 1:], torch.full_like(chi2[:, :1], math.inf)], 1)
    local = (chi2 <= left) & (chi2 <= right) & torch.isfinite(chi2)
    masked = torch.where(far & local, chi2, math.inf)
    second = torch.argmin(masked, 1)
    second = torch.where(torch.isfinite(masked.gather(1, second[:, None])[:, 0]), second, -1)
    return best, second


@torch.no_grad()
def _chi2(model, s, z, y, w) -> torch.Tensor:
    x = model.decode(s).float()
    return kernels.resample_loss(x, z.float(), model.wave_rest, model.wave_obs, y, w).double()


@torch.no_grad()
def gauss_newton(model, s: torch.Tensor, z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, iters: int = 2,
                 eps_s: float = 1e-3, eps_z: float = 1e-5):
    """Polish (s, z) by Gauss–Newton steps on χ² (a step is kept only where it lowers χ²) and return
    (s, z, chi2, z_err, n_dof): z_err² = (F⁻¹)_zz with F = JᵀWJ from central differences of the model in the
    observed frame (latents stepped by eps_s × each spectrum's mean |s|, z by eps_z)."""
    n, S = s.shape
    P = S + 1
    scale = s.abs().mean(1, keepdim=True).clamp_min(1e-3)
    s, z = s.float().clone(), z.double().clone()
    chi = _chi2(model, s, z, y, w)
    y64, w64 = y.double(), w.double()
    for it in range(iters + 1):
        steps = torch.zeros(2 * P + 1, n, P, dtype=torch.float64, device=y.device)
        h = torch.cat([(eps_s * scale).double().expand(n, S), torch.full((n, 1), eps_z, dtype=torch.float64,
                                                                         device=y.device)], 1)
        for p in range(P):
            steps[1 + 2 * p, :, p] = h[:, p]
            steps[2 + 2 * p, :, p] = -h[:, p]
        s_rows = (s[None].double() + steps[..., :S]).float().reshape(-1, S)
        z_rows = (z[None] + steps[..., S]).reshape(-1)
        yhat, valid = model.generate(s_rows, z_rows.float())
        yhat = yhat.double().view(2 * P + 1, n, -1)
        wv = w64 * valid.view(2 * P + 1, n, -1)[0]
        J = (yhat[1::2] - yhat[2::2]) / (2 * h.T[..., None])  # (P, n, L)
        F = torch.einsum("pnl,qnl,nl->npq", J, J, wv)
        r = y64 - yhat[0]
        g = torch.einsum("pnl,nl,nl->np", J, wv, r)
        diag = torch.diagonal(F, dim1=1, dim2=2).clamp_min(1e-300)
        d = diag.sqrt()  # Jacobi scaling: latents and z differ in units by orders of magnitude
        Fs = F / (d[:, :, None] * d[:, None, :]) + 1e-10 * torch.eye(P, dtype=F.dtype, device=F.device)
        cov = torch.linalg.inv(Fs) / (d[:, :, None] * d[:, None, :])
        if it == iters:
            break
        delta = torch.einsum("npq,nq->np", cov, g)
        s_new = (s.double() + delta[:, :S]).float()
        z_new = z + delta[:, S]
        chi_new = _chi2(model, s_new, z_new, y, w)
        ok = torch.isfinite(chi_new) & (chi_new < chi)
        s = torch.where(ok[:, None], s_new, s)
        z = torch.where(ok, z_new, z)
        chi = torch.where(ok, chi_new, chi)
        if not bool(ok.any()):
            break
    z_err = cov[:, S, S].clamp_min(0).sqrt()
    n_dof = ((wv > 0).sum(1) - P).double()
    return s, z, chi, z_err, n_dof


def fit_redshift(model, y: torch.Tensor, w: torch.Tensor, *, z_min: float = 0.0, z_max: float | None = None,
                 step: float | None = None, n_nodes: int = 32, latents: torch.Tensor | None = None,
                 dv_secondary: float = 1500.0, refine_steps: int = 100, lr: float = 0.05, lr_z: float = 1e-4,
                 polish: int = 2, fit_amplitude: bool = True, rows: int = 1024, node_steps: int = 30) -> RedshiftFit:
    """Redshift of each spectrum from the model; see the module docstring for the method.

    y, w: (N, L) normalised flux and weights on the model's observed grid (masked pixels: w = 0).
    z_min, z_max: the scanned range (default [0, model.config.z_max]). step: trial spacing in ln(1+z)
    (default: half the restframe grid's median pixel). n_nodes: node redshifts at which the encoder's latents
    are computed for the scan. latents: (N, S) fixed latents for the scan instead of the encoder's (e.g. known
    ones in tests). dv_secondary: km/s separating a distinct secondary minimum from the best. refine_steps,
    lr, lr_z: the joint Adam refinement (`fastspec.fit.refine`; 0 skips it). polish: Gauss–Newton steps.
    node_steps: if > 0, the node latents are first fitted to the spectrum at each node redshift (that many
    Adam steps, z fixed) instead of taken from the encoder as they are: slower (N·n_nodes refinements), and
    needed where the encoder's latents are poor away from the true z — at redshifts it was not trained on.
    """
    was_training = model.training
    model.eval()
    try:
        y, w = y.float(), w.float()
        model._check_y(y)
        model._check_y(w, "w")
        n = y.shape[0]
        dev = y.device
        z_max = float(model.config.z_max if z_max is None else z_max)
        trials = redshift_grid(z_min, z_max, step or default_step(model))
        if latents is not None:
            if latents.shape != (n, model.n_latent):
                raise ValueError(f"latents must have shape ({n}, {model.n_latent}), got {tuple(latents.shape)}")
            z_nodes = trials[:1]
            s_nodes = latents.float().to(dev)[:, None]
            node = torch.zeros(len(trials), dtype=torch.long)
        else:
            k = max(1, min(int(n_nodes), len(trials))) if model.config.conditioned else 1
            lo, hi = math.log1p(trials[0]), math.log1p(trials[-1])
            z_nodes = torch.expm1(torch.linspace(lo, hi, k, dtype=torch.float64) if k > 1
                                  else torch.tensor([0.5 * (lo + hi)], dtype=torch.float64))
            s_nodes = node_latents(model, y, z_nodes)
            if node_steps > 0:
                kk = len(z_nodes)
                zn = z_nodes.to(dev).float().repeat(n)
                r0 = fit.refine(model, y.repeat_interleave(kk, 0), w.repeat_interleave(kk, 0), zn,
                                s=s_nodes.reshape(n * kk, -1), steps=node_steps, lr=lr)
                s_nodes = r0.latents.view(n, kk, -1)
            lnn, lnt = torch.log1p(z_nodes), torch.log1p(trials)
            node = torch.argmin((lnt[:, None] - lnn[None, :]).abs(), 1)
        chi = chi2_scan(model, y, w, trials, s_nodes, node, fit_amplitude=fit_amplitude, rows=rows)
        best, second = pick_minima(chi, trials, dv_secondary)
        tr = trials.to(dev)
        z_scan = tr[best]
        has2 = second >= 0
        z2 = torch.where(has2, tr[second.clamp_min(0)], z_scan)
        nodes_dev = node.to(dev)
        ar = torch.arange(n, device=dev)
        s1 = s_nodes[ar, nodes_dev[best]]
        s2 = s_nodes[ar, nodes_dev[second.clamp_min(0)]]
        # both candidates refined in one batch: rows [0, n) the best, [n, 2n) the secondary
        yy, ww = torch.cat([y, y]), torch.cat([w, w])
        ss, zz = torch.cat([s1, s2]), torch.cat([z_scan, z2])
        if refine_steps:
            r = fit.refine(model, yy, ww, zz.float(), s=ss, steps=refine_steps, lr=lr, fit_z=True, lr_z=lr_z)
            ss, zz = r.latents, r.z.double()
        ss, zz, chi2, z_err, n_dof = gauss_newton(model, ss, zz, yy, ww, iters=polish)
        c1, c2 = chi2[:n], torch.where(has2, chi2[n:], math.inf)
        swap = c2 < c1
        pick = torch.where(swap, ar + n, ar)
        other = torch.where(swap, c1, c2)
        z_other = torch.where(swap, zz[:n], torch.where(has2, zz[n:], math.nan))
        best_chi = chi2[pick]
        delta = other - best_chi
        # the two refined into one minimum: the scan's secondary and its Δχ² stand (amplitude-fitted scan χ²)
        merged = has2 & ((C_KMS * (torch.log1p(zz[:n]) - torch.log1p(zz[n:]))).abs() <= dv_secondary)
        scan_delta = chi.gather(1, second.clamp_min(0)[:, None])[:, 0] - chi.gather(1, best[:, None])[:, 0]
        delta = torch.where(merged, scan_delta, delta)
        z_other = torch.where(merged, z2, z_other)
        return RedshiftFit(
            z=zz[pick].cpu(), z_err=z_err[pick].cpu(), chi2=best_chi.cpu(),
            chi2_reduced=(best_chi / n_dof[pick].clamp_min(1)).cpu(),
            delta_chi2=delta.cpu(), z_secondary=z_other.cpu(), z_scan=z_scan.double().cpu(),
            latents=ss[pick].float().cpu(),
        )
    finally:
        model.train(was_training)


def velocity_offset(z, z_ref) -> np.ndarray:
    """c·(z − z_ref)/(1 + z_ref) in km/s: the velocity difference of two redshifts."""
    z, z_ref = np.asarray(z, np.float64), np.asarray(z_ref, np.float64)
    return C_KMS * (z - z_ref) / (1 + z_ref)


def nmad(x) -> float:
    """Normalised median absolute deviation 1.4826·median|x − median x| (robust σ)."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if x.size else float("nan")


# ---- files: `fastspec redshift` ------------------------------------------------------------------------

REDSHIFT_FORMAT = "fastspec-redshifts"
REDSHIFT_VERSION = 1
# The fit's options that change its numbers (and so the output's fingerprint), with their defaults.
FIT_OPTIONS = {"z_min": 0.0, "z_max": None, "step": None, "n_nodes": 32, "dv_secondary": 1500.0,
               "refine_steps": 100, "lr": 0.05, "lr_z": 1e-4, "polish": 2, "node_steps": 30}


class RedshiftError(FastspecError, RuntimeError):
    """Redshift fitting cannot proceed (bad options, inputs that do not fit the model, unfinished files)."""


class RedshiftFile(E.RowsFile):
    """A finished output of `fastspec redshift` (columns: see `_columns`)."""

    FORMAT = REDSHIFT_FORMAT
    KEY = "z_fit"
    COMMAND = "fastspec redshift"
    ERROR = RedshiftError


def merge_redshift_shards(out, n: int | None = None, remove: bool = True, progress: bool = True) -> str:
    """Concatenate the finished shards ``<out>.shard-i-of-n`` into `out` (see `fastspec.encode.merge_shards`)."""
    return E.merge_shards(out, n, remove=remove, progress=progress, reader=RedshiftFile)


def _columns(n: int, S: int) -> dict:
    """The output (one row per input spectrum, in input order); the writer adds Z (the input's catalogue
    redshift, for comparison), object_id, source_file and source_row."""
    return {
        "z_fit": ((n,), np.float64),  # best-fitting redshift
        "z_err": ((n,), np.float64),  # 1σ, Δχ² = 1 with the latents marginalised
        "chi2": ((n,), np.float64),  # unreduced χ² at z_fit
        "chi2_reduced": ((n,), np.float32),  # χ² / (valid pixels − S − 1)
        "delta_chi2": ((n,), np.float64),  # χ²(secondary) − χ²(best), inf when there is no secondary
        "z_secondary": ((n,), np.float64),  # the best distinct secondary minimum (NaN: none)
        "z_scan": ((n,), np.float64),  # the scan's best trial redshift
        "latents": ((n, S), np.float32),  # latents at z_fit
        "Z": ((n,), np.float64),
        "object_id": ((n,), np.uint64),
        "source_file": ((n,), np.int32),
        "source_row": ((n,), np.int64),
    }


def redshift_files(model, paths: Sequence[str | os.PathLike], out, *, shard: tuple[int, int] | None = None,
                   batch_size: int = 64, flush_rows: int | None = None, workers: int | None = None,
                   progress: bool = True, model_path: str | None = None, resume: bool = True,
                   **options):
    """Fit the redshift of every spectrum of `paths` (in order) into `out` (or its shard file
    ``<out>.shard-i-of-n``), resumable and shardable exactly as `fastspec.encode.encode_files`.

    options: those of `fit_redshift` (FIT_OPTIONS). Returns an `EncodeStats` (spectra, seconds, timing split).
    """
    unknown = set(options) - set(FIT_OPTIONS)
    if unknown:
        raise RedshiftError(f"unknown redshift option(s): {', '.join(sorted(unknown))}")
    opts = {**FIT_OPTIONS, **options}
    if opts["z_max"] is None:
        opts["z_max"] = float(model.config.z_max)
    if batch_size < 1:
        raise RedshiftError(f"batch size must be positive, got {batch_size}")
    if not (opts["z_max"] > opts["z_min"] > -1):
        raise RedshiftError(f"redshift range must satisfy -1 < z_min < z_max, got [{opts['z_min']}, {opts['z_max']}]")
    device = next(model.parameters()).device
    cfg = model.config
    instrument = cfg.instrument["name"] if isinstance(cfg.instrument, dict) else str(cfg.instrument)
    try:
        inputs = E.inspect_inputs(paths, instrument, model.wave_obs.detach().cpu().double().numpy())
    except E.EncodeError as err:
        raise RedshiftError(str(err)) from None
    n_total = sum(i.n for i in inputs)
    model_sha = E.weights_sha256(model)
    fingerprint = hashlib.sha256(json.dumps({
        "format_version": REDSHIFT_VERSION, "model": model_sha,
        "inputs": [[os.path.abspath(i.path), i.n, i.size, i.mtime_ns] for i in inputs],
        "options": opts}, sort_keys=True).encode()).hexdigest()
    i_shard, n_shard = shard or (0, 1)
    target = os.fspath(out) if shard is None else E.shard_path(out, i_shard, n_shard)
    row_start, row_stop = E.shard_range(n_total, i_shard, n_shard)
    n_rows = row_stop - row_start
    stats = E.EncodeStats(out=target)
    for done_path in dict.fromkeys([os.fspath(out), target]):
        if E.is_complete(done_path, fingerprint):
            E.say_progress(progress, f"{done_path}: already complete, nothing to do")
            stats.rows_skipped = n_rows
            stats.already_complete = done_path == os.fspath(out)
            return stats
    tmp = E.partial_path(target)
    f, done, why = (E.open_resumable(tmp, fingerprint, n_rows, row_start, REDSHIFT_FORMAT, REDSHIFT_VERSION,
                                     "z_fit") if resume else (None, 0, ""))
    if why:
        E.say_progress(progress, f"{tmp}: discarding partial output ({why}); starting over")
    if f is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        attrs = {
            "fingerprint": fingerprint, "model": os.path.abspath(model_path) if model_path else "",
            "model_sha256": model_sha, "instrument": instrument, "n_latent": int(cfg.n_latent),
            "z_max_model": float(cfg.z_max), "options": json.dumps(opts), "device": str(device),
            "batch_size": batch_size, "row_start": np.int64(row_start), "row_stop": np.int64(row_stop),
            "n_total": np.int64(n_total), "shard": f"{i_shard}/{n_shard}",
            "chi2_definition": "chi2 = sum(w * valid * (y - y_model)^2) (unreduced); chi2_reduced = chi2 / "
                               "(sum(valid * (w > 0)) - n_latent - 1)",
            "fastspec_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        f = E.create_rows_file(tmp, _columns(n_rows, int(cfg.n_latent)), attrs, [i.path for i in inputs],
                               REDSHIFT_FORMAT, REDSHIFT_VERSION)
    elif done:
        E.say_progress(progress, f"{tmp}: resuming after {done} of {n_rows} spectra")
    stats.rows_skipped = done
    flush_rows = -(-(flush_rows or 8 * batch_size) // batch_size) * batch_size
    workers = (4 if device.type == "cuda" else 0) if workers is None else workers
    fit_kw = dict(opts)
    t_start = time.perf_counter()
    writer = E.RowWriter(f, inputs, row_start, flush_rows)
    writer.start()
    bar = E.progress_bar(progress, n_rows, done, target)
    try:
        if done < n_rows:
            for batch, t_wait in E.stream_batches(inputs, row_start + done, row_stop, batch_size, workers,
                                                  device, check_z=False):
                t1 = time.perf_counter()
                r = fit_redshift(model, batch.y, batch.w, **fit_kw)
                host = {"z_fit": r.z.numpy(), "z_err": r.z_err.numpy(), "chi2": r.chi2.numpy(),
                        "chi2_reduced": r.chi2_reduced.float().numpy(), "delta_chi2": r.delta_chi2.numpy(),
                        "z_secondary": r.z_secondary.numpy(), "z_scan": r.z_scan.numpy(),
                        "latents": r.latents.numpy()}
                writer.put(int(batch.index[0]), host)
                stats.wait_s += t_wait
                stats.compute_s += time.perf_counter() - t1
                stats.n += len(batch.z)
                if bar is not None:
                    bar.update(len(batch.z))
        writer.finish()
        stats.write_s = writer.busy
        E.finish_output(f, tmp, target)
    except BaseException:
        with contextlib.suppress(Exception):
            writer.cancel()
            f.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - t_start
    return stats


__all__ = ["C_KMS", "RedshiftFit", "redshift_grid", "default_step", "node_latents", "chi2_scan", "pick_minima",
           "gauss_newton", "fit_redshift", "velocity_offset", "nmad", "RedshiftError", "RedshiftFile",
           "redshift_files", "merge_redshift_shards", "REDSHIFT_FORMAT", "FIT_OPTIONS"]
