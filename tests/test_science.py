"""Science-check code (fastspec.science, bench/science.py): the pieces against independent references
(numpy interpolation, a planted low-rank model, analytic line fluxes and displacements), and one tiny end-to-end
run of the experiments whose numbers mean nothing but whose outputs must all be there."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastspec.instruments import get_instrument
from fastspec.science import (
    ScienceConfig,
    WeightedPCA,
    crossfit_r2,
    latent_displacement,
    line_flux,
    r2_score,
    signal_error,
    train_variant,
)

REPO = Path(__file__).resolve().parents[1]
SDSS = get_instrument("sdss")


def test_weighted_pca_recovers_a_planted_rank_3_model_from_windowed_data():
    rng = np.random.default_rng(1)
    N, R, S = 400, 300, 3
    grid = np.linspace(0, 1, R)
    comps = np.stack([np.sin(2 * np.pi * (k + 1) * grid) for k in range(S)])
    mean = 1 + 0.3 * grid
    coef = rng.normal(0, [1.0, 0.5, 0.25], (N, S))
    truth = mean + coef @ comps
    w = np.zeros((N, R))
    for n in range(N):  # each spectrum sees a 70% window, as a redshift places it on the restframe grid
        a = rng.integers(0, int(0.3 * R) + 1)
        w[n, a:a + int(0.7 * R)] = 1e4
    x = truth + rng.normal(0, 0.01, (N, R)) * (w > 0)
    pca = WeightedPCA(S).fit(x.astype(np.float32), w.astype(np.float32), n_iter=30)
    # judged where ≥ 10% of the spectra see a pixel (the grid ends are seen by a handful)
    V = pca.components.double().numpy()
    seen = (w > 0).mean(0) >= 0.1
    assert seen.mean() > 0.8
    # the fitted subspace is the planted one: projecting the planted components leaves nothing
    Q = np.linalg.qr(V[:, seen].T)[0]
    resid = comps[:, seen].T - Q @ (Q.T @ comps[:, seen].T)
    assert np.linalg.norm(resid) / np.linalg.norm(comps[:, seen]) < 0.01
    # and every spectrum, including its unobserved stretch, is reconstructed from its observed pixels
    X = truth - pca.mean.double().numpy()
    fit = np.array([np.linalg.lstsq((V * (w[n] > 0)).T, X[n] * (w[n] > 0), rcond=None)[0] for n in range(N)])
    rec = pca.mean.double().numpy() + fit @ V
    assert np.max(np.abs(rec - truth)[:, seen]) < 0.03
    assert pca.history[-1] <= pca.history[0]


def test_pca_fit_observed_recovers_coefficients_of_a_redshifted_model():
    # A 2-component basis on the model's restframe grid, redshifted by plain numpy: fit_observed must find
    # the coefficients and a zero χ² (it redshifts with fastspec.kernels.resample).
    wave_obs, wave_rest = SDSS.wave_obs, SDSS.wave_rest(0.5)
    pca = WeightedPCA(2)
    import torch

    pca.mean = torch.as_tensor(1 + 0.1 * np.tanh((wave_rest - 4000) / 200), dtype=torch.float32)
    pca.components = torch.as_tensor(np.stack([
        np.exp(-0.5 * ((wave_rest - 6564.6) / 3) ** 2), np.tanh((wave_rest - 6000) / 1500)]),
        dtype=torch.float32)
    pca.coverage = torch.ones(wave_rest.size)
    z = np.array([0.02, 0.1, 0.3])
    coef = np.array([[1.0, 0.5], [2.0, -0.3], [0.0, 1.5]])
    rest = pca.mean.double().numpy() + coef @ pca.components.double().numpy()
    y = np.stack([np.interp(wave_obs / (1 + zi), wave_rest, r) for zi, r in zip(z, rest)]).astype(np.float32)
    w = np.full_like(y, 100.0)
    out = pca.fit_observed(y, w, z, wave_rest, wave_obs)
    np.testing.assert_allclose(out["coeffs"], coef, atol=2e-3)
    assert np.all(out["chi2"] < 1e-3)
    assert out["valid"].all()  # z ≤ 0.5: every observed pixel lies on the restframe grid
    # restframe pixels few training spectra covered are left out of the fit (but not out of the χ²)
    pca.coverage = torch.as_tensor(np.where(wave_rest > 8000, 0.01, 0.9), dtype=torch.float32)
    y_bad = y + np.where(wave_obs / (1 + z[:, None]) > 8000, 0.5, 0.0).astype(np.float32)
    cut = pca.fit_observed(y_bad, w, z, wave_rest, wave_obs)
    np.testing.assert_allclose(cut["coeffs"], coef, atol=2e-3)
    assert np.all(cut["chi2"][:2] > 1) and cut["chi2"][2] < 1e-3  # z = 0.3 never reaches 8000 Å restframe
    every = pca.fit_observed(y_bad, w, z, wave_rest, wave_obs, min_coverage=0.0)
    assert np.all(np.abs(every["coeffs"][:2] - coef[:2]).max(1) > 0.03)


def test_line_flux_of_an_analytic_gaussian_on_a_sloped_continuum():
    wave = np.linspace(3600, 3900, 2000)
    flux = np.array([3.0, 0.0, 12.5])
    sigma = np.array([2.0, 3.0, 5.0])
    cont = 0.8 + 1e-3 * (wave - 3700)
    spec = cont + flux[:, None] * np.exp(-0.5 * ((wave - 3728.5) / sigma[:, None]) ** 2) / (
        np.sqrt(2 * np.pi) * sigma[:, None])
    np.testing.assert_allclose(line_flux(wave, spec), flux, atol=2e-3 * flux.max())
    with pytest.raises(ValueError, match="sideband 3680.0–3705.0 Å holds 0 pixels"):
        line_flux(np.linspace(3706, 3900, 100), spec[:, :100])


def test_latent_displacement_and_signal_error_on_constructed_cases():
    rng = np.random.default_rng(2)
    sample = rng.normal(0, [2.0, 1.0, 0.5], (5000, 3))
    sigma = math.sqrt(4 + 1 + 0.25)
    native = sample[:4]
    step = np.array([0.3, 0.4, 0.0])  # length 0.5
    moved = native[:, None, :] + np.arange(3)[None, :, None] * step  # displaced by 0, 0.5, 1.0
    d = latent_displacement(moved, native, sample)
    assert d["sigma_sample"] == pytest.approx(sigma, rel=0.03)
    np.testing.assert_allclose(d["displacement"], np.tile([0, 0.5, 1.0], (4, 1)) / d["sigma_sample"], rtol=1e-12)
    np.testing.assert_allclose(d["rms"], np.sqrt((0.25 + 1.0) / 3) / d["sigma_sample"], rtol=1e-12)
    # scale-free versions: against the 5th-nearest-neighbour distance, and the rank of the galaxy itself
    d = latent_displacement(moved, native, sample, native_index=np.arange(4))
    d5 = np.array([np.sort(np.linalg.norm(sample - native[i], axis=1))[5] for i in range(4)])
    np.testing.assert_allclose(d["local"], np.arange(3)[None, :] * 0.5 / d5[:, None], rtol=1e-9)
    assert (d["self_rank"][:, 0] == 0).all()
    brute = [[int((np.linalg.norm(sample - moved[i, k], axis=1) < np.linalg.norm(native[i] - moved[i, k])).sum())
              for k in range(3)] for i in range(4)]
    np.testing.assert_array_equal(d["self_rank"], brute)
    assert 1.0 < d["effective_dimensions"] < 3.0  # variances 4 : 1 : 0.25 → (5.25)² / 17.06 ≈ 1.6
    # signal error: residual of exactly 1σ on every valid weighted pixel → 1
    w = np.full((2, 10), 4.0, np.float32)
    w[1, :3] = 0
    valid = np.ones((2, 10), bool)
    valid[0, -2:] = False
    truth = np.zeros((2, 10))
    np.testing.assert_allclose(signal_error(truth, np.full((2, 10), 0.5), w, valid), [1.0, 1.0])


def test_held_out_r2_of_the_regressors():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(600, 4))
    signal = X[:, 0] + 0.5 * X[:, 1] ** 2
    Y = np.stack([signal + 0.1 * rng.normal(size=600), rng.normal(size=600)], 1)
    for method in ("knn", "ridge"):
        r2 = crossfit_r2(X, Y, method)
        assert r2[0] > 0.8, method  # a smooth function of the predictors is recovered
        assert r2[1] < 0.05, method  # noise is not
    # r2_score against its definition
    yt, yp = np.array([[1.0], [2.0], [4.0]]), np.array([[1.5], [2.0], [3.0]])
    assert r2_score(yt, yp)[0] == pytest.approx(1 - 1.25 / (14 / 3))


def test_unknown_mode_bad_options_and_missing_real_data_are_reported(capsys):
    from fastspec import cli

    with pytest.raises(ValueError, match="mode must be one of smoke, quick, full"):
        ScienceConfig.for_mode("fast")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "science.py"), "--smoke", "--real-dir", "/nonexistent"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "/nonexistent/MANIFEST.tsv not found" in proc.stderr
    assert cli.main(["science", "--smoke", "--variants", "a,x"]) == 2
    assert "--variants takes a comma list of a, b, c, d, got 'a,x'" in capsys.readouterr().err
    assert cli.main(["science", "--smoke", "--seeds", "0"]) == 2
    assert "--seeds must be ≥ 1, got 0" in capsys.readouterr().err
    assert cli.main(["science", "--smoke", "--s-scan", "2,x"]) == 2
    assert "--s-scan takes a comma list of positive latent sizes, got '2,x'" in capsys.readouterr().err
    assert cli.main(["science", "--smoke", "--mock-features", "shiny"]) == 2
    assert "--mock-features: unknown mock feature(s) 'shiny'" in capsys.readouterr().err
    assert cli.main(["science", "--smoke", "--real-dr14", "/nonexistent"]) == 2
    assert "/nonexistent/MANIFEST.tsv not found (pass --real-dr14 '' to skip" in capsys.readouterr().err
    assert cli.main(["science", "--smoke", "--steps", "0"]) == 2
    assert "--steps must be ≥ 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["science"])  # a mode is required
    assert "one of the arguments --quick --full --smoke is required" in capsys.readouterr().err


def test_smoke_run_through_the_cli_writes_every_experiment(tmp_path, real_data_dir, capsys):
    from fastspec import cli

    work, out = tmp_path / "work", tmp_path / "out"
    dr14 = real_data_dir / "sdss-dr14"
    rc = cli.main(["science", "--smoke", "--workdir", str(work), "-o", str(out), "--real-dir", str(real_data_dir),
                   "--real-dr14", str(dr14), "--device", "cpu", "-q"])
    assert rc == 0
    assert "science-smoke.md" in capsys.readouterr().out
    saved = json.loads((out / "science-smoke.json").read_text())
    cfg = ScienceConfig.for_mode("smoke", workdir=str(work), out_dir=str(out), real_dir=str(real_data_dir),
                                 real_dr14=str(dr14), progress=False, device="cpu")
    assert saved["mode"] == "smoke" and saved["config"] == json.loads(json.dumps(cfg.to_dict()))
    for key in ("fidelity", "method_scan", "extended_restframe", "redshift_invariance", "latent_physics",
                "real_spectra", "learning_curve", "fidelity_by_wavelength"):
        assert key in saved, key
    # two seeds of every variant and variant (a) at S = 2: 10 trainings; the scan's rows are the runs' medians
    ms = saved["method_scan"]
    assert len(saved["scan_training"]) == 10 and set(ms["by_S"]) == {"2", "10"}
    assert ms["by_S"]["10"]["ae_one_pass"][0] == pytest.approx(saved["fidelity"]["ae_a"]["chi2"]["median"], rel=1e-6)
    assert ms["by_S"]["2"]["pca"] == pytest.approx(saved["fidelity"]["pca_rank_scan"]["S=2"]["chi2"]["median"], rel=1e-6)
    assert all(len(v["one_pass"]) == 2 for v in ms["by_variant"].values())
    assert "## 1b. AE against PCA over S and seeds" in (out / "science-smoke.md").read_text()
    claims_md = (out / "science-smoke.md").read_text().split("## The paper's claims")[1].split("## Findings")[0]
    assert claims_md.count("| **") >= 5 and "redshift-invariant" in claims_md and "real SDSS galaxies" in claims_md
    # real DR14 galaxies: split by object_group, every spectrum of a galaxy on one side, two seeds, PCA beside
    rh = saved["real_heldout"]
    assert rh["n_files"] == 697 and rh["n_train"] + rh["n_test"] == rh["n_spectra"] > 600 and set(rh["ae"]) == {"1", "2"}
    assert all(a["refined"]["median"] <= a["one_pass"]["median"] * (1 + 1e-6) for a in rh["ae"].values())
    assert rh["pca"]["chi2"]["n"] == rh["n_test"] and rh["pca"]["repeats"]["n_spectra"] > 0
    assert "## 7. Real galaxies: trained and tested on SDSS DR14" in (out / "science-smoke.md").read_text()
    assert set(saved["redshift_invariance"]["variants"]) == {"ae_a", "ae_b", "ae_c", "ae_d"}
    assert set(saved["redshift_invariance"]["rerendered"]) == {"ae_a", "ae_b", "ae_c", "ae_d"}
    assert all(0 <= v["noise_floor_self_retrieval"] <= 1 for v in saved["redshift_invariance"]["rerendered"].values())
    assert saved["training"]["ae_d"]["consistency"] == cfg.consistency and saved["training"]["ae_d"]["consistency_sigma"] == "whiten"
    assert saved["training"]["ae_c"]["consistency"] == cfg.consistency
    # every phase has its wall and CPU time
    for phase in ("data", "training", "pca", "encode", "analysis", "real"):
        assert saved["timings"][f"{phase}_s"] > 0 and saved["timings"][f"{phase}_cpu_s"] >= 0, phase
    # the noiseless truth fits the mock data to χ² ≈ 1: the noise model and the χ² definition agree
    assert 0.9 < saved["fidelity"]["truth_model"]["chi2"]["median"] < 1.1
    # the learning curve ends at the final model: its last point is the fidelity experiment's median χ²
    lc = saved["learning_curve"]
    assert lc["pca_median_chi2"] == saved["fidelity"]["pca"]["chi2"]["median"]
    for v in ("ae_a", "ae_b", "ae_c", "ae_d"):
        pts = lc["variants"][v]
        assert pts[-1]["spectra_seen"] == cfg.steps * cfg.batch_size
        assert pts[-1]["median_chi2"] == pytest.approx(saved["fidelity"][v]["chi2"]["median"], rel=1e-6)
    # refined latents: a row per variant on the first n_refine spectra, never worse than the encoder's for any
    # spectrum, so nor in median over the same spectra
    for v in ("ae_a", "ae_b", "ae_c", "ae_d"):
        row = saved["fidelity"][f"{v}_refined"]
        assert row["n_spectra"] == row["chi2"]["n"] == cfg.n_refine < saved["fidelity"][v]["n_spectra"]
        assert row["one_pass_chi2_same_spectra"]["n"] == row["pca_chi2_same_spectra"]["n"] == cfg.n_refine
        assert row["chi2"]["median"] <= row["one_pass_chi2_same_spectra"]["median"] * (1 + 1e-6)
    assert "refined latents" in (out / "science-smoke.md").read_text()
    # every bundled SDSS-spectrograph file is ingested and scored
    assert saved["real_spectra"]["n_ingested"] == saved["real_spectra"]["files"] >= 10
    assert all(math.isfinite(r["chi2_pca"]) for r in saved["real_spectra"]["per_spectrum"])
    for name in saved["figures"].values():
        assert (out / name).stat().st_size > 10_000, name
    md = (out / "science-smoke.md").read_text()
    assert "## 3. Redshift invariance" in md and f"{cfg.steps} steps × {cfg.batch_size} spectra" in md
    assert "Learning curve" in md
    # the Markdown can be rewritten from the JSON alone, with a note added to both
    assert cli.main(["science", "--smoke", "--markdown-only", "-o", str(out), "--note", "load 0.1 throughout"]) == 0
    assert "*Note:* load 0.1 throughout" in (out / "science-smoke.md").read_text()
    assert json.loads((out / "science-smoke.json").read_text())["note"] == "load 0.1 throughout"
    assert cli.main(["science", "--quick", "--markdown-only", "-o", str(out)]) == 2
    assert "science-quick.json not found: run the experiments first" in capsys.readouterr().err
    # the same settings again reuse the trained model instead of training again
    again = train_variant(cfg, "a", str(work / "train-smoke.h5"))
    assert again.pop("reused") and again == saved["training"]["ae_a"]


@pytest.mark.parametrize("features", ["rich", "basic"])
def test_oii_oracle_leaves_exactly_the_scatter_the_mocks_draw(features):
    """The [O II] ceiling: the mocks' own relation on the true class, Hβ, [N II]/Hα and dust. Against the drawn
    line fluxes, what remains must be the relation's lognormal scatter (0.1 dex star-forming, 0.15 dex others),
    centred where the mean of a lognormal puts it."""
    from fastspec.mock import LINE_NAMES, make_mock
    from fastspec.science.experiments.extended_restframe import oracle_prediction

    m = make_mock(4000, seed=11, features=features)
    lowz = {f"truth/{k}": v for k, v in m.truth.items()}
    pred = oracle_prediction(lowz)
    lf = m.truth["line_flux"]
    oii = lf[:, LINE_NAMES.index("OII_3726")] + lf[:, LINE_NAMES.index("OII_3729")]
    cls = m.truth["line_class"] if features == "rich" else np.where(m.truth["quiescent"], 3, 0)
    for c, sigma in ((0, 0.1), (3, 0.15)):
        sel = (cls == c) & (oii > 0)
        assert sel.sum() > 300, (features, c, sel.sum())
        resid = np.log10(oii[sel] / pred[sel])
        assert np.std(resid) == pytest.approx(sigma, rel=0.08), (features, c)
        # three standard errors of a mean
        assert np.mean(resid) == pytest.approx(-0.5 * sigma**2 * math.log(10), abs=3 * sigma / math.sqrt(sel.sum()))
    if features == "rich":  # line-free galaxies have no [O II] and the oracle knows it
        assert np.all(pred[cls == 5] == 0) and np.all(oii[cls == 5] == 0)
