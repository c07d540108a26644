"""Redshift fitting (fastspec.redshift): the χ²(z) scan against a brute-force float64 scan, planted redshifts
recovered with honest uncertainties, the secondary-minimum bookkeeping, and errors."""
import math

import numpy as np
import pytest
import torch
from test_fit import planted, toy_model

from fastspec.redshift import (
    C_KMS,
    chi2_scan,
    fit_redshift,
    gauss_newton,
    nmad,
    pick_minima,
    redshift_grid,
    velocity_offset,
)


def chi2_bruteforce(model, s, z_trials, y, w):
    """Amplitude-fitted χ²(z) (N, T) in float64: decoder in float64, numpy.interp in log λ on the restframe
    grid rebuilt from its end points, one spectrum and one trial at a time."""
    m = model.double()
    try:
        with torch.no_grad():
            x = m.decoder(s.double()).numpy()
    finally:
        model.float()
    r = model.wave_rest.double().numpy()
    coord = np.linspace(np.log10(r[0]), np.log10(r[-1]), r.size)
    wave_obs = model.wave_obs.double().numpy()
    out = np.zeros((len(s), len(z_trials)))
    for i in range(len(s)):
        yi, wi = y[i].double().numpy(), w[i].double().numpy()
        for t, zt in enumerate(z_trials.numpy()):
            at = np.log10(wave_obs / (1 + zt))
            inside = (at >= coord[0]) & (at <= coord[-1])
            m_ = np.where(inside, np.interp(at, coord, x[i]), 0.0)
            a_, b_, c_ = np.sum(wi * inside * yi**2), np.sum(wi * yi * m_), np.sum(wi * m_**2)
            amp = max(b_ / c_, 0.0)
            out[i, t] = a_ - 2 * amp * b_ + amp**2 * c_
    return out


def test_scan_matches_a_bruteforce_float64_scan():
    model = toy_model()
    y, w, z, s_true = planted(model, n=3, sigma=0.01)
    trials = redshift_grid(0.0, 0.5, 0.02)
    g = torch.Generator().manual_seed(5)
    s_nodes = torch.stack([s_true, s_true + 0.3 * torch.randn(s_true.shape, generator=g)], 1)  # (N, 2, S)
    node = (torch.arange(len(trials)) >= len(trials) // 2).long()
    got = chi2_scan(model, y, w * 3.0, trials, s_nodes, node, rows=16).numpy()  # odd blocks of rows
    want = np.concatenate([chi2_bruteforce(model, s_nodes[:, k], trials[node == k], y, w * 3.0)
                           for k in (0, 1)], 1)
    # float32 models: each term of A − 2aB + a²C is good to ~1e-7 of Σwy², which sets the tolerance
    scale = (y.double() ** 2 * w.double() * 3.0).sum(1, keepdim=True).numpy()
    assert np.all(np.abs(got - want) <= 2e-6 * scale), np.abs(got - want).max()
    # without the amplitude: the model as decoded
    got1 = chi2_scan(model, y, w, trials[:4], s_nodes, torch.zeros(4, dtype=torch.long), fit_amplitude=False)
    assert bool((got1 >= chi2_scan(model, y, w, trials[:4], s_nodes, torch.zeros(4, dtype=torch.long)) - 1e-6).all())


def test_grid_is_uniform_in_log_one_plus_z():
    g = redshift_grid(0.0, 0.5, 1e-3)
    d = torch.diff(torch.log1p(g))
    assert g[0] == 0.0 and abs(float(g[-1]) - 0.5) < 1e-12
    assert float(d.max()) <= 1e-3 and float(d.max() - d.min()) < 1e-12
    with pytest.raises(ValueError, match="z_min < z_max"):
        redshift_grid(0.3, 0.2, 1e-3)
    with pytest.raises(ValueError, match="step must be positive"):
        redshift_grid(0.0, 0.2, 0.0)


def test_planted_redshifts_are_recovered_within_their_errors():
    model = toy_model()
    y, w, z, s_true = planted(model, n=8, seed=3, sigma=0.01)
    r = fit_redshift(model, y, w, refine_steps=150)
    dz = (r.z - z.double()).numpy()
    # a toy pixel is Δlog10 λ = 4e-4 (Δz ≈ 1e-3 (1+z)); the fit is far inside it
    assert np.all(np.abs(dz) < 2e-4), dz
    pull = dz / r.z_err.numpy()
    assert np.all(np.isfinite(pull)) and np.median(np.abs(pull)) < 2.0, pull
    # the toy encoder is untrained, so a few spectra's latents start far off; z is found regardless
    assert np.median(r.chi2_reduced.numpy()) < 1.3 and np.all(r.chi2_reduced.numpy() < 3)
    assert np.all(r.delta_chi2.numpy() > 0)
    # the scan alone lands within its trial spacing of the truth
    assert np.all(np.abs(np.log1p(r.z_scan.numpy()) - np.log1p(z.double().numpy())) < 2e-3)
    # same answer through the model's method, with the true latents fixed for the scan
    r2 = model.fit_redshift(y, w, latents=s_true, refine_steps=50)
    assert np.all(np.abs((r2.z - z.double()).numpy()) < 2e-4)


def test_uncertainty_is_the_delta_chi2_of_one_width():
    """With the latents at their truth, χ²(z ± σ_z) − χ²(z) ≈ 1 after profiling out the latents; with the
    latents held fixed the rise is ≥ 1 (marginalising widens the interval)."""
    model = toy_model()
    y, w, z, s_true = planted(model, n=4, seed=4, sigma=0.01)
    s, zf, chi, z_err, _ = gauss_newton(model, s_true, z.double(), y, w, iters=3)
    s_up, z_up, chi_up, _, _ = gauss_newton(model, s, zf + z_err, y, w, iters=0)
    assert bool((chi_up - chi >= 0.9).all()), chi_up - chi


def test_pick_minima_finds_the_distinct_secondary():
    trials = redshift_grid(0.0, 0.1, 1e-4)
    lnz = torch.log1p(trials)
    v = C_KMS * lnz
    chi2 = (torch.minimum(((v - 6000) / 100) ** 2, ((v - 20000) / 100) ** 2 + 50) + 1000)[None].repeat(2, 1)
    chi2[1] += 0.5 * torch.cos(v / 30)  # ripples near the best minimum are not a distinct secondary
    best, second = pick_minima(chi2, trials, dv_min=1500)
    assert torch.all(abs(v[best] - 6000) < 40)
    assert torch.all(abs(v[second] - 20000) < 100)  # the ripples move the minima by < 100 km/s
    one = ((v - 6000) / 100) ** 2
    b1, s1 = pick_minima(one[None], trials, dv_min=1500)
    assert int(s1[0]) == -1


def test_velocity_helpers():
    assert math.isclose(float(velocity_offset(0.1 + 1.1e-3, 0.1)), 299.792458, rel_tol=1e-9)
    assert math.isclose(nmad(np.array([0.0, 1.0, -1.0, np.nan])), 1.4826)


def test_errors():
    model = toy_model()
    y, w, z, s_true = planted(model, n=2)
    with pytest.raises(ValueError, match="needs \\(N, 256\\)"):
        fit_redshift(model, y[:, :100], w)
    with pytest.raises(ValueError, match="latents must have shape"):
        fit_redshift(model, y, w, latents=s_true[:, :2])
