"""Redshift fitting (fastspec.redshift): the χ²(z) scan against a brute-force float64 scan, planted redshifts
recovered with honest uncertainties, the secondary-minimum bookkeeping, and errors."""
import math
import os
import re

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
    r = fit_redshift(model, y, w, refine_steps=150, node_steps=5)
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
    r2 = model.fit_redshift(y, w, latents=s_true, refine_steps=50)  # fixed latents: no node fitting
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


# ---- files and the command ------------------------------------------------------------------------------

FAST = dict(step=4e-3, n_nodes=4, refine_steps=5, polish=1, node_steps=2)


@pytest.fixture(scope="module")
def zdata(tmp_path_factory):
    from test_encode import TINY, write_spectra

    from fastspec.model import ModelConfig, SpectrumAutoencoder

    d = tmp_path_factory.mktemp("redshift")
    torch.manual_seed(0)
    SpectrumAutoencoder(ModelConfig(**TINY)).eval().save(d / "model.pt")
    files = [write_spectra(d / "a.h5", 13, seed=1, id0=100), write_spectra(d / "b.h5", 7, seed=2, id0=9000)]
    return d, str(d / "model.pt"), files


def _read(path):
    from fastspec.redshift import RedshiftFile

    with RedshiftFile(path) as f:
        return {k: f[k] for k in f.row_columns()}


def test_files_rows_in_order_equal_the_api_and_resume(zdata):
    import h5py

    from fastspec import encode as E
    from fastspec.encode import prepare
    from fastspec.model import load_model
    from fastspec.redshift import RedshiftError, RedshiftFile, redshift_files
    from fastspec.spectra_io import open_spectra

    d, model_path, files = zdata
    model = load_model(model_path)
    out = d / "z.h5"
    stats = redshift_files(model, files, out, batch_size=8, flush_rows=8, progress=False, **FAST)
    assert stats.n == 20
    got = _read(out)
    with open_spectra(files[1]) as f:
        b = f.read(0, 7)
    y, w, _ = prepare(b)
    ref = fit_redshift(model, torch.as_tensor(y), torch.as_tensor(w), **FAST)
    # rows 13.. are file b; batches of 8 split it differently from the single call above: same numbers
    np.testing.assert_allclose(got["z_fit"][13:], ref.z.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(got["object_id"][13:], np.arange(9000, 9007))
    np.testing.assert_array_equal(got["Z"][13:], b.z)
    assert got["latents"].shape == (20, model.n_latent)
    # an interrupted run (rows_done 8, rows past it garbled) resumes to the same values
    os.replace(out, E.partial_path(out))
    with h5py.File(E.partial_path(out), "r+") as h:
        h.attrs.modify("complete", False)
        h.attrs.modify("rows_done", np.int64(8))
        h["z_fit"][8:] = np.nan
    with pytest.raises(RedshiftError, match="incomplete output .8 of 20 rows.*fastspec redshift"):
        RedshiftFile(E.partial_path(out))
    stats = redshift_files(model, files, out, batch_size=8, flush_rows=8, progress=False, **FAST)
    assert stats.rows_skipped == 8 and stats.n == 12
    again = _read(out)
    for k in got:
        np.testing.assert_array_equal(again[k], got[k], err_msg=k)
    # complete: nothing to do; other options: a new job
    assert redshift_files(model, files, out, progress=False, **FAST).already_complete
    with pytest.raises(RedshiftError, match="unknown redshift option"):
        redshift_files(model, files, out, progress=False, nodes=3)


def test_cli_shards_merge_and_errors(zdata, tmp_path, capsys):
    import h5py

    from fastspec import cli
    from fastspec.h5format import SpectraWriter
    from fastspec.instruments import get_instrument

    d, model_path, files = zdata
    out = tmp_path / "z.h5"
    fast = ["--step", "4e-3", "--nodes", "4", "--refine", "5", "-q"]
    for i in (0, 1):
        assert cli.main(["redshift", model_path, *files, "-o", str(out), "--shard", f"{i}/2", *fast]) == 0
    assert cli.main(["redshift", "--merge", "-o", str(out), "-q"]) == 0
    merged = _read(out)
    assert len(merged["z_fit"]) == 20 and np.all(np.isfinite(merged["z_fit"]))
    np.testing.assert_array_equal(merged["source_row"], np.r_[np.arange(13), np.arange(7)])
    # errors name file, row and field
    bad = tmp_path / "bad.h5"
    from test_encode import write_spectra

    write_spectra(bad, 5, seed=3, id0=0, nan_row=3)
    assert cli.main(["redshift", model_path, str(bad), "-o", str(tmp_path / "o.h5"), *fast]) == 1
    assert re.search(r"bad\.h5: row 3, field spectrum_flux", capsys.readouterr().err)
    desi = tmp_path / "desi.h5"
    with SpectraWriter(desi, "desi") as w:
        L = get_instrument("desi").L
        w.write(np.ones((2, L)), np.ones((2, L)), np.zeros((2, L), bool), [0.1, 0.2], [0, 0], [1, 2])
    assert cli.main(["redshift", model_path, str(desi), "-o", str(tmp_path / "o.h5"), *fast]) == 1
    assert "desi.h5: spectra of instrument 'desi'" in capsys.readouterr().err
    assert cli.main(["redshift", model_path, str(tmp_path / "missing.h5"), "-o", str(tmp_path / "o.h5")]) == 1
    assert "missing.h5: input file not found" in capsys.readouterr().err
    assert cli.main(["redshift", model_path, files[0], "-o", str(tmp_path / "o.h5"), "--z-min", "0.6"]) == 1
    assert "z_min < z_max" in capsys.readouterr().err
    assert cli.main(["redshift", "--merge", "-o", str(tmp_path / "none.h5")]) == 2
    assert "no finished shard files" in capsys.readouterr().err
    # unknown Z is fine for a redshift fit (it is only copied)
    nan_z = tmp_path / "nan_z.h5"
    write_spectra(nan_z, 3, seed=4, id0=0)
    with h5py.File(nan_z, "r+") as h:
        h["Z"][1] = np.nan
    assert cli.main(["redshift", model_path, str(nan_z), "-o", str(tmp_path / "nz.h5"), *fast]) == 0
    assert np.isnan(_read(tmp_path / "nz.h5")["Z"][1])
    assert not os.path.exists(tmp_path / "o.h5")
